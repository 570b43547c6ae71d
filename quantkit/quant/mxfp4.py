"""MXFP4 (OCP Microscaling v1.0): blocks of 32 along the input dim, E2M1 elements, one E8M0 scale per block.

Codes are the standard 4-bit E2M1 bit patterns (bit 3 = sign, bits 0-2 = magnitude index into
{0, 0.5, 1, 1.5, 2, 3, 4, 6}); this is also llama.cpp's kvalues_mxfp4 index. Exponents are E8M0
(value 2**(e - 127)); 255 is NaN per the spec and is never produced here.

Scale rules (per block, amax = max |w|):
  "floor" OCP / llama.cpp: e = floor(log2f(amax)) - 2 + 127; elements above 6*scale clip to 6.
          Bit-exact with ggml's quantize_row_mxfp4_ref (including its float32 log2f, which rounds
          amax just below a power of two up to that power).
  "ceil"  smallest e with amax <= 6 * 2**(e-127): the block max never clips (coarser grid instead).
  "best"  per block, whichever of floor/ceil gives the lower (importance-weighted) squared error;
          ties keep floor. Default: over SmolLM2-135M's 211 weight matrices its relative MSE is
          0.01286 vs floor 0.01386 (-7%) and ceil 0.01423 (-10%); Gaussian and Student-t(3)
          matrices show the same order (benchmarks/mxfp4_accuracy.py). The output is plain MXFP4
          that any reader decodes; use "floor" to reproduce llama.cpp's bytes.
Element rounding (all rules): nearest grid value, ties to the smaller magnitude, and values that
round to zero get code 0 (+0) — exactly ggml's best_index_mxfp4 (first index wins ties).
"""

from __future__ import annotations

import torch

from .ggml_types import all_finite

from quantkit.errors import QuantkitError

BLOCK = 32
RULES = ("floor", "ceil", "best")
DEFAULT_RULE = "best"

# E2M1 value of each 4-bit code (OCP table; code 8 is -0).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Midpoints between consecutive magnitudes; count(|y| > m) is the nearest index, ties going down.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

_CHUNK_ELEMS = 1 << 24  # bound temporaries for very large (expert-stacked) tensors


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """Exact float32 2**k for integer k in [-149, 127], built from bits (no libm rounding)."""
    k = k.to(torch.int32)
    normal = (k + 127).clamp(min=1) << 23
    sub = torch.ones_like(k) << (k + 149).clamp(0, 22)
    bits = torch.where(k >= -126, normal, sub)
    return bits.view(torch.float32)


def _floor_exps(amax: torch.Tensor) -> torch.Tensor:
    """ggml's e = (uint8)(floorf(log2f(amax)) - 2 + 127), 0 for amax == 0.

    log2 is taken in float64 and rounded to float32, matching a correctly rounded log2f: near a
    power of two the float32 result can round up to the integer, and ggml inherits that.
    Blocks with amax < 2**-125 (where ggml's uint8 cast would wrap) are clamped to e = 0.
    """
    lg = torch.log2(amax.to(torch.float64)).to(torch.float32)
    e = torch.floor(lg) + 125.0
    e = torch.where(amax > 0, e, torch.zeros_like(e))
    return e.clamp(0, 254).to(torch.int32)


def _ceil_exps(amax: torch.Tensor) -> torch.Tensor:
    """Smallest e with amax <= 6 * 2**(e-127), from the exact binary exponent (frexp)."""
    mant, p = torch.frexp(amax)  # amax = mant * 2**p, mant in [0.5, 1)
    f = p.to(torch.int32) - 1  # exact floor(log2 amax)
    e = f + 125 + (mant > 0.75).to(torch.int32)  # amax / 2**(f-2) = 8*mant > 6 -> one step up
    e = torch.where(amax > 0, e, torch.zeros_like(e))
    return e.clamp(0, 254)


