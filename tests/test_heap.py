"""heap.keep_freed_blocks: a freed large tensor's pages are reused (the kernel's page-fault count is the oracle),
and the user's own malloc settings are left alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

PROBE = """
import resource, torch
import torch.nn.functional as F
from quantkit import heap
tuned = heap.keep_freed_blocks()
torch.set_num_threads(1)
w, x = torch.randn(1536, 576), torch.randn(16, 512, 576)
def step():  # a forward's temporaries: 50 MiB each, freed at once
    y = F.linear(x, w)
    return (F.silu(y) * y).sum()
for _ in range(8):  # the heap grows to the loop's footprint over the first few steps
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _probe(**env):
    e = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=e, check=True).stdout
    tuned, faults = out.split()
    return tuned == "True", int(faults)


def test_freed_blocks_are_reused():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    tuned, faults = _probe()
    assert tuned
    plain, plain_faults = _probe(QUANTKIT_MALLOC="system")
    assert not plain
    # after warm-up: measured 0 new pages against 368,670 (three 48 MiB blocks mapped and zero-filled per step)
    assert faults * 10 < plain_faults


def test_user_settings_win():
    assert _probe(GLIBC_TUNABLES="glibc.malloc.arena_max=2")[0] is False
    assert _probe(MALLOC_ARENA_MAX="2")[0] is False


ARENAS = """
import ctypes, threading, torch
from quantkit import heap
tuned = heap.keep_freed_blocks()
def work():  # a pool thread's tensor, with glibc's own per-arena report printed while it is held
    t = torch.ones(4 << 20)
    ctypes.CDLL("libc.so.6").malloc_stats()
    return t
th = threading.Thread(target=work)
th.start()
th.join()
print(tuned)
"""


def _arenas(**env):
    e = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    e.update(env)
    r = subprocess.run([sys.executable, "-c", ARENAS], capture_output=True, text=True, env=e, check=True)
    return r.stdout.split()[0] == "True", sum(line.startswith("Arena ") for line in r.stderr.splitlines())


def test_threads_share_one_arena():
    """A thread's allocations come from the main arena (glibc's malloc_stats lists one): a per-thread arena's
    64 MiB heaps are unmapped whenever wholly free, and its temporaries mapped and zero-filled again."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert _arenas() == (True, 1)
    tuned, n = _arenas(QUANTKIT_MALLOC="system")
    assert not tuned and n > 1
