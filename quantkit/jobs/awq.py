"""`quantkit convert --to safetensors --method awq`: options checked against every projection before any
work, calibration, the AWQ driver (quant/awq.py), and the checkpoint written by the layout's writer."""

from __future__ import annotations

import logging

import torch

from ..errors import QuantkitError
from ..graph import Graph, blk
from ..quant.awq import AWQConfig, AWQResult, awq_layers, check_awq_graph
from ..quant.grid import AWQLinear, check_grid_args

log = logging.getLogger("quantkit.awq")

AWQ_FORMATS = ("awq", "compressed-tensors")


def check_awq_options(graph: Graph, cfg: AWQConfig, fmt: str) -> None:
    """Every option checked against every projection before calibration starts."""
    from ..export import _hf_names
    from ..formats.awq_layout import AWQ_BITS
    from ..formats.quantized_writer import check_layout
    from ..formats.expert_layout import expert_modules, module_shapes
    check_awq_graph(graph)
    if fmt not in AWQ_FORMATS:
        raise QuantkitError(f"--format {fmt}: --method awq writes one of {AWQ_FORMATS}")
    if cfg.keep_fp16 and graph.hparams.n_experts:
        raise QuantkitError("--keep-fp16: float16 side columns are not defined for stacked experts (a MoE model)")
    mods = expert_modules(graph, fmt)  # raises where the family has no loadable expert layout for fmt
    if not 0 <= cfg.keep_fp16 < 100:
        raise QuantkitError(f"--keep-fp16 {cfg.keep_fp16}: expected a percentage in [0, 100)")
    if cfg.keep_fp16 and fmt != "awq":
        raise QuantkitError(f"--keep-fp16 with --format {fmt}: float16 side columns exist only in quantkit's "
                            "keep-fp16 layout (--format awq)")
    check_grid_args(cfg.bits, cfg.group_size, 1, "--bits/--group-size")
    if fmt == "compressed-tensors":
        check_layout(graph, fmt, cfg.bits, cfg.group_size, False, False)
        return
    if cfg.bits != AWQ_BITS:
        raise QuantkitError(f"--bits {cfg.bits}: the AWQ GEMM layout holds 4-bit weights only; use "
                            "--format compressed-tensors for other widths")
    from ..formats.row_maps import row_maps
    _, rev = _hf_names(graph)
    shapes = {m.prefix: module_shapes(graph, m) for m in mods}
    fused = [f for f in row_maps(graph) if f.module]  # a renamed weight with rows moved keeps its own name
    if fused and cfg.keep_fp16:
        raise QuantkitError(f"--keep-fp16: {fused[0].prefix} is a fused module; its float16 columns are not defined")
    parts = {s for f in fused for s in f.sources}
    shapes.update({f.prefix: (len(f.rows), graph[f.sources[0]].shape[1]) for f in fused})
    for i in range(graph.hparams.n_layers):
        for n in rule_linears(graph, i):
            name = blk(i, n)
            if name in parts:
                continue
            if name not in rev:
                raise QuantkitError(f"{name}: no HF tensor name for this architecture")
            shapes[name] = graph[name].shape
    for name, (out_f, in_f) in shapes.items():
        if out_f % 8:
            raise QuantkitError(f"{name}: out_features={out_f} is not a multiple of 8 (AWQ GEMM packing)")
        if not cfg.keep_fp16 and cfg.group_size != -1 and in_f % cfg.group_size:
            raise QuantkitError(f"{name}: in_features={in_f} is not a multiple of --group-size "
                                f"{cfg.group_size}; the AWQ GEMM layout needs whole groups (use a dividing "
                                "size such as 64 or 32, or -1)")


def rule_linears(graph: Graph, i: int) -> list[str]:
    from ..graph import LINEAR_SUFFIXES
    return [s for s in LINEAR_SUFFIXES if blk(i, s) in graph and len(graph[blk(i, s)].shape) == 2]


