"""Write an integer-quantized HF checkpoint: the GPTQ layout (AutoGPTQ / GPTQModel, vLLM, transformers) or
compressed-tensors pack-quantized (vLLM, transformers).

Quantized projections are packed as they arrive (`QuantizedPacker.add`), so only packed words wait in memory;
with a `LayerPull` the writer asks the driver for layer i only when it reaches that layer's first tensor
(packed shapes are planned from the graph up front: `packed_shapes`), so one layer's words wait at a time;
stacked experts are packed expert by expert under the modules their family declares (expert_layout);
everything else (embeddings, norms, router, lm_head) is written as fp16/bf16 from the graph, one tensor at a
time. The directory (safetensors shards, config.json with `quantization_config`, tokenizer files, the run's
report) appears whole or not at all.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from ..atomic import atomic_output
from ..errors import BadInput
from ..graph import Graph
from ..quant.grid import n_groups_for
from .compressed_tensors import CT_BITS, ct_quantization_config, pack_compressed_tensors
from .gptq_layout import GPTQ_BITS, _check_packable, gptq_quantization_config, pack_gptq
from .safetensors_io import PlannedTensor, write_sharded

FORMATS = ("gptq", "compressed-tensors")
REPORT_NAME = "quantkit_report.json"
DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def checkpoint_format_for(sym: bool) -> str:
    """v1 ("gptq", zero-1 stored) for symmetric grids, the widest-read form; asymmetric grids can have a
    zero-point of 0, which v1 cannot hold, so they are written as gptq_v2."""
    return "gptq" if sym else "gptq_v2"


def check_layout(graph: Graph, fmt: str, bits: int, group_size: int, desc_act: bool, static_groups: bool) -> None:
    """Fail before any work when a projection of `graph` cannot be stored in `fmt` with these options."""
    from ..export import _hf_names
    from ..families.registry import quantizable
    if fmt not in FORMATS:
        raise BadInput(f"--format {fmt}: expected one of {FORMATS}")
    allowed = GPTQ_BITS if fmt == "gptq" else CT_BITS
    if bits not in allowed:
        raise BadInput(f"--bits {bits}: the {fmt} layout holds {allowed}")
    if fmt == "compressed-tensors" and desc_act and not static_groups:
        raise BadInput("--desc-act with --format compressed-tensors needs --static-groups "
                       "(compressed-tensors stores no per-column group index)")
    from .expert_layout import expert_modules, module_shapes
    _, rev = _hf_names(graph)
    mods = expert_modules(graph, fmt)
    shapes = {n: s for n, s in quantizable(graph).items() if len(s) == 2}
    for m in mods:
        shapes[m.prefix] = module_shapes(graph, m)
    covered = {w for m in mods for w in m.weights}
    from .row_maps import row_maps
    maps = row_maps(graph)
    for f in maps:
        for s in f.sources:
            if s != f.key:
                shapes.pop(s, None)
        shapes[f.key] = (len(f.rows), graph[f.sources[0]].shape[1])
    mapped = {s for f in maps for s in f.sources}
    for name, shape in quantizable(graph).items():
        if len(shape) == 3 and name not in covered:
            raise BadInput(f"{name}: stacked expert weights {list(shape)} have no {fmt} module in this family")
        if len(shape) == 2 and name not in rev and name not in mapped:
            raise BadInput(f"{name}: no HF tensor name for this architecture")
    for name, (out_f, in_f) in shapes.items():
        if fmt == "gptq":
            _check_packable(bits, in_f, out_f, name)
        elif group_size != -1 and in_f % group_size:
            raise BadInput(f"{name}: in_features={in_f} is not a multiple of --group-size {group_size}; "
                           "compressed-tensors needs whole groups (use a dividing size, -1, or --format gptq)")


class QuantizedPacker:
    """Collects packed tensors per canonical weight name (pass `add` as the driver's on_tensor); stacked
    experts (a list per expert) go to `experts`, packed per expert module of `graph`'s family."""

    def __init__(self, fmt: str, sym: bool, graph: Graph | None = None):
        from .expert_layout import ExpertPacker, expert_modules
        self.fmt, self.checkpoint_format = fmt, checkpoint_format_for(sym)
        self.packed: dict[str, dict[str, torch.Tensor]] = {}
        self.experts = ExpertPacker(expert_modules(graph, fmt) if graph is not None else [], self._pack)
        from .row_maps import RowMapPacker, row_maps
        self.row_maps = RowMapPacker(row_maps(graph) if graph is not None else [], self._pack, self.packed)

    def _pack(self, ql, name: str) -> dict[str, torch.Tensor]:
        if self.fmt == "gptq":
            return pack_gptq(ql, self.checkpoint_format, name)
        return pack_compressed_tensors(ql, name=name)

    def add(self, name: str, ql) -> None:
        if isinstance(ql, list):
            self.experts.add(name, ql)
        elif not self.row_maps.add(name, ql):
            self.packed[name] = self._pack(ql, name)


def _gptq_shapes(out_f: int, in_f: int, bits: int, group_size: int, sym: bool, scale_dtype) -> dict:
    g = n_groups_for(in_f, group_size)  # desc_act keeps the groups, only g_idx orders them
    return {"qweight": (torch.int32, (-(-in_f * bits // 32), out_f)),
            "qzeros": (torch.int32, (g, -(-out_f * bits // 32))),
            "scales": (torch.float16, (g, out_f)), "g_idx": (torch.int32, (in_f,))}


def _ct_shapes(out_f: int, in_f: int, bits: int, group_size: int, sym: bool, scale_dtype) -> dict:
    g = n_groups_for(in_f, group_size)
    out = {"weight_packed": (torch.int32, (out_f, -(-in_f * bits // 32))),
           "weight_scale": (scale_dtype, (out_f, g)), "weight_shape": (torch.int64, (2,))}
    if not sym:
        out["weight_zero_point"] = (torch.int32, (-(-out_f * bits // 32), g))
    return out


def _awq_shapes(out_f: int, in_f: int, bits: int, group_size: int, sym: bool, scale_dtype) -> dict:
    g = n_groups_for(in_f, group_size)
    return {"qweight": (torch.int32, (in_f, out_f // 8)), "qzeros": (torch.int32, (g, out_f // 8)),
            "scales": (torch.float16, (g, out_f))}


def _keep_fp16_shapes(out_f: int, in_f: int, bits: int, group_size: int, sym: bool, scale_dtype,
                      percent: float) -> dict:
    k = min(in_f - 1, max(1, math.floor(in_f * percent / 100 + 0.5)))  # as awq_search.salient_channels
    out = _awq_shapes(out_f, in_f - k, bits, group_size, sym, scale_dtype)
    out.update({"weight_fp16_cols": (torch.float16, (out_f, k)), "weight_fp16_idx": (torch.int32, (k,))})
    return out


def packed_shapes(layout: str, out_f: int, in_f: int, bits: int, group_size: int, sym: bool,
                  scale_dtype: torch.dtype = torch.float16, keep_fp16: float = 0.0) -> dict:
    """{tensor: (dtype, shape)} the packer of `layout` ('gptq', 'compressed-tensors', 'awq', 'keep-fp16')
    writes for an (out_f, in_f) linear, in its order: what the writer plans before any calibration."""
    args = (out_f, in_f, bits, group_size, sym, scale_dtype)
    if layout == "keep-fp16":
        return _keep_fp16_shapes(*args, keep_fp16)
    return {"gptq": _gptq_shapes, "compressed-tensors": _ct_shapes, "awq": _awq_shapes}[layout](*args)


class LayerPull:
    """A driver's per-layer results (a generator of (layer, {name: quantized})), fed to `add` (a packer)
    when the writer first asks for a tensor of that layer: the writer goes in layer order, so one layer's
    packed tensors wait at a time. `names`: what the driver quantizes; `shapes(out, in)`: their packed plan."""

    def __init__(self, layers, add: Callable[[str, object], None], names, shapes: Callable[[int, int], dict]):
        import threading
        self._layers, self._add, self.names, self.shapes = layers, add, set(names), shapes
        self._lock, self._last = threading.Lock(), -1
        self.computed = 0  # layers the driver finished (tests check the writer does not run ahead)

    def pull(self, layer: int) -> None:
        with self._lock:  # a writer may ask from another thread: advancing the calibration is serialised
            while self._last < layer:
                try:
                    self._last, part = next(self._layers)
                except StopIteration:
                    self._last = 1 << 62
                    break
                self.computed += 1
                for name, q in part.items():
                    self._add(name, q)

    def take(self, layer: int, store: dict, key: str, part: str) -> torch.Tensor:
        self.pull(layer)
        if part not in store.get(key, {}):
            raise BadInput(f"{key}: the quantizer produced no '{part}' for layer {layer}")
        t = store[key].pop(part)
        if not store[key]:
            del store[key]  # written: drop it
        return t

    def finish(self) -> None:
        self.pull(1 << 62)


def float_linears(graph: Graph) -> list[str]:
    """HF module names of the linears blocks keep float (routers, shared-expert gates, DeepSeek V3.2's indexer
    head weights): a compressed-tensors config must list them in `ignore`, or loaders expect them packed."""
    from ..export import _hf_names
    from ..graph import FFN_GATE_INP_SHEXP, FFN_ROUTER, parse_name
    fam, _ = _hf_names(graph)
    floats = {(s, "weight") for s in (FFN_ROUTER, FFN_GATE_INP_SHEXP, "indexer.proj")}
    return [hf[: -len(".weight")] for hf, sources, _ in fam.hf_export(graph.hparams)
            if hf.endswith(".weight") and sources[0] in graph.tensors and parse_name(sources[0])[1:] in floats]


def quantization_config(fmt: str, bits: int, group_size: int, sym: bool, desc_act: bool, static_groups: bool,
                        damp_percent: float, true_sequential: bool, method: str, graph: Graph | None = None) -> dict:
    if fmt == "gptq":
        qc = gptq_quantization_config(bits, group_size, desc_act, sym, checkpoint_format_for(sym), static_groups,
                                      damp_percent, true_sequential=true_sequential)
        qc["meta"]["method"] = method  # "rtn" checkpoints share the layout
        return qc
    ignore = ["lm_head"] + (float_linears(graph) if graph is not None else [])
    return ct_quantization_config(bits, group_size, sym, desc_act=desc_act and static_groups, ignore=ignore)


def _write_card(graph: Graph, out: Path, qc: dict, report: dict) -> None:
    from .model_card import model_card, write_card
    method = report.get("method") or qc.get("quant_method")
    bits = report.get("bits", qc.get("bits", (report.get("options") or {}).get("bits")))
    gs = report.get("group_size", qc.get("group_size", (report.get("options") or {}).get("group_size")))
    opts = {"method": method, "format": report.get("format") or qc.get("quant_method") or qc.get("format"),
            "bits": bits, "group_size": gs}
    for k in ("sym", "desc_act", "static_groups", "damp_percent", "true_sequential", "checkpoint_format"):
        v = qc.get(k, (report.get("options") or {}).get(k))
        if v is not None:
            opts[k] = v
    for k in ("sym", "keep_fp16_percent", "duo_scaling", "clip", "seed"):
        if report.get(k) is not None:
            opts[k] = report[k]
    samples = (f"{report['calib_samples']} samples of {report['calib_seqlen']} tokens"
               if report.get("calib_samples") else None)
    title = f"{Path(str(graph.source)).name} ({str(method).upper()} {bits}-bit, group size {gs})"
    write_card(out, model_card(graph, title, opts, report.get("calib"), samples), qc)


def write_quantized_checkpoint(graph: Graph, out_dir: Path, packed: dict[str, dict[str, torch.Tensor]],
                               qc: dict, dtype: torch.dtype = torch.float16, force: bool = False,
                               report: dict | Callable[[], dict] | None = None, progress: bool = True,
                               max_shard_bytes: int = 5 * 2**30, experts=None, pull: LayerPull | None = None) -> dict:
    """`packed`: canonical weight name -> its layout tensors (qweight ... or weight_packed ...), written under
    the HF module prefix; `experts` (an ExpertPacker): per-expert modules (their tensors, and the experts'
    biases as `<module>.bias`); every other graph tensor is written in `dtype` under its HF name.
    With `pull`, `packed` and `experts` start empty and fill as the writer pulls each layer (`pull.names` are
    planned as packed); `report` may then be a function, called once every tensor is written."""
    from tqdm import tqdm

    from ..export import _hf_names, copy_tokenizer_files, hf_config_for, hf_export_plan, hf_shape
    from ..graph import parse_name
    if dtype not in DTYPES:
        raise BadInput(f"unquantized tensors: dtype {dtype}; expected float16 or bfloat16")
    from .row_maps import row_maps
    fam, rev = _hf_names(graph)
    covered = experts.covered if experts is not None else set()
    quantized = pull.names if pull is not None else set(packed)
    maps = {f.prefix + ".weight": f for f in row_maps(graph)}  # the packers moved their rows already
    by_weight: dict[str, list] = {}
    if experts is not None:
        if pull is None:
            experts.check_complete()
        for m in experts.modules:
            by_weight.setdefault(m.weights[0], []).append(m)

    def parts(store: dict, key: str, weight: str, shape2d) -> list[tuple]:
        if pull is None:
            return [(k, t.dtype, tuple(t.shape), lambda t=t: t) for k, t in store[key].items()]
        layer = parse_name(weight)[0]
        return [(k, dt, tuple(shp), lambda k=k: pull.take(layer, store, key, k))
                for k, (dt, shp) in pull.shapes(*shape2d).items()]
    planned: list[PlannedTensor] = []
    # the family's plain-HF plan (renames, reshapes such as Qwen2-MoE's [1, d] shared-expert gate); packed
    # linears and expert modules take the place of the entries they cover
    for hf, sources, fn in hf_export_plan(graph, fam):
        if any(s in covered for s in sources):
            from .expert_layout import module_shapes
            for m in [m for s in sources for m in by_weight.pop(s, [])]:  # a module, where its first weight is
                for k, dt, shp, load in parts(experts.packed, m.prefix, m.weights[0], module_shapes(graph, m)):
                    planned.append(PlannedTensor(f"{m.prefix}.{k}", dt, shp, load))
                load = experts.bias_loader(graph, m, dtype)
                if load is not None:
                    shape = (sum(graph[b].shape[1] for b in m.biases),)
                    planned.append(PlannedTensor(f"{m.prefix}.bias", dtype, shape, load))
            continue
        f = maps.get(hf)
        if f is not None and (f.key in packed or all(s in quantized for s in sources)):
            shape = (len(f.rows), graph[sources[0]].shape[1])
            for k, dt, shp, load in parts(packed, f.key, sources[0], shape):
                planned.append(PlannedTensor(f"{f.prefix}.{k}", dt, shp, load))
            continue
        if len(sources) == 1 and sources[0] in quantized:
            if fn is not None or rev.get(sources[0]) != hf:
                raise BadInput(f"{sources[0]}: quantized, but its HF tensor '{hf}' is not a plain rename")
            prefix = hf[: -len(".weight")]
            for k, dt, shp, load in parts(packed, sources[0], sources[0], graph[sources[0]].shape):
                planned.append(PlannedTensor(f"{prefix}.{k}", dt, shp, load))
            continue

        def load(sources=sources, fn=fn):
            ts = [graph[s].load() for s in sources]
            return (fn(*ts) if fn is not None else ts[0]).to(dtype)
        planned.append(PlannedTensor(hf, dtype, hf_shape(graph, sources, fn), load))
    missing = set(quantized) - set(graph.tensors) - {f.prefix for f in maps.values()}
    if missing:
        raise BadInput(f"quantized tensor '{sorted(missing)[0]}' is not in the graph")
    cfg = hf_config_for(graph)
    cfg["torch_dtype"] = cfg["dtype"] = DTYPES[dtype]  # transformers 5 reads "dtype", older ones "torch_dtype"
    cfg["quantization_config"] = qc
    with atomic_output(Path(out_dir), force, directory=True) as tmp, \
            tqdm(total=len(planned), desc="writing", unit="tensor", disable=not progress) as bar:
        files = write_sharded(tmp, planned, max_shard_bytes, metadata={"format": "pt"},
                              progress=lambda n: bar.update())
        if pull is not None:  # the driver ran to its end (its report is complete); nothing left unwritten
            pull.finish()
            if experts is not None:
                experts.check_complete()
            left = sorted(set(packed) | set(experts.packed if experts is not None else {}))
            if left:
                raise BadInput(f"'{left[0]}': quantized, but not planned in the checkpoint")
        if callable(report):
            report = report()
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        copy_tokenizer_files(graph, tmp)
        _write_card(graph, tmp, qc, report or {})
        if report is not None:
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
    total = sum(p.nbytes for p in planned)
    n_params = sum(t.numel for t in graph.tensors.values())
    return {"output": str(out_dir), "files": files, "tensors": len(planned), "bytes": total,
            "bits_per_weight": 8 * total / max(n_params, 1)}
