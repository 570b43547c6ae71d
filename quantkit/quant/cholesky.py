"""Cholesky factors whose bits do not depend on the number of CPU threads.

MKL's LAPACK (potrf, potri) gives different bits at different thread counts, so a GPTQ result would depend
on OMP_NUM_THREADS (a torchrun rank runs on one thread, a plain run on all cores). Here the only LAPACK calls
are on BLOCK x BLOCK diagonal blocks, run on one thread; everything else is GEMMs whose inner dimension is one
block, which MKL computes with the same bits at any thread count (tests/test_thread_determinism.py checks the
factor itself at 1, 2 and 3 threads), so the large products still use every core.
"""

from __future__ import annotations

import torch

BLOCK = 128


class one_thread:
    """torch on one thread inside (restores the caller's count)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        if self.n != 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.n != 1:
            torch.set_num_threads(self.n)


def _tri_inv(L: torch.Tensor) -> torch.Tensor:
    """Inverse of a small lower-triangular block (one thread)."""
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    return torch.linalg.solve_triangular(L, eye, upper=False)


def cholesky_lower(A: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, int]:
    """(L, info): A = L L^T with L lower, by a blocked right-looking Cholesky (only A's lower triangle is
    read). info is 0, or as LAPACK's: the 1-based column whose pivot was not positive (L is then partial)."""
    return _cholesky_lower_(A.tril(), block)


def _cholesky_lower_(L: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """cholesky_lower on L's lower triangle, in place."""
    n = L.shape[0]
    for k0 in range(0, n, block):
        k1 = min(n, k0 + block)
        with one_thread():
            L11, info = torch.linalg.cholesky_ex(L[k0:k1, k0:k1])
            if int(info):
                return L, k0 + int(info)
            L[k0:k1, k0:k1] = L11
            inv11 = _tri_inv(L11) if k1 < n else None
        if k1 == n:
            break
        P = L[k1:, k0:k1] @ inv11.T  # the panel: A21 L11^-T
        L[k1:, k0:k1] = P
        for j0 in range(k1, n, block):  # trailing update of the lower block triangle only
            j1 = min(n, j0 + block)
            L[j0:, j0:j1].addmm_(P[j0 - k1:], P[j0 - k1:j1 - k1].T, alpha=-1)
    return L.tril_(), 0


def tri_inverse_lower(L: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """L^-1 of a lower-triangular L with a positive diagonal, block row by block row (right-looking: X starts
    as I; each finished block row is scaled by its diagonal block's inverse and eliminated from the rows below)."""
    n = L.shape[0]
    X = torch.eye(n, dtype=L.dtype, device=L.device)
    for k0 in range(0, n, block):
        k1 = min(n, k0 + block)
        with one_thread():
            inv11 = _tri_inv(L[k0:k1, k0:k1])
        X[k0:k1, :k1] = inv11 @ X[k0:k1, :k1]
        if k1 < n:
            X[k1:, :k1].addmm_(L[k1:, k0:k1], X[k0:k1, :k1], alpha=-1)
    return X


def upper_inverse_factor(Hd: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor | None, int]:
    """(U, info): the upper-triangular U with U^T U = Hd^-1 (the upper Cholesky factor of Hd^-1), from one
    Cholesky and one triangular inverse: with J the reversal, J Hd J = L L^T gives U = J L^-1 J.
    info != 0 (U None): Hd is not positive definite in this precision. Off the CPU (cuSOLVER, cuBLAS: their
    bits do not depend on CPU threads) the two steps are whole-matrix calls."""
    if Hd.device.type != "cpu":
        return _upper_inverse_factor_whole(Hd)
    L, info = _cholesky_lower_(Hd.flip(0, 1).tril_(), block)
    if info:
        return None, info
    X = tri_inverse_lower(L, block)
    del L
    return X.flip(0, 1), 0


def _upper_inverse_factor_whole(Hd: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    L, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))
    if int(info):
        return None, int(info)
    X = torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype, device=L.device), upper=False)
    del L
    return X.flip(0, 1), 0
