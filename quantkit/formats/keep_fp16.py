"""quantkit's salient-channel layout: a few input columns of each linear kept in float16, the rest 4-bit AWQ.

Per linear `<prefix>.` (in_features = n, k columns kept, m = n - k quantized):

    qweight          int32 [m, out/8]      AutoAWQ GEMM packing (awq_layout) of the quantized columns,
    qzeros           int32 [G, out/8]      in ascending original order; groups of group_size run over
    scales           fp16  [G, out]        these m columns, G = ceil(m / group_size) (last group may be partial)
    weight_fp16_cols fp16  [out, k]        the kept columns, in the order of weight_fp16_idx
    weight_fp16_idx  int32 [k]             their original column indices, ascending

config.json quantization_config: {quant_method "quantkit-awq-keep-fp16", format_version 1, bits 4,
group_size, zero_point, version "gemm", keep_fp16_percent}. Other engines do not read this method (it is
named apart from "awq" so they refuse it instead of misreading it); quantkit's reader presents the dense
weight W[:, idx] = cols, W[:, rest] = dequantized codes. GGUF cannot hold per-channel mixed precision.
"""

from __future__ import annotations

import torch

from ..errors import BadInput
from ..graph import LazyTensor
from ..quant.grid import AWQLinear
from .awq_layout import AWQ_BITS, pack_awq_gemm, passthrough, quantized_modules, unpack_awq_gemm
from .hf_quantized import register

METHOD = "quantkit-awq-keep-fp16"
FORMAT_VERSION = 1


def pack_keep_fp16(a: AWQLinear, name: str = "linear") -> dict[str, torch.Tensor]:
    if a.fp16_idx is None:
        raise BadInput(f"{name}: no float16 columns to store (keep_fp16 was 0)")
    out = pack_awq_gemm(a.ql, name, allow_partial=True)
    out["weight_fp16_cols"] = a.fp16_cols.to(torch.float16).contiguous()
    out["weight_fp16_idx"] = a.fp16_idx.to(torch.int32).contiguous()
    return out


def unpack_keep_fp16(t: dict[str, torch.Tensor], group_size: int, name: str = "linear",
                     sym: bool = False) -> AWQLinear:
    for k in ("weight_fp16_cols", "weight_fp16_idx"):
        if k not in t:
            raise BadInput(f"{name}: keep-fp16 tensor '{k}' is missing")
    ql = unpack_awq_gemm(t, group_size, name, sym)
    idx, cols = t["weight_fp16_idx"], t["weight_fp16_cols"]
    k = idx.numel()
    n = ql.in_features + k
    if idx.dtype != torch.int32 or idx.dim() != 1 or tuple(cols.shape) != (ql.out_features, k):
        raise BadInput(f"{name}: weight_fp16_idx {idx.dtype} {tuple(idx.shape)} / weight_fp16_cols "
                       f"{tuple(cols.shape)}: expected int32 [k] and [{ql.out_features}, k]")
    if k and (int(idx.min()) < 0 or int(idx.max()) >= n or not bool((idx[1:] > idx[:-1]).all())):
        raise BadInput(f"{name}: weight_fp16_idx must be ascending distinct column indices in [0, {n})")
    return AWQLinear(ql, n, idx, cols)


def keep_fp16_quantization_config(group_size: int, percent: float, zero_point: bool = True) -> dict:
    return {"quant_method": METHOD, "format_version": FORMAT_VERSION, "bits": AWQ_BITS, "group_size": group_size,
            "zero_point": zero_point, "version": "gemm", "keep_fp16_percent": percent}


def read_keep_fp16(files: dict, qc: dict, source: str) -> dict[str, LazyTensor]:
    gs = qc.get("group_size")
    if qc.get("format_version") != FORMAT_VERSION or not isinstance(gs, int) or (gs <= 0 and gs != -1):
        raise BadInput(f"{source}: {METHOD} config needs format_version {FORMAT_VERSION} and an integer "
                       f"group_size, got {qc.get('format_version')!r} / {gs!r}")
    sym = not qc.get("zero_point", True)
    parts = ("qweight", "qzeros", "scales", "weight_fp16_cols", "weight_fp16_idx")
    mods = quantized_modules(files, source, parts)
    skip = {f"{pre}.{p}" for pre, d in mods.items() for p in d}
    out = passthrough(files, skip)
    for pre, d in mods.items():
        sf, kq = d["qweight"]
        m, out_w = sf.entries[kq].shape
        fi, ki = d["weight_fp16_idx"]
        n = m + fi.entries[ki].shape[0]
        nbytes = sum(f.entries[k].end - f.entries[k].start for f, k in d.values())

        def load(d=d, pre=pre):
            t = {p: f.tensor(k) for p, (f, k) in d.items()}
            return unpack_keep_fp16(t, gs, pre, sym).dequantize(torch.float32)
        out[f"{pre}.weight"] = LazyTensor((out_w * 8, n), "F32", load, source=f"{sf.path}:{pre} (keep-fp16)",
                                          nbytes=nbytes)
    return out


register(METHOD, read_keep_fp16)
