"""GPTQ / RTN over a whole model, one decoder layer at a time -> QuantizedLinears + a report.

GPTQ streams the layers (calibration.stream): only the current layer is on the device, activations wait on
the CPU. Inside a layer the projections are quantized in execution order (true-sequential):
q/k/v -> o -> gate/up -> down; each group's Hessian comes from a forward pass in which every earlier group
already computes with its dequantized quantized weights. Projections that read the same input share one
Hessian. MoE layers: one Hessian per expert from `MoE.expert_hook` (token counts recorded); an expert that
saw fewer than `min_expert_tokens` tokens falls back to RTN and is named in the report. The router stays
unquantized. RTN needs no calibration and reads one tensor at a time.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..errors import BadInput
from ..families.registry import layer_projections, quantizable  # noqa: F401  (re-exported)
from ..graph import FFN_DOWN_EXPS, FFN_GATE_EXPS, FFN_UP_EXPS, Graph, blk
from .gptq import GPTQ, Timed
from .grid import QuantizedLinear, check_grid_args
from .hessian import quad
from .rtn import rtn_quantize

log = logging.getLogger("quantkit.gptq")

METHODS = ("gptq", "rtn")


@dataclass
class GridOptions:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    damp_auto_increment: float = 0.0025
    # lazy-update block: the same result as 128 up to rounding, and on CPU torch's rank-1 update of a
    # strided [out, block] slice is ~60x faster at 32 columns than at 128 (cache-bound)
    block_size: int = 32
    true_sequential: bool = True
    min_expert_tokens: int = 16  # experts that saw fewer calibration tokens get RTN
    route_all: bool = False  # forced routing: every expert's statistics see every token
    scale_dtype: torch.dtype = torch.float16
    calib_dtype: torch.dtype = torch.float32  # the calibration forwards' dtype (Hessian sums stay float32)

    def check(self) -> None:
        if self.method not in METHODS:
            raise BadInput(f"--method {self.method}: expected one of {METHODS}")
        check_grid_args(self.bits, self.group_size, 1, "--bits/--group-size")
        if not 0 < self.damp_percent < 1:
            raise BadInput(f"--damp {self.damp_percent}: expected 0 < damp < 1")
        if self.static_groups and not self.desc_act:
            raise BadInput("--static-groups only applies with --desc-act")


@dataclass
class QuantResult:
    """linears: canonical weight name -> QuantizedLinear; experts: stacked weight name -> one per expert."""
    linears: dict[str, QuantizedLinear] = field(default_factory=dict)
    experts: dict[str, list[QuantizedLinear]] = field(default_factory=dict)
    report: dict = field(default_factory=dict)


def sha256_of(w: torch.Tensor) -> str:
    """Digest of a weight as float32 bytes (what the report promises readers give back)."""
    return hashlib.sha256(w.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def _errors(w: torch.Tensor, deq: torch.Tensor, H: torch.Tensor | None) -> dict:
    w = w.float()
    d = w - deq
    out = {"weight_rel_err": float(d.square().sum() / w.square().sum().clamp_min(1e-30))}
    if H is not None:  # ||X(W-Q)^T||^2 / ||XW^T||^2 through the Hessian
        num, den = quad(torch.cat([d, w]), H.to(w.device)).split(d.shape[0])
        out["output_rel_err"] = float(num.sum() / den.sum().clamp_min(1e-30))
    return out


class _Run:
    def __init__(self, graph: Graph, opts: GridOptions, device: str, on_tensor, keep: bool):
        self.graph, self.opts, self.device, self.on_tensor, self.keep = graph, opts, device, on_tensor, keep
        self.result = QuantResult()
        self.tensors: dict[str, dict] = {}
        self.fallbacks: list[dict] = []
        self.layers: list[dict] = []
        self.phases = {"statistics_s": 0.0, "solve_s": 0.0, "experts_s": 0.0}  # the rest of a layer: forward

    # ---- bookkeeping
    def _done(self, name: str, ql, info: dict, deq: torch.Tensor | None = None) -> None:
        if isinstance(ql, list):
            info["sha256"] = sha256_of(torch.stack([q.dequantize() for q in ql]))
            if self.keep:
                self.result.experts[name] = ql
        else:
            info["sha256"] = sha256_of(deq if deq is not None else ql.dequantize())
            if self.keep:
                self.result.linears[name] = ql
        self.tensors[name] = info
        if self.on_tensor is not None:
            self.on_tensor(name, ql)

    def _gptq(self, gp: GPTQ, w: torch.Tensor, name: str) -> tuple[QuantizedLinear, dict, torch.Tensor]:
        o = self.opts
        ql, info = gp.quantize(w, o.bits, o.group_size, o.sym, o.desc_act, o.static_groups, o.damp_percent,
                               o.block_size, o.damp_auto_increment, o.scale_dtype)
        deq = ql.dequantize(torch.float32)
        info = {"method": "gptq", "tokens": info["nsamples"], "damp_percent": info["damp_percent"],
                "damp_failed": info["damp_failed"], "loss": info["loss"], "dead_columns": info["dead_columns"],
                "time_s": info["time_s"], **_errors(w, deq, gp.H)}
        return _cpu(ql), info, deq

    def _rtn(self, w: torch.Tensor, name: str, H: torch.Tensor | None = None):
        t0 = time.perf_counter()
        o = self.opts
        ql = rtn_quantize(w.float(), o.bits, o.group_size, o.sym, o.scale_dtype, name=name)
        deq = ql.dequantize(torch.float32)
        info = {"method": "rtn", "time_s": time.perf_counter() - t0, **_errors(w, deq, H)}
        return _cpu(ql), info, deq

    # ---- RTN: no calibration, one tensor at a time
    def rtn_layers(self, progress: bool):
        """Yields each layer's index once its tensors went to on_tensor."""
        from tqdm import tqdm
        for i in tqdm(range(self.graph.hparams.n_layers), desc="layers", unit="layer", disable=not progress):
            t0 = time.perf_counter()
            names = []
            for s in layer_projections(self.graph, i):
                name = blk(i, s)
                if name not in self.graph:
                    continue
                w = self.graph[name].load().to(self.device, torch.float32)
                if w.dim() == 3:
                    parts = [self._rtn(w[e], f"{name}[{e}]") for e in range(w.shape[0])]
                    qls = [p[0] for p in parts]
                    info = {"method": "rtn", "time_s": sum(p[1]["time_s"] for p in parts),
                            "experts": [{"expert": e, **p[1]} for e, p in enumerate(parts)]}
                    self._done(name, qls, info)
                else:
                    ql, info, deq = self._rtn(w, name)
                    self._done(name, ql, info, deq)
                names.append(name)
            self.layers.append({"layer": i, "time_s": time.perf_counter() - t0, "tensors": names})
            yield i

    # ---- GPTQ: streamed layers
    def on_slot(self, slot, budget_bytes: int) -> None:
        """True-sequential GPTQ of one streamed layer, branch by branch (calibration.stream.run_sequential);
        the slot's output store receives the quantized layer's outputs."""
        from ..calibration.stream import run_sequential
        if not self.opts.true_sequential or not hasattr(slot.layer, "branch"):
            slot.replacement = self.on_layer(slot.i, slot.layer, slot.store, slot.rope)
            return
        t0 = time.perf_counter()
        i, layer, store, rope = slot.i, slot.layer, slot.store, slot.rope
        lin = layer.linears()
        moe = layer.moe()
        gps: dict = {}

        ph = self.phases

        def on_input(g):
            gps[g] = Timed(GPTQ(lin[g[0]].in_features, name=g[0], gather=True), ph)
            return gps[g]

        def on_group(g):
            store.phase(f"GPTQ {'/'.join(g)}")
            t = time.perf_counter()
            self._quantize_group(i, lin, g, gps.pop(g).acc)
            ph["solve_s"] += time.perf_counter() - t

        def on_branch(k, view, inputs):
            if layer.mixer(k) is not moe:
                return
            t = time.perf_counter()
            ex = self._capture(view, lin, [], moe, inputs, rope, stop=False, down=False)
            self._quantize_experts(i, moe, ex, (FFN_GATE_EXPS, FFN_UP_EXPS))
            ex = self._capture(view, lin, [], moe, inputs, rope, stop=False, up=False)
            self._quantize_experts(i, moe, ex, (FFN_DOWN_EXPS,))
            ph["experts_s"] += time.perf_counter() - t
        run_sequential(layer, store, rope, self.device, slot.out, on_input, on_group,
                       on_branch if moe is not None else None, budget_bytes)
        slot.outputs_written = True
        groups = [g for g in layer.spec.input_groups() if all(s in lin for s in g)]
        names = [blk(i, s) for g in groups for s in g] + \
            ([blk(i, s) for s in moe.stacked] if moe is not None else [])
        self.layers.append({"layer": i, "time_s": time.perf_counter() - t0, "tensors": names})

    def on_layer(self, i: int, layer, store, rope) -> None:
        t0 = time.perf_counter()
        lin = layer.linears()
        moe = layer.moe()
        groups = [g for g in layer.spec.input_groups() if all(s in lin for s in g)]
        if self.opts.true_sequential:
            for g in groups:
                gps = self._capture(layer, lin, [g], None, store, rope, stop=True)
                store.phase(f"GPTQ {'/'.join(g)}")
                self._quantize_group(i, lin, g, gps[g[0]])
            if moe is not None:
                ex = self._capture(layer, lin, [], moe, store, rope, stop=False, down=False)
                self._quantize_experts(i, moe, ex, (FFN_GATE_EXPS, FFN_UP_EXPS))
                ex = self._capture(layer, lin, [], moe, store, rope, stop=False, up=False)
                self._quantize_experts(i, moe, ex, (FFN_DOWN_EXPS,))
        else:  # every input from the unquantized layer, then quantize all
            gps = self._capture(layer, lin, groups, moe, store, rope, stop=moe is None)
            for g in groups:
                self._quantize_group(i, lin, g, gps[g[0]])
            if moe is not None:
                self._quantize_experts(i, moe, gps, tuple(moe.stacked))
        names = [blk(i, s) for g in groups for s in g] + \
            ([blk(i, s) for s in moe.stacked] if moe is not None else [])
        self.layers.append({"layer": i, "time_s": time.perf_counter() - t0, "tensors": names})
        return None

    def _capture(self, layer, lin, groups, moe, store, rope, stop: bool, up: bool = True, down: bool = True):
        """Hessians for the listed dense groups (keyed by each group's first suffix) and, with `moe`, per-expert
        Hessians of the gate/up input (key (FFN_GATE_EXPS, e)) and the down input (key (FFN_DOWN_EXPS, e))."""
        from ..calibration.stream import Stop, Tape, run_layer, shares_fit
        gps: dict = {}
        handles = []
        last = groups[-1][0] if groups else None
        tape = Tape()  # the forwards run side by side; the sums get their inputs in sample order
        # dense groups: a sample's share of each Hessian computed on its forward's thread while the shares in
        # flight fit (as run_sequential); else the inputs go to add_batch in order
        ahead = shares_fit(self.device, [lin[g[0]].in_features for g in groups])

        for g in groups:
            first = g[0]
            gps[first] = GPTQ(lin[first].in_features, name=f"{first}")

            def pre(mod, args, first=first):
                gp = gps[first]
                if ahead:
                    tape.put(gp.add_product, gp.product(args[0]))
                else:
                    tape.put(gp.add_batch, args[0])
                if stop and first == last:
                    raise Stop
            handles.append(lin[first].register_forward_pre_hook(pre))
        if moe is not None:
            d, f = moe.gate_exps.shape[2], moe.down_exps.shape[2]
            moe.route_all = self.opts.route_all
            for e in range(moe.n_experts):
                if up:
                    gps[FFN_GATE_EXPS, e] = GPTQ(d, name=f"expert {e}")
                if down:
                    gps[FFN_DOWN_EXPS, e] = GPTQ(f, name=f"expert {e}")

            def hook(e, xe):
                if up:
                    tape.put(gps[FFN_GATE_EXPS, e].add_batch, xe)
                if down:  # the down projection's input, from the current gate/up weights
                    tape.put(gps[FFN_DOWN_EXPS, e].add_batch, moe.hidden(e, xe))
            moe.expert_hook = hook
        try:
            run_layer(layer, store, rope, self.device, store.dtype, tape=tape, accs=list(gps.values()))
        finally:
            for h in handles:
                h.remove()
            if moe is not None:
                moe.expert_hook = None
                moe.route_all = False
        return gps

    def _quantize_group(self, i: int, lin, group, gp: GPTQ) -> None:
        from ..calibration.dist import spread
        from ..calibration.stream import master_weight

        mine = {}

        def one(s):  # under torchrun the group's linears are spread over the ranks
            gp.name = blk(i, s)
            w = master_weight(self.graph, i, s, lin[s].weight.data, self.device)
            ql, info, mine[s] = self._gptq(gp, w, gp.name)
            return ql, info
        for s, (ql, info) in zip(group, spread(list(group), one)):
            name, mod = blk(i, s), lin[s]
            deq = mine[s] if s in mine else ql.dequantize(torch.float32)
            mod.weight.data = deq.to(mod.weight.dtype)
            self._done(name, ql, info, deq)

    def _quantize_experts(self, i: int, moe, gps: dict, suffixes) -> None:
        from ..calibration.dist import spread
        from ..calibration.stream import master_weight
        params = moe.stacked
        for s in suffixes:
            name = blk(i, s)
            p = params[s]
            p.data = p.data.clone()  # written per expert below; never into the graph's own storage
            w32 = master_weight(self.graph, i, s, p.data, p.device)  # read before any expert is written back
            qls, infos = [], []

            def one(e, name=name, w32=w32, s=s):  # under torchrun the experts are spread over the ranks
                gp = gps[FFN_DOWN_EXPS if s == FFN_DOWN_EXPS else FFN_GATE_EXPS, e]
                gp.name = f"{name}[{e}]"
                if gp.nsamples < self.opts.min_expert_tokens:
                    ql, info, _ = self._rtn(w32[e], gp.name, gp.H if gp.nsamples else None)
                    info["tokens"] = gp.nsamples
                    return ql, info
                return self._gptq(gp, w32[e], gp.name)[:2]
            for e, (ql, info) in enumerate(spread(list(range(p.shape[0])), one)):
                if info["method"] == "rtn":
                    self.fallbacks.append({"tensor": name, "expert": e, "tokens": info["tokens"],
                                           "reason": f"fewer than {self.opts.min_expert_tokens} calibration tokens"})
                p.data[e] = ql.dequantize(torch.float32).to(p.dtype)
                qls.append(ql)
                infos.append({"expert": e, **info})
            self._done(name, qls, {"method": "gptq", "time_s": sum(x["time_s"] for x in infos), "experts": infos})


