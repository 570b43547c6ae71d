"""Round-to-nearest on the integer grid: the no-calibration baseline for GPTQ/AWQ."""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.quant.grid import QuantizedLinear, check_grid_args, contiguous_g_idx, group_params, quantize_codes


def rtn_quantize(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    bias: torch.Tensor | None = None,
    include_zero: bool = True,
    name: str = "weight",
) -> QuantizedLinear:
    """Quantize w [out, in] group-wise with min/max params (see grid.minmax_params)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise QuantkitError(f"{name}: expected a float [out, in] weight, got {w.dtype} {tuple(w.shape)}")
    check_grid_args(bits, group_size, w.shape[1], name)
    w = w.float()
    scales, zeros = group_params(w, bits, group_size, sym, scale_dtype, include_zero)
    g_idx = contiguous_g_idx(w.shape[1], group_size, w.device)
    gi = g_idx.long()
    codes = quantize_codes(w, scales[:, gi], zeros[:, gi].float(), bits).to(torch.uint8)
    return QuantizedLinear(
        codes=codes,
        scales=scales.to(scale_dtype),
        zeros=zeros,
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=False,
        bias=bias,
    )
