"""llama.cpp as an oracle: load a GGUF, get logits for token ids, run llama-perplexity's protocol, quantize.

Uses llama-cpp-python's low-level bindings (the library it compiles pins llama.cpp 0c1e570).
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import numpy as np

llama_cpp = None


_log_cb = None


def lib():
    global llama_cpp, _log_cb
    if llama_cpp is None:
        import llama_cpp as _l
        _log_cb = _l.llama_log_callback(lambda level, text, user: None)  # keep a reference: C holds it
        _l.llama_log_set(_log_cb, ctypes.c_void_p(0))
        _l.llama_backend_init()
        llama_cpp = _l
    return llama_cpp


def decode(ctx, ids: list[int]) -> None:
    """Clear the cache and decode one sequence from position 0 with every position an output."""
    L = lib()
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    batch = L.llama_batch_init(len(ids), 0, 1)
    try:
        for i, t in enumerate(ids):
            batch.token[i] = int(t)
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = len(ids)
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")
    finally:
        L.llama_batch_free(batch)


class LlamaModel:
    def __init__(self, path: Path, n_ctx: int = 512, n_threads: int = 2, exact: bool = False):
        """exact: F32 KV cache and no flash attention (whose F16 products cost ~1e-3 on the logits), for
        comparisons at float32 precision."""
        L = lib()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = False  # no AMX repacking: it dies with SIGILL on CPUs that report AMX
        mp.use_mmap = True
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_ctx
        cp.n_ubatch = n_ctx
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        if exact:
            cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
            cp.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = n_ctx

    def add_bos(self) -> bool:
        return bool(lib().llama_vocab_get_add_bos(self.vocab))

    def bos(self) -> int:
        return int(lib().llama_vocab_bos(self.vocab))

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        L = lib()
        b = text.encode("utf-8")
        n = len(b) + 16
        buf = (L.llama_token * n)()
        k = L.llama_tokenize(self.vocab, b, len(b), buf, n, add_special, False)
        if k < 0:
            buf = (L.llama_token * -k)()
            k = L.llama_tokenize(self.vocab, b, len(b), buf, -k, add_special, False)
        return list(buf[:k])

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), n_vocab] for one sequence starting at position 0 (fresh cache)."""
        L = lib()
        n = len(ids)
        assert n <= self.n_ctx
        decode(self.ctx, ids)
        ptr = L.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n * self.n_vocab,)).reshape(n, self.n_vocab).copy()

    def close(self):
        L = lib()
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def perplexity(model: LlamaModel, tokens: list[int], n_ctx: int = 512, n_chunks: int | None = None) -> dict:
    """llama-perplexity's loop (examples/perplexity): BOS replaces each chunk's first token when the vocab adds
    one; the second half of each chunk is scored."""
    add_bos = model.add_bos()
    n = len(tokens) // n_ctx if n_chunks is None else min(n_chunks, len(tokens) // n_ctx)
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    for i in range(n):
        ids = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if add_bos:
            ids[0] = model.bos()
        lg = model.logits(ids)[first:n_ctx - 1].astype(np.float64)
        mx = lg.max(axis=1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(lg - mx).sum(axis=1))
        tgt = np.asarray(tokens[i * n_ctx + first + 1:(i + 1) * n_ctx])
        v = lse - lg[np.arange(len(tgt)), tgt]
        nll += v.sum()
        nll2 += (v * v).sum()
        count += len(v)
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    return {"ppl": ppl, "ppl_stderr": math.sqrt(var / (count - 1)) * ppl, "n_tokens": count}


def quantize_file(src: Path, dst: Path, ftype: int, nthread: int = 2, allow_requantize: bool = False,
                  pure: bool = False) -> None:
    """llama-quantize's library entry point (llama_model_quantize) on a GGUF file."""
    L = lib()
    p = L.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = nthread
    p.allow_requantize = allow_requantize
    p.pure = pure
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
