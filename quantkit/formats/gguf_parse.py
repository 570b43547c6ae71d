"""GGUF header parser: metadata (as plain Python values + their GGUF value types) and tensor infos.

Our own parser rather than gguf.GGUFReader: that reader builds a numpy view per array element (about 2.5 s
for a 49k-token vocabulary, longer than llama.cpp needs to quantize the whole 135M model); this one reads each
array with one numpy call (numbers) or one tight loop (strings). Tensor data is not touched here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from ..errors import BadInput

_SCALAR = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
           VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}
_NUMPY = {VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4", VT.INT32: "<i4",
          VT.FLOAT32: "<f4", VT.BOOL: "?", VT.UINT64: "<u8", VT.INT64: "<i8", VT.FLOAT64: "<f8"}
_DEFAULT_ALIGNMENT = 32


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne0 (the contiguous dimension) first
    tensor_type: QT
    data_offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class GGUFFile:
    path: Path
    version: int
    fields: dict[str, object]  # key -> value (str, int, float, bool, or list of those)
    types: dict[str, list[VT]]  # key -> [type] or [ARRAY, element type]
    tensors: list[TensorInfo]
    alignment: int


class _NeedMore(Exception):
    """The header runs past the bytes read so far (the file has more)."""


class _Cursor:
    def __init__(self, buf: bytes, path: Path, complete: bool):
        self.buf, self.off, self.path, self.complete = buf, 0, path, complete

    def _need(self, n: int, what: str) -> None:
        if self.off + n > len(self.buf):
            if not self.complete:
                raise _NeedMore
            raise BadInput(f"{self.path}: truncated GGUF header (reading {what} at byte {self.off})")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self._need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.off)[0]
        self.off += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self._need(n, what)
        b = self.buf[self.off:self.off + n]
        self.off += n
        try:
            return bytes(b).decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput(f"{self.path}: {what} is not valid UTF-8") from None

    def value(self, vt: int, key: str):
        try:
            vt = VT(vt)
        except ValueError:
            raise BadInput(f"{self.path}: metadata '{key}' has unknown value type {vt}") from None
        if vt == VT.STRING:
            return self.string(f"metadata '{key}'"), [vt]
        if vt != VT.ARRAY:
            v = self.scalar(_SCALAR[vt], f"metadata '{key}'")
            return v, [vt]
        et = self.scalar("<I", f"metadata '{key}'")
        count = self.scalar("<Q", f"metadata '{key}'")
        try:
            et = VT(et)
        except ValueError:
            raise BadInput(f"{self.path}: metadata '{key}' is an array of unknown type {et}") from None
        if et in _NUMPY:
            size = np.dtype(_NUMPY[et]).itemsize * count
            self._need(size, f"metadata '{key}'")
            a = np.frombuffer(self.buf, dtype=_NUMPY[et], count=count, offset=self.off)
            self.off += size
            return a.tolist(), [VT.ARRAY, et]
        if et == VT.STRING:
            return self._strings(count, key), [VT.ARRAY, et]
        items, sub = [], [et]
        for _ in range(count):  # nested arrays (rare): element by element
            v, sub = self.value(et, key)
            items.append(v)
        return items, [VT.ARRAY, *sub]

    def _strings(self, count: int, key: str) -> list[str]:
        buf, off, end, out = self.buf, self.off, len(self.buf), []
        unpack = struct.Struct("<Q").unpack_from
        append = out.append
        try:
            for _ in range(count):
                n = unpack(buf, off)[0]
                off += 8
                if off + n > end:
                    raise struct.error
                append(str(buf[off:off + n], "utf-8"))
                off += n
        except struct.error:
            if not self.complete:
                raise _NeedMore from None
            raise BadInput(f"{self.path}: truncated GGUF header (metadata '{key}')") from None
        except UnicodeDecodeError:
            raise BadInput(f"{self.path}: metadata '{key}' holds a string that is not valid UTF-8") from None
        self.off = off
        return out


def parse_gguf(path: Path) -> GGUFFile:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 24 or f.read(4) != b"GGUF":
            raise BadInput(f"{path}: not a GGUF file (bad magic; expected 'GGUF')")
        f.seek(0)
        n = 1 << 24  # headers are small next to the tensors: read more only when one runs past this
        while True:
            buf = f.read(n)
            try:
                return _parse(buf, path, size, complete=len(buf) >= size)
            except _NeedMore:
                f.seek(0)
                n *= 4


def _parse(buf: bytes, path: Path, size: int, complete: bool) -> GGUFFile:
    c = _Cursor(buf, path, complete)
    c.off = 4
    version = c.scalar("<I", "version")
    if version not in (2, 3):
        if version & 0xFFFF == 0 and version >> 16:
            raise BadInput(f"{path}: big-endian GGUF is not supported")
        raise BadInput(f"{path}: GGUF version {version} is not supported (expected 2 or 3)")
    n_tensors = c.scalar("<Q", "tensor count")
    n_kv = c.scalar("<Q", "metadata count")
    if n_tensors > size or n_kv > size:
        raise BadInput(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} metadata entries)")
    fields, types = {}, {}
    for _ in range(n_kv):
        key = c.string("metadata key")
        vt = c.scalar("<I", f"metadata '{key}'")
        fields[key], types[key] = c.value(vt, key)
    infos = []
    for _ in range(n_tensors):
        name = c.string("tensor name")
        nd = c.scalar("<I", f"tensor '{name}'")
        if nd > 8:
            raise BadInput(f"{path}: tensor '{name}' has {nd} dimensions (corrupt header)")
        shape = tuple(c.scalar("<Q", f"tensor '{name}'") for _ in range(nd))
        tt = c.scalar("<I", f"tensor '{name}'")
        off = c.scalar("<Q", f"tensor '{name}'")
        infos.append((name, shape, tt, off))
    header_end = c.off
    alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise BadInput(f"{path}: general.alignment = {alignment!r}, expected a power of two")
    data_start = -(-header_end // alignment) * alignment
    tensors = []
    for name, shape, tt, off in infos:
        try:
            qt = QT(tt)
            block, tsize = GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise BadInput(f"{path}: tensor '{name}' has unknown ggml type {tt}") from None
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if shape and shape[0] % block:
            raise BadInput(f"{path}: tensor '{name}': row of {shape[0]} is not a multiple of {qt.name}'s "
                           f"block of {block}")
        nbytes = n // block * tsize
        start = data_start + off
        if start + nbytes > size:
            raise BadInput(f"{path}: truncated: tensor '{name}' ends at byte {start + nbytes}, file has {size}")
        tensors.append(TensorInfo(name, shape, qt, start, nbytes))
    return GGUFFile(path, version, fields, types, tensors, alignment)
