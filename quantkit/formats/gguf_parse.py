"""GGUF header parser: metadata (as plain Python values + their GGUF value types) and tensor infos.

Our own parser rather than gguf.GGUFReader: that reader builds a numpy view per array element (about 2.5 s
for a 49k-token vocabulary, longer than llama.cpp needs to quantize the whole 135M model); this one reads each
array with one numpy call (numbers) or one tight loop (strings). Tensor data is not touched here.
"""

from __future__ import annotations

import math
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
MAX_HEADER_BYTES = 256 << 20  # metadata beyond this is not a model header (vocabularies take a few MiB)
MAX_NESTING = 4  # arrays of arrays of ... (llama.cpp itself reads none nested)


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne0 (the contiguous dimension) first
    tensor_type: QT
    data_offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


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
    def __init__(self, buf: bytes, path: Path, complete: bool, size: int):
        self.buf, self.off, self.path, self.complete, self.size = buf, 0, path, complete, size

    def _fits(self, n: int, what: str) -> None:
        """Lengths and counts are checked against the file before more of it is read."""
        if self.off + n > self.size or self.off + n > MAX_HEADER_BYTES:
            raise BadInput(f"{self.path}: truncated or corrupt GGUF header: {what} at byte {self.off} needs {n} bytes, "
                           f"past the end of the {self.size}-byte file" if self.off + n > self.size else
                           f"{self.path}: GGUF header larger than {MAX_HEADER_BYTES} bytes ({what})")

    def _need(self, n: int, what: str) -> None:
        self._fits(n, what)
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

    def value(self, vt: int, key: str, depth: int = 0):
        if depth > MAX_NESTING:
            raise BadInput(f"{self.path}: metadata '{key}' nests arrays more than {MAX_NESTING} deep")
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
        self._fits(count * (np.dtype(_NUMPY[et]).itemsize if et in _NUMPY else 8 if et == VT.STRING else 12),
                   f"metadata '{key}' (array of {count})")
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
            v, sub = self.value(et, key, depth + 1)
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
                    self.off = off
                    self._fits(n, f"metadata '{key}' string")
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
        while True:  # (every length is checked against the file first, so this stops at the real header)
            buf = f.read(n)
            try:
                return _parse(buf, path, size, complete=len(buf) >= size)
            except _NeedMore:
                f.seek(0)
                n *= 4
            except RecursionError:
                raise BadInput(f"{path}: corrupt GGUF header (nesting too deep)") from None


def _parse(buf: bytes, path: Path, size: int, complete: bool) -> GGUFFile:
    c = _Cursor(buf, path, complete, size)
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
        if key in fields:
            raise BadInput(f"{path}: metadata key '{key}' appears twice")
        vt = c.scalar("<I", f"metadata '{key}'")
        fields[key], types[key] = c.value(vt, key)
    c._fits(n_tensors * 24, f"{n_tensors} tensor infos")
    infos = []
    seen = set()
    for _ in range(n_tensors):
        name = c.string("tensor name")
        if name in seen:
            raise BadInput(f"{path}: tensor '{name}' appears twice")
        seen.add(name)
        nd = c.scalar("<I", f"tensor '{name}'")
        if nd > 8:
            raise BadInput(f"{path}: tensor '{name}' has {nd} dimensions (corrupt header)")
        shape = tuple(c.scalar("<Q", f"tensor '{name}'") for _ in range(nd))
        tt = c.scalar("<I", f"tensor '{name}'")
        off = c.scalar("<Q", f"tensor '{name}'")
        infos.append((name, shape, tt, off))
    header_end = c.off
    alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or \
            alignment & (alignment - 1):
        raise BadInput(f"{path}: general.alignment = {alignment!r}, expected a power of two")
    data_start = -(-header_end // alignment) * alignment
    tensors = []
    for name, shape, tt, off in infos:
        try:
            qt = QT(tt)
            block, tsize = GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise BadInput(f"{path}: tensor '{name}' has unknown ggml type {tt}") from None
        n = math.prod(shape)  # Python ints: a [2^32, 2^32] shape must not wrap around
        if shape and shape[0] % block:
            raise BadInput(f"{path}: tensor '{name}': row of {shape[0]} is not a multiple of {qt.name}'s "
                           f"block of {block}")
        nbytes = n // block * tsize
        start = data_start + off
        if off % alignment:
            raise BadInput(f"{path}: tensor '{name}' at data offset {off}, not a multiple of the alignment "
                           f"{alignment}")
        if start + nbytes > size:
            raise BadInput(f"{path}: truncated: tensor '{name}' ends at byte {start + nbytes}, file has {size}")
        tensors.append(TensorInfo(name, shape, qt, start, nbytes))
    prev = None
    for t in sorted(tensors, key=lambda t: (t.data_offset, t.n_bytes)):
        if prev is not None and t.data_offset < prev.data_offset + prev.n_bytes and t.n_bytes:
            raise BadInput(f"{path}: tensors '{prev.name}' and '{t.name}' overlap in the data section "
                           f"(bytes {t.data_offset}..{prev.data_offset + prev.n_bytes})")
        if t.n_bytes:
            prev = t
    return GGUFFile(path, version, fields, types, tensors, alignment)
