"""Public ggml tensor-type codec: quantize/dequantize rows to llama.cpp's exact byte layouts.

`quantize` reproduces what llama.cpp's `ggml_quantize_chunk` writes for the same float32 rows
(with or without an importance matrix), bit for bit.  Pure torch: runs on the input's device,
vectorized over all blocks, processed in row chunks to bound memory.
"""

from __future__ import annotations

from typing import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from quantkit.errors import QuantkitError
from quantkit.quant import ggml_legacy as lg
from quantkit.quant import kquants as kq

# elements per chunk: big enough to amortize per-op overhead, small enough to stay cache-friendly
CHUNK_ELEMS = 1 << 18


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in t. One summing pass (torch's isfinite().all() is ~30x slower on CPU); only when the sum is
    not finite (NaN/Inf present, or finite values overflowing it) is the exact elementwise check run."""
    s = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(s)) or bool(torch.isfinite(t).all())


def _f32_bytes(x: torch.Tensor, imatrix=None) -> torch.Tensor:
    return x.contiguous().view(torch.uint8).reshape(x.shape[0], -1)


def _f16_bytes(x: torch.Tensor, imatrix=None) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(x.shape[0], -1)


def _bf16_bytes(x: torch.Tensor, imatrix=None) -> torch.Tensor:
    """ggml_compute_fp32_to_bf16: round-to-nearest-even, NaN forced quiet."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    h = torch.where(nan, (u >> 16) | 64, (u + (0x7FFF + ((u >> 16) & 1))) >> 16) & 0xFFFF
    h16 = torch.where(h >= 0x8000, h - 0x10000, h).to(torch.int16)
    return h16.view(torch.uint8).reshape(x.shape[0], -1)


def _from_f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def _from_f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _from_bf16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float()


_QUANT: dict[T, Callable] = {
    T.F32: _f32_bytes, T.F16: _f16_bytes, T.BF16: _bf16_bytes,
    T.Q4_0: lg.quantize_q4_0, T.Q4_1: lg.quantize_q4_1, T.Q5_0: lg.quantize_q5_0,
    T.Q5_1: lg.quantize_q5_1, T.Q8_0: lg.quantize_q8_0,
    T.Q2_K: kq.quantize_q2_K, T.Q3_K: kq.quantize_q3_K,
    T.Q4_K: kq.quantize_q4_K, T.Q5_K: kq.quantize_q5_K, T.Q6_K: kq.quantize_q6_K,
}
_DEQUANT: dict[T, Callable] = {
    T.F32: _from_f32, T.F16: _from_f16, T.BF16: _from_bf16,
    T.Q4_0: lg.dequantize_q4_0, T.Q4_1: lg.dequantize_q4_1, T.Q5_0: lg.dequantize_q5_0,
    T.Q5_1: lg.dequantize_q5_1, T.Q8_0: lg.dequantize_q8_0,
    T.Q2_K: kq.dequantize_q2_K, T.Q3_K: kq.dequantize_q3_K,
    T.Q4_K: kq.dequantize_q4_K, T.Q5_K: kq.dequantize_q5_K, T.Q6_K: kq.dequantize_q6_K,
}


def supported_types() -> list[T]:
    return sorted(_QUANT, key=int)


def _check_type(qtype) -> T:
    try:
        qtype = T(qtype)
    except ValueError:
        raise QuantkitError(f"ggml type {qtype!r}: unknown; expected one of {[t.name for t in supported_types()]}") from None
    if qtype not in _QUANT:
        raise QuantkitError(f"ggml type {qtype.name}: not supported; expected one of {[t.name for t in supported_types()]}")
    return qtype


def row_bytes(qtype, n_per_row: int) -> int:
    qtype = _check_type(qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    if n_per_row <= 0 or n_per_row % block:
        raise QuantkitError(f"{qtype.name}: row length {n_per_row} is not a positive multiple of the block size {block}")
    return n_per_row // block * size


def quantize(w: torch.Tensor, qtype, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """w float [..., n_per_row] -> uint8 [..., row_bytes], ggml's exact block bytes.

    imatrix: per-column importance [n_per_row] (or [E, n_per_row] for w [E, rows, n_per_row],
    one per expert), used by the quant types whose ggml quantizer takes quant_weights."""
    qtype = _check_type(qtype)
    if not torch.is_tensor(w) or not w.is_floating_point() or w.dim() < 1:
        raise QuantkitError(f"quantize({qtype.name}): expected a floating-point tensor [rows, n_per_row], got {type(w).__name__}")
    n = w.shape[-1]
    rb = row_bytes(qtype, n)
    lead = tuple(w.shape[:-1])
    if imatrix is not None:
        imatrix = imatrix.to(device=w.device, dtype=torch.float32)
        if imatrix.dim() == 2 and w.dim() == 3 and imatrix.shape == (w.shape[0], n):
            out = [quantize(w[e], qtype, imatrix[e]) for e in range(w.shape[0])]
            return torch.stack(out)
        if imatrix.reshape(-1).shape[0] != n:
            raise QuantkitError(f"quantize({qtype.name}): imatrix has {imatrix.numel()} values, expected {n} (one per column)")
        imatrix = imatrix.reshape(-1).contiguous()
        if not all_finite(imatrix):
            raise QuantkitError(f"quantize({qtype.name}): imatrix contains non-finite values")
    x = w.reshape(-1, n)
    rows = x.shape[0]
    if qtype not in (T.F32, T.F16, T.BF16) and not all_finite(x):
        raise QuantkitError(f"quantize({qtype.name}): tensor contains NaN/Inf; block quantization needs finite weights")
    out = torch.empty((rows, rb), dtype=torch.uint8, device=w.device)
    fn = _QUANT[qtype]
    pool = _pool() if w.device.type == "cpu" and rows > 1 and kq.cpu_kernels(x) is not None else None
    n_chunks = -(-rows * n // CHUNK_ELEMS)
    if pool is not None:  # equal chunks, a multiple of the thread count, so no thread waits on a long tail
        k = torch.get_num_threads()  # the pool's width
        n_chunks = -(-max(n_chunks, k) // k) * k
    step = -(-rows // max(1, n_chunks))

    def chunk(r0: int) -> None:
        xc = x[r0:r0 + step].to(torch.float32).contiguous()
        out[r0:r0 + step] = fn(xc, imatrix)

    starts = range(0, rows, step)
    if pool is None or len(starts) == 1:
        for r0 in starts:
            chunk(r0)
    else:  # the numba kernels release the GIL: chunks run side by side on torch's thread count
        for f in [pool.submit(chunk, r0) for r0 in starts]:
            f.result()
    return out.reshape(*lead, rb)


_POOL: tuple[int, object] | None = None


def _pool():
    """A thread pool as wide as torch's intra-op thread count (None for one thread)."""
    global _POOL
    n = torch.get_num_threads()
    if n <= 1:
        return None
    if _POOL is None or _POOL[0] != n:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = (n, ThreadPoolExecutor(n, thread_name_prefix="quantkit-quant"))
    return _POOL[1]


def dequantize(data: torch.Tensor, qtype, n_per_row: int) -> torch.Tensor:
    """uint8 [..., row_bytes] -> float32 [..., n_per_row] (ggml's dequantize_row_* arithmetic)."""
    qtype = _check_type(qtype)
    rb = row_bytes(qtype, n_per_row)
    if not torch.is_tensor(data) or data.dtype != torch.uint8 or data.dim() < 1 or data.shape[-1] != rb:
        shape = tuple(data.shape) if torch.is_tensor(data) else type(data).__name__
        raise QuantkitError(f"dequantize({qtype.name}): expected uint8 [..., {rb}] for rows of {n_per_row}, got {shape}")
    lead = tuple(data.shape[:-1])
    b = data.reshape(-1, rb)
    rows = b.shape[0]
    out = torch.empty((rows, n_per_row), dtype=torch.float32, device=data.device)
    fn = _DEQUANT[qtype]
    step = max(1, (CHUNK_ELEMS * 8) // n_per_row)
    for r0 in range(0, rows, step):
        chunk = b[r0:r0 + step].contiguous()
        out[r0:r0 + step] = fn(chunk).reshape(chunk.shape[0], n_per_row)
    return out.reshape(*lead, n_per_row)
