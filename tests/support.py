"""What tests prove for which family: the vocabulary of the README's support table and the `support` marker.

A test tags itself with the features it proves:

    @pytest.mark.support("gptq", "out_gptq")                  # family from the test's `kind` parameter
    @pytest.mark.support("run", param="family_model")         # ... or from another parameter / fixture param
    @pytest.mark.support("awq", family="llama")               # a fixed family
    @pytest.mark.support("load", family=lambda kind: ...)     # parameter value -> family (None: no claim)

A parameter value (a tiny-model kind id such as "olmo_clip", "qwen2_moe_dense", "llama_gqa_llama3") names its
family by its longest registered architecture prefix, ignoring "_" and "-" (`family_of_kind`), so a new family's
tests need only the marker. With `pytest --support-json FILE` (or QUANTKIT_SUPPORT_JSON=FILE) conftest writes
each (family, feature)'s passing and failing tests to FILE; `scripts/support_table.py FILE --readme README.md`
turns it into the README's table. A feature counts as supported when a test proving it passed and none failed.
"""

from __future__ import annotations

import re

# key -> (column heading, what a test tagged with it must show); the table's columns, in this order
FEATURES: dict[str, tuple[str, str]] = {
    "load": ("load", "the HF checkpoint is read (hyperparameters, tensors) and checked against transformers"),
    "run": ("run", "quantkit's executor gives transformers' logits"),
    "gguf_in": ("GGUF in", "a GGUF of the family (ours or llama.cpp's converter's) reads back and runs as transformers"),
    "rtn": ("RTN", "round-to-nearest output equals a textbook RTN"),
    "gptq": ("GPTQ", "GPTQ runs over the family's blocks and beats RTN on the same grid"),
    "awq": ("AWQ", "AWQ scale search and fold keep the float function / stay close to the float model"),
    "kquants": ("k-quants", "llama.cpp's k-quant types and mixtures (q4_k_m ..., imatrix, --optimizer gptq): "
                            "llama.cpp's bytes or a llama.cpp run close to the float model"),
    "mxfp4": ("MXFP4", "MXFP4 weights: llama.cpp's bytes or a small KLD"),
    "out_gguf": ("→ GGUF", "our GGUF writer: llama.cpp's names/metadata, read back or run by llama.cpp"),
    "out_safetensors": ("→ safetensors", "plain HF safetensors that transformers (for remote-code families: the "
                                         "test's reference forward) loads and runs as the source"),
    "out_gptq": ("→ GPTQ", "GPTQ-layout checkpoint decoded independently to the evaluated weights"),
    "out_awq": ("→ AWQ", "AutoAWQ GEMM checkpoint decoded independently and close to the float model"),
    "out_ct": ("→ compressed-tensors", "compressed-tensors checkpoint decompressed by its own package"),
    "out_mxfp4": ("→ MXFP4", "MXFP4 safetensors that transformers or compressed-tensors' own decompressor "
                             "dequantizes to our values"),
    "llamacpp": ("llama.cpp-verified", "llama.cpp runs our GGUF as transformers runs the checkpoint, or its "
                                       "converter writes the same bytes"),
}


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def registered_families() -> dict[str, dict]:
    """Every registered family: arch -> {"name", "hf", "gguf"} (rows of the table, tested or not)."""
    from quantkit.families.registry import BY_ARCH, _discover
    _discover()
    out = {}
    for arch, cls in sorted(BY_ARCH.items()):
        hf = list(cls.hf_architectures)
        name = re.sub(r"For(CausalLM|ConditionalGeneration)$", "", hf[0]) if hf else cls.__name__
        out[arch] = {"name": name, "hf": hf, "gguf": cls.gguf_arch}
    return out


def family_of_kind(kind: str) -> str:
    """The registered family a kind id names: its longest architecture prefix ("olmoe_clip" -> "olmoe")."""
    k = _norm(str(kind))
    hits = [a for a in registered_families() if k.startswith(_norm(a))]
    if not hits:
        raise ValueError(f"kind {kind!r} names no registered family (give the support marker family=...)")
    return max(hits, key=lambda a: len(_norm(a)))


def claims(item) -> list[tuple[str, str]]:
    """(family, feature) pairs an item's support markers claim; ValueError naming what is wrong."""
    out = []
    params = getattr(getattr(item, "callspec", None), "params", {})
    for m in item.iter_markers("support"):
        feats = m.args
        bad = [f for f in feats if f not in FEATURES]
        if not feats or bad:
            raise ValueError(f"support marker: unknown feature(s) {bad or '(none given)'}; known: {', '.join(FEATURES)}")
        fam = m.kwargs.get("family")
        param = m.kwargs.get("param", "kind")
        if fam is None or callable(fam):
            if param not in params:
                raise ValueError(f"support marker: no family= and no parameter {param!r}")
            value = params[param]
            fam = fam(value) if callable(fam) else family_of_kind(value)
            if fam is None:  # this parameter value proves nothing for the feature (e.g. a refusal case)
                continue
        if fam not in registered_families():
            raise ValueError(f"support marker: family {fam!r} is not registered")
        out += [(fam, f) for f in feats]
    return out
