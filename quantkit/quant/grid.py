"""Integer-grid weight quantization shared by RTN, GPTQ and AWQ.

A weight W [out, in] is stored as integer codes in [0, 2^bits - 1] with one
(scale, zero) pair per output row and input group:
    W[r, j] ~= (codes[r, j] - zeros[r, g_idx[j]]) * scales[r, g_idx[j]]
`g_idx[j]` names the group of input column j (contiguous j // group_size unless
GPTQ act-order regrouped the columns). Symmetric grids use zero = 2^(bits-1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quantkit.errors import QuantkitError

SUPPORTED_BITS = (2, 3, 4, 8)


def check_grid_args(bits: int, group_size: int, in_features: int, name: str = "weight") -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantkitError(f"{name}: bits={bits} is not supported; expected one of {SUPPORTED_BITS}")
    if group_size != -1 and group_size <= 0:
        raise QuantkitError(f"{name}: group_size={group_size}; expected a positive size or -1 (per channel)")
    if in_features <= 0:
        raise QuantkitError(f"{name}: in_features={in_features}; expected > 0")


def n_groups_for(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def contiguous_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32, device=device)
    return torch.div(torch.arange(in_features, device=device), group_size, rounding_mode="floor").to(torch.int32)


def round_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round scales to what `scale_dtype` stores (kept in scale's dtype); a scale never rounds to 0."""
    if scale_dtype == scale.dtype:
        return scale
    fi = torch.finfo(scale_dtype)
    stored = scale.to(scale_dtype)
    if not torch.isfinite(stored).all():
        raise QuantkitError(
            f"quantization scale overflows {scale_dtype} (|w| too large); use scale_dtype=torch.float32 or bfloat16"
        )
    tiny = torch.tensor(fi.smallest_normal * fi.eps, dtype=scale_dtype, device=scale.device)
    return torch.where(stored == 0, tiny, stored).to(scale.dtype)


