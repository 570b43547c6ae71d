"""Byte layouts of MXFP4 (codes uint8 [..., n], exps uint8 [..., n/32] from quantkit.quant.mxfp4).

GGUF (ggml type MXFP4 = 39), per 32-element block 17 bytes: e (E8M0), then qs[16] with element j
  in the low nibble of qs[j] and element j+16 in the high nibble  -> uint8 [..., n/32*17].
gpt-oss HF checkpoints: `<proj>_blocks` uint8 [..., rows, n/32, 16] with element 2i in the low
  nibble and 2i+1 in the high nibble of byte i; `<proj>_scales` uint8 [..., rows, n/32] (E8M0).
  Expert tensors keep HF's output-major rows: gate_up_proj_blocks is [E, 2*ff, hidden/32, 16]
  with gate on rows 0::2 and up on rows 1::2; down_proj_blocks is [E, hidden, ff/32, 16].
  (transformers' dequantize transposes to [E, in, out] for its bmm; the packed rows are [out, in].)
compressed-tensors "mxfp4-pack-quantized": `weight_packed` uint8 [rows, n/2] with the same
  low-nibble-first pairing as gpt-oss, `weight_scale` uint8 [rows, n/32] (E8M0, bias 127).
Conversions between these layouts are nibble shuffles: nothing is requantized.
Importing this module registers the reader for HF checkpoints whose quant_method is "mxfp4".
"""

from __future__ import annotations

from typing import Callable

import torch

from quantkit.errors import BadInput, QuantkitError
from quantkit.formats.hf_quantized import register
from quantkit.graph import LazyTensor
from quantkit.quant.mxfp4 import BLOCK, dequantize_mxfp4

GGUF_BLOCK_BYTES = 1 + BLOCK // 2


