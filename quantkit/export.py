"""Export: the graph (or a stream of encoded tensors) written as GGUF or a plain HF checkpoint. The CLI's and the
API's `convert` wire options and recipes to these."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf import LlamaFileType

from .atomic import atomic_output
from .checks import check_raw, check_weight
from .errors import BadInput
from .graph import ATTN_K, ATTN_Q, Graph, parse_name
from .formats.gguf_arch import llama3_rope_factors, permute_qk
from .formats.gguf_writer import GGUFTensor, write_gguf
from .formats.safetensors_io import PlannedTensor, write_sharded
from .quant.plan import derived_type, gguf_family, gguf_tensor_order, plan_types  # noqa: F401  (callers import them from here)

log = logging.getLogger("quantkit")

FLOAT_QTYPES = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}
# general.file_type per --q (llama.cpp's llama_ftype)
FILE_TYPES = {
    "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1,
    "q5_0": LlamaFileType.MOSTLY_Q5_0, "q5_1": LlamaFileType.MOSTLY_Q5_1, "q2_k": LlamaFileType.MOSTLY_Q2_K,
    "q3_k_s": LlamaFileType.MOSTLY_Q3_K_S, "q3_k_m": LlamaFileType.MOSTLY_Q3_K_M,
    "q3_k_l": LlamaFileType.MOSTLY_Q3_K_L, "q4_k_s": LlamaFileType.MOSTLY_Q4_K_S,
    "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M, "q5_k_s": LlamaFileType.MOSTLY_Q5_K_S,
    "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M, "q6_k": LlamaFileType.MOSTLY_Q6_K,
}
MXFP4_MOE_FTYPE = 38  # LLAMA_FTYPE_MOSTLY_MXFP4_MOE

GGUF_QS = tuple(FILE_TYPES) + ("mxfp4", "mxfp4_moe")  # every --q for GGUF, in help and errors alike
ST_QS = ("f32", "f16", "bf16", "mxfp4")  # --q for plain safetensors


def stored_bytes(graph: Graph) -> int:
    """Bytes the source stores for the graph's tensors (its file size less metadata)."""
    size = {"F32": 4, "FLOAT32": 4, "F16": 2, "FLOAT16": 2, "BF16": 2, "BFLOAT16": 2, "F64": 8, "I8": 1, "U8": 1}
    return sum(t.nbytes if t.nbytes is not None else t.numel * size.get(str(t.dtype).upper().replace("TORCH.", ""), 4)
               for t in graph.tensors.values())


def fallback_summary(fallbacks: list) -> list[dict]:
    """Shape fallbacks grouped as llama-quantize reports them: count, wanted -> chosen type, and why."""
    from gguf.constants import GGML_QUANT_SIZES
    groups: dict[tuple, list[str]] = {}
    for name, want, got, ncols in fallbacks:
        groups.setdefault((want, got, ncols), []).append(name)
    return [{"count": len(names), "from": want.name, "to": got.name, "ncols": ncols,
             "reason": f"{ncols} is not a multiple of {GGML_QUANT_SIZES[want][0]}", "tensors": names}
            for (want, got, ncols), names in groups.items()]



def _tokenizer_kv(graph: Graph) -> list[tuple[str, object, object]]:
    tok = graph.tokenizer
    if tok.gguf_kv is not None:
        types = graph.metadata.get("gguf_kv_types", {})
        return [(k, v, types.get(k, VT.STRING)) for k, v in tok.gguf_kv.items()]
    if tok.hf_dir is not None:
        from .formats.gguf_tokenizer import tokenizer_kv
        return [(t.key, t.value, [t.type, t.sub_type] if t.sub_type is not None else t.type)
                for t in tokenizer_kv(Path(tok.hf_dir), graph.hparams.vocab_size)]
    raise BadInput(f"{graph.source}: no tokenizer found; a GGUF needs one")


