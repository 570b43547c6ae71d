"""load -> canonical graph -> (quantize) -> write. The CLI's convert command is a thin wrapper over these."""

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
from .errors import BadInput
from .graph import ATTN_K, ATTN_Q, OUTPUT, TOKEN_EMBD, Graph, parse_name
from .families import family_of
from .formats.gguf_arch import llama3_rope_factors, permute_qk
from .formats.gguf_writer import GGUFTensor, write_gguf
from .formats.safetensors_io import PlannedTensor, write_sharded

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


def gguf_family(graph: Graph):
    """The graph's family, checked to have a GGUF architecture (fails early for families GGUF can't hold)."""
    from .errors import UnsupportedArchitecture
    fam = family_of(graph.hparams.arch)
    if not fam.gguf_arch:
        raise UnsupportedArchitecture(f"architecture '{graph.hparams.arch}' cannot be written to GGUF: llama.cpp "
                                      "has no architecture for it")
    return fam


def gguf_tensor_order(graph: Graph) -> list[str]:
    """token_embd first, then layers in order, then the rest (what llama.cpp's converter does)."""
    def key(n):
        layer, _, _ = parse_name(n)
        return (0, -1) if n == TOKEN_EMBD else ((1, layer) if layer is not None else (2, 0))
    return sorted(graph.tensors, key=key)


def plan_types(graph: Graph, q: str, overrides: list[tuple[str, str]] | None = None, pure: bool = False,
               has_imatrix: bool = False) -> dict[str, QT]:
    """Per-tensor GGUF type for a --q preset, with llama.cpp's mixture rules."""
    shapes = {n: graph.tensors[n].shape for n in gguf_tensor_order(graph)}
    if q in ("f32", "f16", "bf16") and not overrides:
        # convert_hf_to_gguf's rule for float outputs: 1-D tensors stay F32, the rest take the type
        ft = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16}[q]
        return {n: (QT.F32 if len(s) == 1 else ft) for n, s in shapes.items()}
    if q in ("mxfp4", "mxfp4_moe"):
        from .quant.mxfp4 import gguf_types
        return gguf_types(shapes, q, overrides or [], pure)
    from .quant import mixtures
    hp = graph.hparams
    arch = mixtures.ArchInfo(n_layer=hp.n_layers, n_head=hp.n_heads, n_head_kv=hp.n_kv_heads,
                             n_expert=hp.n_experts, arch=gguf_family(graph).gguf_arch)
    return mixtures.plan_tensor_types(shapes.items(), q, arch, overrides=overrides or [], pure=pure,
                                      has_imatrix=has_imatrix)


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
    q = Counter(t.qtype for t in graph.tensors.values() if t.qtype is not None)
    if q:
        kinds = ", ".join(f"{n} {k}" for k, n in q.most_common())
        log.warning("%s: re-quantizing from an already quantized GGUF (%s tensors); "
                    "quality is lower than quantizing from the original weights", graph.source, kinds)


def tensor_producer(graph: Graph, name: str, qt: QT, imatrix: dict | None = None,
                    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
                    quantizer: Callable | None = None) -> Callable[[], object]:
    """A closure that reads one tensor, applies the GGUF layout change, and encodes it as qt."""
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
            w = w.float()  # e.g. bf16 -> f16 goes through f32, as a rounding of the exact value
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
            yield encode(part(), im[e] if im is not None and im.dim() == 2 else im)

    def produce():
        if (transform is None and quantizer is None and not permute and fam_tf is None
                and lt.qtype in QT.__members__ and QT[lt.qtype] == qt):
            raw = lt.raw()
            if raw is not None:
                return raw[1]  # already in the target type: carry the bytes over unchanged
        if lt.parts is not None and transform is None and quantizer is None and not permute and fam_tf is None:
            return expert_parts()
        w = lt.load()
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
            return quantizer(name, w, qt, im)
        if w.dim() == 3 and qt not in FLOAT_QTYPES and qt != QT.MXFP4:  # stacked experts: per-expert imatrix
            return torch.cat([encode(w[e], im[e] if im is not None and im.dim() == 2 else im)
                              for e in range(w.shape[0])])
        return encode(w, im)
    return produce


def write_graph_gguf(graph: Graph, out: Path, types: dict[str, QT], file_type: int, force: bool = False,
                     imatrix: dict | None = None, transform=None, quantizer=None, extra_kv: list | None = None,
                     progress: bool = True) -> dict:
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
    for name in order:
        qt = types[name]
        tensors.append(GGUFTensor(fam.gguf_tensor_name(name), qt, graph.tensors[name].shape,
                                  tensor_producer(graph, name, qt, imatrix, transform, quantizer)))
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
            "bits_per_weight": 8 * sum(sizes[fam.gguf_tensor_name(n)] for n in order) / max(n_params, 1),
            "types": {n: t.qtype.name for n, t in zip([t.name for t in tensors], tensors)}}


def convert_to_gguf(graph: Graph, out: Path, q: str = "f16", force: bool = False, overrides=None, pure=False,
                    imatrix: dict | None = None, progress: bool = True, **kw) -> dict:
    q = q.lower()
    if q not in FILE_TYPES and q not in ("mxfp4", "mxfp4_moe"):
        raise BadInput(f"--q '{q}' is not a known GGUF type (expected one of: {', '.join(FILE_TYPES)})")
    gguf_family(graph)  # fail early on archs GGUF can't hold
    _requant_warning(graph)
    types = plan_types(graph, q, overrides, pure, has_imatrix=imatrix is not None)
    ft = FILE_TYPES.get(q, MXFP4_MOE_FTYPE)
    return write_graph_gguf(graph, out, types, int(ft), force, imatrix=imatrix, progress=progress, **kw)


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
    cfg["torch_dtype"] = cfg["dtype"] = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype]
    planned = []
    for hf, sources, fn in hf_export_plan(graph, fam):
        shape = hf_shape(graph, sources, fn)

        def load(sources=sources, fn=fn):
            ts = [graph[s].load() for s in sources]
            return (fn(*ts) if fn is not None else ts[0]).to(dt)
        planned.append(PlannedTensor(hf, dt, shape, load))
    with atomic_output(out_dir, force, directory=True) as tmp, tqdm(total=len(planned), desc="writing",
                                                                    unit="tensor", disable=not progress) as bar:
        files = write_sharded(tmp, planned, max_shard_bytes, metadata={"format": "pt"}, progress=lambda n: bar.update())
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        copy_tokenizer_files(graph, tmp)
    return {"output": str(out_dir), "files": files, "tensors": len(planned),
            "bytes": sum(p.nbytes for p in planned)}