def _cpu(ql: QuantizedLinear) -> QuantizedLinear:
    return QuantizedLinear(ql.codes.cpu(), ql.scales.cpu(), ql.zeros.cpu(), ql.g_idx.cpu(), ql.bits,
                           ql.group_size, ql.sym, ql.desc_act, None)


def quantize_graph(graph: Graph, samples: list[torch.Tensor] | None, opts: GridOptions, device: str = "cpu",
                   progress: bool = True, on_tensor: Callable[[str, object], None] | None = None,
                   keep: bool = True, budget_bytes: int = 4 * 2**30) -> QuantResult:
    """Quantize every decoder projection of `graph` (see module doc). samples: equal-length token ids [T]
    (GPTQ only). on_tensor(name, QuantizedLinear | list per expert) is called as each tensor finishes;
    keep=False drops them afterwards (a writer that packs them right away keeps memory low)."""
    result = QuantResult()
    for _, part in quantize_layers(graph, samples, opts, device, progress, keep, budget_bytes, result):
        if on_tensor is not None:
            for name, ql in part.items():
                on_tensor(name, ql)
    return result


def quantize_layers(graph: Graph, samples: list[torch.Tensor] | None, opts: GridOptions, device: str = "cpu",
                    progress: bool = True, keep: bool = False, budget_bytes: int = 4 * 2**30,
                    result: QuantResult | None = None, resume=None):
    """Generator form of `quantize_graph`: yields (layer, {name: QuantizedLinear | list per expert}) as each
    layer finishes, so a writer can pull layer by layer; `result` (kept tensors, and the report once the
    generator is exhausted) is filled in. Options and samples are checked before the first layer is asked.
    resume (calibration.checkpoint.ResumeState): finished layers are replayed from it and each new one saved."""
    opts.check()
    if not quantizable(graph):
        raise BadInput(f"{graph.source}: no decoder projections to quantize")
    if opts.method != "rtn":
        if not samples:
            raise BadInput("GPTQ needs calibration samples (--calib)")
        lengths = {int(s.numel()) for s in samples}
        if len(lengths) != 1:
            raise BadInput(f"calibration samples must have one length, got {sorted(lengths)}")
    part: dict = {}
    run = _Run(graph, opts, device, part.__setitem__, keep)
    if result is not None:
        run.result = result
    return _layers(run, graph, samples, opts, device, progress, budget_bytes, part, resume)


