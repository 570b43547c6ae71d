"""ggml quantization oracle: llama.cpp's own `ggml_quantize_chunk` from the libggml-base shipped
inside the installed llama_cpp package, called through ctypes (single thread, the caller's)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

_LIB = None


def lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        libdir = Path(llama_cpp.__file__).resolve().parent / "lib"
        cands = sorted(libdir.glob("libggml-base.so*")) + sorted(libdir.glob("libggml-base*.dylib")) + sorted(libdir.glob("ggml-base.dll"))
        if not cands:
            pytest.skip(f"no libggml-base in {libdir}")
        L = ctypes.CDLL(str(cands[0]))
        L.ggml_quantize_chunk.restype = ctypes.c_size_t
        L.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                          ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        L.ggml_row_size.restype = ctypes.c_size_t
        L.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        L.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        L.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        L.ggml_quantize_init.restype = None
        L.ggml_quantize_init.argtypes = [ctypes.c_int]
        _LIB = L
    return _LIB


def row_size(qtype: int, n_per_row: int) -> int:
    return int(lib().ggml_row_size(int(qtype), int(n_per_row)))


def quantize(x: np.ndarray, qtype: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 [rows, n_per_row] -> uint8 [rows, row_size], exactly what llama.cpp writes."""
    L = lib()
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    qt = int(qtype)
    if L.ggml_quantize_requires_imatrix(qt) and imatrix is None:
        raise ValueError(f"ggml type {qt} requires an imatrix")
    L.ggml_quantize_init(qt)
    rs = row_size(qt, n)
    out = np.zeros((rows, rs), dtype=np.uint8)
    im_ptr = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        assert imatrix.shape[0] == n
        im_ptr = imatrix.ctypes.data
    written = L.ggml_quantize_chunk(qt, x.ctypes.data, out.ctypes.data, 0, rows, n, im_ptr)
    assert written == rows * rs
    return out
