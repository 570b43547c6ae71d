"""The GGUF type plan: which ggml type each tensor of a graph gets for a --q preset (llama.cpp's mixture
rules, MXFP4 plans), and the tensor order GGUF files use."""

from __future__ import annotations

from gguf import GGMLQuantizationType as QT

from ..graph import TOKEN_EMBD, Graph, parse_name


def gguf_family(graph: Graph):
    """The graph's family, checked to have a GGUF architecture (fails early for families GGUF can't hold)."""
    from ..errors import UnsupportedArchitecture
    from ..families import family_of
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


_FLOAT_F32 = ("ssm_conv1d", "indexer.proj")


def derived_type(qt: QT, shape) -> QT:
    """A derived tensor takes its source's type when its rows fit that type's blocks, else F16."""
    from gguf import GGML_QUANT_SIZES
    if qt in (QT.F32, QT.F16, QT.BF16):
        return qt
    return qt if shape[-1] % GGML_QUANT_SIZES[qt][0] == 0 else QT.F16


def plan_types(graph: Graph, q: str, overrides: list[tuple[str, str]] | None = None, pure: bool = False,
               has_imatrix: bool = False, fallbacks: list | None = None) -> dict[str, QT]:
    """Per-tensor GGUF type for a --q preset, with llama.cpp's mixture rules. `fallbacks` (a list) receives
    (name, wanted type, chosen type, ncols) for each tensor whose row length forced another type."""
    shapes = {n: graph.tensors[n].shape for n in gguf_tensor_order(graph)}
    if q in ("f32", "f16", "bf16") and not overrides:
        # convert_hf_to_gguf's rule for float outputs: 1-D tensors stay F32, the rest take the type
        ft = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16}[q]
        # ... and what it keeps F32 by name: conv kernels (llama.cpp's ssm_conv reads F32 only), DSA's indexer
        # head weights
        return {n: (QT.F32 if len(s) == 1 or any(k in n for k in _FLOAT_F32) else ft) for n, s in shapes.items()}
    if q in ("mxfp4", "mxfp4_moe"):
        from .mxfp4 import gguf_types
        if q == "mxfp4_moe" and not pure and not any(len(s) >= 3 for s in shapes.values()):
            import logging  # llama.cpp's MXFP4_MOE does the same; say so rather than surprise
            logging.getLogger("quantkit").warning(
                "--q mxfp4_moe: %s has no stacked experts, so no tensor is MXFP4 (Q8_0, as llama.cpp's MXFP4_MOE "
                "writes a dense model); --q mxfp4 makes every weight MXFP4", graph.source)
        return gguf_types(shapes, q, overrides or [], pure)
    from . import mixtures
    hp = graph.hparams
    fam = gguf_family(graph)
    # llama-quantize counts every block the file holds (n_layer_all: MTP layers too)
    arch = mixtures.ArchInfo(n_layer=hp.n_layers + int(hp.extra.get("mtp_layers", 0)), n_head=hp.n_heads,
                             n_head_kv=hp.n_kv_heads, n_expert=hp.n_experts, arch=fam.gguf_arch)
    src = {n: n for n in shapes}
    if getattr(fam, "gguf_plan_derived", False):
        # plan the tensors GGUF stores in another form under their own names, as llama-quantize sees them
        # (Qwen3-Next's attn_qkv counts as an attn_v); the canonical source takes its first part's type
        items = {}
        for n, s in shapes.items():
            for g, gs, _, _ in fam.gguf_tensors(hp, n) or [(n, s, None, None)]:
                items[g], src[g] = gs, n
        shapes = items
    planned = mixtures.plan_tensor_types(shapes.items(), q, arch, overrides=overrides or [], pure=pure,
                                         has_imatrix=has_imatrix, fallbacks=fallbacks)
    for g, t in list(planned.items()):
        planned.setdefault(src[g], t)
    return planned
