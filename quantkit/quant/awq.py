"""AWQ: activation-aware weight quantization (Lin et al., MLSys 2024), as llm-awq / AutoAWQ run it.

Per decoder layer, with the float layer's calibration inputs:
  1. scale search, per group of linears sharing an input (awq_groups): s = x_mean^a (or the "duo" form
     x_mean^a / w_mean^(1-a)), normalized by sqrt(max s * min s), a on a grid of 20; the s whose
     Q(W*s)/s gives the smallest MSE at the group's block output wins. All groups search against the
     float layer, then every s is folded: prev op's output / s, the linears' input columns * s.
  2. clip search (not for q/k): per (row, group) max |w| shrunk by up to 50% in 20 steps, the shrink with the
     least output MSE on a token sample wins; weights are clamped to it.
  3. optional keep-fp16: the PCT% input columns with the largest mean |x| (of the scaled input) stay float16;
     the rest are quantized on the integer grid (asymmetric zero point by default, AWQ's min/max range).
Like the reference, the next layer's inputs are the float layer's outputs.
MoE layers (awq_moe): the norm before the router scales the router's columns (float), every expert's gate/up
and the shared expert's, searched at the block output; each expert's up -> down gets its own scale and clip
on its routed tokens (all tokens with `route_all`); experts under `min_expert_tokens` get RTN, reported.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .. import gemm
from ..errors import QuantkitError
from ..graph import Graph, HParams, LazyTensor, blk
from .awq_groups import LayerRule, ScaleGroup, rule_for
# the searches live in awq_search; their names stay importable from here
from .awq_search import (AWQConfig, _group_pad, abs_mean, apply_clip, fake_quant,  # noqa: F401
                         quantize_linear, salient_channels, search_clip, search_scale)
from .grid import AWQLinear

log = logging.getLogger("quantkit.awq")
PHASES = ("forward_s", "search_s", "clip_quantize_s")



@dataclass
class AWQResult:
    """Per folded group: (layer, group, s) (s [E, in] for per-expert groups). `quantized`: canonical weight
    name -> AWQLinear (a list, one per expert, for stacked experts), or what `pack` turned it into.
    `experts`: stacked weight name -> per-expert token counts; `fallbacks`: experts quantized without search."""
    scales: list[tuple[int, ScaleGroup, torch.Tensor]] = field(default_factory=list)
    quantized: dict[str, object] = field(default_factory=dict)
    tensors: dict[str, dict] = field(default_factory=dict)  # canonical weight name -> AWQLinear.info
    experts: dict[str, list[dict]] = field(default_factory=dict)
    fallbacks: list[dict] = field(default_factory=list)
    # seconds per phase: forward (capture + passing the layer on), scale search, clip search + quantization
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def fold_plan(self) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None, float]]:
        """canonical tensor name -> (input-column multiplier, output-row divisor, offset); norms use the divisor
        (a (1 + w) norm's weight the offset 1: w' = (1 + w) / s - 1)."""
        plan: dict[str, list] = {}
        for i, g, s in self.scales:
            for kind in ("weight", "bias"):
                e = plan.setdefault(blk(i, g.prev, kind), [None, None, 0.0])
                e[1] = s if e[1] is None else e[1] * s
                if kind == "weight" and g.prev_kind == "norm":
                    e[2] = g.prev_offset
            for n in g.linears + g.floats:
                e = plan.setdefault(blk(i, n), [None, None, 0.0])
                e[0] = s if e[0] is None else e[0] * s
        return {k: (v[0], v[1], v[2]) for k, v in plan.items()}


def fold_tensor(w: torch.Tensor, col_mul: torch.Tensor | None, row_div: torch.Tensor | None,
                offset: float = 0.0) -> torch.Tensor:
    """Input columns (last dim) * col_mul, output rows / row_div. A per-expert scale [E, n] applies to
    stacked weights [E, out, in] expert by expert; a 1-D tensor (norm, bias, gate vector) is scaled
    elementwise, a per-expert bias [E, out] row by row. `offset`: a norm computing (offset + w) (Gemma's
    1 + w) keeps that form: w' = (offset + w) / row_div - offset."""
    w = w.float()
    if offset and row_div is not None and col_mul is None:
        return (w + offset) / row_div.float() - offset
    if col_mul is not None:
        c = col_mul.float()
        w = w * (c[:, None, :] if c.dim() == 2 and w.dim() == 3 else c)
    if row_div is not None:
        r = row_div.float()
        if r.dim() == 2 and w.dim() == 3:
            w = w / r[:, :, None]
        elif r.dim() == 1 and w.dim() == 2:
            w = w / r[:, None]
        else:  # same shape: norm weights, biases (per expert too)
            w = w / r
    return w


