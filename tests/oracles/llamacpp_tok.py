"""llama.cpp tokenizer oracle: load a GGUF vocab-only through llama-cpp-python's C API, tokenize, detokenize."""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from pathlib import Path

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

_LOG_CB = llama_cpp.llama_log_callback(lambda level, text, user_data: None)  # keep a reference: C holds it
_initialized = False


def _init() -> None:
    global _initialized
    if not _initialized:
        llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _initialized = True


class Vocab:
    """A vocab-only llama.cpp model (no tensors are read)."""

    def __init__(self, path: str | Path):
        _init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path} (vocab_only)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)

    def close(self) -> None:
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    @property
    def n_tokens(self) -> int:
        return llama_cpp.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the required size
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise RuntimeError("llama_tokenize failed")
        return list(buf[:n])

    def detokenize(self, ids: list[int], remove_special: bool = False, unparse_special: bool = True) -> str:
        arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
        cap = 8 * len(ids) + 64
        out = ctypes.create_string_buffer(cap)
        n = llama_cpp.llama_detokenize(self.vocab, arr, len(ids), out, cap, remove_special, unparse_special)
        if n < 0:
            cap = -n
            out = ctypes.create_string_buffer(cap)
            n = llama_cpp.llama_detokenize(self.vocab, arr, len(ids), out, cap, remove_special, unparse_special)
        return out.raw[:n].decode("utf-8", errors="replace")

    def token_text(self, tid: int) -> str:
        return llama_cpp.llama_vocab_get_text(self.vocab, tid).decode("utf-8")

    def add_bos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))


@contextmanager
def load_vocab(path: str | Path):
    v = Vocab(path)
    try:
        yield v
    finally:
        v.close()
