"""FP8 checkpoints, dequantized on load tensor by tensor (no separate FP8 -> BF16 pass).

- quant_method "fp8" (DeepSeek V3/R1, Kimi-K2, MiniMax-M2, Qwen3 FP8): `P.weight` float8_e4m3fn [out, in] with
  `P.weight_scale_inv` float32 [ceil(out/bn), ceil(in/bk)] for `weight_block_size` [bn, bk] (a scalar scale
  without a block size); value = fp8 * scale of its block.
- compressed-tensors "float-quantized": `P.weight` fp8 with `P.weight_scale`: per tensor, per output channel
  [out, 1], per group [out, in/gs] or per block [ceil(out/bn), ceil(in/bk)] (`strategy`, `block_structure`).
Every other tensor passes through as stored.
"""

from __future__ import annotations

import torch

from ..errors import BadInput
from ..graph import LazyTensor
from .hf_quantized import register

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


def _entry(files: dict, name: str):
    sf, key = files[name]
    return sf, key, sf.entries[key]


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] | None, name: str) -> torch.Tensor:
    """A scale laid over blocks (or per tensor / channel / group) -> one factor per element [out, in]."""
    out_f, in_f = shape
    s = scale.float()
    if s.numel() == 1:
        return s.reshape(1, 1).expand(out_f, in_f)
    if s.dim() == 1:
        s = s[:, None]
    if block is None:  # per channel [out, 1] or per group [out, in/gs]
        if s.shape[0] != out_f or in_f % s.shape[1]:
            raise BadInput(f"{name}: scale {list(scale.shape)} does not fit weight {list(shape)}")
        return s.repeat_interleave(in_f // s.shape[1], dim=1)
    bn, bk = block
    want = (-(-out_f // bn), -(-in_f // bk))
    if tuple(s.shape) != want:
        raise BadInput(f"{name}: block scale {list(scale.shape)} does not fit weight {list(shape)} in "
                       f"{bn}x{bk} blocks (expected {list(want)})")
    return s.repeat_interleave(bn, 0)[:out_f].repeat_interleave(bk, 1)[:, :in_f]


def _dequantized(files: dict, p: str, scale_key: str, block, source: str) -> LazyTensor:
    sf, key, e = _entry(files, f"{p}.weight")
    if e.dtype not in FP8_DTYPES or len(e.shape) != 2:
        raise BadInput(f"{source}: '{p}.weight' is {e.dtype} {list(e.shape)}; an FP8 weight is 2-D "
                       f"{' or '.join(FP8_DTYPES)}")
    ssf, skey, se = _entry(files, f"{p}.{scale_key}")
    shape = tuple(e.shape)

    def load():
        w = sf.tensor(key).float()
        return w * expand_scale(ssf.tensor(skey), shape, block, f"{source}: {p}")
    return LazyTensor(shape, "F32", load, qtype=f"FP8-{e.dtype[3:]}", source=f"{sf.path}:{key}",
                      nbytes=(e.end - e.start) + (se.end - se.start))


def _with_plain(out: dict, files: dict, used: set, source: str) -> dict:
    for name in files:
        if name not in used:
            sf, key, e = _entry(files, name)
            out[name] = LazyTensor(e.shape, e.dtype, lambda sf=sf, key=key: sf.tensor(key),
                                   source=f"{sf.path}:{key}", nbytes=e.end - e.start)
    return out


def read_fp8(files: dict, qc: dict, source: str) -> dict[str, LazyTensor]:
    fmt = qc.get("fmt", "e4m3")
    if fmt not in ("e4m3", "e5m2"):
        raise BadInput(f"{source}: quantization_config.fmt '{fmt}' is not an FP8 format (e4m3, e5m2)")
    block = qc.get("weight_block_size")
    if block is not None:
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise BadInput(f"{source}: quantization_config.weight_block_size {block!r}: expected [rows, cols]")
        block = tuple(block)
    out, used = {}, set()
    for name in files:
        if name.endswith(".weight_scale_inv"):
            p = name[: -len(".weight_scale_inv")]
            if f"{p}.weight" not in files:
                raise BadInput(f"{source}: '{name}' has no weight '{p}.weight'")
            out[f"{p}.weight"] = _dequantized(files, p, "weight_scale_inv", block, source)
            used.update({name, f"{p}.weight"})
    if not used:
        raise BadInput(f"{source}: quant_method 'fp8' but no '*.weight_scale_inv' tensors in the checkpoint")
    return _with_plain(out, files, used, source)


def read_ct_float(files: dict, scheme: dict, source: str) -> dict[str, LazyTensor]:
    """compressed-tensors float-quantized (one weight scheme for every quantized module)."""
    w = scheme
    if w.get("type") != "float" or w.get("num_bits") != 8:
        raise BadInput(f"{source}: float-quantized weights {w.get('type')} {w.get('num_bits')}-bit; expected "
                       "float 8-bit")
    if not w.get("symmetric", True):
        raise BadInput(f"{source}: float-quantized weights with a zero point are not supported")
    strategy = w.get("strategy")
    block = None
    if strategy == "block":
        bs = w.get("block_structure")
        if not (isinstance(bs, list) and len(bs) == 2):
            raise BadInput(f"{source}: block strategy needs block_structure [rows, cols], got {bs!r}")
        block = (int(bs[0]), int(bs[1]))
    elif strategy not in ("tensor", "channel", "group"):
        raise BadInput(f"{source}: float-quantized weight strategy '{strategy}' is not supported "
                       "(tensor, channel, group, block)")
    out, used = {}, set()
    for name in files:
        if name.endswith(".weight_scale"):
            p = name[: -len(".weight_scale")]
            if f"{p}.weight" in files and files[f"{p}.weight"][0].entries[files[f"{p}.weight"][1]].dtype \
                    in FP8_DTYPES:
                out[f"{p}.weight"] = _dequantized(files, p, "weight_scale", block, source)
                used.update({name, f"{p}.weight"})
    if not used:
        raise BadInput(f"{source}: compressed-tensors float-quantized but no FP8 '*.weight' with '*.weight_scale'")
    return _with_plain(out, files, used, source)


register("fp8", read_fp8)
