"""The upper Cholesky factor of H^-1 (GPTQ's) with the same bits at any number of CPU threads.

MKL's potrf / potri, and even its GEMMs (a [7, 64] x [64, 32] product differs at 2 threads), split work by
the thread count, and the split changes the order of the sums. Here the work is cut into tiles whose shapes
depend on the matrix size only, and every tile is one single-threaded MKL call on a pool thread: a tile gives
the same bits whichever thread runs it, and the pool (as wide as the caller's torch threads) keeps the cores
busy. Tiles: LAPACK on BLOCK x BLOCK diagonal blocks, GEMMs with a BLOCK-deep inner dimension elsewhere.
While the pool works torch's thread count is 1 (one_thread): a pool thread's first torch op sets its own
count from that process-wide value, and a tile on two MKL threads would differ from run to run.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from quantkit.threads import on_one_thread as _on_one_thread, one_thread
from quantkit.threads import pool as thread_pool

BLOCK = 128  # diagonal block: the depth of every GEMM tile
ROWS = 256  # rows per GEMM tile
COLS = 2048  # columns per tile of a block row's scaling in the triangular inverse

def _run(pool: ThreadPoolExecutor, fn, *tasks) -> None:
    for f in [pool.submit(_on_one_thread, fn, *t) for t in tasks]:
        f.result()


def _diag(A11: torch.Tensor, with_inverse: bool):
    """(L11, info, L11^-1) of a diagonal block."""
    L11, info = torch.linalg.cholesky_ex(A11)
    if int(info) or not with_inverse:
        return L11, int(info), None
    return L11, 0, _tri_inv(L11)


def _tri_inv(L: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    return torch.linalg.solve_triangular(L, eye, upper=False)


def _mul_right_(t: torch.Tensor, m: torch.Tensor) -> None:  # t = t @ m
    t.copy_(t @ m)


def _mul_left_(t: torch.Tensor, m: torch.Tensor) -> None:  # t = m @ t
    t.copy_(m @ t)


def _sub_product_(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:  # t -= a @ b
    t.addmm_(a, b, alpha=-1)


def _row_tiles(r0: int, n: int):
    return [(r, min(n, r + ROWS)) for r in range(r0, n, ROWS)]


def _cholesky_lower_(L: torch.Tensor, block: int, pool: ThreadPoolExecutor) -> tuple[torch.Tensor, int]:
    """Blocked right-looking Cholesky on L's lower triangle, in place."""
    n = L.shape[0]
    for k0 in range(0, n, block):
        k1 = min(n, k0 + block)
        L11, info, inv11 = pool.submit(_on_one_thread, _diag, L[k0:k1, k0:k1], k1 < n).result()
        if info:
            return L, k0 + info
        L[k0:k1, k0:k1] = L11
        if k1 == n:
            break
        tiles = _row_tiles(k1, n)
        _run(pool, _mul_right_, *[(L[r0:r1, k0:k1], inv11.T) for r0, r1 in tiles])  # panel: A21 L11^-T
        # trailing update of the lower triangle, a row tile at a time up to its own last column (the widest
        # first, so no thread is left with a long one at the end); above the diagonal it leaves garbage
        _run(pool, _sub_product_, *[(L[r0:r1, k1:r1], L[r0:r1, k0:k1], L[k1:r1, k0:k1].T)
                                    for r0, r1 in reversed(tiles)])
    return L, 0


def _tri_inverse_lower_(X: torch.Tensor, L: torch.Tensor, block: int, pool: ThreadPoolExecutor) -> torch.Tensor:
    """L^-1 into X = I (only L's lower triangle is read), right-looking: each block row in turn is scaled by its
    diagonal block's inverse and eliminated from the rows below (its diagonal block is still I then, so it
    becomes that inverse)."""
    n = L.shape[0]
    for k0 in range(0, n, block):
        k1 = min(n, k0 + block)
        inv11 = pool.submit(_on_one_thread, _tri_inv, L[k0:k1, k0:k1]).result()
        X[k0:k1, k0:k1] = inv11
        _run(pool, _mul_left_, *[(X[k0:k1, c:min(k0, c + COLS)], inv11) for c in range(0, k0, COLS)])
        if k1 < n:
            _run(pool, _sub_product_, *[(X[r0:r1, :k1], L[r0:r1, k0:k1], X[k0:k1, :k1])
                                        for r0, r1 in _row_tiles(k1, n)])
    return X


def cholesky_lower(A: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, int]:
    """(L, info): A = L L^T with L lower (only A's lower triangle is read). info is 0, or as LAPACK's: the
    1-based column whose pivot was not positive (L is then partial)."""
    workers = thread_pool("chol", torch.get_num_threads())
    L = A.tril()
    with one_thread():
        L, info = _cholesky_lower_(L, block, workers)
    return L.tril_(), info


def tri_inverse_lower(L: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """L^-1 of a lower-triangular L with a positive diagonal."""
    workers = thread_pool("chol", torch.get_num_threads())
    X = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    with one_thread():
        return _tri_inverse_lower_(X, L, block, workers)


def upper_inverse_factor(Hd: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor | None, int]:
    """(U, info): the upper-triangular U with U^T U = Hd^-1 (the upper Cholesky factor of Hd^-1), from one
    Cholesky and one triangular inverse: with J the reversal, J Hd J = L L^T gives U = J L^-1 J.
    info != 0 (U None): Hd is not positive definite in this precision. Off the CPU (cuSOLVER, cuBLAS: their
    bits do not depend on CPU threads) the two steps are whole-matrix calls."""
    if Hd.device.type != "cpu":
        return _upper_inverse_factor_whole(Hd)
    L, info = cholesky_lower(Hd.flip(0, 1), block)
    if info:
        return None, info
    return tri_inverse_lower(L, block).flip(0, 1), 0


def _upper_inverse_factor_whole(Hd: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    L, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))
    if int(info):
        return None, int(info)
    X = torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype, device=L.device), upper=False)
    del L
    return X.flip(0, 1), 0
