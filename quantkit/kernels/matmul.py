"""Triton dequant-matmul kernels y = x @ dequant(W)^T for every PackedWeight format.

Three kernels share one tile dequantizer (`_dequant`, specialised per format at compile time):
  * `_splitk_kernel` (decode, M <= 16): grid (N tiles, K splits); each CTA dequantizes a [BK, BN]
    slab of its K range and multiplies it into all M rows (M == 1: broadcast-multiply + row sum;
    2..16: tl.dot on a 16-row tile). Splits write fp32 partials [S, M, N] that torch sums in a
    fixed order (deterministic, no atomics); with one split the kernel writes y directly.
  * `_gemm_kernel` (M > 16): classic tiled GEMM, grouped tile order for L2 reuse of W, tl.dot
    with fp32 accumulation, autotuned on CUDA.
  * `_moe_kernel`: grouped GEMM over experts; rows are pre-sorted by expert and cut into BLOCK_M
    blocks, each block reads its expert's weight through per-tensor expert strides.
Under TRITON_INTERPRET=1 fixed small configs are used (no autotuning) so CPU tests stay fast.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from quantkit.kernels.ggml_kernels import (q4_0_tile, q4_1_tile, q4_k_tile, q5_0_tile, q5_1_tile, q5_k_tile,
                                           q6_k_tile, q8_0_tile)
from quantkit.kernels.int_kernels import awq_tile, gptq_tile
from quantkit.kernels.mxfp4_kernels import mxfp4_gguf_tile, mxfp4_hf_tile
from quantkit.kernels.packed import PackedWeight

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DECODE_MAX_M = 16


@triton.jit
def _dequant(FMT: tl.constexpr, w, a1, a2, a3, k0, k_hi, n0, offs_n, mask_n, N, row_bytes, nb,
             BITS: tl.constexpr, GROUP: tl.constexpr, ZERO_OFF: tl.constexpr, HAS_GIDX: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, KN: tl.constexpr):
    """float32 tile of W for columns k0..k0+BK (k0 a multiple of BK; k >= k_hi read as 0) and rows
    offs_n = n0 + arange(BN): [BK, BN] if KN else [BN, BK]. Format codes as in packed.py."""
    if FMT == 1:
        t = tl.reshape(gptq_tile(w, a1, a2, a3, k0, k_hi, offs_n, mask_n, N, BLOCK_K,
                                 BITS, GROUP, ZERO_OFF, HAS_GIDX), (BLOCK_K, BLOCK_N))
        if not KN:
            t = tl.trans(t)
    elif FMT == 2:
        t = tl.reshape(awq_tile(w, a1, a2, k0, k_hi, n0, N, BLOCK_K, BLOCK_N, GROUP), (BLOCK_K, BLOCK_N))
        if not KN:
            t = tl.trans(t)
    else:
        if FMT == 22:  # Q6_K: one int8 scale per 16 elements
            NSUB: tl.constexpr = BLOCK_K // 16
            mb = mask_n[:, None, None] & ((k0 + tl.arange(0, NSUB) * 16) < k_hi)[None, :, None]
        else:
            NSUB: tl.constexpr = BLOCK_K // 32
            mb = mask_n[:, None, None] & ((k0 + tl.arange(0, NSUB) * 32) < k_hi)[None, :, None]
        base = w + n0.to(tl.int64) * row_bytes
        rn = ((offs_n - n0) * row_bytes)[:, None, None]
        if FMT == 3:
            t3 = mxfp4_hf_tile(w, a1, n0, offs_n, k0, mb, nb, NSUB)
        elif FMT == 10:
            t3 = q4_0_tile(base, rn, k0, mb, NSUB)
        elif FMT == 11:
            t3 = q4_1_tile(base, rn, k0, mb, NSUB)
        elif FMT == 12:
            t3 = q5_0_tile(base, rn, k0, mb, NSUB)
        elif FMT == 13:
            t3 = q5_1_tile(base, rn, k0, mb, NSUB)
        elif FMT == 14:
            t3 = q8_0_tile(base, rn, k0, mb, NSUB)
        elif FMT == 20:
            t3 = q4_k_tile(base, rn, k0, mb, NSUB)
        elif FMT == 21:
            t3 = q5_k_tile(base, rn, k0, mb, NSUB)
        elif FMT == 22:
            t3 = q6_k_tile(base, rn, k0, mb, NSUB)
        else:
            t3 = mxfp4_gguf_tile(base, rn, k0, mb, NSUB)
        t = tl.reshape(t3, (BLOCK_N, BLOCK_K))
        if KN:
            t = tl.trans(t)
    return t


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc += a @ b; b (dequantized W) is cast to a's dtype, or both to fp32 with IEEE."""
    if IEEE:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b.to(a.dtype), acc)
    return acc


