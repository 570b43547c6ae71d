"""AWQ's searches on one group of linears (Lin et al., MLSys 2024): the integer grid as AWQ stores it, the
activation-aware scale search and the clip search. Pure functions of weights and calibration inputs; the
layer and graph drivers are quant/awq.py (dense) and quant/awq_moe.py (experts)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import gemm
from ..errors import QuantkitError
from .grid import QuantizedLinear, check_grid_args, contiguous_g_idx, group_params, n_groups_for, quantize_codes
from .hessian import add_xtx, quad, symmetric, total


@dataclass
class AWQConfig:
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    duo_scaling: bool = True
    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    keep_fp16: float = 0.0  # percent of input channels kept in float16
    scale_dtype: torch.dtype = torch.float16
    batch_tokens: int = 8192  # tokens per forward during the search (memory bound)
    # two-stage scale search: every grid point on an evenly spaced share of the samples (at least
    # search_min_samples), then the search_top best of them on all samples; 1.0 = every point on all samples
    search_fraction: float = 0.25
    search_min_samples: int = 8
    search_top: int = 3
    # per-weight grid (bits, group_size, sym) used by the search; None = (bits, group_size, sym).
    # The GGUF path sets it to a proxy of each tensor's k-quant type.
    grid: Callable[[str], tuple[int, int, bool]] | None = None
    # MoE: experts with fewer calibration tokens get no scale/clip search (plain RTN on the folded weight);
    # route_all: every expert's statistics see every token (forced routing; outputs follow the router)
    min_expert_tokens: int = 16
    route_all: bool = False
    # the calibration forwards' dtype (capture and search passes); folds, clip and quantization stay float32
    calib_dtype: torch.dtype = torch.float32

    def grid_for(self, name: str) -> tuple[int, int, bool]:
        return self.grid(name) if self.grid is not None else (self.bits, self.group_size, self.sym)


# ---------------------------------------------------------------- the integer grid, AWQ style

def fake_quant(w: torch.Tensor, bits: int, group_size: int, sym: bool,
               scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Q(w): quantize-dequantize on the grid AWQ stores (asym: raw min/max range, zero clamped)."""
    scales, zeros = group_params(w, bits, group_size, sym, scale_dtype, include_zero=False)
    out_f, in_f = w.shape
    if group_size == -1 or in_f % group_size == 0:  # whole groups: broadcast instead of gathering
        wg = w.float().reshape(out_f, scales.shape[1], -1)
        s, z = scales[:, :, None], zeros[:, :, None].float()
        return ((quantize_codes(wg, s, z, bits) - z) * s).reshape(out_f, in_f)
    gi = contiguous_g_idx(in_f, group_size, w.device).long()
    s, z = scales[:, gi], zeros[:, gi].float()
    return (quantize_codes(w.float(), s, z, bits) - z) * s


def quantize_linear(w: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype=torch.float16,
                    bias: torch.Tensor | None = None, name: str = "weight") -> QuantizedLinear:
    check_grid_args(bits, group_size, w.shape[1], name)
    w = w.float()
    scales, zeros = group_params(w, bits, group_size, sym, scale_dtype, include_zero=False)
    g_idx = contiguous_g_idx(w.shape[1], group_size, w.device)
    gi = g_idx.long()
    codes = quantize_codes(w, scales[:, gi], zeros[:, gi].float(), bits).to(torch.uint8)
    return QuantizedLinear(codes=codes, scales=scales.to(scale_dtype), zeros=zeros, g_idx=g_idx, bits=bits,
                           group_size=group_size, sym=sym, bias=bias)


