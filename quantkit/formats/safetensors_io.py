"""safetensors read (mmap, one tensor at a time) and streaming write (header first, then tensor by tensor)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..errors import BadInput

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


def read_at(path: Path, offset: int, nbytes: int) -> bytearray:
    """Read one tensor's bytes with a positioned read. Unlike an mmap, nothing stays mapped (and counted
    as resident) after the tensor is released, so peak memory follows the largest tensor, not the file."""
    buf = bytearray(nbytes)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        view, got = memoryview(buf), 0
        while got < nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise BadInput(f"{path}: truncated: expected {nbytes} bytes at offset {offset}")
            got += n
    return buf


@dataclass
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _entry(info, where: str) -> _Entry:
    """One header entry, checked: dtype a string, shape small non-negative integers, offsets ordered and
    exactly as long as the shape needs."""
    if not isinstance(info, dict):
        raise BadInput(f"{where}: header entry is not an object")
    dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dt, str):
        raise BadInput(f"{where}: dtype {dt!r} is not a string")
    if not isinstance(shape, list) or len(shape) > 8 or \
            not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape):
        raise BadInput(f"{where}: shape {str(shape)[:60]} is not a list of up to 8 non-negative integers")
    if not isinstance(offs, list) or len(offs) != 2 or \
            not all(isinstance(o, int) and not isinstance(o, bool) for o in offs) or not 0 <= offs[0] <= offs[1]:
        raise BadInput(f"{where}: data_offsets {str(offs)[:60]} are not two ordered non-negative integers")
    if dt in ST_DTYPES:
        need = math.prod(shape) * torch.empty((), dtype=ST_DTYPES[dt]).element_size()
        if offs[1] - offs[0] != need:
            raise BadInput(f"{where}: {offs[1] - offs[0]} bytes of data, {dt} {tuple(shape)} needs {need}")
    return _Entry(dt, tuple(shape), offs[0], offs[1])


class SafetensorsFile:
    """One .safetensors file opened by mmap; `tensor(name)` copies just that tensor out."""

    def __init__(self, path: str | Path):
        from ..checks import parse_json
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise BadInput(f"{self.path}: not a safetensors file (too short: {size} bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100 * 2**20:
                    raise BadInput(f"{self.path}: corrupt safetensors header (header length {n}, file size {size})")
                raw = f.read(n)
        except OSError as e:
            raise BadInput(f"{self.path}: cannot read safetensors header ({e.__class__.__name__}: {e})") from None
        header = parse_json(raw, f"{self.path}: safetensors header")
        if not isinstance(header, dict):
            raise BadInput(f"{self.path}: safetensors header is a JSON {type(header).__name__}, expected an object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise BadInput(f"{self.path}: safetensors __metadata__ is not an object")
        self.metadata = meta
        self.base = 8 + n
        self.entries: dict[str, _Entry] = {}
        for name, info in header.items():
            self.entries[name] = _entry(info, f"{self.path}: tensor '{name}'")
        data = size - self.base
        prev = None
        for name, e in sorted(self.entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
            if e.end > data:
                raise BadInput(f"{self.path}: truncated: tensor '{name}' ends at byte {self.base + e.end}, "
                               f"file has {size}")
            if prev is not None and e.start < prev[1].end and e.end > e.start:
                raise BadInput(f"{self.path}: tensors '{prev[0]}' and '{name}' overlap (data offsets "
                               f"{list((prev[1].start, prev[1].end))} and {list((e.start, e.end))})")
            if e.end > e.start:
                prev = (name, e)


    def keys(self):
        return self.entries.keys()

    def tensor(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        if e.dtype not in ST_DTYPES:
            raise BadInput(f"{self.path}: tensor '{name}' has unsupported dtype {e.dtype}")
        dt = ST_DTYPES[e.dtype]
        nbytes = e.end - e.start
        if nbytes == 0:
            return torch.empty(e.shape, dtype=dt)
        t = torch.frombuffer(read_at(self.path, self.base + e.start, nbytes), dtype=dt)
        expect = int(np.prod(e.shape)) if e.shape else 1
        if t.numel() != expect:
            raise BadInput(f"{self.path}: tensor '{name}' holds {t.numel()} elements, shape {e.shape} needs {expect}")
        return t.reshape(e.shape)


def open_checkpoint(model_dir: Path) -> dict[str, tuple[SafetensorsFile, str]]:
    """All tensors of an HF checkpoint dir (single file or sharded with model.safetensors.index.json)."""
    from ..checks import inside, read_json
    index = model_dir / "model.safetensors.index.json"
    files: list[Path]
    if index.exists():
        wm = read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise BadInput(f"{index}: 'weight_map' must be an object of tensor name -> shard file name")
        names = sorted(set(wm.values()))
        for n in names:
            if not inside(model_dir, n, str(index)).is_file():
                raise BadInput(f"{model_dir / n}: shard listed in {index.name} is missing")
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise BadInput(f"{model_dir}: no *.safetensors files (and no model.safetensors.index.json)")
    out: dict[str, tuple[SafetensorsFile, str]] = {}
    for f in files:
        sf = SafetensorsFile(f)
        for k in sf.keys():
            out[k] = (sf, k)
    if index.exists():
        for k, shard in wm.items():
            if k not in out:
                raise BadInput(f"{model_dir / shard}: tensor '{k}' listed in the index is not in that shard")
    return out


@dataclass
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape)) if self.shape else 1
        return n * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(path: Path, tensors: list[PlannedTensor], metadata: dict | None = None,
                      progress: Callable[[str], None] | None = None) -> None:
    """Write one file: header from the plan, then each tensor produced and written in turn."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    off = 0
    for t in tensors:
        header[t.name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for t in tensors:
            x = t.produce()
            if x.dtype != t.dtype or tuple(x.shape) != tuple(t.shape):
                raise BadInput(f"tensor '{t.name}': produced {x.dtype} {tuple(x.shape)}, planned {t.dtype} {t.shape}")
            x = x.detach().contiguous().cpu()
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                from ..checks import check_weight
                check_weight(t.name, x)  # names the first non-finite value
            # flat first: a "contiguous" [n, 1] may keep stride(-1) != 1 (a single packed group), which view refuses
            f.write(x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"")
            if progress:
                progress(t.name)


def write_sharded(out_dir: Path, tensors: Iterable[PlannedTensor], max_shard_bytes: int = 5 * 2**30,
                  metadata: dict | None = None, progress: Callable[[str], None] | None = None) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    total = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
        total += t.nbytes
    from ..atomic import ensure_free_space
    ensure_free_space(Path(out_dir), total)
    if len(shards) == 1:
        write_safetensors(out_dir / "model.safetensors", shards[0], metadata, progress)
        return ["model.safetensors"]
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    wm = {}
    for fname, shard in zip(names, shards):
        write_safetensors(out_dir / fname, shard, metadata, progress)
        wm.update({t.name: fname for t in shard})
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
    return names
