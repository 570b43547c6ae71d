"""torch's CPU thread count for a stretch of code."""

from __future__ import annotations

import contextlib

import torch

# MKL cuts a product whose left operand has few rows differently at different thread counts, so its sums come
# out in another order (x [5..11 rows, K] @ W differs at 2 threads; MKL 2024.2 in torch 2.13): such products
# run on one thread, where they cost next to nothing anyway
FEW_ROWS = 16


class one_thread:
    """torch on one thread inside (the caller's count is restored after)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        if self.n != 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.n != 1:
            torch.set_num_threads(self.n)


def few_rows(x: torch.Tensor):
    """one_thread() when x (a product's left operand [..., K] on the CPU) has fewer than FEW_ROWS rows."""
    rows = x.numel() // max(1, x.shape[-1])
    return one_thread() if x.device.type == "cpu" and rows < FEW_ROWS else contextlib.nullcontext()
