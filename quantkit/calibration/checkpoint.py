"""`--resume`: a calibrated run's finished layers kept on disk, so an interrupted run continues from the last
finished layer instead of starting over.

The state directory (next to the output, `<output>.quantkit-resume`) holds `manifest.json` (what the run was
started with, and the layers finished), `layer-<i>.pt` (the driver's results for layer i and its report
slice) and `inputs-<i>-rank<r>.npy` (the next layer's inputs; under torchrun each rank keeps its own shards). Every file is written to a temporary name and renamed, the
manifest last, so a kill at any moment leaves the previous consistent state. It is removed when the run
succeeds; a run without `--resume` neither reads nor writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInput

MANIFEST = "manifest.json"
MAGIC = "quantkit-resume-1"


def resume_dir(out: Path) -> Path:
    out = Path(os.path.abspath(out))
    return out.parent / f"{out.name}.quantkit-resume"


def source_identity(source) -> list:
    """Name, size and mtime of every file of the source (a file or a checkpoint directory)."""
    p = Path(str(source))
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p] if p.is_file() else []
    return [[str(f.relative_to(p)) if p.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def samples_digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples or []:
        h.update(s.to(torch.int64).cpu().numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def remove_state(out: Path) -> None:
    """Removes the resume state of output `out`, if there is one (and it is ours)."""
    d = resume_dir(out)
    try:
        ours = json.loads((d / MANIFEST).read_text()).get("magic") == MAGIC
    except (OSError, ValueError):
        ours = False
    if ours:
        shutil.rmtree(d, ignore_errors=True)


def resume_key(graph, samples, options: dict) -> dict:
    from .._version import __version__
    from .dist import world
    return {"source": str(graph.source), "files": source_identity(graph.source), "options": options,
            "samples": samples_digest(samples), "version": __version__, "processes": world().size}


class ResumeState:
    """key: everything the results depend on (source identity, options, calibration tokens digest); a state
    written for another key is refused, never mixed in."""

    def __init__(self, path: Path, key: dict):
        self.path, self.key = Path(path), json.loads(json.dumps(key, sort_keys=True, default=str))
        self.done = -1  # last finished layer
        from .dist import barrier, world
        m = self.path / MANIFEST
        existed = self.path.exists()
        barrier()  # every rank looked before rank 0 may create it
        if existed:
            try:
                man = json.loads(m.read_text())
                ok = man.get("magic") == MAGIC
            except (OSError, ValueError):
                ok = False
            if not ok:
                raise BadInput(f"--resume: {self.path} exists and is not a quantkit resume state; move it away")
            if man["key"] != self.key:
                old, new = _flat(man["key"]), _flat(self.key)
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise BadInput(f"--resume: {self.path} was written for other inputs or options ({', '.join(diff)} "
                               "differ); rerun the original command, or remove that directory to start over")
            self.done = int(man["done"])
            if self.done >= 0 and not self._inputs_path(self.done).exists():
                raise BadInput(f"--resume: {self.path} is incomplete ({self._inputs_path(self.done).name} "
                               "missing); remove it to start over")
        else:
            if world().writer:
                self.path.mkdir(parents=True)
                self._manifest()
            barrier()

    def _manifest(self) -> None:
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"magic": MAGIC, "key": self.key, "done": self.done}, indent=1, sort_keys=True))
        os.replace(tmp, self.path / MANIFEST)

    def finished(self):
        """(layer, results, report slice) of every finished layer, in order (what a resumed run replays)."""
        for i in range(self.done + 1):
            yield (i, *self.layer(i))

    def layer(self, i: int) -> tuple[dict, dict]:
        """(results, report slice) of finished layer i."""
        d = torch.load(self.path / f"layer-{i}.pt", weights_only=False)  # our own file (see module doc)
        return d["part"], d["report"]

    def _inputs_path(self, i: int) -> Path:
        from .dist import world
        return self.path / f"inputs-{i}-rank{world().rank}.npy"

    def inputs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """This rank's inputs of layer done + 1 [n_local, T, d] (memory-mapped) in the calibration dtype (the
        key holds it: a state of another dtype was refused)."""
        t = torch.from_numpy(np.load(self._inputs_path(self.done), mmap_mode="r"))
        return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t

    def save(self, i: int, part: dict, report: dict, inputs: torch.Tensor) -> None:
        """Layer i finished: its results and the next layer's inputs (every rank its own), then the manifest
        (rank 0, once every rank's files are in place); older inputs go last."""
        from .dist import barrier, world
        if world().writer:
            tmp = self.path / f"layer-{i}.pt.tmp"
            torch.save({"part": part, "report": report}, tmp)
            os.replace(tmp, self.path / f"layer-{i}.pt")
        dst = self._inputs_path(i)
        tmp = dst.with_name(dst.name[:-4] + ".tmp.npy")
        if isinstance(inputs, torch.Tensor) and inputs.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits
            inputs = inputs.view(torch.int16)
        np.save(tmp, inputs.numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs))
        os.replace(tmp, dst)
        barrier()
        self.done = i
        if world().writer:
            self._manifest()
        barrier()
        if i > 0:
            self._inputs_path(i - 1).unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
