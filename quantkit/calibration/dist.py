"""Calibration across processes with torch.distributed (`torchrun --nproc-per-node N -m quantkit ...`; gloo on
CPUs, NCCL on GPUs), with outputs byte-identical to one process.

The calibration samples are cut into canonical shards of SHARD consecutive samples; shard k belongs to rank
k % world. Each rank embeds and runs only its own samples. Every sum over samples is defined the same way
whatever the world size: per shard from zero in sample order, then shards folded in shard order. One process
does exactly that; N processes fold along a ring (rank of shard k receives the running sum from the rank of
shard k-1, adds its shard's partial, sends it on), so the float operations, and their results, are the same.
The rank holding the last shard broadcasts the total. Only rank 0 writes outputs; a rank that dies makes
torchrun stop the others, whose interrupted outputs are removed like any interrupted run's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

SHARD = 4  # calibration samples per canonical shard (world-size independent: it fixes the summation order)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        return self.rank == 0


_WORLD = World()


def init_from_env() -> World:
    """Joins the process group torchrun describes (WORLD_SIZE > 1 in the environment); no-op otherwise."""
    global _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return _WORLD
    import datetime

    import torch.distributed as dist
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    _WORLD = World(dist.get_rank(), dist.get_world_size())
    return _WORLD


def world() -> World:
    return _WORLD


def shard_owner(k: int, w: World | None = None) -> int:
    return k % (w or _WORLD).size


def n_shards(n_samples: int) -> int:
    return -(-n_samples // SHARD)


def local_samples(n_samples: int, w: World | None = None) -> list[int]:
    """Global indices of this rank's samples, in order (its shards, each in sample order)."""
    w = w or _WORLD
    return [s for k in range(n_shards(n_samples)) if shard_owner(k, w) == w.rank
            for s in range(k * SHARD, min((k + 1) * SHARD, n_samples))]


class Ring:
    """The fold of one pass's accumulators along the shards (see module doc). Accumulators expose `parts()`
    (their per-shard partial tensors, zeroed after each fold) and `totals()` (the running sums, same
    shapes); `fold(k)` after this rank's shard k, `finish()` once the pass is over."""

    def __init__(self, accs: list, n_samples: int, w: World | None = None):
        self.accs, self.w, self.k_last = accs, w or _WORLD, n_shards(n_samples) - 1
        self._sends: list = []

    def _pairs(self):
        for a in self.accs:
            yield from zip(a.totals(), a.parts())

    def fold(self, k: int) -> None:
        if not self.w.active:
            for tot, part in self._pairs():
                tot += part
                part.zero_()
            return
        import torch.distributed as dist
        for h in self._sends:  # the totals are about to be overwritten: earlier sends must be out
            h.wait()
        self._sends = []
        if k > 0:
            src = shard_owner(k - 1, self.w)
            for tot, _ in self._pairs():
                dist.recv(tot, src=src)
        for tot, part in self._pairs():
            tot += part
            part.zero_()
        if k < self.k_last:
            dst = shard_owner(k + 1, self.w)
            self._sends = [dist.isend(tot, dst=dst) for tot, _ in self._pairs()]

    def finish(self) -> None:
        if not self.w.active:
            return
        import torch.distributed as dist
        for h in self._sends:
            h.wait()
        self._sends = []
        src = shard_owner(self.k_last, self.w)
        for tot, _ in self._pairs():
            dist.broadcast(tot, src=src)


def barrier() -> None:
    if _WORLD.active:
        import torch.distributed as dist
        dist.barrier()


def gather_objects(obj):
    """Every rank's `obj`, in rank order (one process: [obj])."""
    if not _WORLD.active:
        return [obj]
    import torch.distributed as dist
    out = [None] * _WORLD.size
    dist.all_gather_object(out, obj)
    return out


def gather_samples(x: torch.Tensor, n_samples: int) -> torch.Tensor:
    """[n_local, ...] per rank -> [n_samples, ...] in global sample order on every rank."""
    if not _WORLD.active:
        return x
    parts = gather_objects(x.cpu())
    out = torch.empty((n_samples, *x.shape[1:]), dtype=x.dtype)
    for r, p in enumerate(parts):
        idx = local_samples(n_samples, World(r, _WORLD.size))
        if idx:
            out[idx] = p
    return out.to(x.device)


def spread(items: list, fn, local=None) -> list:
    """[fn(x) for x in items], item i computed by rank i % world and shared with every rank (results must
    pickle; the quantization of a group's linears or a layer's experts). local(fn, items): how a rank maps
    its own items (default: in turn)."""
    local = local or (lambda f, xs: [f(x) for x in xs])
    if not _WORLD.active:
        return local(fn, items)
    idx = [i for i in range(len(items)) if i % _WORLD.size == _WORLD.rank]
    mine = dict(zip(idx, local(fn, [items[i] for i in idx])))
    merged: dict = {}
    for part in gather_objects(mine):
        merged.update(part)
    return [merged[i] for i in range(len(items))]
