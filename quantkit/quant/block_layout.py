"""Block-major views shared by the torch and numba ggml codecs: one column per n-element group."""

from __future__ import annotations

import torch


def _sub_major(x: torch.Tensor, n: int) -> torch.Tensor:
    """[rows, n_per_row] -> [n, B] with B = total/n (one column per n-element group)."""
    return x.reshape(-1, n).t().contiguous()


def _imatrix_cols(imatrix: torch.Tensor, rows: int, n: int) -> torch.Tensor:
    return _sub_major(imatrix.reshape(1, -1).expand(rows, -1), n)
