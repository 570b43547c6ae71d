"""llama.cpp as the imatrix oracle: llama-imatrix's statistics collected inside llama.cpp's own compute graph.

llama-cpp-python does not ship the llama-imatrix tool, but libllama takes the same scheduler eval callback
(`cb_eval`) that tool installs. This module installs one written from imatrix.cpp's description: for each
MUL_MAT whose weight is a `blk.*` tensor (or output.weight when asked) with >= 16 f32 activation rows, add the
squared activations per input column and the row count; for each MUL_MAT_ID add each routed token's row to
its expert (one count per expert). Chunks are decoded as llama-imatrix does: fresh KV cache, all positions
output, first token replaced by BOS when the vocab adds one. The KV cache is F32 and flash attention is off
so the graph computes in f32 like our executor. Sums are float64 here (llama.cpp uses float32).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from oracles.llamacpp_model import decode, lib

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_NAME, GGML_MAX_OP_PARAMS = 4, 10, 64, 64
GGML_TYPE_F32 = 0


class GgmlTensor(ctypes.Structure):  # struct ggml_tensor (ggml.h of the bundled llama.cpp)
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * GGML_MAX_DIMS), ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
                ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * GGML_MAX_SRC),
                ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p),
                ("name", ctypes.c_char * GGML_MAX_NAME), ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _ggml():
    import llama_cpp
    libdir = Path(llama_cpp.__file__).resolve().parent / "lib"
    g = ctypes.CDLL(str(sorted(libdir.glob("libggml-base.so*"))[0]))
    g.ggml_op_name.restype = ctypes.c_char_p
    g.ggml_op_name.argtypes = [ctypes.c_int]
    g.ggml_get_name.restype = ctypes.c_void_p
    g.ggml_get_name.argtypes = [ctypes.c_void_p]
    g.ggml_nbytes.restype = ctypes.c_size_t
    g.ggml_nbytes.argtypes = [ctypes.c_void_p]
    g.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    g.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    return g


def _wname(name: bytes) -> str:
    """imatrix.cpp's filter_tensor_name: 'CUDA0#blk.0.attn_k.weight#0' -> 'blk.0.attn_k.weight'."""
    s = name.decode()
    if "#" in s:
        s = s.split("#", 1)[1]
        s = s.split("#", 1)[0]
    return s


def _array(t: GgmlTensor, addr: int, g, dtype) -> np.ndarray:
    """The tensor's data as a numpy array in ggml index order reversed: [ne3, ne2, ne1, ne0]."""
    if not g.ggml_backend_buffer_is_host(t.buffer):
        raise RuntimeError("oracle expects CPU (host) buffers")
    nbytes = g.ggml_nbytes(addr)
    flat = np.frombuffer((ctypes.c_char * nbytes).from_address(t.data), dtype=dtype,
                         count=nbytes // np.dtype(dtype).itemsize)
    shape = tuple(int(t.ne[i]) for i in reversed(range(4)))
    strides = tuple(int(t.nb[i]) for i in reversed(range(4)))
    return np.lib.stride_tricks.as_strided(flat, shape=shape, strides=strides).copy()


class Collector:
    def __init__(self, process_output: bool = False):
        self.g = _ggml()
        self.process_output = process_output
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.checked = False
        import llama_cpp
        self.cb = llama_cpp.ggml_backend_sched_eval_callback(self._cb)  # keep a reference while C holds it

    def _check_layout(self, addr: int, t: GgmlTensor) -> None:
        # the struct mirror must put `name` where ggml_get_name says it is
        off = GgmlTensor.name.offset
        assert self.g.ggml_get_name(addr) == addr + off, "ggml_tensor layout mismatch"
        self.checked = True

    def _cb(self, addr, ask, user):
        t = GgmlTensor.from_address(addr)
        if not self.checked:
            self._check_layout(addr, t)
        op = self.g.ggml_op_name(t.op).decode()
        if op not in ("MUL_MAT", "MUL_MAT_ID"):
            return not ask  # ask: not interested; else: keep computing
        src0 = GgmlTensor.from_address(t.src[0])
        src1 = GgmlTensor.from_address(t.src[1])
        wname = _wname(src0.name)
        if ask:
            if op == "MUL_MAT_ID":
                return True
            if src1.ne[1] < 16 or src1.type != GGML_TYPE_F32:
                return False
            return wname.startswith("blk.") or (self.process_output and wname == "output.weight")
        assert int(src1.nb[0]) == 4
        x = _array(src1, t.src[1], self.g, np.float32).astype(np.float64)  # [ne13, ne12, ne11, ne10]
        ne10 = int(src1.ne[0])
        if op == "MUL_MAT_ID":
            ids_t = GgmlTensor.from_address(t.src[2])
            ids = _array(ids_t, t.src[2], self.g, np.int32)[0, 0]  # [n_tokens, n_used]
            n_as = int(src0.ne[2])
            s = self.sums.setdefault(wname, np.zeros((n_as, ne10)))
            c = self.counts.setdefault(wname, np.zeros(n_as, dtype=np.int64))
            rows = x[0]  # [n_tokens, ne11, ne10]
            for idx in range(ids.shape[1]):
                xs = rows[:, idx % rows.shape[1], :]
                np.add.at(s, ids[:, idx], xs * xs)
                np.add.at(c, ids[:, idx], 1)
        else:
            n_mat = int(src0.ne[2] * src0.ne[3])
            s = self.sums.setdefault(wname, np.zeros((n_mat, ne10)))
            c = self.counts.setdefault(wname, np.zeros(1, dtype=np.int64))
            for i3 in range(x.shape[0]):
                for i2 in range(x.shape[1]):
                    mat = (i3 % int(src0.ne[3])) * int(src0.ne[2]) + (i2 % int(src0.ne[2]))
                    s[mat] += (x[i3, i2] ** 2).sum(0)
            c += x.shape[0] * x.shape[1] * x.shape[2] // n_mat
        return True


def llamacpp_imatrix(gguf_path: Path, chunks: list[list[int]], process_output: bool = False, n_threads: int = 2
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], bool]:
    """(sums [n_mat, ne0], counts [n_mat], add_bos) over the given chunks of token ids, as llama-imatrix."""
    L = lib()
    col = Collector(process_output)
    n_ctx = len(chunks[0])
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = False  # no AMX repacking: it dies with SIGILL on CPUs that report AMX
    model = L.llama_model_load_from_file(str(gguf_path).encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.type_k = cp.type_v = GGML_TYPE_F32
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.cb_eval = col.cb
    cp.cb_eval_user_data = None
    ctx = L.llama_init_from_model(model, cp)
    try:
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        vocab = L.llama_model_get_vocab(model)
        add_bos = bool(L.llama_vocab_get_add_bos(vocab))
        bos = int(L.llama_vocab_bos(vocab))
        for ids in chunks:
            ids = list(ids)
            if add_bos:
                ids[0] = bos
            decode(ctx, ids)  # every position an output, as llama-imatrix asks
    finally:
        if ctx:
            L.llama_free(ctx)
        L.llama_model_free(model)
    return col.sums, col.counts, add_bos