def _replay(run: _Run, resume):
    """The layers a resumed run finished before: results and report slices from the resume state."""
    for i, p, rep in resume.finished():
        run.layers.append(rep["layer"])
        run.tensors.update(rep["tensors"])
        run.fallbacks += rep["fallbacks"]
        if run.keep:
            for name, q in p.items():
                (run.result.experts if isinstance(q, list) else run.result.linears)[name] = q
        yield i, p


def _layers(run: _Run, graph, samples, opts: GridOptions, device, progress, budget_bytes, part: dict, resume):
    t0 = time.perf_counter()
    if opts.method == "rtn":
        for i in run.rtn_layers(progress):
            yield i, dict(part)
            part.clear()
        n, t = 0, 0
    else:
        from ..calibration.stream import iter_layers
        start, inputs, last = 0, None, {}
        if resume is not None:
            yield from _replay(run, resume)
            start = resume.done + 1
            inputs = resume.inputs(opts.calib_dtype) if start else None

        def on_done(i, out):  # layer i's outputs are final: it and the next layer's inputs go to disk
            resume.save(i, last["part"], last["report"], out.data)
        for slot in iter_layers(graph, samples, device=device, dtype=opts.calib_dtype, budget_bytes=budget_bytes,
                                progress=progress, start=start, inputs=inputs,
                                on_done=on_done if resume is not None else None):
            nf = len(run.fallbacks)
            run.on_slot(slot, budget_bytes)
            lay = run.layers[-1]
            last = {"part": dict(part), "report": {"layer": lay, "fallbacks": run.fallbacks[nf:],
                                                   "tensors": {n: run.tensors[n] for n in lay["tensors"]}}}
            yield slot.i, dict(part)
            part.clear()
        n, t = len(samples), int(samples[0].numel())
    o = asdict(opts)
    o["scale_dtype"] = str(opts.scale_dtype).replace("torch.", "")
    o["calib_dtype"] = str(opts.calib_dtype).replace("torch.", "")
    total = time.perf_counter() - t0
    layer_s = sum(lay["time_s"] for lay in run.layers)
    phases = {k: round(v, 3) for k, v in run.phases.items()}
    phases["forward_s"] = round(max(0.0, layer_s - sum(run.phases.values())), 3)  # passes, less the above
    phases["write_and_other_s"] = round(max(0.0, total - layer_s), 3)  # the writer between layers, embedding
    run.result.report = {
        "options": o, "device": str(device), "calib_samples": n, "calib_seqlen": t,
        "calib_dtype": o["calib_dtype"] if opts.method != "rtn" else None,
        "total_time_s": total, "phase_times": phases, "layers": run.layers, "tensors": run.tensors,
        "fallbacks": run.fallbacks,
    }


