"""AutoAWQ "GEMM" safetensors layout (what AutoAWQ writes, transformers/vLLM read), per linear `<prefix>.`:

    qweight int32 [in, out/8]        word j of input row i holds outputs 8j..8j+7; nibble p (bits 4p..4p+3)
                                     holds output 8j + ORDER[p], ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
    qzeros  int32 [n_groups, out/8]  zero points, packed the same way (stored as is, no -1)
    scales  fp16  [n_groups, out]
    W[o, i] = (q[i, o] - z[i // group_size, o]) * s[i // group_size, o]

4-bit only (AutoAWQ's GEMM packing has no other width) and whole groups only (its kernels and
dequantizer index groups as in // group_size, so in_features must divide). config.json
quantization_config: {quant_method "awq", version "gemm", bits, group_size, zero_point}.
Importing this module registers the reader for quant_method "awq" (GEMM checkpoints).
"""

from __future__ import annotations

import torch

from ..errors import BadInput, QuantkitError
from ..graph import LazyTensor
from ..quant.grid import QuantizedLinear, contiguous_g_idx, n_groups_for
from .hf_quantized import register

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble p holds element ORDER[p] of its 8
AWQ_BITS = 4


def _pack_rows(v: torch.Tensor) -> torch.Tensor:
    """int values [rows, n] (n % 8 == 0, 0..15) -> int32 [rows, n/8] in AWQ nibble order."""
    v = v.to(torch.int64).reshape(v.shape[0], -1, 8)[:, :, list(ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=v.device)
    w = (v << shifts).sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _unpack_rows(w: torch.Tensor) -> torch.Tensor:
    """int32 [rows, n/8] -> int32 [rows, n] (inverse of _pack_rows)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=w.device)
    nib = ((w.to(torch.int64)[:, :, None] & 0xFFFFFFFF) >> shifts) & 0xF  # [rows, n/8, 8] in nibble order
    out = torch.empty_like(nib)
    out[:, :, list(ORDER)] = nib
    return out.reshape(w.shape[0], -1).to(torch.int32)


def check_gemm(ql: QuantizedLinear, name: str, allow_partial: bool = False) -> None:
    if ql.bits != AWQ_BITS:
        raise QuantkitError(f"{name}: the AWQ GEMM layout holds 4-bit weights only, got {ql.bits}-bit; "
                            "use --format compressed-tensors for other widths")
    if ql.out_features % 8:
        raise QuantkitError(f"{name}: out_features={ql.out_features} is not a multiple of 8 (AWQ GEMM packs "
                            "8 outputs per int32)")
    if not ql.has_trivial_g_idx():
        raise QuantkitError(f"{name}: regrouped columns (g_idx) cannot be stored in the AWQ GEMM layout")
    if not allow_partial and ql.group_size != -1 and ql.in_features % ql.group_size:
        raise QuantkitError(f"{name}: in_features={ql.in_features} is not a multiple of group_size="
                            f"{ql.group_size}; the AWQ GEMM layout needs whole groups (use a dividing "
                            "--group-size such as 64 or 32, or -1)")
    if bool((ql.zeros < 0).any()) or bool((ql.zeros > 15).any()):
        raise QuantkitError(f"{name}: zero points outside [0, 15] cannot be stored at 4 bits")


def pack_awq_gemm(ql: QuantizedLinear, name: str = "linear", allow_partial: bool = False) -> dict[str, torch.Tensor]:
    """QuantizedLinear -> {qweight, qzeros, scales[, bias]} (names without the module prefix)."""
    check_gemm(ql, name, allow_partial)
    scales = ql.scales.to(torch.float16)
    if not torch.equal(scales.to(ql.scales.dtype), ql.scales):
        raise QuantkitError(f"{name}: scales are not exactly representable in float16; quantize with "
                            "scale_dtype=torch.float16")
    out = {"qweight": _pack_rows(ql.codes.T.contiguous()), "qzeros": _pack_rows(ql.zeros.T.contiguous()),
           "scales": scales.T.contiguous()}
    if ql.bias is not None:
        out["bias"] = ql.bias.to(torch.float16)
    return out


def unpack_awq_gemm(t: dict[str, torch.Tensor], group_size: int, name: str = "linear",
                    sym: bool = False) -> QuantizedLinear:
    """{qweight, qzeros, scales[, bias]} -> QuantizedLinear (a last partial group is read when scales have
    ceil(in / group_size) rows: quantkit's keep-fp16 layout uses that)."""
    for k in ("qweight", "qzeros", "scales"):
        if k not in t:
            raise BadInput(f"{name}: AWQ tensor '{k}' is missing")
    qw, qz, sc = t["qweight"], t["qzeros"], t["scales"]
    if qw.dtype != torch.int32 or qz.dtype != torch.int32 or qw.dim() != 2 or qz.dim() != 2:
        raise BadInput(f"{name}: AWQ qweight/qzeros must be 2-D int32, got {qw.dtype} {tuple(qw.shape)} / "
                       f"{qz.dtype} {tuple(qz.shape)}")
    in_f, out_f = qw.shape[0], qw.shape[1] * 8
    g = n_groups_for(in_f, group_size)
    if tuple(sc.shape) != (g, out_f) or tuple(qz.shape) != (g, out_f // 8) or not sc.is_floating_point():
        raise BadInput(f"{name}: AWQ scales {tuple(sc.shape)} / qzeros {tuple(qz.shape)} do not fit qweight "
                       f"{tuple(qw.shape)} with group_size {group_size} "
                       f"(expected ({g}, {out_f}) / ({g}, {out_f // 8}))")
    codes = _unpack_rows(qw).T.to(torch.uint8).contiguous()
    zeros = _unpack_rows(qz).T.contiguous()
    return QuantizedLinear(codes=codes, scales=sc.T.contiguous(), zeros=zeros,
                           g_idx=contiguous_g_idx(in_f, group_size), bits=AWQ_BITS, group_size=group_size,
                           sym=sym, bias=t.get("bias"))


def awq_quantization_config(group_size: int, zero_point: bool = True) -> dict:
    """config.json `quantization_config` of an AutoAWQ GEMM checkpoint (transformers' AwqConfig keys)."""
    return {"quant_method": "awq", "version": "gemm", "bits": AWQ_BITS, "group_size": group_size,
            "zero_point": zero_point, "modules_to_not_convert": None}


def _qc_params(qc: dict, source: str) -> tuple[int, int, bool, str]:
    bits = qc.get("bits", qc.get("w_bit", AWQ_BITS))
    gs = qc.get("group_size", qc.get("q_group_size"))
    version = str(qc.get("version", "gemm")).lower()
    if gs is None or not isinstance(gs, int) or (gs <= 0 and gs != -1):
        raise BadInput(f"{source}: quantization_config.group_size={gs!r}; expected a positive integer or -1")
    if bits != AWQ_BITS:
        raise BadInput(f"{source}: AWQ bits={bits}; only 4-bit AWQ checkpoints exist (GEMM layout)")
    return bits, gs, bool(qc.get("zero_point", True)), version


def quantized_modules(files: dict, source: str, parts=("qweight", "qzeros", "scales")) -> dict[str, dict]:
    """Module prefix -> {part: (file, key)} for every module that has a `qweight`."""
    mods: dict[str, dict] = {}
    for name in files:
        pre, _, part = name.rpartition(".")
        if part == "qweight":
            mods[pre] = {}
    for pre, d in mods.items():
        for p in parts:
            if f"{pre}.{p}" not in files:
                raise BadInput(f"{source}: quantized module '{pre}' has qweight but no '{pre}.{p}'")
            d[p] = files[f"{pre}.{p}"]
    return mods


def passthrough(files: dict, skip: set[str]) -> dict[str, LazyTensor]:
    out = {}
    for name, (sf, key) in files.items():
        if name in skip:
            continue
        e = sf.entries[key]
        out[name] = LazyTensor(e.shape, e.dtype, lambda sf=sf, key=key: sf.tensor(key), source=f"{sf.path}:{key}",
                               nbytes=e.end - e.start)
    return out


def read_awq(files: dict, qc: dict, source: str) -> dict[str, LazyTensor]:
    """HF name -> lazy tensor; each quantized module's `X.weight` is presented dequantized (float32, exact)."""
    _, gs, zp, version = _qc_params(qc, source)
    if version != "gemm":
        raise BadInput(f"{source}: AWQ version '{version}' is not supported (only 'gemm' checkpoints are read)")
    mods = quantized_modules(files, source)
    skip = {f"{pre}.{p}" for pre, d in mods.items() for p in d}
    out = passthrough(files, skip)
    for pre, d in mods.items():
        (sf, kq) = d["qweight"]
        in_f, out_w = sf.entries[kq].shape
        nbytes = sum(f.entries[k].end - f.entries[k].start for f, k in d.values())

        def load(d=d, pre=pre):
            t = {p: f.tensor(k) for p, (f, k) in d.items()}
            return unpack_awq_gemm(t, gs, pre, sym=not zp).dequantize(torch.float32)
        out[f"{pre}.weight"] = LazyTensor((out_w * 8, in_f), "F32", load, source=f"{sf.path}:{pre} (AWQ)",
                                          nbytes=nbytes)
    return out


register("awq", read_awq)
