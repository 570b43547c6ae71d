"""Torch fallbacks: dequantize a PackedWeight to float32 [N, K] and run F.linear.

Used when there is no CUDA (and no forced Triton interpreter). Vectorized, no per-block loops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from quantkit.errors import QuantkitError
from quantkit.kernels.packed import AWQ_ORDER, PackedWeight
from quantkit.quant import ggml_types

# E2M1 magnitudes doubled (ggml's kvalues_mxfp4); the scale is then 2^(e-128).
_E2M1X2 = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=torch.float32)


def _unpack_bits(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words holding 32/bits fields LSB-first along `dim` -> unsigned codes, that dim 32/bits times longer."""
    p = packed.movedim(dim, -1)
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    codes = ((p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(*p.shape[:-1], -1)
    return codes.movedim(-1, dim)


def dequant_gptq(pw: PackedWeight) -> torch.Tensor:
    t = pw.tensors
    n, k = pw.shape
    q = _unpack_bits(t["qweight"], pw.bits, dim=-2)  # [..., K, N]
    z = _unpack_bits(t["qzeros"], pw.bits, dim=-1) + pw.zero_offset  # [..., G, N]
    if "g_idx" in t:
        g = t["g_idx"].long()
        s = torch.gather(t["scales"].float(), -2, g.unsqueeze(-1).expand(*g.shape, n))
        z = torch.gather(z, -2, g.unsqueeze(-1).expand(*g.shape, n))
    else:
        s = t["scales"].float().repeat_interleave(pw.group_size, dim=-2)[..., :k, :]
        z = z.repeat_interleave(pw.group_size, dim=-2)[..., :k, :]
    return ((q - z).float() * s).transpose(-1, -2).contiguous()


def dequant_awq(pw: PackedWeight) -> torch.Tensor:
    t = pw.tensors
    n, k = pw.shape
    # nibble p of packed column j holds column 8j + AWQ_ORDER[p]: undo the permutation
    inv = torch.argsort(torch.tensor(AWQ_ORDER)).to(t["qweight"].device)

    def unpack(p: torch.Tensor) -> torch.Tensor:
        c = _unpack_bits(p, 4, dim=-1).reshape(*p.shape, 8)
        return c[..., inv].reshape(*p.shape[:-1], p.shape[-1] * 8)

    q = unpack(t["qweight"])  # [..., K, N]
    z = unpack(t["qzeros"]).repeat_interleave(pw.group_size, dim=-2)[..., :k, :]
    s = t["scales"].float().repeat_interleave(pw.group_size, dim=-2)[..., :k, :]
    return ((q - z).float() * s).transpose(-1, -2).contiguous()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., m] bytes -> [..., 2m]: low nibbles of all bytes, then high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """2^(e-128) for E8M0 bytes, exact (float32 subnormals for e < 2), as ggml's e8m0_to_fp32_half."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32, device=e.device) << e, (e - 1) << 23)
    return bits.view(torch.float32)


def dequant_ggml(data: torch.Tensor, qtype: QT, n_per_row: int) -> torch.Tensor:
    """uint8 [..., rows, row_bytes] ggml blocks -> float32 [..., rows, n_per_row].

    MXFP4 is decoded here; the other types go through quantkit.quant.ggml_types (the project's codec)."""
    if qtype != QT.MXFP4:
        return ggml_types.dequantize(data, qtype, n_per_row)
    lead = data.shape[:-1]
    b = data.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    vals = _E2M1X2.to(b.device)[_nibbles(b[:, 1:]).long()] * _e8m0_half(b[:, 0])[:, None]
    return vals.reshape(*lead, n_per_row)


def dequant_mxfp4_hf(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """gpt-oss blocks uint8 [..., N, nb, 16] + E8M0 scales [..., N, nb] -> float32 [..., N, nb*32]."""
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*blocks.shape[:-1], 32)
    vals = _E2M1X2.to(blocks.device)[codes.long()] * _e8m0_half(scales).unsqueeze(-1)
    return vals.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def dequantize(pw: PackedWeight) -> torch.Tensor:
    """float32 [N, K] (or [E, N, K]) of a PackedWeight."""
    if pw.format == "gptq":
        return dequant_gptq(pw)
    if pw.format == "awq":
        return dequant_awq(pw)
    if pw.format == "mxfp4":
        return dequant_mxfp4_hf(pw.tensors["blocks"], pw.tensors["scales"])
    if pw.format == "ggml":
        return dequant_ggml(pw.tensors["data"], pw.qtype, pw.shape[1])
    raise QuantkitError(f"reference: unknown packed format '{pw.format}'")


def linear_reference(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(W)^T (+ bias), computed in float32, returned in x's dtype."""
    w = dequantize(pw)
    y = F.linear(x.float(), w.to(x.device), None if bias is None else bias.float())
    return y.to(x.dtype)