def format_report(report: dict) -> str:
    """A fixed-width table of the report: one row per tensor (experts summarized), then totals."""
    rows = [f"{'tensor':34s} {'method':6s} {'tokens':>8s} {'damp%':>7s} {'gptq loss':>11s} {'out err':>9s} "
            f"{'w err':>9s} {'s':>6s}"]

    def fmt(x, spec):
        return format(x, spec) if x is not None else "-"
    for name, t in report["tensors"].items():
        if "experts" in t:
            ex = t["experts"]
            n_rtn = sum(x["method"] == "rtn" for x in ex)
            oe = [x["output_rel_err"] for x in ex if "output_rel_err" in x]
            rows.append(f"{name:34s} {t['method']:6s} {fmt(sum(x.get('tokens', 0) for x in ex), '8d')} "
                        f"{'-':>7s} {fmt(sum(x.get('loss', 0.0) for x in ex), '11.4g')} "
                        f"{fmt(max(oe) if oe else None, '9.2e')} "
                        f"{max(x['weight_rel_err'] for x in ex):9.2e} {t['time_s']:6.2f}"
                        + (f"  ({len(ex)} experts, {n_rtn} RTN fallback)" if n_rtn else f"  ({len(ex)} experts)"))
            continue
        rows.append(f"{name:34s} {t['method']:6s} {fmt(t.get('tokens'), '8d')} "
                    f"{fmt(100 * t['damp_percent'] if 'damp_percent' in t else None, '7.3f')} "
                    f"{fmt(t.get('loss'), '11.4g')} {fmt(t.get('output_rel_err'), '9.2e')} "
                    f"{t['weight_rel_err']:9.2e} {t['time_s']:6.2f}")
    for lay in report["layers"]:
        rows.append(f"layer {lay['layer']:3d}: {lay['time_s']:.2f} s")
    rows.append(f"total {report['total_time_s']:.2f} s, {len(report['fallbacks'])} RTN fallbacks")
    for fb in report["fallbacks"]:
        rows.append(f"  fallback: {fb['tensor']} expert {fb['expert']} ({fb['tokens']} tokens): {fb['reason']}")
    return "\n".join(rows)