def fold_graph(graph: Graph, plan: dict) -> Graph:
    """The graph with AWQ scales folded in (lazy). The float function is unchanged."""
    out = {}
    for name, t in graph.tensors.items():
        if name in plan:
            c, r, o = plan[name]
            out[name] = LazyTensor(t.shape, "F32", lambda t=t, c=c, r=r, o=o: fold_tensor(t.load(), c, r, o),
                                   source=t.source + " (AWQ-scaled)")
        else:
            out[name] = t
    return graph.with_tensors(out)


def quantized_graph(graph: Graph, res: AWQResult) -> Graph:
    """The folded graph with every quantized linear replaced by its dequantized weight (for evaluation)."""
    g = fold_graph(graph, res.fold_plan())
    tensors = dict(g.tensors)
    for name, a in res.quantized.items():
        parts = a if isinstance(a, list) else [a]
        if not all(isinstance(x, AWQLinear) for x in parts):
            raise QuantkitError(f"{name}: quantized_graph needs run_awq results without `pack`")
        fn = (lambda a=a: torch.stack([x.dequantize() for x in a])) if isinstance(a, list) else a.dequantize
        tensors[name] = LazyTensor(graph[name].shape, "F32", fn, source=f"{name} (AWQ dequantized)")
    return g.with_tensors(tensors)


def layer_params(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical suffix -> weight of every linear, stacked expert and float input (router ...) of a layer."""
    out = {n: m.weight for n, m in layer.linears().items()}
    moe = layer.moe()
    if moe is not None:
        out.update(moe.float_params())
        out.update(moe.stacked)
    return out


def fold_layer_scales(layer: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    lin = layer.linears()
    if group.per_expert:
        from .awq_moe import fold_expert_scales
        return fold_expert_scales(layer.moe(), group, s)
    params = layer_params(layer)
    sd = s.to(params[group.linears[0]].device)
    with torch.no_grad():
        if group.prev_kind == "norm":
            norm = getattr(layer, group.prev)  # layers keep norms under their canonical suffix
            off = float(getattr(norm, "offset", 0.0))  # RMSNorm (1 + w): the scale folds into 1 + w
            norm.weight.data = (norm.weight.data + off) / sd.to(norm.weight.dtype) - off
            if getattr(norm, "bias", None) is not None:
                norm.bias.data = norm.bias.data / sd.to(norm.bias.dtype)
        else:
            p = lin[group.prev]
            p.weight.data = p.weight.data / sd.to(p.weight.dtype)[:, None]
            if p.bias is not None:
                p.bias.data = p.bias.data / sd.to(p.bias.dtype)
        for n in group.linears + group.floats:  # stacked experts and 1-D gate vectors broadcast on the last dim
            params[n].data = params[n].data * sd.to(params[n].dtype)


# ---------------------------------------------------------------- one layer, the whole graph

def _blocks(layer: nn.Module, rope) -> dict[str, Callable]:
    """Module attribute -> the block's function of its input (what a scale group's error is measured at)."""
    cos, sin = rope
    out = {"attn": lambda x: layer.attn(x, cos, sin), "mlp": lambda x: layer.mlp(x)}
    if hasattr(layer, "linear_attn"):  # Qwen3-Next's Gated DeltaNet (takes no rope)
        out["linear_attn"] = lambda x: layer.linear_attn(x)
    return out


MOE_IN = "moe_input"  # feature key of a MoE block's input (router, experts' gate/up, shared expert)
FEATURE_BUDGET = 4 * 2**30  # bytes of one layer's captured inputs kept in RAM; the rest spill to disk


def capture_features(layer: nn.Module, rule: LayerRule, store, rope, device, dtype=None, out=None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Inputs [S, T, in] (CPU, in the store's dtype: the calibration dtype) of each distinct linear input;
    `owner` maps a linear to the key of its input.
    A MoE layer's block input is captured under MOE_IN (stacked experts read it through their routing).
    `out` (an ActivationStore) receives the layer's outputs of the same pass."""
    from ..calibration.dist import gather_samples, world
    from ..calibration.stream import ActivationStore, capture_inputs
    lin = layer.linears()
    moe = layer.moe()
    stacked = set(moe.stacked) if moe is not None else set()
    owner = {}
    for g in rule.groups:
        if g.per_expert:
            continue
        key = MOE_IN if g.linears[0] in stacked else g.linears[0]
        for n in g.linears:
            owner[n] = key
    grouped = set(owner)
    for ig in rule.inputs:  # unscaled linears sharing an input: captured once, at the first (always run:
        free = [n for n in ig if n in lin and n not in grouped]  # DSA's indexer q runs only past index_topk)
        for n in free:
            owner.setdefault(n, free[0])
    for n in lin:
        owner.setdefault(n, n)
    keys = {k for n, k in owner.items() if n in lin}
    if moe is not None:
        keys.add(MOE_IN)
    mods = {k: (moe if k == MOE_IN else lin[k]) for k in keys}
    dtype = dtype or store.dtype
    if world().active:  # each rank ran its own samples: every rank searches on all of them, in sample order
        got: dict[str, list] = {k: [] for k in keys}
        capture_inputs(layer, mods, store, rope, device, dtype,
                       lambda n, x: got[n].append(x.to("cpu", store.dtype)), out=out)
        return {k: gather_samples(torch.cat(got[k]), store.n_total) for k in sorted(got)}, owner
    # in RAM while the layer's features fit FEATURE_BUDGET, past it in temporary files (ActivationStore)
    stores: dict[str, ActivationStore] = {}
    seen = dict.fromkeys(keys, 0)

    def put(n: str, x: torch.Tensor) -> None:
        if n not in stores:
            used = sum(a.data.numel() * a.data.element_size() for a in stores.values() if not a.on_disk)
            stores[n] = ActivationStore(store.n, store.seqlen, x.shape[-1], store.dtype,
                                        budget_bytes=FEATURE_BUDGET - used)
        stores[n][seen[n]] = x
        seen[n] += 1
    capture_inputs(layer, mods, store, rope, device, dtype, put, out=out)
    short = [k for k in keys if seen[k] != store.n]
    if short:
        raise QuantkitError(f"AWQ: inputs of {short} were seen {[seen[k] for k in short]} times for {store.n} samples")
    return {k: stores[k].data for k in sorted(stores)}, owner


