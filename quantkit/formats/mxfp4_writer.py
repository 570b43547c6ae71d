"""MXFP4 safetensors checkpoints: the gpt-oss layout for gpt-oss graphs, compressed-tensors for dense ones.

gpt-oss layout (what openai/gpt-oss-* ship and transformers' Mxfp4 integration reads): expert weights as
`model.layers.N.mlp.experts.{gate_up_proj,down_proj}_{blocks,scales}` (see mxfp4_layouts), every other
tensor in bf16, config `quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [...]}`.
Experts that are already MXFP4 in the source (an MXFP4 checkpoint, or MXFP4 tensors of a GGUF) keep their
codes and scales; the rest are quantized with `rule`.

compressed-tensors layout (format "mxfp4-pack-quantized", vLLM / transformers + compressed-tensors): every
projection whose input dim is a multiple of 32 becomes `<module>.weight_packed` uint8 [out, in/2] +
`<module>.weight_scale` uint8 [out, in/32]; stacked experts are written one module per expert (the names the
family's int compressed-tensors checkpoints use), encoded one expert at a time; lm_head, routers and any other
linear stay bf16 and are listed in `ignore`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_output
from ..errors import BadInput
from ..graph import FFN_DOWN_EXPS, FFN_GATE_EXPS, FFN_UP_EXPS, Graph, LazyTensor, blk
from ..quant.mxfp4 import BLOCK, DEFAULT_RULE, RULES, quantize_mxfp4
from .mxfp4_layouts import (COMPRESSED_TENSORS_FORMAT, COMPRESSED_TENSORS_WEIGHT_ARGS, from_gguf_mxfp4,
                            merge_gate_up, to_compressed_tensors, to_gpt_oss)
from .safetensors_io import PlannedTensor, write_sharded

LAYOUTS = ("gpt-oss", "compressed-tensors")
# HF gpt-oss checkpoints' list (everything but the experts stays bf16)
GPT_OSS_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
CT_VERSION = "0.20.1"  # compressed-tensors release the config was checked against (informational)


def mxfp4_codes(lt: LazyTensor, rule: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, exps) of a canonical weight [..., rows, n]: the stored ones when the source is MXFP4
    (no requantization), else quantize_mxfp4(weights, rule)."""
    if lt.qtype == "MXFP4":
        raw = lt.raw()
        if raw is not None:
            data = raw[1]
            data = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.array(data, dtype=np.uint8))
            return from_gguf_mxfp4(data.reshape(*lt.shape[:-1], -1), lt.shape[-1], name)
    return quantize_mxfp4(lt.load(), rule=rule, name=name)


def mxfp4_names(graph: Graph) -> set[str]:
    """Canonical weights the default MXFP4 layout of `graph` stores as MXFP4 (the rest stays 16-bit): gpt-oss's
    experts; elsewhere every projection GPTQ quantizes whose input dim holds whole blocks."""
    from ..families.registry import quantizable
    if graph.hparams.arch == "gpt-oss":
        return {blk(i, s) for i in range(graph.hparams.n_layers) for s in (FFN_GATE_EXPS, FFN_UP_EXPS, FFN_DOWN_EXPS)}
    return {n for n, shape in quantizable(graph).items() if shape[-1] % BLOCK == 0}


def _cast(lt: LazyTensor, dtype: torch.dtype):
    return lambda: lt.load().to(dtype).contiguous()