def minmax_params(
    x: torch.Tensor,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype = torch.float16,
    include_zero: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero over the last dim of x, as GPTQ's quantizer does.

    asym: range [min(x,0), max(x,0)] -> scale = range / maxq, zero = round(-xmin / scale).
    sym:  amax = max|x| -> scale = 2 * amax / maxq, zero = 2^(bits-1).
    An all-zero slice gets the range [-1, 1]. `include_zero=False` uses the raw min/max
    (AWQ's asymmetric grid); the zero is then clamped to the code range.
    Returns (scale in x's float32/float64 dtype, exactly representable in scale_dtype; zero int32).
    """
    maxq = 2**bits - 1
    x = x if x.dtype == torch.float64 else x.float()
    xmin = x.amin(dim=-1)
    xmax = x.amax(dim=-1)
    if include_zero or sym:
        xmin = xmin.clamp(max=0)
        xmax = xmax.clamp(min=0)
    if sym:  # always [-amax, amax]; the reference keeps xmin = 0 for all-positive slices, halving the range
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = xmin == xmax
    xmin = torch.where(flat, xmin - 1, xmin)
    xmax = torch.where(flat, xmax + 1, xmax)
    scale = round_scale((xmax - xmin) / maxq, scale_dtype)
    if sym:
        zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int32)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq).to(torch.int32)
    return scale, zero


def group_params(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    scale_dtype: torch.dtype = torch.float16,
    include_zero: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, contiguous group) params of w [out, in] -> scales, zeros [out, n_groups].

    A last partial group (in % group_size != 0) is zero-padded; zero padding does not move
    the [min(x,0), max(x,0)] range. With include_zero=False the partial group is handled apart.
    """
    out_f, in_f = w.shape
    if group_size == -1:
        s, z = minmax_params(w, bits, sym, scale_dtype, include_zero)
        return s[:, None], z[:, None]
    g = n_groups_for(in_f, group_size)
    pad = g * group_size - in_f
    if pad and not (include_zero or sym):
        full = in_f - (in_f % group_size)
        s1, z1 = group_params(w[:, :full], bits, group_size, sym, scale_dtype, include_zero)
        s2, z2 = minmax_params(w[:, full:], bits, sym, scale_dtype, include_zero)
        return torch.cat([s1, s2[:, None]], 1), torch.cat([z1, z2[:, None]], 1)
    w = w if w.dtype == torch.float64 else w.float()
    wp = torch.nn.functional.pad(w, (0, pad)) if pad else w
    return minmax_params(wp.reshape(out_f, g, group_size), bits, sym, scale_dtype, include_zero)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer levels clamp(round(w / scale) + zero, 0, maxq) as float (broadcasting shapes)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


@dataclass
class QuantizedLinear:
    """A linear weight on an integer grid (see module docstring)."""

    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float [out, n_groups]
    zeros: torch.Tensor  # int32 [out, n_groups]
    g_idx: torch.Tensor  # int32 [in]
    bits: int
    group_size: int  # -1 = per channel
    sym: bool
    desc_act: bool = False
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.codes.dim() != 2 or self.codes.dtype != torch.uint8:
            raise QuantkitError(f"QuantizedLinear.codes: expected uint8 [out, in], got {self._desc(self.codes)}")
        out_f, in_f = self.codes.shape
        check_grid_args(self.bits, self.group_size, in_f, "QuantizedLinear")
        if self.scales.dim() != 2 or self.scales.shape[0] != out_f or not self.scales.is_floating_point():
            got = self._desc(self.scales)
            raise QuantkitError(f"QuantizedLinear.scales: expected float [{out_f}, n_groups], got {got}")
        if self.zeros.shape != self.scales.shape or self.zeros.is_floating_point():
            shape = tuple(self.scales.shape)
            raise QuantkitError(f"QuantizedLinear.zeros: expected int {shape}, got {self._desc(self.zeros)}")
        if self.g_idx.shape != (in_f,) or self.g_idx.dtype != torch.int32:
            raise QuantkitError(f"QuantizedLinear.g_idx: expected int32 [{in_f}], got {self._desc(self.g_idx)}")
        if int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= self.scales.shape[1]:
            raise QuantkitError(f"QuantizedLinear.g_idx: values must lie in [0, {self.scales.shape[1]})")
        if self.bias is not None and self.bias.shape != (out_f,):
            raise QuantkitError(f"QuantizedLinear.bias: expected [{out_f}], got {tuple(self.bias.shape)}")

    @staticmethod
    def _desc(t: torch.Tensor) -> str:
        return f"{t.dtype} {tuple(t.shape)}"

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def has_trivial_g_idx(self) -> bool:
        """True when g_idx is the contiguous j // group_size (no act-order regrouping)."""
        return bool(torch.equal(self.g_idx, contiguous_g_idx(self.in_features, self.group_size, self.g_idx.device)))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(codes - zero) * scale per column group, in float32, then cast to dtype.

        The float32 product of a <=9-bit integer and a fp16/bf16 scale is exact, so casting
        to the scale dtype gives the same bits as computing in that dtype.
        """
        gi = self.g_idx.long()
        s = self.scales.float()[:, gi]
        z = self.zeros.float()[:, gi]
        return ((self.codes.float() - z) * s).to(dtype)


@dataclass
class AWQLinear:
    """A quantized linear: `ql` over the columns not kept in float16 (all of them when keep_fp16 is 0)."""
    ql: QuantizedLinear
    in_features: int
    fp16_idx: torch.Tensor | None = None  # int32 [k], ascending
    fp16_cols: torch.Tensor | None = None  # float16 [out, k]
    info: dict = field(default_factory=dict)  # the report's per-tensor numbers (errors, time)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        wq = self.ql.dequantize(torch.float32)
        if self.fp16_idx is None:
            return wq.to(dtype)
        w = torch.empty(wq.shape[0], self.in_features, dtype=torch.float32)
        keep = torch.zeros(self.in_features, dtype=torch.bool)
        keep[self.fp16_idx.long()] = True
        w[:, ~keep] = wq
        w[:, keep] = self.fp16_cols.float()
        return w.to(dtype)