def _encode(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """x float32 [R, nb, 32], e int32 [R, nb] -> uint8 E2M1 codes [R, nb, 32]."""
    y = x * _pow2(127 - e).unsqueeze(-1)  # power-of-two scaling: exact, ties preserved
    mids = torch.tensor(_MIDPOINTS, dtype=torch.float32, device=x.device)
    mag = torch.bucketize(y.abs().contiguous(), mids, right=False).to(torch.uint8)  # strided: torch copies and warns
    neg = (y < 0) & (mag > 0)
    return torch.where(neg, mag + 8, mag)


def _decode(codes: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """codes uint8 [R, nb, 32], e int32 [R, nb] -> float32 [R, nb, 32]."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return lut[codes.long()] * _pow2(e - 127).unsqueeze(-1)


def _check_weight(w: torch.Tensor, name: str) -> int:
    if not isinstance(w, torch.Tensor) or not (w.is_floating_point()):
        raise QuantkitError(f"MXFP4: tensor '{name}' must be a floating-point torch.Tensor, got {type(w).__name__}"
                            f"{'' if not isinstance(w, torch.Tensor) else ' ' + str(w.dtype)}")
    if w.ndim < 1 or w.shape[-1] == 0 or w.shape[-1] % BLOCK != 0:
        raise QuantkitError(f"MXFP4: tensor '{name}' has shape {tuple(w.shape)}; its last (input) dim "
                            f"must be a positive multiple of {BLOCK}")
    return w.shape[-1]


def quantize_mxfp4(
    w: torch.Tensor,
    rule: str = DEFAULT_RULE,
    weights: torch.Tensor | None = None,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize w [..., n] (n % 32 == 0) to MXFP4.

    Returns (codes uint8 [..., n], one E2M1 code per element in the low nibble;
             exps uint8 [..., n/32], E8M0 biased exponents).
    weights: optional per-input-column importance [n] (>= 0), used only by rule "best".
    """
    n = _check_weight(w, name)
    if rule not in RULES:
        raise QuantkitError(f"MXFP4: unknown rule '{rule}' for tensor '{name}'; expected one of {', '.join(RULES)}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (n,):
            shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise QuantkitError(f"MXFP4: importance weights for tensor '{name}' must have shape ({n},), got {shape}")
        weights = weights.to(device=w.device, dtype=torch.float32)
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise QuantkitError(f"MXFP4: importance weights for tensor '{name}' must be finite and >= 0")

    lead = tuple(w.shape[:-1])
    nb = n // BLOCK
    x_all = w.detach().reshape(-1, n)
    rows = x_all.shape[0]
    codes = torch.empty((rows, n), dtype=torch.uint8, device=w.device)
    exps = torch.empty((rows, nb), dtype=torch.uint8, device=w.device)
    wb = None if weights is None else weights.view(1, nb, BLOCK)
    step = max(1, _CHUNK_ELEMS // n)
    for r0 in range(0, rows, step):
        x = x_all[r0:r0 + step].to(torch.float32).view(-1, nb, BLOCK)
        if not all_finite(x):
            raise QuantkitError(f"MXFP4: tensor '{name}' (shape {tuple(w.shape)}) contains inf/NaN")
        amax = x.abs().amax(dim=-1)
        if rule == "floor":
            e = _floor_exps(amax)
            c = _encode(x, e)
        elif rule == "ceil":
            e = _ceil_exps(amax)
            c = _encode(x, e)
        else:
            e_lo, e_hi = _floor_exps(amax), _ceil_exps(amax)
            c_lo, c_hi = _encode(x, e_lo), _encode(x, e_hi)
            d_lo = (x - _decode(c_lo, e_lo)).square()
            d_hi = (x - _decode(c_hi, e_hi)).square()
            if wb is not None:
                d_lo, d_hi = d_lo * wb, d_hi * wb
            # float64 sums so near-ties are decided the same on every device
            take_hi = d_hi.sum(-1, dtype=torch.float64) < d_lo.sum(-1, dtype=torch.float64)
            e = torch.where(take_hi, e_hi, e_lo)
            c = torch.where(take_hi.unsqueeze(-1), c_hi, c_lo)
        codes[r0:r0 + step] = c.view(-1, n)
        exps[r0:r0 + step] = e.to(torch.uint8)
    return codes.view(*lead, n), exps.view(*lead, nb)


def dequantize_mxfp4(codes: torch.Tensor, exps: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes uint8 [..., n], exps uint8 [..., n/32] -> values [..., n] (E8M0 255 decodes to NaN)."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.ndim < 1 or codes.shape[-1] % BLOCK:
        shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise QuantkitError(f"MXFP4: codes must be uint8 [..., n] with n a multiple of {BLOCK}, got {shape}")
    n = codes.shape[-1]
    want = tuple(codes.shape[:-1]) + (n // BLOCK,)
    if not isinstance(exps, torch.Tensor) or exps.dtype != torch.uint8 or tuple(exps.shape) != want:
        shape = tuple(exps.shape) if isinstance(exps, torch.Tensor) else type(exps).__name__
        raise QuantkitError(f"MXFP4: exps must be uint8 of shape {want} for codes {tuple(codes.shape)}, got {shape}")
    if bool((codes > 15).any()):
        raise QuantkitError(f"MXFP4: codes {tuple(codes.shape)} hold values > 15 (expected 4-bit E2M1 codes)")
    e = exps.to(torch.int32).reshape(-1, n // BLOCK)
    out = _decode(codes.reshape(-1, n // BLOCK, BLOCK), e)
    out = torch.where((e == 255).unsqueeze(-1), torch.full_like(out, float("nan")), out)
    return out.reshape(codes.shape).to(dtype)


def mxfp4_error(w: torch.Tensor, codes: torch.Tensor, exps: torch.Tensor) -> float:
    """Mean squared error of an MXFP4 encoding against the original weights (float64 accumulate)."""
    d = w.to(torch.float32) - dequantize_mxfp4(codes, exps)
    return float(d.square().mean(dtype=torch.float64))


# ---- GGUF tensor types for the MXFP4 file types ----

MXFP4_PRESETS = ("mxfp4_moe", "mxfp4")


def gguf_types(shapes: dict[str, tuple[int, ...]], q: str, overrides=(), pure: bool = False) -> dict:
    """{canonical name: ggml type} for --q mxfp4_moe / mxfp4 (shapes in torch order, ne[0] = shape[-1]).

    mxfp4_moe is llama.cpp's LLAMA_FTYPE_MOSTLY_MXFP4_MOE: stacked expert tensors (ne[2] > 1) MXFP4, every
    other quantizable weight (token_embd and output included) Q8_0. mxfp4: every quantizable weight MXFP4.
    Quantizable = llama.cpp's tensor_allows_quantization (2-D/3-D `.weight`, not norms, not the router);
    the rest stay F32, as the converter writes them. Rows that are not a multiple of 32 fall back to F16.
    overrides: (regex, type) pairs, first match wins (--tensor-type); pure: every quantizable tensor MXFP4.
    """
    import re

    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    from quantkit.quant.mixtures import allows_quantization

    q = q.lower()
    if q not in MXFP4_PRESETS:
        raise QuantkitError(f"--q '{q}': not an MXFP4 preset (expected one of {', '.join(MXFP4_PRESETS)})")
    pats = []
    for pat, ty in overrides or ():
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise QuantkitError(f"--tensor-type: bad regex {pat!r}: {e}") from None
        try:
            pats.append((rx, ty if isinstance(ty, T) else T[str(ty).upper()]))
        except KeyError:
            raise QuantkitError(f"--tensor-type {pat}={ty}: unknown ggml type {ty!r}") from None
    out = {}
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        if not allows_quantization(name, shape):
            out[name] = T.F32
            continue
        hit = next((ty for rx, ty in pats if rx.search(name)), None)
        if hit is not None:
            t = hit
        elif q == "mxfp4" or pure or (len(shape) >= 3 and shape[-3] > 1):
            t = T.MXFP4
        else:
            t = T.Q8_0
        if shape[-1] % GGML_QUANT_SIZES[t][0]:
            t = T.F16
        out[name] = t
    return out
