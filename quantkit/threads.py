"""torch's CPU thread count for a stretch of code."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import torch

# MKL cuts a product whose left operand has few rows differently at different thread counts, so its sums come
# out in another order (x [5..11 rows, K] @ W differs at 2 threads; MKL 2024.2 in torch 2.13): such products
# run on one thread, where they cost next to nothing anyway
FEW_ROWS = 16
# in_order keeps this many items per thread submitted ahead: with one, a thread that finished waited idle while
# the caller folded the last result in (--optimizer gptq, 64 x 512: probe passes 17 -> 5 idle core-seconds)
AHEAD = 2


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


_POOLS: dict[tuple[str, int], ThreadPoolExecutor] = {}


def pool(name: str, width: int) -> ThreadPoolExecutor:
    """A process-wide pool of `width` threads named quantkit-<name>."""
    key = (name, width)
    p = _POOLS.get(key)
    if p is None:
        p = _POOLS.setdefault(key, ThreadPoolExecutor(width, thread_name_prefix=f"quantkit-{name}"))
    return p


def on_one_thread(fn, *args):
    """fn(*args) with torch on one thread, for pool threads working inside one_thread(): a pool thread's torch
    count may have been set before, outside it."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    return fn(*args)


def map_single_threaded(fn, items: list) -> list:
    """[fn(x) for x in items], on as many Python threads as torch has CPU threads (at most one per item), each
    running torch on one thread. For independent pieces of work that alone leave cores idle (small ops, Python
    in between; numba kernels that release the GIL): every item is computed on one thread wherever it runs, so
    its bits do not depend on the thread count. fn must not share mutable state across items."""
    k = min(len(items), torch.get_num_threads())
    if k <= 1:
        with one_thread():
            return [fn(x) for x in items]
    p = pool("map", k)
    with one_thread():
        return [f.result() for f in [p.submit(on_one_thread, fn, x) for x in items]]


def in_order(fn, n: int, width: int):
    """Yield fn(0), ..., fn(n - 1) in order, computing them on `width` pool threads (up to AHEAD * width of them
    submitted) with torch on one thread each, the caller's thread held at one thread too until the generator ends
    (close it, e.g. contextlib.closing, when stopping early); width <= 1: inline. For per-sample forwards whose
    results the caller folds into order-dependent sums: the sums stay in sample order, and each item's bits are
    its one-thread bits wherever it runs."""
    if width <= 1:
        for i in range(n):
            yield fn(i)
        return
    p = pool("ahead", width)
    futures, nxt = {}, 0
    with one_thread():
        try:
            for i in range(n):
                while nxt < n and nxt < i + AHEAD * width:
                    futures[nxt] = p.submit(on_one_thread, fn, nxt)
                    nxt += 1
                yield futures.pop(i).result()
        finally:  # stopped early (error, close): nothing may still run on the caller's modules
            for f in futures.values():
                f.cancel()
            for f in futures.values():
                if not f.cancelled():
                    f.exception()