def awq_layer(layer: nn.Module, hp: HParams, i: int, store, rope, cfg: AWQConfig, device, dtype=None,
              variants: dict[str, AWQConfig] | None = None, experts: dict | None = None,
              phases: dict[str, float] | None = None, out=None, master: nn.Module | None = None
              ) -> tuple[list[tuple[ScaleGroup, torch.Tensor]], dict[str, dict[str, object]]]:
    """Search and fold one layer in place with `cfg`; then clip and quantize it once per variant config
    (keep-fp16 share, clip on/off ...: everything after the fold), {} for none. MoE layers: each expert is
    searched, clipped and quantized on its routed tokens (awq_moe); `experts` (a dict) receives the
    per-expert token counts and the experts that fell back to RTN; `phases` (PHASES) gets the seconds spent;
    `out` (an ActivationStore) the float layer's outputs, from the pass that captures its inputs.
    master: the layer in float32 when `layer` computes in a lower calibration dtype: the searches quantize its
    weights (their forwards run `layer`), and it, not `layer`, is folded, clipped and quantized."""
    import time

    from . import awq_moe
    ph = phases if phases is not None else dict.fromkeys(PHASES, 0.0)
    t = time.perf_counter()
    rule = rule_for(hp, i)
    feats, owner = capture_features(layer, rule, store, rope, device, dtype, out)
    t, ph["forward_s"] = time.perf_counter(), ph["forward_s"] + time.perf_counter() - t
    lin = layer.linears()
    moe = layer.moe()
    params = layer_params(layer)
    blocks = _blocks(layer, rope)
    mparams = layer_params(master) if master is not None else None
    toks = awq_moe.expert_tokens(moe, feats[MOE_IN], cfg.route_all) if moe is not None else None
    found = []
    for g in rule.groups:
        if g.per_expert:
            s = awq_moe.search_expert_scales(moe, g, feats[MOE_IN], toks, cfg, cfg.grid_for(blk(i, g.linears[0])),
                                             device, master.moe() if master is not None else None)
            found.append((g, s))
            continue
        store.phase(f"AWQ scale search {'/'.join(g.linears)}")
        mods = {n: (lin[n] if n in lin else params[n]) for n in g.linears}
        grids = {n: cfg.grid_for(blk(i, n)) for n in g.linears}
        block = blocks[g.block] if g.block in blocks else mods[g.linears[0]]
        s, _ = search_scale(feats[owner[g.linears[0]]], mods, block, cfg, grids, device,
                            {n: mparams[n] for n in g.linears} if mparams is not None else None)
        found.append((g, s))
    if master is not None:  # from here on: the float32 layer
        layer, lin, moe = master, master.linears(), master.moe()
    for g, s in found:
        fold_layer_scales(layer, g, s)
        if not g.per_expert:
            feats[owner[g.linears[0]]] /= s
    t, ph["search_s"] = time.perf_counter(), ph["search_s"] + time.perf_counter() - t
    if variants:
        store.phase("AWQ clip search and quantization")
    out = {}
    for n, (k, c) in enumerate((variants or {}).items()):
        out[k] = quantize_layer(lin, feats, owner, rule, i, c, device)
        if moe is not None:  # fallbacks are the same for every variant: reported once
            out[k].update(awq_moe.quantize_experts(moe, feats[MOE_IN], toks, rule, i, c, device,
                                                   experts if n == 0 else None))
    if moe is not None and experts is not None:
        experts.setdefault("tokens", {}).update(awq_moe.token_report(moe, toks, i))
    ph["clip_quantize_s"] += time.perf_counter() - t
    return found, out


