"""Text -> token ids for evaluation, with the BOS rule llama.cpp applies to the same model's GGUF."""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInput
from ..graph import Graph

ADD_BOS = "tokenizer.ggml.add_bos_token"
BOS = "tokenizer.ggml.bos_token_id"


def _kv_and_tokenizer(graph: Graph):
    tok = graph.tokenizer
    if tok.gguf_kv is not None:
        from ..formats.hf_tokenizer import build_hf_tokenizer
        return tok.gguf_kv, build_hf_tokenizer(tok.gguf_kv)
    if tok.hf_dir is not None:
        from tokenizers import Tokenizer

        from ..formats.gguf_tokenizer import tokenizer_kv, uses_tiktoken
        if uses_tiktoken(tok.hf_dir):  # Qwen v1 / Kimi-K2 rank files: the vocabulary as their GGUF holds it
            from ..formats.hf_tokenizer import build_hf_tokenizer
            kv = {k.key: k.value for k in tokenizer_kv(tok.hf_dir, graph.hparams.vocab_size)}
            return kv, build_hf_tokenizer(kv)
        path = Path(tok.hf_dir) / "tokenizer.json"
        if not path.exists():
            raise BadInput(f"{tok.hf_dir}: evaluation needs tokenizer.json (or a tiktoken rank file)")
        kv = {k.key: k.value for k in tokenizer_kv(tok.hf_dir, graph.hparams.vocab_size)}
        return kv, Tokenizer.from_file(str(path))
    raise BadInput(f"{graph.source}: model has no tokenizer")


def encode(graph: Graph, text: str) -> tuple[list[int], int | None]:
    """(token ids with a leading BOS when the vocab adds one, the BOS id to put at each chunk start or None)."""
    kv, tok = _kv_and_tokenizer(graph)
    model = kv.get("tokenizer.ggml.model")
    add_bos = bool(kv.get(ADD_BOS, model == "llama"))
    ids = tok.encode(text, add_special_tokens=False).ids
    bos = kv.get(BOS) if add_bos else None
    if bos is not None:
        ids = [int(bos)] + ids
    return ids, (int(bos) if bos is not None else None)