def _check_codes(codes: torch.Tensor, exps: torch.Tensor, name: str) -> int:
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.ndim < 1 \
            or codes.shape[-1] == 0 or codes.shape[-1] % BLOCK:
        shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise QuantkitError(f"MXFP4 layout: codes of '{name}' must be uint8 [..., n] with n a multiple of {BLOCK}, "
                            f"got {shape}")
    n = codes.shape[-1]
    want = tuple(codes.shape[:-1]) + (n // BLOCK,)
    if not isinstance(exps, torch.Tensor) or exps.dtype != torch.uint8 or tuple(exps.shape) != want:
        shape = tuple(exps.shape) if isinstance(exps, torch.Tensor) else type(exps).__name__
        raise QuantkitError(f"MXFP4 layout: exps of '{name}' must be uint8 {want}, got {shape}")
    return n


def _pair_pack(codes: torch.Tensor) -> torch.Tensor:
    """[..., 2m] codes -> [..., m] bytes, element 2i low nibble, 2i+1 high nibble."""
    c = codes.reshape(*codes.shape[:-1], -1, 2)
    return (c[..., 0] & 0x0F) | ((c[..., 1] & 0x0F) << 4)


def _pair_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of _pair_pack: [..., m] bytes -> [..., 2m] codes."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)


# ---- GGUF (ggml MXFP4) ----

def to_gguf_mxfp4(codes: torch.Tensor, exps: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """codes [..., n], exps [..., n/32] -> GGUF MXFP4 bytes uint8 [..., n/32*17]."""
    n = _check_codes(codes, exps, name)
    lead = tuple(codes.shape[:-1])
    c = codes.reshape(-1, n // BLOCK, 2, BLOCK // 2)
    qs = (c[:, :, 0] & 0x0F) | ((c[:, :, 1] & 0x0F) << 4)  # element j low, j+16 high
    blocks = torch.cat((exps.reshape(-1, n // BLOCK, 1), qs), dim=-1)
    return blocks.reshape(*lead, n // BLOCK * GGUF_BLOCK_BYTES)


def from_gguf_mxfp4(data: torch.Tensor, n: int, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF MXFP4 bytes uint8 [..., n/32*17] (or flat) for rows of n elements -> (codes [..., n], exps [..., n/32])."""
    if n <= 0 or n % BLOCK:
        raise QuantkitError(f"MXFP4 layout: '{name}' row length {n} must be a positive multiple of {BLOCK}")
    row_bytes = n // BLOCK * GGUF_BLOCK_BYTES
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.numel() % row_bytes:
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise QuantkitError(f"MXFP4 layout: GGUF data of '{name}' must be uint8 with a multiple of {row_bytes} bytes "
                            f"(rows of {n}), got {shape}")
    lead = tuple(data.shape[:-1]) if data.ndim >= 1 and data.shape[-1] == row_bytes else (data.numel() // row_bytes,)
    b = data.reshape(-1, n // BLOCK, GGUF_BLOCK_BYTES)
    exps = b[:, :, 0].contiguous()
    qs = b[:, :, 1:]
    codes = torch.cat((qs & 0x0F, qs >> 4), dim=-1)
    return codes.reshape(*lead, n), exps.reshape(*lead, n // BLOCK)


# ---- gpt-oss HF checkpoints ----

def to_gpt_oss(codes: torch.Tensor, exps: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """codes [..., rows, n], exps [..., rows, n/32] -> (blocks [..., rows, n/32, 16], scales [..., rows, n/32])."""
    n = _check_codes(codes, exps, name)
    blocks = _pair_pack(codes.reshape(*codes.shape[:-1], n // BLOCK, BLOCK))
    return blocks.contiguous(), exps.clone()


def from_gpt_oss(blocks: torch.Tensor, scales: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss `*_blocks` [..., rows, G, 16] and `*_scales` [..., rows, G] -> (codes [..., rows, 32G], exps)."""
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8 or blocks.ndim < 2 \
            or blocks.shape[-1] != BLOCK // 2:
        shape = tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise QuantkitError(f"MXFP4 layout: '{name}_blocks' must be uint8 [..., rows, n/32, 16], got {shape}")
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.uint8 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        shape = tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise QuantkitError(f"MXFP4 layout: '{name}_scales' must be uint8 {tuple(blocks.shape[:-1])} to match "
                            f"'{name}_blocks' {tuple(blocks.shape)}, got {shape}")
    codes = _pair_unpack(blocks)  # [..., G, 32]
    return codes.reshape(*blocks.shape[:-2], -1), scales.clone()


def split_gate_up(codes: torch.Tensor, exps: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                   tuple[torch.Tensor, torch.Tensor]]:
    """gpt-oss fused gate_up rows [E, 2*ff, n] (gate 0::2, up 1::2) -> ((gate codes, exps), (up codes, exps))."""
    if codes.ndim < 2 or codes.shape[-2] % 2:
        raise QuantkitError(f"MXFP4 layout: gate_up_proj rows must be even (interleaved gate/up), got {tuple(codes.shape)}")
    gate = (codes[..., 0::2, :].contiguous(), exps[..., 0::2, :].contiguous())
    up = (codes[..., 1::2, :].contiguous(), exps[..., 1::2, :].contiguous())
    return gate, up


def merge_gate_up(gate: tuple[torch.Tensor, torch.Tensor], up: tuple[torch.Tensor, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of split_gate_up: interleave gate/up rows back into gpt-oss's fused gate_up order."""
    (gc, ge), (uc, ue) = gate, up
    if gc.shape != uc.shape or ge.shape != ue.shape:
        raise QuantkitError(f"MXFP4 layout: gate {tuple(gc.shape)} and up {tuple(uc.shape)} must have the same shape")
    codes = torch.stack((gc, uc), dim=-2).reshape(*gc.shape[:-2], -1, gc.shape[-1])
    exps = torch.stack((ge, ue), dim=-2).reshape(*ge.shape[:-2], -1, ge.shape[-1])
    return codes, exps


def quantize_gguf_mxfp4(x: torch.Tensor, imatrix: torch.Tensor | None = None, rule: str = "floor",
                        name: str = "weight") -> torch.Tensor:
    """float [..., rows, n] -> GGUF MXFP4 bytes [..., rows, n/32*17]. The default rule "floor" is llama.cpp's
    own quantizer bit for bit (which ignores any imatrix); with rule="best" the imatrix weights the choice.
    imatrix: [n], or [E, n] (one per expert) for stacked x [E, rows, n]."""
    from quantkit.quant.mxfp4 import quantize_mxfp4
    if rule != "best":
        imatrix = None
    if imatrix is not None and imatrix.dim() == 2:
        if x.dim() != 3 or tuple(imatrix.shape) != (x.shape[0], x.shape[-1]):
            raise QuantkitError(f"MXFP4: per-expert imatrix of '{name}' has shape {tuple(imatrix.shape)}, expected "
                                f"({x.shape[0]}, {x.shape[-1]}) for weights {tuple(x.shape)}")
        return torch.stack([to_gguf_mxfp4(*quantize_mxfp4(x[e], rule=rule, weights=imatrix[e], name=name), name=name)
                            for e in range(x.shape[0])])
    return to_gguf_mxfp4(*quantize_mxfp4(x, rule=rule, weights=imatrix, name=name), name=name)


def dequantize_gguf_mxfp4(data: torch.Tensor) -> torch.Tensor:
    """GGUF MXFP4 bytes [rows, n/32*17] -> float32 [rows, n]."""
    n = data.shape[-1] // GGUF_BLOCK_BYTES * BLOCK
    return dequantize_mxfp4(*from_gguf_mxfp4(data, n, "MXFP4 data"))


def gpt_oss_to_gguf(blocks: torch.Tensor, scales: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Repack gpt-oss blocks/scales straight into GGUF MXFP4 bytes [..., rows, n/32*17] (no requantization)."""
    return to_gguf_mxfp4(*from_gpt_oss(blocks, scales, name), name=name)


def gguf_to_gpt_oss(data: torch.Tensor, n: int, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Repack GGUF MXFP4 bytes into gpt-oss (blocks, scales) (no requantization)."""
    return to_gpt_oss(*from_gguf_mxfp4(data, n, name), name=name)


# ---- compressed-tensors "mxfp4-pack-quantized" ----

COMPRESSED_TENSORS_FORMAT = "mxfp4-pack-quantized"
# QuantizationArgs of the weights (compressed-tensors' MXFP4A16 preset) for a config_groups entry.
COMPRESSED_TENSORS_WEIGHT_ARGS = {
    "num_bits": 4, "type": "float", "strategy": "group", "group_size": BLOCK,
    "symmetric": True, "dynamic": False, "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8",
}


def to_compressed_tensors(codes: torch.Tensor, exps: torch.Tensor, name: str = "weight") -> dict[str, torch.Tensor]:
    """codes [rows, n], exps [rows, n/32] -> {"weight_packed": uint8 [rows, n/2], "weight_scale": uint8 [rows, n/32]}."""
    _check_codes(codes, exps, name)
    return {"weight_packed": _pair_pack(codes).contiguous(), "weight_scale": exps.clone()}


def from_compressed_tensors(weight_packed: torch.Tensor, weight_scale: torch.Tensor, name: str = "weight"
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors weight_packed [rows, n/2] + weight_scale [rows, n/32] -> (codes, exps)."""
    if not isinstance(weight_packed, torch.Tensor) or weight_packed.dtype != torch.uint8 or weight_packed.ndim < 1 \
            or (2 * weight_packed.shape[-1]) % BLOCK or weight_packed.shape[-1] == 0:
        shape = tuple(weight_packed.shape) if isinstance(weight_packed, torch.Tensor) else type(weight_packed).__name__
        raise QuantkitError(f"MXFP4 layout: '{name}.weight_packed' must be uint8 [rows, n/2] with n a multiple of "
                            f"{BLOCK}, got {shape}")
    codes = _pair_unpack(weight_packed)
    _check_codes(codes, weight_scale, name)
    return codes, weight_scale.clone()


# ---- reading HF checkpoints with quantization_config.quant_method == "mxfp4" (gpt-oss) ----

class MXFP4LazyTensor(LazyTensor):
    """An MXFP4 tensor of an HF checkpoint. `load()` dequantizes (bf16: every MXFP4 value of a normal
    scale is exact in bf16) in the HF *parameter* orientation; `codes()` gives the stored codes/exps
    in the packed, output-major orientation [..., rows, n] with no arithmetic."""

    def __init__(self, shape, codes_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]], transpose: bool,
                 source: str):
        self.codes = codes_fn
        self.transposed = transpose

        def load():
            w = dequantize_mxfp4(*codes_fn(), dtype=torch.bfloat16)
            return w.transpose(-1, -2).contiguous() if transpose else w
        super().__init__(shape, "MXFP4", load, qtype="MXFP4", source=source)


def read_hf_mxfp4(files: dict, qc: dict, source: str) -> dict[str, LazyTensor]:
    """HF name -> lazy tensor for an MXFP4 checkpoint: each `X_blocks`/`X_scales` pair becomes `X`.

    Stacked (expert) tensors `X_blocks` [E, rows, G, 16] are presented as transformers' parameter
    [E, 32G, rows] (what its dequantize returns); 2-D pairs [rows, G, 16] as [rows, 32G].
    Every other tensor is passed through as stored.
    """
    out: dict[str, LazyTensor] = {}
    for name, (sf, key) in files.items():
        e = sf.entries[key]
        if name.endswith("_scales") and name[:-len("_scales")] + "_blocks" in files:
            continue
        if not name.endswith("_blocks"):
            out[name] = LazyTensor(e.shape, e.dtype, lambda sf=sf, key=key: sf.tensor(key), source=f"{sf.path}:{key}")
            continue
        base = name[:-len("_blocks")]
        if base + "_scales" not in files:
            raise BadInput(f"{source}: MXFP4 tensor '{name}' has no matching '{base}_scales'")
        ssf, skey = files[base + "_scales"]
        bshape, sshape = tuple(e.shape), tuple(ssf.entries[skey].shape)
        if len(bshape) < 3 or bshape[-1] != BLOCK // 2 or sshape != bshape[:-1] or e.dtype != "U8" \
                or ssf.entries[skey].dtype != "U8":
            raise BadInput(f"{source}: MXFP4 tensor '{name}' {e.dtype}{list(bshape)} / '{base}_scales' "
                           f"{ssf.entries[skey].dtype}{list(sshape)}: expected U8 [..., rows, n/32, 16] and U8 "
                           f"[..., rows, n/32]")
        n = bshape[-2] * BLOCK
        transpose = len(bshape) >= 4
        shape = bshape[:-3] + ((n, bshape[-3]) if transpose else (bshape[-3], n))

        def codes(sf=sf, key=key, ssf=ssf, skey=skey, base=base):
            return from_gpt_oss(sf.tensor(key), ssf.tensor(skey), base)
        out[base] = MXFP4LazyTensor(shape, codes, transpose, source=f"{sf.path}:{name}")
    return out


register("mxfp4", read_hf_mxfp4)