def _gpt_oss_plan(graph: Graph, rule: str, dtype: torch.dtype) -> list[PlannedTensor]:
    from ..export import gguf_tensor_order
    from ..families import gpt_oss, validate
    hp = graph.hparams
    if hp.arch != gpt_oss.ARCH:
        raise BadInput(f"{graph.source}: the gpt-oss MXFP4 layout is for gpt-oss graphs, not '{hp.arch}'")
    validate(graph)
    to_hf = {c: h for h, c in gpt_oss.name_map(hp).items()}
    e, f, d = hp.n_experts, hp.expert_ffn_size or hp.ffn_size, hp.hidden_size
    for n in (d, f):
        if n % BLOCK:
            raise BadInput(f"{graph.source}: gpt-oss expert input dim {n} is not a multiple of {BLOCK}; "
                           f"MXFP4 needs whole blocks")
    planned: list[PlannedTensor] = []
    expert_names = set()
    for i in range(hp.n_layers):
        expert_names |= {blk(i, s, k) for s in (FFN_GATE_EXPS, FFN_UP_EXPS, FFN_DOWN_EXPS) for k in ("weight", "bias")}
    for name in gguf_tensor_order(graph):
        if name in expert_names:
            continue
        if name not in to_hf:
            raise BadInput(f"{graph.source}: tensor '{name}' has no place in a gpt-oss checkpoint")
        lt = graph.tensors[name]
        planned.append(PlannedTensor(to_hf[name], dtype, lt.shape, _cast(lt, dtype)))
    for i in range(hp.n_layers):
        p = f"model.layers.{i}.mlp.experts."
        g, u, dn = (graph[blk(i, s)] for s in (FFN_GATE_EXPS, FFN_UP_EXPS, FFN_DOWN_EXPS))
        cache: dict[str, torch.Tensor] = {}  # blocks are produced first; their scales are kept for the next tensor

        def gate_up_blocks(g=g, u=u, i=i, cache=cache):
            codes, exps = merge_gate_up(mxfp4_codes(g, rule, blk(i, FFN_GATE_EXPS)),
                                        mxfp4_codes(u, rule, blk(i, FFN_UP_EXPS)))
            blocks, cache["gate_up"] = to_gpt_oss(codes, exps, f"layer {i} gate_up_proj")
            return blocks

        def down_blocks(dn=dn, i=i, cache=cache):
            blocks, cache["down"] = to_gpt_oss(*mxfp4_codes(dn, rule, blk(i, FFN_DOWN_EXPS)), f"layer {i} down_proj")
            return blocks

        def scales(key, cache=cache, i=i):
            if key not in cache:
                raise BadInput(f"layer {i}: MXFP4 scales of {key} requested before its blocks")
            return cache.pop(key)

        gb, ub = graph[blk(i, FFN_GATE_EXPS, "bias")], graph[blk(i, FFN_UP_EXPS, "bias")]

        def gate_up_bias(gb=gb, ub=ub):
            return torch.stack((gb.load(), ub.load()), dim=-1).reshape(e, 2 * f).to(dtype)
        planned += [
            PlannedTensor(p + "gate_up_proj_blocks", torch.uint8, (e, 2 * f, d // BLOCK, BLOCK // 2), gate_up_blocks),
            PlannedTensor(p + "gate_up_proj_scales", torch.uint8, (e, 2 * f, d // BLOCK),
                          lambda scales=scales: scales("gate_up")),
            PlannedTensor(p + "gate_up_proj_bias", dtype, (e, 2 * f), gate_up_bias),
            PlannedTensor(p + "down_proj_blocks", torch.uint8, (e, d, f // BLOCK, BLOCK // 2), down_blocks),
            PlannedTensor(p + "down_proj_scales", torch.uint8, (e, d, f // BLOCK),
                          lambda scales=scales: scales("down")),
            PlannedTensor(p + "down_proj_bias", dtype, (e, d), _cast(graph[blk(i, FFN_DOWN_EXPS, "bias")], dtype)),
        ]
    return planned


def _gpt_oss_config(graph: Graph) -> dict:
    from ..families import gpt_oss
    if graph.hf_config is not None and graph.hf_config.get("model_type") == "gpt_oss":
        cfg = {k: v for k, v in graph.hf_config.items() if k != "quantization_config"}
    else:
        cfg = gpt_oss.config_of(graph.hparams)
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": list(GPT_OSS_NOT_CONVERTED)}
    return cfg


def ct_mxfp4_config(ignore: list[str]) -> dict:
    """config.json `quantization_config` for MXFP4 weights / 16-bit activations (compressed-tensors MXFP4A16)."""
    return {
        "version": CT_VERSION, "quant_method": "compressed-tensors", "format": COMPRESSED_TENSORS_FORMAT,
        "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": dict(COMPRESSED_TENSORS_WEIGHT_ARGS),
                                      "input_activations": None, "output_activations": None,
                                      "format": COMPRESSED_TENSORS_FORMAT}},
        "kv_cache_scheme": None, "global_compression_ratio": None, "ignore": ignore,
    }


class _ExpertCodes:
    """MXFP4 codes of one expert of a stacked weight: from its own source tensor when the source keeps one per
    expert (`LazyTensor.parts`), else from the stacked tensor's codes (uint8, kept until its last expert is
    taken: a fused source tensor is read whole anyway; MXFP4 sources keep their codes)."""

    def __init__(self, graph: Graph, rule: str, uses: dict[str, int]):
        self.graph, self.rule, self.left = graph, rule, dict(uses)
        self.stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, name: str, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        lt = self.graph[name]
        if lt.parts is not None and lt.qtype is None:
            return quantize_mxfp4(lt.parts[e](), rule=self.rule, name=f"{name}[{e}]")
        if name not in self.stacked:
            self.stacked[name] = mxfp4_codes(lt, self.rule, name)
        codes, exps = self.stacked[name]
        self.left[name] -= 1
        if not self.left[name]:
            del self.stacked[name]
        return codes[e].clone(), exps[e].clone()


def _packed_pair(mod: str, shape: tuple[int, int], codes_fn) -> list[PlannedTensor]:
    """`mod.weight_packed` + `mod.weight_scale`; the scales are kept from the packed tensor's encoding."""
    cache: dict[str, torch.Tensor] = {}

    def packed():
        out = to_compressed_tensors(*codes_fn(), mod)
        cache["scale"] = out["weight_scale"]
        return out["weight_packed"]

    def scale():
        if "scale" not in cache:
            raise BadInput(f"{mod}: MXFP4 scales requested before the packed weight")
        return cache.pop("scale")
    rows, n = shape
    return [PlannedTensor(mod + ".weight_packed", torch.uint8, (rows, n // 2), packed),
            PlannedTensor(mod + ".weight_scale", torch.uint8, (rows, n // BLOCK), scale)]


def _ct_plan(graph: Graph, rule: str, dtype: torch.dtype) -> tuple[list[PlannedTensor], list[str]]:
    """Every projection GPTQ would quantize (quantizable) becomes MXFP4 under its HF module; stacked experts
    go per expert under the modules the family declares for compressed-tensors (as its int checkpoints);
    routers, gates and lm_head stay 16-bit and are listed in `ignore`, as llm-compressor writes them."""
    from ..export import _hf_names, hf_export_plan, hf_shape
    from ..families.registry import quantizable
    from .expert_layout import expert_modules, interleave_rows, module_shapes
    from .quantized_writer import float_linears
    if graph.hparams.arch == "gpt-oss":
        raise BadInput(f"{graph.source}: gpt-oss experts are written in the gpt-oss MXFP4 layout (its default), "
                       f"not compressed-tensors")
    fam, _ = _hf_names(graph)
    mods = expert_modules(graph, "compressed-tensors")
    by_weight: dict[str, list] = {}
    uses: dict[str, int] = {}
    for m in mods:
        by_weight.setdefault(m.weights[0], []).append(m)
        for w in m.weights:
            uses[w] = uses.get(w, 0) + 1
    covered = {w for m in mods for w in m.weights + m.biases}
    quant = {n for n, s in quantizable(graph).items() if len(s) == 2}
    expert_codes = _ExpertCodes(graph, rule, uses)
    planned: list[PlannedTensor] = []
    ignore = ["lm_head"] + float_linears(graph)
    for hf, sources, fn in hf_export_plan(graph, fam):
        if any(s in covered for s in sources):
            for m in [m for s in sources for m in by_weight.pop(s, [])]:
                shape = module_shapes(graph, m)
                if shape[1] % BLOCK:
                    raise BadInput(f"{m.prefix}: expert input dim {shape[1]} is not a multiple of {BLOCK}; "
                                   f"MXFP4 needs whole blocks")

                def codes(m=m):
                    parts = [expert_codes(w, m.expert) for w in m.weights]
                    return interleave_rows([c for c, _ in parts]), interleave_rows([x for _, x in parts])
                planned += _packed_pair(m.prefix, shape, codes)
                if m.biases:
                    planned.append(PlannedTensor(
                        m.prefix + ".bias", dtype, (shape[0],),
                        lambda m=m: interleave_rows([graph[b].load()[m.expert] for b in m.biases]).to(dtype)))
            continue
        shape = hf_shape(graph, sources, fn)
        if all(s in quant for s in sources) and hf.endswith(".weight") and len(shape) == 2:
            mod = hf[:-len(".weight")]
            if shape[1] % BLOCK == 0:
                # a family's row map (Llama 4's q/k, Baichuan's W_pack, BLOOM's query_key_value) is applied and
                # quantized as written: MXFP4 blocks run along rows; a plain rename keeps MXFP4 source codes
                def codes(sources=sources, fn=fn, mod=mod):
                    if fn is None:
                        return mxfp4_codes(graph[sources[0]], rule, sources[0])
                    return quantize_mxfp4(fn(*[graph[s].load() for s in sources]), rule=rule, name=mod)
                planned += _packed_pair(mod, shape, codes)
                continue
            ignore.append(mod)  # input dim not a multiple of 32: stays 16-bit

        def load(sources=sources, fn=fn):
            ts = [graph[s].load() for s in sources]
            return (fn(*ts) if fn is not None else ts[0]).to(dtype).contiguous()
        planned.append(PlannedTensor(hf, dtype, shape, load))
    return planned, ignore


def convert_to_mxfp4_safetensors(graph: Graph, out: Path, force: bool = False, progress: bool = True,
                                 layout: str | None = None, rule: str = DEFAULT_RULE,
                                 dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 * 2**30) -> dict:
    """An MXFP4 HF checkpoint directory (config.json, tokenizer files, sharded safetensors), written atomically.

    layout: "gpt-oss" (default for gpt-oss graphs) or "compressed-tensors" (default for dense families).
    rule: MXFP4 scale rule for tensors that are not MXFP4 already (see quantkit.quant.mxfp4).
    dtype: the unquantized tensors' dtype (bf16, as HF MXFP4 checkpoints store them).
    """
    from tqdm import tqdm

    from ..export import copy_tokenizer_files, hf_config_for
    out = Path(out)
    is_gpt_oss = graph.hparams.arch == "gpt-oss"
    layout = layout or ("gpt-oss" if is_gpt_oss else "compressed-tensors")
    if layout not in LAYOUTS:
        raise BadInput(f"MXFP4 layout '{layout}' is unknown (expected one of {', '.join(LAYOUTS)})")
    if rule not in RULES:
        raise BadInput(f"MXFP4 rule '{rule}' is unknown (expected one of {', '.join(RULES)})")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise BadInput(f"MXFP4 checkpoint dtype {dtype}: expected torch.bfloat16, float16 or float32")
    if layout == "gpt-oss":
        if not is_gpt_oss:
            raise BadInput(f"{graph.source}: the gpt-oss MXFP4 layout needs a gpt-oss model, got '{graph.hparams.arch}'")
        planned = _gpt_oss_plan(graph, rule, dtype)
        cfg = _gpt_oss_config(graph)
    else:
        planned, ignore = _ct_plan(graph, rule, dtype)
        cfg = hf_config_for(graph)
        cfg["quantization_config"] = ct_mxfp4_config(ignore)
    # transformers 5 reads "dtype", older ones "torch_dtype"
    cfg["torch_dtype"] = cfg["dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16",
                                         torch.float32: "float32"}[dtype]
    with atomic_output(out, force, directory=True) as tmp, tqdm(total=len(planned), desc="writing", unit="tensor",
                                                                disable=not progress) as bar:
        files = write_sharded(tmp, planned, max_shard_bytes, metadata={"format": "pt"},
                              progress=lambda n: bar.update())
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        copy_tokenizer_files(graph, tmp)
        from .model_card import model_card, write_card
        write_card(tmp, model_card(graph, f"{Path(str(graph.source)).name} (MXFP4)",
                                   {"method": "mxfp4", "layout": layout, "rule": rule, "dtype": cfg["dtype"]}),
                   cfg.get("quantization_config"))
    from ..export import stored_bytes
    total = sum(p.nbytes for p in planned)
    return {"output": str(out), "layout": layout, "rule": rule, "files": files, "tensors": len(planned),
            "bytes": total, "bits_per_weight": 8 * total / max(1, sum(t.numel for t in graph.tensors.values())),
            "source_bytes": stored_bytes(graph)}
