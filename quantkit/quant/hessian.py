"""Sums of x^T x and quadratic forms m H m^T on their lower block triangle: H is symmetric, so half of a
full product's flops (about 0.6x with the diagonal blocks) give the same numbers."""

from __future__ import annotations

import torch

BLOCK = 128  # column block: large enough for efficient GEMMs, small enough to skip most of the upper half


def add_xtx(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += x^T x on acc's lower block triangle (x [tokens, n] float32; the upper part is left alone)."""
    n = acc.shape[0]
    for i0 in range(0, n, BLOCK):
        i1 = min(n, i0 + BLOCK)
        acc[i0:i1, :i1].addmm_(x[:, i0:i1].T, x[:, :i1])


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
        r = M[:, i0:i1] @ H[i0:i1, i0:i1]
        if i0:
            r.addmm_(M[:, :i0], H[:i0, i0:i1], alpha=2)
        q += (r * M[:, i0:i1]).sum(1)
    return q
