"""Function-preserving graph transforms."""

from __future__ import annotations

import torch

from .graph import (ATTN_K, ATTN_NORM, ATTN_OUT, ATTN_Q, ATTN_V, FFN_DOWN, FFN_GATE, FFN_NORM, FFN_UP, OUTPUT,
                    OUTPUT_NORM, TOKEN_EMBD, Graph, parse_name)
from .errors import BadInput


def permute_dense(graph: Graph, seed: int = 0) -> Graph:
    """Permute the residual dimension and each layer's FFN dimension with a fixed seed.

    The model's function is exactly unchanged (RMSNorm and the residual stream are permutation-equivariant),
    but no weight block lines up with a grid the weights were quantized on before. Lazy: nothing is read now.
    """
    hp = graph.hparams
    if hp.n_experts or hp.norm != "rms":
        raise BadInput(f"{graph.source}: permute_dense handles dense RMSNorm decoders only")
    gen = torch.Generator().manual_seed(seed)
    pr = torch.randperm(hp.hidden_size, generator=gen)
    pf = [torch.randperm(hp.ffn_size, generator=gen) for _ in range(hp.n_layers)]
    out = {}
    for name, t in graph.tensors.items():
        layer, suffix, kind = parse_name(name)
        if name in (TOKEN_EMBD, OUTPUT):
            fn = lambda w: w[:, pr]
        elif name == OUTPUT_NORM or suffix in (ATTN_NORM, FFN_NORM):
            fn = lambda w: w[pr]
        elif suffix in (ATTN_Q, ATTN_K, ATTN_V) and kind == "weight":
            fn = lambda w: w[:, pr]
        elif suffix == ATTN_OUT:
            fn = lambda w: w[pr] if w.dim() == 1 or kind == "bias" else w[pr, :]
        elif suffix in (FFN_GATE, FFN_UP):
            p = pf[layer]
            fn = (lambda w, p=p: w[p][:, pr]) if kind == "weight" else (lambda w, p=p: w[p])
        elif suffix == FFN_DOWN:
            p = pf[layer]
            fn = (lambda w, p=p: w[pr][:, p]) if kind == "weight" else (lambda w: w[pr])
        else:
            fn = None
        nt = t.map(fn) if fn is not None else t
        if fn is not None:
            nt._raw = None
        out[name] = nt
    return graph.with_tensors(out)