def awq_to_safetensors(graph: Graph, out, force: bool = False, progress: bool = True, device: str = "cpu",
                       st_format: str | None = None, bits: int = 4, group_size: int = 128, sym: bool | None = None,
                       keep_fp16: float = 0.0, calib=None, calib_samples: int = 128, calib_seqlen: int = 512,
                       seed: int = 0, desc_act: bool = False, static_groups: bool = False,
                       samples: list[torch.Tensor] | None = None, min_expert_tokens: int = 16,
                       moe_route_all: bool = False, awq_full_search: bool = False, calib_dtype: str | None = None,
                       **_unused) -> dict:
    """`quantkit convert --to safetensors --method awq`: check, calibrate, search/fold/clip/quantize, write.
    `samples` (token-id tensors) replace reading `calib` when given."""
    from pathlib import Path

    from ..calibration.data import load_calibration
    from ..calibration.stream import calib_dtype as torch_dtype
    from ..formats.awq_layout import awq_quantization_config, pack_awq_gemm
    from ..formats.compressed_tensors import ct_quantization_config, pack_compressed_tensors
    from ..formats.keep_fp16 import keep_fp16_quantization_config, pack_keep_fp16
    from ..formats.quantized_writer import write_quantized_checkpoint
    if desc_act or static_groups:
        raise QuantkitError("--desc-act/--static-groups are GPTQ options; AWQ keeps contiguous groups")
    fmt = st_format or "awq"
    cfg = AWQConfig(bits=bits, group_size=group_size, sym=bool(sym), keep_fp16=float(keep_fp16 or 0.0),
                    min_expert_tokens=min_expert_tokens, route_all=moe_route_all,
                    search_fraction=1.0 if awq_full_search else AWQConfig.search_fraction,
                    calib_dtype=torch_dtype(calib_dtype))
    check_awq_options(graph, cfg, fmt)
    if samples is None:
        samples = load_calibration(graph, calib, calib_samples, calib_seqlen, seed)
    from ..formats.expert_layout import ExpertPacker, expert_modules
    from ..formats.quantized_writer import LayerPull, float_linears, packed_shapes
    from ..families.registry import quantizable
    if cfg.keep_fp16:
        pack, qc = pack_keep_fp16, keep_fp16_quantization_config(group_size, cfg.keep_fp16)
    elif fmt == "awq":
        pack, qc = (lambda a, name: pack_awq_gemm(a.ql, name)), awq_quantization_config(group_size)
    else:
        pack, qc = (lambda a, name: pack_compressed_tensors(a.ql, name=name)), \
            ct_quantization_config(bits, group_size, cfg.sym, ignore=["lm_head"] + float_linears(graph))
    experts = ExpertPacker(expert_modules(graph, fmt), lambda ql, name: pack(AWQLinear(ql, ql.in_features), name))

    packed: dict = {}
    from ..formats.row_maps import RowMapPacker, row_maps
    # rows moved (Llama 4's q/k, keep-fp16 side columns alike) or parts of one HF module (Baichuan's W_pack)
    maps = RowMapPacker(row_maps(graph), pack, packed)

    def add(name, a):
        if isinstance(a, list):  # stacked experts: packed per expert module
            experts.add(name, [x.ql for x in a])
        elif not maps.add(name, a):
            packed[name] = pack(a, name)
    # the writer pulls each layer from the driver as it reaches it: one layer's packed tensors in memory; the
    # folded norms of layer i pull layer i too (they need its scales)
    import time
    t0 = time.perf_counter()
    res = AWQResult()
    from ..calibration.dist import world
    if not world().writer:  # another rank writes: this one takes its part in the calibration only
        for _ in awq_layers(graph, samples, cfg, device=device, progress=False, res=res):
            pass
        return {"output": None}
    layout = "keep-fp16" if cfg.keep_fp16 else fmt
    pull = LayerPull(awq_layers(graph, samples, cfg, device=device, progress=progress, res=res), add,
                     quantizable(graph), lambda o, i: packed_shapes(layout, o, i, bits, group_size, cfg.sym,
                                                                    cfg.scale_dtype, cfg.keep_fp16))

    def report() -> dict:  # complete once the driver ran to its end
        total = time.perf_counter() - t0
        phases = {k: round(v, 3) for k, v in res.phases.items()}
        phases["write_and_other_s"] = round(max(0.0, total - sum(res.phases.values())), 3)
        for fb in res.fallbacks:
            log.warning("AWQ: %s expert %d (%d tokens): %s", fb["tensor"], fb["expert"], fb["tokens"], fb["reason"])
        return {"method": "awq", "format": fmt, "bits": bits, "group_size": group_size, "sym": cfg.sym,
                "keep_fp16_percent": cfg.keep_fp16, "duo_scaling": cfg.duo_scaling, "clip": cfg.clip,
                "scale_search": {"grid": cfg.n_grid, "first_share": cfg.search_fraction,
                                 "min_samples": cfg.search_min_samples, "top_on_all": cfg.search_top},
                "calib": str(calib), "calib_samples": len(samples), "calib_seqlen": int(samples[0].numel()),
                "seed": seed, "calib_dtype": str(cfg.calib_dtype).replace("torch.", ""), "source": graph.source,
                "scaled_groups": len(res.scales), "tensors": res.tensors,
                "min_expert_tokens": cfg.min_expert_tokens, "moe_route_all": cfg.route_all,
                "experts": res.experts, "fallbacks": res.fallbacks, "total_time_s": total,
                "phase_times": phases}
    return write_quantized_checkpoint(streamed_fold(graph, res, pull), Path(out), packed, qc, force=force,
                                      report=report, progress=progress, experts=experts, pull=pull)


def streamed_fold(graph: Graph, res: AWQResult, pull) -> Graph:
    """`fold_graph` with scales not known yet: the tensors AWQ folds (named by the layer rules) load by first
    pulling their layer, then fold with that layer's scales."""
    from ..graph import LazyTensor, parse_name
    from ..quant.awq import fold_tensor
    from ..quant.awq_groups import rule_for
    folds: set[str] = set()
    for i in range(graph.hparams.n_layers):
        for g in rule_for(graph.hparams, i).groups:  # the keys AWQResult.fold_plan gives for these groups
            folds.update({blk(i, g.prev, "weight"), blk(i, g.prev, "bias")})
            folds.update(blk(i, n) for n in g.linears + g.floats)

    def load(name: str, t):
        i = parse_name(name)[0]
        pull.pull(i)
        c, r, o = AWQResult(scales=[x for x in res.scales if x[0] == i]).fold_plan()[name]
        return fold_tensor(t.load(), c, r, o)
    out = {n: LazyTensor(t.shape, "F32", lambda n=n, t=t: load(n, t), source=t.source + " (AWQ-scaled)")
           if n in folds else t for n, t in graph.tensors.items()}
    return graph.with_tensors(out)
