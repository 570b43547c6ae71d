"""AWQ on mixture-of-experts blocks: per-expert statistics from each expert's routed tokens.

awq.py searches the block-level group (the norm before the router -> router + every expert's gate/up +
the shared expert) at the MoE block output. Here: which tokens each expert sees (its routing, or every
token with forced routing), the per-expert up -> down scales (one s per expert, its error measured at that
expert's down-projection output on its own tokens), and the per-expert clip search and quantization.
An expert that saw fewer than `min_expert_tokens` tokens gets neither search (s = 1, RTN of the folded
weight) and is reported by name with its token count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import QuantkitError
from ..graph import FFN_DOWN_EXPS, blk


@dataclass
class ExpertTokens:
    idx: list[torch.Tensor]  # per expert: rows of the flattened block input its statistics use
    routed: list[int]  # per expert: tokens the router sent it
    forced: bool


def expert_tokens(moe, x: torch.Tensor, route_all: bool) -> ExpertTokens:
    """x: the block input [S, T, d] (CPU). The routing is recomputed from x (deterministic, and unchanged by
    the block-level fold, which scales the router's columns with the experts')."""
    xf = x.reshape(-1, x.shape[-1])
    dev = moe.router.weight.device
    with torch.no_grad():
        _, idx = moe.route(xf.to(dev, moe.router.weight.dtype))
    idx = idx.cpu()
    routed = [(idx == e).any(-1).nonzero().squeeze(1) for e in range(moe.n_experts)]
    counts = [int(r.numel()) for r in routed]
    if route_all:
        routed = [torch.arange(xf.shape[0])] * moe.n_experts
    return ExpertTokens(routed, counts, route_all)


def search_expert_scales(moe, group, x: torch.Tensor, toks: ExpertTokens, cfg, grid, device,
                         master=None) -> torch.Tensor:
    """Per-expert s [E, in of group.linears[0]] for an up -> down group (ones where an expert has too few
    tokens). master: the float32 copy of `moe` when `moe` computes in a lower dtype (its weights are searched)."""
    from .awq_search import WeightBlock, search_scale
    (lin,) = group.linears
    w = moe.stacked[lin]
    w32 = (master if master is not None else moe).stacked[lin]
    xf = x.reshape(-1, x.shape[-1])
    s = torch.ones(w.shape[0], w.shape[2])
    for e in range(w.shape[0]):
        idx = toks.idx[e]
        if idx.numel() < cfg.min_expert_tokens:
            continue
        with torch.no_grad():
            h = moe.hidden(e, xf[idx].to(device, w.dtype)).float().cpu()
        p = w32.data[e].clone()
        s[e], _ = search_scale(h[None], {lin: p}, WeightBlock(p), cfg, {lin: grid}, device)
    return s


def fold_expert_scales(moe, group, s: torch.Tensor) -> None:
    """prev's rows (and bias) of expert e / s[e], the group's input columns of expert e * s[e]."""
    prev = moe.stacked[group.prev]
    sd = s.to(prev.device)
    with torch.no_grad():
        prev.data = prev.data / sd[:, :, None].to(prev.dtype)
        bias = moe.stacked_bias().get(group.prev)
        if bias is not None:
            bias.data = bias.data / sd.to(bias.dtype)
        for n in group.linears:
            p = moe.stacked[n]
            p.data = p.data * sd[:, None, :].to(p.dtype)


def quantize_experts(moe, x: torch.Tensor, toks: ExpertTokens, rule, i: int, cfg, device,
                     report: dict | None = None) -> dict[str, list]:
    """Clip search and quantization of every folded expert matrix on its tokens: suffix -> [AWQLinear per
    expert]. Experts under cfg.min_expert_tokens: RTN, appended to report["fallbacks"] when given."""
    from .awq_search import apply_clip, quantize_linear, search_clip
    from .grid import AWQLinear
    if cfg.keep_fp16:
        raise QuantkitError("--keep-fp16: float16 side columns are not defined for stacked experts")
    xf = x.reshape(-1, x.shape[-1])
    fallbacks = report.setdefault("fallbacks", []) if report is not None else None
    out = {}
    for suffix, p in moe.stacked.items():
        name = blk(i, suffix)
        bits, gs, sym = cfg.grid_for(name)
        qls = []
        for e in range(p.shape[0]):
            idx = toks.idx[e]
            w = p.data[e].detach().float().cpu()
            if idx.numel() < cfg.min_expert_tokens:
                if fallbacks is not None:
                    fallbacks.append({"tensor": name, "expert": e, "tokens": int(idx.numel()),
                                      "reason": f"fewer than {cfg.min_expert_tokens} calibration tokens: RTN, "
                                                "no scale or clip search"})
            elif cfg.clip and suffix not in rule.no_clip:
                xe = xf[idx]
                if suffix == FFN_DOWN_EXPS:  # the down projection's input, from the folded gate/up
                    with torch.no_grad():
                        xe = moe.hidden(e, xe.to(device, p.dtype)).float().cpu()
                step = max(1, xe.shape[0] // cfg.clip_tokens)
                mv = search_clip(w.to(device), xe[::step].to(device), bits, gs, sym, cfg, cfg.scale_dtype).cpu()
                w = apply_clip(w, mv, gs)
            ql = quantize_linear(w, bits, gs, sym, cfg.scale_dtype, name=f"{name}[{e}]")
            qls.append(AWQLinear(ql, w.shape[1]))
        out[suffix] = qls
    return out


def token_report(moe, toks: ExpertTokens, i: int) -> dict[str, list[dict]]:
    """Stacked weight name -> per expert: tokens its statistics used, tokens the router sent it."""
    rows = [{"expert": e, "tokens": int(toks.idx[e].numel()), "routed": toks.routed[e]}
            for e in range(moe.n_experts)]
    return {blk(i, s): rows for s in moe.stacked}
