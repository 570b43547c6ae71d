"""GPTQ safetensors layout (AutoGPTQ / GPTQModel), per linear layer `<prefix>.`:

    qweight int32 [in*bits/32, out]   codes packed along the input dim
    qzeros  int32 [n_groups, out*bits/32]   zero-points packed along the output dim
    scales  fp16  [n_groups, out]
    g_idx   int32 [in]                group of each input column

Packing is a dense little-endian bitstream: value k of a packed run starts at bit
k*bits (word k*bits // 32, LSB first); 3-bit values straddle words (32 values in 3 words).
checkpoint_format "gptq" (v1) stores zero - 1, "gptq_v2" stores the zero itself.
"""

from __future__ import annotations

import math

import torch

from quantkit._version import __version__
from quantkit.errors import QuantkitError
from quantkit.quant.grid import QuantizedLinear, contiguous_g_idx, n_groups_for

GPTQ_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _bit_plan(bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(32, device=device, dtype=torch.int64) * bits
    return pos // 32, pos % 32


def pack_bits(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integers in [0, 2^bits) along `dim` into int32 words (dense LSB-first stream).

    The packed dim gets ceil(n * bits / 32) words.
    """
    v = values.to(torch.int64).movedim(dim, -1)
    n = v.shape[-1]
    n_words = -(-n * bits // 32)
    pad = -n % 32
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    lead = v.shape[:-1]
    v = v.reshape(*lead, -1, 32)
    word, off = _bit_plan(bits, v.device)
    out = torch.zeros(*v.shape[:-1], bits, dtype=torch.int64, device=v.device)
    idx = word.expand_as(v)
    out.scatter_add_(-1, idx, (v << off) & 0xFFFFFFFF)
    spill = off + bits > 32  # high bits continue in the next word
    if bool(spill.any()):
        out.scatter_add_(-1, (idx + 1)[..., spill], v[..., spill] >> (32 - off[spill]))
    out = out.reshape(*lead, -1)[..., :n_words]
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.movedim(-1, dim).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """Inverse of pack_bits: `count` values (int32) along `dim`."""
    w = packed.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    n_words = w.shape[-1]
    groups = -(-count // 32)
    need = groups * bits + 1
    w = torch.nn.functional.pad(w, (0, need - n_words))
    lead = w.shape[:-1]
    word, off = _bit_plan(bits, w.device)
    base = (torch.arange(groups, device=w.device) * bits)[:, None] + word[None, :]  # [groups, 32]
    lo = w[..., base] >> off
    hi = w[..., base + 1] << (32 - off)
    vals = (lo | hi) & (2**bits - 1)
    return vals.reshape(*lead, groups * 32)[..., :count].to(torch.int32).movedim(-1, dim).contiguous()


def _check_format(fmt: str) -> None:
    if fmt not in CHECKPOINT_FORMATS:
        raise QuantkitError(f"checkpoint_format={fmt!r}; expected one of {CHECKPOINT_FORMATS}")


def _check_packable(bits: int, in_f: int, out_f: int, name: str) -> None:
    if bits not in GPTQ_BITS:
        raise QuantkitError(f"{name}: {bits}-bit is not a GPTQ layout; expected one of {GPTQ_BITS}")
    if (in_f * bits) % 32 or (out_f * bits) % 32:
        raise QuantkitError(
            f"{name}: [{out_f}, {in_f}] cannot be packed at {bits} bits; "
            f"in and out features must fill whole int32 words (multiples of {32 // math.gcd(32, bits)})"
        )


def pack_gptq(ql: QuantizedLinear, checkpoint_format: str = "gptq", name: str = "linear") -> dict[str, torch.Tensor]:
    """QuantizedLinear -> {qweight, qzeros, scales, g_idx[, bias]} (tensor names without prefix)."""
    _check_format(checkpoint_format)
    _check_packable(ql.bits, ql.in_features, ql.out_features, name)
    scales = ql.scales.to(torch.float16)
    if not torch.equal(scales.to(ql.scales.dtype), ql.scales):
        raise QuantkitError(
            f"{name}: scales are not exactly representable in float16; quantize with scale_dtype=torch.float16"
        )
    zeros = ql.zeros.to(torch.int64)
    maxq = 2**ql.bits - 1
    if checkpoint_format == "gptq":
        zeros = zeros - 1
        if bool((zeros < 0).any()):
            raise QuantkitError(
                f"{name}: a zero-point of 0 cannot be stored in checkpoint_format 'gptq' "
                "(v1 stores zero-1); use 'gptq_v2'"
            )
    if bool((zeros > maxq).any()) or bool((zeros < 0).any()):
        raise QuantkitError(f"{name}: zero-points outside [0, {maxq}] cannot be stored at {ql.bits} bits")
    out = {
        "qweight": pack_bits(ql.codes.T, ql.bits, dim=0),
        "qzeros": pack_bits(zeros.T, ql.bits, dim=1),
        "scales": scales.T.contiguous(),
        "g_idx": ql.g_idx.to(torch.int32).contiguous(),
    }
    if ql.bias is not None:
        out["bias"] = ql.bias
    return out


def unpack_gptq(
    tensors: dict[str, torch.Tensor],
    bits: int,
    group_size: int,
    sym: bool,
    checkpoint_format: str = "gptq",
    name: str = "linear",
) -> QuantizedLinear:
    """{qweight, qzeros, scales[, g_idx][, bias]} -> QuantizedLinear (zeros decoded as kernels do)."""
    _check_format(checkpoint_format)
    for key in ("qweight", "qzeros", "scales"):
        if key not in tensors:
            raise QuantkitError(f"{name}: missing GPTQ tensor '{key}'")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or qweight.dim() != 2 or qzeros.dim() != 2:
        raise QuantkitError(f"{name}: qweight/qzeros must be 2-D int32")
    if bits not in GPTQ_BITS:
        raise QuantkitError(f"{name}: {bits}-bit is not a GPTQ layout; expected one of {GPTQ_BITS}")
    in_f, out_f = qweight.shape[0] * 32 // bits, qweight.shape[1]
    n_groups = n_groups_for(in_f, group_size)
    if scales.shape != (n_groups, out_f) or qzeros.shape != (n_groups, out_f * bits // 32):
        raise QuantkitError(
            f"{name}: scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not fit qweight "
            f"{tuple(qweight.shape)} at bits={bits}, group_size={group_size}"
        )
    codes = unpack_bits(qweight, bits, in_f, dim=0).T.to(torch.uint8).contiguous()
    zeros = unpack_bits(qzeros, bits, out_f, dim=1).T.contiguous()
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        g_idx = contiguous_g_idx(in_f, group_size, qweight.device)
    if g_idx.shape != (in_f,):
        raise QuantkitError(f"{name}: g_idx has shape {tuple(g_idx.shape)}; expected [{in_f}]")
    g_idx = g_idx.to(torch.int32)
    ql = QuantizedLinear(
        codes=codes,
        scales=scales.T.contiguous(),
        zeros=zeros,
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=False,
        bias=tensors.get("bias"),
    )
    ql.desc_act = not ql.has_trivial_g_idx()
    return ql


def gptq_quantization_config(
    bits: int,
    group_size: int,
    desc_act: bool,
    sym: bool,
    checkpoint_format: str = "gptq",
    static_groups: bool = False,
    damp_percent: float = 0.01,
    damp_auto_increment: float = 0.0025,
    true_sequential: bool = True,
    lm_head: bool = False,
) -> dict:
    """config.json `quantization_config` as GPTQModel writes it (tool facts under `meta`);
    the AutoGPTQ-era top-level keys are kept too since transformers/optimum read them."""
    _check_format(checkpoint_format)
    if bits not in GPTQ_BITS:
        raise QuantkitError(f"GPTQ bits={bits}; expected one of {GPTQ_BITS}")
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "lm_head": lm_head,
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
        "pack_dtype": "int32",
        "static_groups": static_groups,
        "damp_percent": damp_percent,
        "true_sequential": true_sequential,
        "meta": {
            "quantizer": [f"quantkit:{__version__}"],
            "damp_percent": damp_percent,
            "damp_auto_increment": damp_auto_increment,
            "static_groups": static_groups,
            "true_sequential": true_sequential,
            "mse": 0.0,
        },
    }