def _group_pad(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., in] -> [..., G, gs] with zero padding of a last partial group."""
    n = t.shape[-1]
    gs = n if group_size == -1 else group_size
    g = n_groups_for(n, group_size)
    if g * gs != n:
        t = torch.nn.functional.pad(t, (0, g * gs - n))
    return t.reshape(*t.shape[:-1], g, gs)


# ---------------------------------------------------------------- scale search

def _param(m) -> torch.Tensor:
    """The weight of a linear module, or the stacked-expert parameter itself."""
    return m.weight if isinstance(m, nn.Module) else m


def _fake_quant_cols(w: torch.Tensor, s: torch.Tensor, grid: tuple[int, int, bool], scale_dtype) -> torch.Tensor:
    """Q(w * s) / s; stacked experts [E, out, in] are quantized expert by expert (rows are independent)."""
    b, g, sym = grid
    q = fake_quant((w.float() * s).reshape(-1, w.shape[-1]), b, g, sym, scale_dtype).reshape(w.shape)
    return (q / s).to(w.dtype)


def search_scale(x: torch.Tensor, linears: dict[str, object], block: Callable, cfg: AWQConfig,
                 grids: dict[str, tuple[int, int, bool]], device, masters: dict[str, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, list[float]]:
    """x: the group's input [S, T, in] (CPU, in the dtype `block` computes in); linears: name -> nn.Linear or
    stacked-expert parameter [E, out, in]. masters: their float32 weights when the block computes in a lower
    dtype (each candidate quantizes those and casts the result for the forward); losses are float32.
    Returns (best s [in], loss per grid point on the first stage's samples: all of them unless the two-stage
    search applies, see AWQConfig)."""
    d = x.shape[-1]
    per = max(1, cfg.batch_tokens // x.shape[1])
    x_mean = abs_mean(x, per).to(device)
    orig = {n: _param(m).data.clone() for n, m in linears.items()}
    src = orig if masters is None else {n: masters[n].detach() for n in linears}
    w = torch.cat([src[n].float().reshape(-1, d) for n in linears])
    gs = next(iter(grids.values()))[1]
    wg = _group_pad(w.abs(), gs)
    w_mean = (wg / (wg.amax(-1, keepdim=True) + 1e-6)).reshape(w.shape[0], -1)[:, :d].mean(0).to(device)
    H = _output_hessian([x[k:k + per] for k in range(0, x.shape[0], per)], linears, block, cfg.n_grid, device)
    first, rest = search_subset(x.shape[0], cfg) if H is None else (list(range(x.shape[0])), [])
    parts = []  # (sample chunks, their float outputs) of the first samples, then of the rest
    for idx in (first, rest):
        chunks = [idx[k:k + per] for k in range(0, len(idx), per)]  # read when used: x may live on disk
        with torch.no_grad():
            parts.append((chunks, [block(_rows(x, c).to(device)) for c in chunks] if H is None else None))

    def scale(r: int) -> torch.Tensor:
        ratio = r / cfg.n_grid
        if cfg.duo_scaling:
            s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        else:
            s = x_mean.pow(ratio).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        return torch.where(torch.isfinite(s), s, torch.ones_like(s))

    def sq_err(r: int, part: int) -> tuple[float, int]:
        """(sum of squared output errors, their count) at grid point r over the first samples or the rest."""
        s = scale(r)
        if H is not None:  # the block is the group's one linear: sum (x D^T)^2 = sum D H D^T
            (n, m), = linears.items()
            D = _fake_quant_cols(src[n], s, grids[n], cfg.scale_dtype).float() - src[n].float()
            return float(total(quad(D, H))), x.shape[0] * x.shape[1] * D.shape[0]
        for n, m in linears.items():
            _param(m).data = _fake_quant_cols(src[n], s, grids[n], cfg.scale_dtype).to(orig[n].dtype)
        err, count = 0.0, 0
        with torch.no_grad():
            for c, y in zip(*parts[part]):
                out = block(_rows(x, c).to(device))
                err += float(total((out.float() - y.float()).pow(2)))
                count += y.numel()
        return err, count
    from ..calibration.dist import spread
    try:  # under torchrun the grid points are spread over the ranks
        stage1 = spread(list(range(cfg.n_grid)), lambda r: sq_err(r, 0))
        history = [e / c for e, c in stage1]
        final = dict(enumerate(history))
        if rest:  # the best few on every sample: the search's answer unless the subset misranked them all
            top = sorted((loss, r) for r, loss in enumerate(history) if math.isfinite(loss))[:cfg.search_top]
            top = sorted(r for _, r in top)
            for r, (e, c) in zip(top, spread(top, lambda r: sq_err(r, 1))):
                final[r] = (stage1[r][0] + e) / (stage1[r][1] + c)
            final = {r: final[r] for r in top}
    finally:
        for n, m in linears.items():
            _param(m).data = orig[n]
    best, best_loss = None, float("inf")
    for r in sorted(final):  # the first smallest finite loss
        if final[r] < best_loss:
            best, best_loss = scale(r), final[r]
    if best is None:
        raise QuantkitError(f"AWQ scale search: every candidate gave a non-finite loss ({history[:3]} ...); "
                            "the calibration activations or weights contain inf/NaN")
    return best.cpu(), history


def abs_mean(x: torch.Tensor, per: int) -> torch.Tensor:
    """mean |x| over every token of x [S, T, d], `per` samples at a time (x may be a file-backed tensor)."""
    acc = torch.zeros(x.shape[-1], dtype=torch.float64)
    for k in range(0, x.shape[0], per):
        acc += x[k:k + per].reshape(-1, x.shape[-1]).abs().sum(0, dtype=torch.float64)
    return (acc / (x.numel() // x.shape[-1])).float()


def _rows(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """x[idx], a view when idx is a run of consecutive samples."""
    return x[idx[0]:idx[-1] + 1] if idx == list(range(idx[0], idx[-1] + 1)) else x[idx]


def search_subset(n: int, cfg: AWQConfig) -> tuple[list[int], list[int]]:
    """(samples every grid point is evaluated on, the rest): evenly spaced, all of them for small sets."""
    m = max(cfg.search_min_samples, math.ceil(n * cfg.search_fraction))
    if cfg.search_fraction >= 1 or m >= n:
        return list(range(n)), []
    first = [(2 * k + 1) * n // (2 * m) for k in range(m)]
    taken = set(first)
    return first, [i for i in range(n) if i not in taken]


class WeightBlock:
    """A bare weight [out, in] as the block (an expert's down projection): z -> z @ w^T."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return gemm.linear(z, self.weight.to(z.dtype))


def _output_hessian(chunks: list[torch.Tensor], linears: dict, block, n_grid: int, device) -> torch.Tensor | None:
    """sum x^T x of the group's input when the error is measured at the output of its only linear (v -> o,
    up -> down) and that is cheaper than n_grid passes over the tokens; else None."""
    (m,) = linears.values() if len(linears) == 1 else (None,)
    if m is None or not (block is m or isinstance(block, WeightBlock) and block.weight is m):
        return None
    out, d = _param(m).shape
    toks = sum(c.numel() // d for c in chunks)
    if d * d * 4 > 2**30 or 0.6 * d * d * (toks + n_grid * out) >= n_grid * toks * out * d:
        return None
    acc = torch.zeros(d, d, dtype=torch.float32, device=device)
    for c in chunks:
        add_xtx(acc, c.reshape(-1, d).to(device, torch.float32))
    return symmetric(acc)


# ---------------------------------------------------------------- clip search

def search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, sym: bool, cfg: AWQConfig,
                scale_dtype=torch.float16) -> torch.Tensor:
    """Best per-(row, group) max |w| [out, G]; x: input token sample [tok, in].

    The reference's error mean_t (x_g . (Q(w_g) - w_g))^2 is computed as d^T C_g d with the per-group
    input second moment C_g = mean_t x_g x_g^T: the same quantity, without a pass over the tokens per step."""
    out_f, in_f = w.shape
    w = w.float()
    xg = _group_pad(x.float(), group_size)  # [tok, G, gs]
    C = torch.einsum("tgk,tgl->gkl", xg, xg) / xg.shape[0]
    gi = contiguous_g_idx(in_f, group_size, w.device).long()
    G, gs = xg.shape[1], xg.shape[2]
    rows = max(1, (1 << 23) // max(1, in_f + G * gs))
    best_all = []
    for r0 in range(0, out_f, rows):
        wb = w[r0:r0 + rows]
        org_max = _group_pad(wb.abs(), group_size).amax(-1)  # [o, G]
        best = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        for i_s in range(int(cfg.max_shrink * cfg.clip_grid)):
            mv = org_max * (1 - i_s / cfg.clip_grid)
            m = mv[:, gi]
            d = _group_pad(fake_quant(torch.clamp(wb, -m, m), bits, group_size, sym, scale_dtype) - wb, group_size)
            err = (torch.einsum("ogk,gkl->ogl", d, C) * d).sum(-1)
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best = torch.where(better, mv, best)
        best_all.append(best)
    return torch.cat(best_all)


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, group_size: int) -> torch.Tensor:
    m = max_val[:, contiguous_g_idx(w.shape[1], group_size, w.device).long()].to(w.dtype)
    return torch.clamp(w, -m, m)


def salient_channels(x_absmean: torch.Tensor, percent: float) -> torch.Tensor:
    """Indices (ascending, int32) of the top `percent`% channels by mean |x| (at least one when percent > 0)."""
    n = x_absmean.numel()
    k = min(n - 1, max(1, math.floor(n * percent / 100 + 0.5)))
    idx = torch.topk(x_absmean.float(), k, sorted=True).indices  # ties: topk is deterministic on CPU
    return idx.sort().values.to(torch.int32)