def gguf_metadata(graph: Graph, file_type: int, quantized: bool, extra: list | None = None) -> list:
    hp = graph.hparams
    kv: list = []
    src_kv = graph.metadata.get("gguf_kv", {})
    types = graph.metadata.get("gguf_kv_types", {})
    skip = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"}
    own = gguf_family(graph).gguf_kv(hp)
    kv.append(own[0])  # general.architecture first
    for k, v in src_kv.items():  # carry the source's descriptive general.* keys
        if k.startswith("general.") and k not in skip:
            kv.append((k, v, types.get(k, VT.STRING)))
    if not any(k == "general.name" for k, _, _ in kv):
        kv.append(("general.name", Path(hp.name or graph.source).name, VT.STRING))
    kv += own[1:]
    kv.append(("general.file_type", int(file_type), VT.UINT32))
    kv.append(("general.quantization_version", 2, VT.UINT32))  # written always, as llama.cpp's converter does
    kv += extra or []
    kv += _tokenizer_kv(graph)
    return kv


def _requant_warning(graph: Graph) -> None:
    from collections import Counter
    # FP8 checkpoints (DeepSeek V3, Kimi-K2 ...) are the released weights themselves: no warning for them
    q = Counter(t.qtype for t in graph.tensors.values() if t.qtype is not None and not t.qtype.startswith("FP8"))
    if q:
        kinds = ", ".join(f"{n} {k}" for k, n in q.most_common())
        log.warning("%s: re-quantizing from an already quantized GGUF (%s tensors); "
                    "quality is lower than quantizing from the original weights", graph.source, kinds)


