"""Sums of x^T x and quadratic forms m H m^T on their lower block triangle: H is symmetric, so half of a
full product's flops (about 0.6x with the diagonal blocks) give the same numbers."""

from __future__ import annotations

import torch

from .. import gemm

# column block: large enough for efficient GEMMs, small enough to skip most of the upper half. 192 over 128: a
# 512-token share took 1.45 / 7.6 ms against 1.75 / 8.2 ms (576 / 1536 wide, float32, one Zen 5 core); bf16
# products and adds won 5-10 % in a calibration run
BLOCK = 192
ROW = 4096  # total()'s row length: at most this many elements are ever summed by one call on one thread


def bf16_products(x: torch.Tensor) -> bool:
    """Whether add_xtx takes x as it is (bf16 on the CPU) rather than as float32."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu"


def add_xtx(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += x^T x on acc's lower block triangle (acc float32; the upper part is left alone).

    x [tokens, n] float32 (on the CPU through oneDNN, gemm.py), or bfloat16 on the CPU: there the products run
    as bf16 GEMMs (~2x float32's speed where the CPU has bf16 dot products; exact products summed in float32
    inside, each call's output rounded to bf16 once: a relative 2^-9 per call, far below a Hessian's sampling
    noise) added into the float32 acc, and the diagonal (llama.cpp's search weights, GPTQ's damping) is summed
    in float32 instead."""
    add_blocks(acc, xtx_blocks(x))


def xtx_blocks(x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """x's share of a sum, apart from it: the lower-block-triangle products of x^T x (bf16 on the CPU as add_xtx
    computes them, else float32) and, for bf16, the float32 diagonal. Calibration passes compute a sample's
    share on the thread that ran its forward; add_blocks adds it in sample order."""
    n = x.shape[1]
    if bf16_products(x):
        b = BLOCK
        return [x[:, i0:min(n, i0 + b)].T @ x[:, :min(n, i0 + b)] for i0 in range(0, n, b)], x.float().square_().sum(0)
    xt = x.float().T.contiguous()  # rows of x^T: operands oneDNN reads without a copy
    return [gemm.linear(xt[i0:min(n, i0 + BLOCK)], xt[:min(n, i0 + BLOCK)]) for i0 in range(0, n, BLOCK)], None


def add_blocks(acc: torch.Tensor, share: tuple[list[torch.Tensor], torch.Tensor | None]) -> None:
    """acc += a share from xtx_blocks."""
    blocks, diag = share
    d0 = acc.diagonal().clone() if diag is not None else None
    i0 = 0
    for b in blocks:
        acc[i0:i0 + b.shape[0], :b.shape[1]] += b
        i0 += b.shape[0]
    if diag is not None:
        acc.diagonal().copy_(d0 + diag)


def symmetric(acc: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle `acc` holds (a new tensor)."""
    h = acc.tril()
    h += h.tril(-1).T
    return h


def quad(M: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """m H m^T for each row m of M [rows, n] and a symmetric H [n, n]."""
    q = M.new_zeros(M.shape[0])
    for i0 in range(0, H.shape[0], BLOCK):
        i1 = min(H.shape[0], i0 + BLOCK)
        r = gemm.mm(M[:, i0:i1], H[i0:i1, i0:i1])
        if i0:
            r.add_(gemm.mm(M[:, :i0], H[:i0, i0:i1]), alpha=2)
        q += (r * M[:, i0:i1]).sum(1)
    return q


def total(t: torch.Tensor) -> torch.Tensor:
    """The sum of t's elements (float64) with the same bits at any thread count. torch splits a full reduction
    of more than 32768 elements into per-thread partial sums; a sum along rows computes each row on one thread,
    so the elements go in rows of ROW, whose sums go in rows again, until one row is left."""
    v = t.reshape(-1)
    while v.numel() > ROW:
        m = v.numel() - v.numel() % ROW
        v = torch.cat([v[:m].view(-1, ROW).sum(1, dtype=torch.float64), v[m:].sum(0, dtype=torch.float64)[None]])
    return v.sum(dtype=torch.float64)


def diag_mean(H: torch.Tensor) -> torch.Tensor:
    """mean(diag H) in H's dtype, with the same bits at any thread count (GPTQ's damping unit)."""
    return (total(H.diagonal()) / H.shape[0]).to(H.dtype)