def quantize_layer(lin: dict[str, nn.Linear], feats: dict[str, torch.Tensor], owner: dict[str, str],
                   rule: LayerRule, i: int, cfg: AWQConfig, device) -> dict[str, AWQLinear]:
    """Keep-fp16 selection, clip search and quantization of a folded layer's linears (nothing is modified)."""
    import time
    out = {}
    for n, m in lin.items():
        t0 = time.perf_counter()
        bits, gs, sym = cfg.grid_for(blk(i, n))
        feat = feats[owner[n]]
        x = feat.reshape(-1, m.in_features)
        x = x[:: max(1, x.shape[0] // cfg.clip_tokens)].float()  # the clip search's and the report's tokens
        w = m.weight.detach().float().cpu()
        keep = kept_cols = None
        w0 = w
        if cfg.keep_fp16 > 0:
            keep = salient_channels(abs_mean(feat, max(1, cfg.batch_tokens // feat.shape[1])), cfg.keep_fp16)
            mask = torch.ones(m.in_features, dtype=torch.bool)
            mask[keep.long()] = False
            kept_cols = w[:, keep.long()].to(torch.float16)
            w, x = w[:, mask], x[:, mask]
            w0 = w
        if cfg.clip and n not in rule.no_clip:
            mv = search_clip(w.to(device), x.to(device), bits, gs, sym, cfg, cfg.scale_dtype).cpu()
            w = apply_clip(w, mv, gs)
        # biases stay float tensors of the graph (folded by fold_graph), not part of the packed weight
        ql = quantize_linear(w, bits, gs, sym, cfg.scale_dtype, name=blk(i, n))
        out[n] = AWQLinear(ql, m.in_features, keep, kept_cols,
                           info=_errors(m.weight.detach().float().cpu() if keep is None else w0, ql, x, cfg, t0))
    return out


def _errors(w: torch.Tensor, ql, xs: torch.Tensor, cfg: AWQConfig, t0: float) -> dict:
    """Relative weight error and output error on a token sample xs (the quantized columns), as GPTQ reports."""
    import time
    deq = ql.dequantize(torch.float32)
    d = w - deq
    y = gemm.linear(xs, w)
    return {"method": "awq", "weight_rel_err": float(d.square().sum() / w.square().sum().clamp_min(1e-30)),
            "output_rel_err": float(gemm.linear(xs, d).square().sum() / y.square().sum().clamp_min(1e-30)),
            "time_s": time.perf_counter() - t0}


def run_awq(graph: Graph, samples: list[torch.Tensor], cfg: AWQConfig, device: str = "cpu",
            progress: bool = True, quantize: bool = True,
            pack: Callable[[str, AWQLinear], object] | None = None,
            variants: dict[str, AWQConfig] | None = None) -> AWQResult | dict[str, AWQResult]:
    """AWQ over every decoder layer, one layer in memory at a time. `pack(name, AWQLinear)` (optional)
    turns each quantized linear into its stored form right away. With `variants` (name -> config differing
    only after the fold, e.g. keep_fp16), the scale search runs once and one result per variant is returned."""
    vs = variants if variants is not None else ({"": cfg} if quantize else {})
    results = {k: AWQResult() for k in (vs or {"": None})}
    for _, parts in _awq_layers(graph, samples, cfg, device, progress, vs, results):
        for k, res in results.items():
            for name, a in parts.get(k, {}).items():
                res.quantized[name] = pack(name, a) if pack is not None else a
    return results if variants is not None else results[""]


def awq_layers(graph: Graph, samples: list[torch.Tensor], cfg: AWQConfig, device: str = "cpu",
               progress: bool = True, res: AWQResult | None = None):
    """Generator form of `run_awq`: yields (layer, {name: AWQLinear | list per expert}) as each layer finishes
    (nothing is kept in `res.quantized`); `res` gets the layer's scales (what folds its norms) before the yield,
    and its report fields."""
    if not samples:
        raise QuantkitError("AWQ needs at least one calibration sample")
    res = res if res is not None else AWQResult()
    gen = _awq_layers(graph, samples, cfg, device, progress, {"": cfg}, {"": res})
    return ((i, parts.get("", {})) for i, parts in gen)


def _awq_layers(graph, samples, cfg, device, progress, vs, results):
    import time

    from ..calibration.stream import iter_layers
    if not samples:
        raise QuantkitError("AWQ needs at least one calibration sample")
    hp = graph.hparams
    phases = dict.fromkeys(PHASES, 0.0)
    for res in results.values():  # one clock shared by every variant's result
        res.phases = phases

    low = cfg.calib_dtype != torch.float32
    ex32 = None
    if low:  # the layers' float32 weights: what the searches quantize and the folds change
        from ..runtime import executor_for
        ex32 = executor_for(graph, device=device, dtype=torch.float32, keep=False)

    def on_layer(i, layer, store, rope, nxt):
        # the float layer's outputs feed the next layer, as in the reference: they come from the pass that
        # captures its inputs, before any scale is folded (into a copy, or into the float32 master)
        work, master = (layer, ex32.build_layer(i)) if low else (copy.deepcopy(layer), None)
        ex: dict = {}
        found, qs = awq_layer(work, hp, i, store, rope, cfg, device, variants=vs, experts=ex, phases=phases,
                              out=nxt, master=master)
        out = {}
        for k, res in results.items():
            res.scales += [(i, g, s) for g, s in found]
            res.experts.update(ex.get("tokens", {}))
            res.fallbacks += ex.get("fallbacks", [])
            out[k] = {}
            for n, a in qs.get(k, {}).items():  # stacked experts: one entry per expert, as GPTQ reports them
                res.tensors[blk(i, n)] = {"method": "awq", "experts": [{"expert": e, **x.info} for e, x in
                                                                       enumerate(a)]} if isinstance(a, list) else a.info
                out[k][blk(i, n)] = a
        del work, master
        return out

    t = time.perf_counter()
    for slot in iter_layers(graph, samples, device=device, dtype=cfg.calib_dtype, progress=progress):
        phases["forward_s"] += time.perf_counter() - t  # the embedding, building layers, passing them on
        out = on_layer(slot.i, slot.layer, slot.store, slot.rope, slot.out)
        slot.outputs_written = True
        yield slot.i, out
        t = time.perf_counter()


def check_awq_graph(graph: Graph, what: str = "--method awq") -> list[str]:
    """Every norm kind folds exactly (RMSNorm and LayerNorm: w / s, b / s; Gemma's 1 + w: (1 + w) / s - 1),
    except a norm without weight (OLMo 1): the linears it feeds are quantized unscaled, and the groups whose
    previous op is a linear (v -> o, up -> down) are still scaled. Returns (and logs) what is left unscaled."""
    from ..families import family_of
    hp = graph.hparams
    fam = family_of(hp.arch)
    skipped = sorted({n for i in range(hp.n_layers) for n in fam.layer(hp, i).unscaled_norms()})
    if skipped:
        log.warning("%s: %s has weightless norms (%s): the linears after them are quantized without AWQ scales; "
                    "only linear -> linear groups (v -> o, up -> down) are scaled", what, graph.source,
                    ", ".join(skipped))
    return skipped