def tensor_producer(graph: Graph, name: str, qt: QT, imatrix: dict | None = None,
                    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                    quantizer: Callable | None = None, stats: dict | None = None) -> Callable[[], object]:
    """A closure that reads one tensor, applies the GGUF layout change, and encodes it as qt. With `stats`
    (a dict), it records the tensor's relative weight error and encode time there under `name`."""
    hp = graph.hparams
    lt = graph.tensors[name]
    _, suffix, kind = parse_name(name)
    fam = gguf_family(graph)
    permute = fam.gguf_permute_qk and suffix in (ATTN_Q, ATTN_K)
    fam_tf = fam.gguf_transform(name)  # a value change llama.cpp's graph needs (Gemma's 1 + w norms)

    def encode(w: torch.Tensor, im):
        if not w.is_floating_point():
            w = w.float()
        elif qt in FLOAT_QTYPES and FLOAT_QTYPES[qt] != w.dtype and w.dtype != torch.float32:
            # e.g. bf16 -> f16 goes through f32, as a rounding of the exact value; in row chunks, so that no f32
            # copy of the whole tensor (2x a bf16 embedding) is held next to its input and output
            out = torch.empty(w.shape, dtype=FLOAT_QTYPES[qt])
            rows = w.reshape(-1, w.shape[-1]) if w.dim() > 1 else w.reshape(1, -1)
            flat = out.view(rows.shape)
            step = max(1, (1 << 22) // max(1, rows.shape[1]))
            for i in range(0, rows.shape[0], step):
                flat[i:i + step] = rows[i:i + step].float()
            return out
        if qt in FLOAT_QTYPES:
            return w.to(FLOAT_QTYPES[qt])
        if qt == QT.MXFP4:
            from .formats.mxfp4_layouts import quantize_gguf_mxfp4
            return quantize_gguf_mxfp4(w, im)
        from .quant.ggml_types import quantize
        return quantize(w.reshape(-1, w.shape[-1]), qt, im)

    def expert_parts():
        """A stacked tensor from per-expert sources, encoded one expert at a time (bounded memory)."""
        im = imatrix.get(name) if imatrix else None
        for e, part in enumerate(lt.parts):
            w = check_weight(f"{name}[{e}]", part(), FLOAT_QTYPES.get(qt), source=lt.source or graph.source)
            yield encode(w, im[e] if im is not None and im.dim() == 2 else im)

    def produce():
        import time
        t0 = time.perf_counter()
        data = _produce()
        if isinstance(data, tuple):
            data, w = data
        else:  # carried-over bytes, or stacked experts encoded one at a time as they are written
            w = None
        if stats is not None:
            stats[name] = {"type": qt.name, "time_s": time.perf_counter() - t0,
                           **(_weight_error(data, w, qt) if w is not None else {})}
        return data

    def _produce():
        if (transform is None and quantizer is None and not permute and fam_tf is None
                and lt.qtype in QT.__members__ and QT[lt.qtype] == qt):
            raw = lt.raw()
            if raw is not None:
                check_raw(name, raw[1], FLOAT_QTYPES.get(qt), lt.source or graph.source)
                return raw[1]  # already in the target type: carry the bytes over unchanged
        if lt.parts is not None and transform is None and quantizer is None and not permute and fam_tf is None:
            return expert_parts()
        w = check_weight(name, lt.load(), FLOAT_QTYPES.get(qt), source=lt.source or graph.source)
        if fam_tf is not None:
            w = fam_tf(w)
        if transform is not None or quantizer is not None:
            w = w.float()
        if transform is not None:
            w = transform(name, w)
        if permute:
            w = permute_qk(w, hp.n_heads if suffix == ATTN_Q else hp.n_kv_heads)
        im = imatrix.get(name) if imatrix else None
        if quantizer is not None and qt not in FLOAT_QTYPES:
            return quantizer(name, w, qt, im), w
        if w.dim() == 3 and qt not in FLOAT_QTYPES and qt != QT.MXFP4:  # stacked experts: per-expert imatrix
            return torch.cat([encode(w[e], im[e] if im is not None and im.dim() == 2 else im)
                              for e in range(w.shape[0])]), w
        return encode(w, im), w
    return produce


def _weight_error(data, w: torch.Tensor | None, qt: QT) -> dict:
    """||W - Q(W)||^2 / ||W||^2 of an encoded tensor (nothing for carried-over bytes)."""
    if w is None:
        return {}
    w = w.float().reshape(-1, w.shape[-1])
    if qt in FLOAT_QTYPES:
        deq = data.float().reshape(w.shape)
    else:
        from .quant.ggml_types import dequantize
        try:
            b = data if isinstance(data, torch.Tensor) else torch.from_numpy(data)
            deq = dequantize(b.reshape(w.shape[0], -1).cpu(), qt, w.shape[-1]).float().reshape(w.shape)
        except Exception:  # a type without a dequantizer here: time only
            return {}
    return {"weight_rel_err": float((w.cpu() - deq).square().sum() / w.square().sum().clamp_min(1e-30))}


def write_graph_gguf(graph: Graph, out: Path, types: dict[str, QT], file_type: int, force: bool = False,
                     imatrix: dict | None = None, transform=None, quantizer=None, extra_kv: list | None = None,
                     progress: bool = True, stats: dict | None = None) -> dict:
    from tqdm import tqdm
    hp = graph.hparams
    fam = gguf_family(graph)
    tensors: list[GGUFTensor] = []
    order = gguf_tensor_order(graph)
    f = None
    if hp.rope_scaling.kind == "llama3":
        f = llama3_rope_factors(hp)
    elif hp.rope_scaling.kind == "freq_factors":
        f = torch.tensor(hp.rope_scaling.freq_factors, dtype=torch.float32)
    if f is not None:
        tensors.append(GGUFTensor("rope_freqs.weight", QT.F32, tuple(f.shape), lambda f=f: f))
    # tensors GGUF stores in another form (family hook), as lazy views of their canonical source
    parts = {n: fam.gguf_tensors(hp, n) for n in order}
    derived = {g: graph.tensors[n].map(lambda w, fn=fn, n=n: fn(transform(n, w.float()) if transform else w), shape)
               for n, ps in parts.items() if ps for g, shape, fn, _ in ps}
    view = graph.with_tensors({**graph.tensors, **derived}) if derived else graph
    if derived and imatrix:  # a derived tensor reading its source's input columns takes its importances
        imatrix = {**{g: imatrix[n] for n, ps in parts.items() if ps and n in imatrix
                      for g, _, _, same_input in ps if same_input}, **imatrix}
    for name in order:
        if not parts[name]:
            qt = types[name]
            tensors.append(GGUFTensor(fam.gguf_tensor_name(name), qt, graph.tensors[name].shape,
                                      tensor_producer(graph, name, qt, imatrix, transform, quantizer, stats)))
            continue
        for gname, shape, _, _ in parts[name]:
            qt = types.get(gname) or derived_type(types[name], shape)  # planned under its own name, else as its source
            # (the quantizer sees the derived name: --optimizer gptq has bytes for row subsets it optimized)
            tensors.append(GGUFTensor(gname, qt, shape, tensor_producer(view, gname, qt, imatrix, quantizer=quantizer,
                                                                        stats=stats)))
    quantized = any(t.qtype not in FLOAT_QTYPES for t in tensors)
    kv = gguf_metadata(graph, file_type, quantized, extra_kv)
    with atomic_output(out, force) as tmp, tqdm(total=len(tensors), desc="writing", unit="tensor",
                                                disable=not progress) as bar:
        def tick(name):
            bar.set_postfix_str(name, refresh=False)
            bar.update()
        write_gguf(tmp, kv, tensors, progress=tick)
    sizes = {t.name: t.nbytes for t in tensors}
    n_params = sum(graph.tensors[n].numel for n in order)
    return {"output": str(out), "tensors": len(tensors), "bytes": sum(sizes.values()),
            "bits_per_weight": 8 * sum(v for k, v in sizes.items() if k != "rope_freqs.weight") / max(n_params, 1),
            "types": {n: t.qtype.name for n, t in zip([t.name for t in tensors], tensors)},
            "source_bytes": stored_bytes(graph)}


def check_gguf_q(q: str) -> str:
    q = q.lower()
    if q not in GGUF_QS:
        raise BadInput(f"--q '{q}' is not a known GGUF type{did_you_mean(q, GGUF_QS)} "
                       f"(expected one of: {', '.join(GGUF_QS)})")
    return q


def did_you_mean(word: str, choices) -> str:
    """'; did you mean X?' for a near miss (q4km -> q4_k_m), else ''."""
    import difflib
    flat = {c.replace("_", "").replace("-", ""): c for c in choices}
    key = word.lower().replace("_", "").replace("-", "")
    hit = flat.get(key) or next(iter(difflib.get_close_matches(word.lower(), list(choices), 1, 0.75)), None)
    return f"; did you mean '{hit}'?" if hit else ""


_KERNELS = {"loaded": False}


def load_kernels() -> None:
    """Load (on a machine's first run: compile) the CPU k-quant kernels before the progress bar starts, and say
    so, rather than letting the compile show as a huge ETA on the first tensor."""
    from .quant import ggml_cpu
    if not ggml_cpu.enabled() or _KERNELS["loaded"]:
        return
    _KERNELS["loaded"] = True
    log.info("loading CPU quantization kernels (compiled on the first run on a machine, then cached) ...")
    s = ggml_cpu.warm_up()
    log.log(logging.INFO if s > 2 else logging.DEBUG, "kernels ready in %.1f s", s)


def convert_to_gguf(graph: Graph, out: Path, q: str = "f16", force: bool = False, overrides=None, pure=False,
                    imatrix: dict | None = None, progress: bool = True, **kw) -> dict:
    q = check_gguf_q(q)
    gguf_family(graph)  # fail early on archs GGUF can't hold
    _requant_warning(graph)
    fallbacks: list = []
    types = plan_types(graph, q, overrides, pure, has_imatrix=imatrix is not None, fallbacks=fallbacks)
    ft = FILE_TYPES.get(q, MXFP4_MOE_FTYPE)
    if any(t not in FLOAT_QTYPES for t in types.values()):
        load_kernels()
    r = write_graph_gguf(graph, out, types, int(ft), force, imatrix=imatrix, progress=progress, **kw)
    r["fallbacks"] = fallback_summary(fallbacks)
    return r


def _hf_names(graph: Graph):
    """(family, canonical name -> HF name) for the tensors that map one to one."""
    from .families import hf_family
    fam = hf_family(graph)
    rev = {c: h for h, c in fam.hf_name_map(graph.hparams).items()}
    return fam, rev


def copy_tokenizer_files(graph: Graph, out_dir: Path) -> None:
    tok = graph.tokenizer
    if tok.hf_dir is not None:
        for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                  "qwen.tiktoken", "tiktoken.model",
                  "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja"):
            p = Path(tok.hf_dir) / n
            if p.exists():
                shutil.copy2(p, out_dir / n)
    elif tok.gguf_kv is not None:
        from .formats.hf_tokenizer import write_hf_tokenizer
        write_hf_tokenizer(tok.gguf_kv, out_dir)


