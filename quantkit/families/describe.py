"""A model's graph in words people recognise (`quantkit inspect`): family, embeddings and head, and the
layers as their blocks describe themselves (`Block.describe`), consecutive identical layers grouped."""

from __future__ import annotations

from ..graph import Graph
from .registry import family_of


def describe(graph: Graph) -> dict:
    hp = graph.hparams
    fam = family_of(hp.arch)
    layers = []
    for i in range(hp.n_layers):
        kind = fam.rope_kind(hp, i)
        theta, rs = fam.rope_params(hp, kind)
        rope = {"theta": float(theta), "scaling": rs.kind, "factor": rs.factor if rs.kind != "none" else None}
        d = fam.layer(hp, i).describe(hp, i, rope)
        if layers and layers[-1]["branches"] == d["branches"]:
            layers[-1]["last"] = i
        else:
            layers.append({"first": i, "last": i, **d})
    for g in layers:
        g["text"] = (f"layer {g['first']}" if g["first"] == g["last"] else f"layers {g['first']}-{g['last']}")
    embed = fam.embed_scale(hp)
    cap = fam.logit_softcap(hp)
    head = ["tied to the embeddings" if hp.tie_embeddings else "own output matrix"]
    if cap:
        head.append(f"final logit soft-cap {cap:g}")
    moe = [i for i in range(hp.n_layers) if hp.is_moe(i)]
    return {"family": fam.__name__, "architecture": hp.arch, "hf_architectures": list(fam.hf_architectures),
            "gguf_architecture": fam.gguf_arch, "n_layers": hp.n_layers, "hidden_size": hp.hidden_size,
            "vocab_size": hp.vocab_size, "embedding_scale": embed, "output": ", ".join(head),
            "experts": hp.n_experts or 0, "experts_used": hp.n_experts_used or 0, "moe_layers": moe,
            "layer_groups": layers}


def describe_lines(d: dict) -> list[str]:
    """The description as indented lines for the terminal."""
    hf = ", ".join(d["hf_architectures"]) or "-"
    lines = [f"family: {d['family']} (HF {hf}; GGUF {d['gguf_architecture'] or 'none'})",
             f"  {d['n_layers']} layers, hidden {d['hidden_size']}, vocab {d['vocab_size']}"
             + (f", embeddings ×{d['embedding_scale']:.4g}" if d["embedding_scale"] else "") + f"; output: {d['output']}"]
    if d["experts"]:
        lines.append(f"  experts: {d['experts']} per MoE layer, {d['experts_used']} used per token, "
                     f"{len(d['moe_layers'])} of {d['n_layers']} layers MoE")
    for g in d["layer_groups"]:
        lines.append(f"  {g['text']}:")
        lines += [f"    {b['role']}: {b['text']}" for b in g["branches"]]
    return lines