@triton.jit
def _splitk_kernel(x, out, w, a1, a2, a3, M, N, K, sxm, sxk, k_per_split, row_bytes, nb,
                   FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, ZERO_OFF: tl.constexpr,
                   HAS_GIDX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        xt = tl.load(x + offs_m[:, None] * sxm + offs_k[None, :] * sxk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if BLOCK_M == 1:
            wt = _dequant(FMT, w, a1, a2, a3, k0, k_hi, n0, offs_n, mask_n, N, row_bytes, nb,
                          BITS, GROUP, ZERO_OFF, HAS_GIDX, BLOCK_N, BLOCK_K, False)
            acc += tl.sum(wt * xt.to(tl.float32), axis=1)[None, :]
        else:
            wt = _dequant(FMT, w, a1, a2, a3, k0, k_hi, n0, offs_n, mask_n, N, row_bytes, nb,
                          BITS, GROUP, ZERO_OFF, HAS_GIDX, BLOCK_N, BLOCK_K, True)
            acc = _mma(xt, wt, acc, IEEE)
    dst = out + pid_s.to(tl.int64) * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(dst, acc.to(out.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gemm_kernel(x, y, w, a1, a2, a3, M, N, K, sxm, sxk, row_bytes, nb, M_BUCKET,
                 FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, ZERO_OFF: tl.constexpr,
                 HAS_GIDX: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row-tiles walk the same W columns together, so a dequantized W slab is reused from L2
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    n0 = pid_n * BLOCK_N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(x + offs_m[:, None].to(tl.int64) * sxm + offs_k[None, :] * sxk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = _dequant(FMT, w, a1, a2, a3, k0, K, n0, offs_n, mask_n, N, row_bytes, nb,
                      BITS, GROUP, ZERO_OFF, HAS_GIDX, BLOCK_N, BLOCK_K, True)
        acc = _mma(xt, wt, acc, IEEE)
    dst = y + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(dst, acc.to(y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _moe_kernel(x, y, w, a1, a2, a3, x_rows, y_rows, blk_expert, blk_start, blk_end,
                N, K, sxm, sxk, es0, es1, es2, es3, row_bytes, nb,
                FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, ZERO_OFF: tl.constexpr,
                HAS_GIDX: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(blk_start + pid_b)
    end = tl.load(blk_end + pid_b)
    if start < end:
        e = tl.load(blk_expert + pid_b).to(tl.int64)
        w += e * es0
        a1 += e * es1
        a2 += e * es2
        a3 += e * es3
        offs_r = start + tl.arange(0, BLOCK_M)
        mask_m = offs_r < end
        xr = tl.load(x_rows + offs_r, mask=mask_m, other=0).to(tl.int64)
        yr = tl.load(y_rows + offs_r, mask=mask_m, other=0).to(tl.int64)
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xt = tl.load(x + xr[:, None] * sxm + offs_k[None, :] * sxk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            wt = _dequant(FMT, w, a1, a2, a3, k0, K, n0, offs_n, mask_n, N, row_bytes, nb,
                          BITS, GROUP, ZERO_OFF, HAS_GIDX, BLOCK_N, BLOCK_K, True)
            acc = _mma(xt, wt, acc, IEEE)
        tl.store(y + yr[:, None] * N + offs_n[None, :], acc.to(y.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------- host side

def _gemm_prune(configs, named_args, **kwargs):
    m = named_args["M"]
    cap = max(32, triton.next_power_of_2(m))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap]
    return kept or configs[:1]


# Every config keeps the dequantized W tile at <= 32 values per thread (BK*BN <= 32*32*warps): larger
# ones spill under ptxas for sm_90a (measured with all formats), smaller ones starve the tensor cores.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=nw, num_stages=ns)
    for bm, bn, bk, nw, ns in [
        (32, 64, 64, 4, 3), (32, 128, 64, 8, 3), (64, 64, 128, 8, 3), (64, 128, 64, 8, 3),
        (128, 64, 64, 8, 3), (128, 128, 64, 8, 3),
    ]
]
# QUANTKIT_KERNEL_TUNE=0: one fixed GEMM config, no autotuning (fast first calls, e.g. in tests)
_GEMM_FIXED = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
TUNE = os.environ.get("QUANTKIT_KERNEL_TUNE", "1") != "0"


def _quick_bench(kernel_call, quantiles):
    # short timing runs: tuning happens once per (M bucket, N, K, format) and must not stall a model load
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


_TUNE_KEY = ["M_BUCKET", "N", "K", "FMT", "BITS", "GROUP", "HAS_GIDX"]
try:
    _gemm_tuned = triton.autotune(_GEMM_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _gemm_prune},
                                  do_bench=_quick_bench)(_gemm_kernel)
except TypeError:  # triton without autotune(do_bench=...)
    _gemm_tuned = triton.autotune(_GEMM_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _gemm_prune},
                                  warmup=5, rep=25)(_gemm_kernel)


def _fmt_args(pw: PackedWeight) -> tuple[list[torch.Tensor], dict, int, int]:
    """(pointer tensors w, a1, a2, a3), constexpr kwargs, row_bytes, nb for a (single or stacked) PackedWeight."""
    t = pw.tensors
    if pw.format in ("gptq", "awq"):
        ptrs = [t["qweight"], t["qzeros"], t["scales"], t.get("g_idx", t["qweight"])]
    elif pw.format == "mxfp4":
        ptrs = [t["blocks"], t["scales"], t["blocks"], t["blocks"]]
    else:
        ptrs = [t["data"]] * 4
    meta = dict(FMT=pw.fmt_code, BITS=pw.bits or 4, GROUP=pw.group_size or 1, ZERO_OFF=pw.zero_offset,
                HAS_GIDX="g_idx" in t)
    return ptrs, meta, pw.meta.get("row_bytes", 0), pw.shape[1] // 32


def _ieee(x: torch.Tensor) -> bool:
    # fp32 inputs get exact fp32 dots; the interpreter's bf16 dot is broken (numpy has no bf16), so
    # interpreted bf16 also goes through fp32.
    return x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _decode(x2: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    m, k = x2.shape
    n = pw.shape[0]
    ptrs, meta, row_bytes, nb = _fmt_args(pw)
    block_m = 1 if m == 1 else 16
    if INTERPRET:
        block_n, block_k, warps, stages, target = 32, 64, 4, 1, 8
    else:
        # 32 weights per thread per step keeps every format under ~150 registers with no spills
        # (ptxas, sm_90a), so several CTAs per SM keep enough loads in flight to stream HBM
        block_n, block_k, warps, stages = 32, 128, 4, 2
        target = 4 * _num_sms(x2.device.index or 0)
    grid_n = triton.cdiv(n, block_n)
    nk = triton.cdiv(k, block_k)
    split = max(1, min(nk, target // grid_n))
    k_per_split = triton.cdiv(nk, split) * block_k
    split = triton.cdiv(k, k_per_split)
    out = torch.empty((split, m, n), device=x2.device, dtype=torch.float32 if split > 1 else x2.dtype)
    _splitk_kernel[(grid_n, split)](
        x2, out, *ptrs, m, n, k, x2.stride(0), x2.stride(1), k_per_split, row_bytes, nb,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=_ieee(x2),
        num_warps=warps, num_stages=stages, **meta)
    return out[0] if split == 1 else out.sum(0).to(x2.dtype)


def _gemm(x2: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    m, k = x2.shape
    n = pw.shape[0]
    ptrs, meta, row_bytes, nb = _fmt_args(pw)
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    args = (x2, y, *ptrs, m, n, k, x2.stride(0), x2.stride(1), row_bytes, nb, triton.next_power_of_2(m))
    ieee = _ieee(x2)
    if INTERPRET:
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=4)
        grid = (triton.cdiv(m, 16) * triton.cdiv(n, 32),)
        _gemm_kernel[grid](*args, IEEE=ieee, num_warps=4, **cfg, **meta)
    elif not TUNE:
        c = _GEMM_FIXED
        grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)
        _gemm_kernel[grid](*args, IEEE=ieee, **c, **meta)
    else:
        def grid(c):
            return (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)
        _gemm_tuned[grid](*args, IEEE=ieee, **meta)
    return y


def triton_linear(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """y[..., N] = x[..., K] @ dequant(W)^T with the Triton kernels (decode path for M <= 16)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x.new_empty(*lead, pw.shape[0])
    y = _decode(x2, pw) if x2.shape[0] <= DECODE_MAX_M else _gemm(x2, pw)
    return y.reshape(*lead, pw.shape[0])


def triton_linear_experts(x2: torch.Tensor, pw: PackedWeight, ids: torch.Tensor) -> torch.Tensor:
    """x2 [T, K], ids [T, top_k] expert per (token, slot) -> y [T*top_k, N] (row t*top_k + j)."""
    t_count, k = x2.shape
    top_k = ids.shape[1]
    n = pw.shape[0]
    e_count = pw.num_experts
    flat = ids.reshape(-1).to(torch.int64)
    rows = flat.numel()
    block_m = 16 if INTERPRET or rows <= 16 * e_count else 64
    block_n, block_k, warps, stages = (32, 64, 4, 1) if INTERPRET else (64, 64, 8, 3)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=e_count)
    starts = torch.cumsum(counts, 0) - counts
    nblk = (counts + block_m - 1) // block_m
    blk_cum = torch.cumsum(nblk, 0)
    max_blocks = triton.cdiv(rows, block_m) + e_count  # upper bound: no host sync on the real count
    b = torch.arange(max_blocks, device=x2.device)
    e_of_b = torch.searchsorted(blk_cum, b, right=True).clamp(max=e_count - 1)
    first = blk_cum - nblk
    start = starts[e_of_b] + (b - first[e_of_b]) * block_m
    end = starts[e_of_b] + counts[e_of_b]
    valid = b < blk_cum[-1]
    start = torch.where(valid, start, 0).to(torch.int32)
    end = torch.where(valid, end, 0).to(torch.int32)
    x_rows = (order // top_k).to(torch.int32)
    y_rows = order.to(torch.int32)
    y = torch.empty((rows, n), device=x2.device, dtype=x2.dtype)
    ptrs, meta, row_bytes, nb = _fmt_args(pw)
    es = [p[0].numel() for p in ptrs]
    grid = (max_blocks, triton.cdiv(n, block_n))
    _moe_kernel[grid](x2, y, *ptrs, x_rows, y_rows, e_of_b.to(torch.int32), start, end,
                      n, k, x2.stride(0), x2.stride(1), *es, row_bytes, nb,
                      IEEE=_ieee(x2), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                      num_warps=warps, num_stages=stages, **meta)
    return y
