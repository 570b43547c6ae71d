"""glibc heap settings for the CLI's process: a freed large tensor's memory stays in the heap for the next one.

glibc serves a block past its mmap threshold (dynamic, at most 32 MiB) with a mapping of its own, unmapped on
free, and trims the heap's top past 128 KiB. A calibration pass allocates and frees blocks of tens of MiB at
every op, which the kernel then maps and zero-fills page by page again: GPTQ at 32 x 512 tokens on SmolLM2
spent 9 of its 80 CPU seconds in the kernel. Raised thresholds (what GLIBC_TUNABLES would set) reuse the freed
blocks: 2-3 s in the kernel, ~12 % less wall time (64 MiB thresholds kept most of the cost); peak RSS moved
-7 % (AWQ 16 x 512) to +11 % (GPTQ 128 x 512: freed blocks wait for reuse). A block past 1 GiB still gets its
own mapping. Only for the commands that run forwards (a calibrated convert, imatrix, perplexity): a plain
conversion streams tensors of hundreds of MiB one at a time, and with them kept in the heap its peak RSS rose
~20 % (benchmarks/convert_memory.py --gib 2: 1945 -> 2334 MiB).

One arena (M_ARENA_MAX 1): a pool thread otherwise gets an arena of its own, made of 64 MiB heaps that glibc
unmaps whenever one is wholly free, whatever the thresholds; a sample's forward on a pool thread then maps and
zero-fills its temporaries again (`--optimizer gptq` at 64 x 512 on SmolLM2: 4.2 M page faults and 20 s in the
kernel, against 0.38 M and 8 s with one arena, 83 -> 71 s wall, same bytes). Torch allocates few, large
blocks, so threads seldom wait on the one arena's lock. Set before the pools start: a thread takes its arena
at its first allocation.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
THRESHOLD = 1 << 30


def keep_freed_blocks() -> bool:
    """Raise glibc's mmap and trim thresholds to THRESHOLD and keep one arena; whether it did. Left alone off
    Linux / glibc, where the user tuned malloc (GLIBC_TUNABLES, MALLOC_* variables) or with QUANTKIT_MALLOC=system."""
    env = os.environ
    if (not sys.platform.startswith("linux") or env.get("QUANTKIT_MALLOC") == "system" or "GLIBC_TUNABLES" in env
            or any(k.startswith("MALLOC_") for k in env)):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return (bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
            and bool(mallopt(M_ARENA_MAX, 1)))