def hf_config_for(graph: Graph) -> dict:
    fam, _ = _hf_names(graph)
    if graph.hf_config is not None:
        cfg = {k: v for k, v in graph.hf_config.items() if k != "quantization_config"}
    else:
        cfg = fam.hf_config(graph.hparams)
    return cfg


def hf_export_plan(graph: Graph, fam) -> list:
    """The family's HF tensors for this graph, in canonical order; every graph tensor must be covered."""
    plan = [e for e in fam.hf_export(graph.hparams) if all(s in graph.tensors for s in e[1])]
    covered = {s for e in plan for s in e[1]}
    missing = [n for n in graph.tensors if n not in covered]
    if missing:
        raise BadInput(f"{graph.source}: tensor '{missing[0]}' has no HF name in family '{graph.hparams.arch}'")
    rank = {n: k for k, n in enumerate(gguf_tensor_order(graph))}
    return sorted(plan, key=lambda e: min(rank[s] for s in e[1]))


def hf_shape(graph: Graph, sources, fn) -> tuple[int, ...]:
    if fn is None:
        return graph[sources[0]].shape
    metas = [torch.empty(graph[s].shape, device="meta") for s in sources]
    return tuple(fn(*metas).shape)


def convert_to_safetensors(graph: Graph, out_dir: Path, dtype: str = "bf16", force: bool = False,
                           max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> dict:
    """Unquantized HF checkpoint: config.json + tokenizer files + (sharded) safetensors."""
    from tqdm import tqdm
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
    if dt is None:
        raise BadInput(f"--q '{dtype}' is not a safetensors dtype (expected f32, f16 or bf16)")
    from .families import hf_family
    fam = hf_family(graph)
    cfg = hf_config_for(graph)
    # transformers 5 reads "dtype", older ones "torch_dtype": both, or a copied source "dtype" wins
    cfg["torch_dtype"] = cfg["dtype"] = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype]
    planned = []
    for hf, sources, fn in hf_export_plan(graph, fam):
        shape = hf_shape(graph, sources, fn)

        def load(sources=sources, fn=fn):
            ts = [check_weight(s, graph[s].load(), dt, source=graph[s].source) for s in sources]
            return (fn(*ts) if fn is not None else ts[0]).to(dt)
        planned.append(PlannedTensor(hf, dt, shape, load))
    with atomic_output(out_dir, force, directory=True) as tmp, tqdm(total=len(planned), desc="writing",
                                                                    unit="tensor", disable=not progress) as bar:
        files = write_sharded(tmp, planned, max_shard_bytes, metadata={"format": "pt"}, progress=lambda n: bar.update())
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        copy_tokenizer_files(graph, tmp)
        from .formats.model_card import model_card, write_card
        write_card(tmp, model_card(graph, f"{Path(str(graph.source)).name} ({cfg['dtype']})",
                                   {"dtype": cfg["dtype"], "source format": graph.source_format}, quantized=False))
    n_params = sum(graph.tensors[n].numel for n in graph.tensors)
    total = sum(p.nbytes for p in planned)
    return {"output": str(out_dir), "files": files, "tensors": len(planned), "bytes": total,
            "bits_per_weight": 8 * total / max(n_params, 1), "source_bytes": stored_bytes(graph)}
