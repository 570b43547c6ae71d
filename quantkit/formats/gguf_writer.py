"""Streaming GGUF v3 writer: header + metadata + tensor infos first, then each tensor produced and written in turn."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from ..errors import BadInput

_SCALAR = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
           VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}
_NP = {VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4", VT.INT32: "<i4",
       VT.FLOAT32: "<f4", VT.BOOL: "?", VT.UINT64: "<u8", VT.INT64: "<i8", VT.FLOAT64: "<f8"}


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _infer_elem(values: list) -> VT:
    if all(isinstance(v, str) for v in values):
        return VT.STRING
    if all(isinstance(v, bool) for v in values):
        return VT.BOOL
    if all(isinstance(v, (int, np.integer)) for v in values):
        return VT.INT32
    return VT.FLOAT32


def encode_value(value, vtype) -> bytes:
    """vtype: a GGUFValueType, or [ARRAY, element type] as the gguf reader reports it."""
    elem = None
    if isinstance(vtype, (list, tuple)):
        vtype, elem = VT(vtype[0]), (VT(vtype[1]) if len(vtype) > 1 else None)
    vtype = VT(vtype)
    out = struct.pack("<I", vtype)
    if vtype == VT.STRING:
        return out + _str(str(value))
    if vtype == VT.ARRAY:
        values = list(value)
        elem = elem or _infer_elem(values)
        out += struct.pack("<IQ", elem, len(values))
        if elem == VT.STRING:
            return out + b"".join(_str(v) for v in values)
        return out + np.asarray(values, dtype=_NP[elem]).tobytes()
    return out + struct.pack(_SCALAR[vtype], value)


def tensor_nbytes(qtype: QT, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    ne0 = shape[-1]
    if ne0 % block:
        raise BadInput(f"type {qtype.name} needs rows that are a multiple of {block}, got {ne0}")
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * (ne0 // block) * size


@dataclass
class GGUFTensor:
    name: str
    qtype: QT
    shape: tuple[int, ...]  # torch order: [..., rows, ne0]
    produce: Callable[[], object]  # -> torch/numpy array with the exact bytes (uint8) or float data of qtype

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.qtype, self.shape)


def _as_bytes(x, t: GGUFTensor, whole: bool = True):
    """The produced tensor's bytes, without another copy of it (an iterator of parts passes through)."""
    if hasattr(x, "__next__"):
        return x
    if isinstance(x, torch.Tensor):
        x = x.detach().contiguous().cpu()
        if x.dtype == torch.bfloat16:
            x = x.view(torch.int16)
        x = x.numpy()
    b = memoryview(np.ascontiguousarray(x)).cast("B")
    if whole and b.nbytes != t.nbytes:
        raise BadInput(f"tensor '{t.name}': produced {b.nbytes} bytes, {t.qtype.name} {t.shape} needs {t.nbytes}")
    return b


def write_gguf(path: Path, kv: list[tuple[str, object, object]], tensors: list[GGUFTensor], alignment: int = 32,
               progress: Callable[[str], None] | None = None) -> None:
    keys = [k for k, _, _ in kv]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise BadInput(f"duplicate GGUF metadata keys: {', '.join(dup)}")
    head = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)))
    for k, v, vt in kv:
        head += _str(k) + encode_value(v, vt)
    offset = 0
    for t in tensors:
        ne = list(reversed(t.shape))
        head += _str(t.name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        head += struct.pack("<IQ", int(t.qtype), offset)
        offset += t.nbytes + (-t.nbytes % alignment)
    head += b"\0" * (-len(head) % alignment)
    from ..atomic import ensure_free_space
    ensure_free_space(Path(path).parent, len(head) + offset)
    with open(path, "wb") as f:
        f.write(head)
        for t, b in _produced(tensors):
            n = _write_data(f, b, t)
            f.write(b"\0" * (-n % alignment))
            del b
            if progress:
                progress(t.name)


def _write_data(f, data, t: GGUFTensor) -> int:
    """Writes a produced tensor: bytes, or an iterator of parts (stacked experts encoded one at a time)."""
    if isinstance(data, memoryview):
        f.write(data)
        return data.nbytes
    n = 0
    for x in data:
        b = _as_bytes(x, t, whole=False)
        f.write(b)
        n += b.nbytes
        del b, x
    if n != t.nbytes:
        raise BadInput(f"tensor '{t.name}': produced {n} bytes, {t.qtype.name} {t.shape} needs {t.nbytes}")
    return n


PREFETCH_MAX_BYTES = 16 << 20  # only tensors this small (as written) are produced ahead: memory stays bounded


def _produced(tensors: list[GGUFTensor]):
    """(tensor, bytes) in order. With more than one torch thread a small next tensor is produced (read,
    quantized) alongside this one, so the many small tensors overlap; large ones use the quantizer's own
    chunk threads. At most two tensors are in flight."""
    import torch
    if torch.get_num_threads() <= 1 or len(tensors) < 2:
        for t in tensors:
            yield t, _as_bytes(t.produce(), t)
        return
    from concurrent.futures import ThreadPoolExecutor
    futs: dict = {}
    with ThreadPoolExecutor(2, thread_name_prefix="quantkit-produce") as ex:
        try:
            for i, t in enumerate(tensors):
                if i not in futs:
                    futs[i] = ex.submit(t.produce)
                if i + 1 < len(tensors) and tensors[i + 1].nbytes <= PREFETCH_MAX_BYTES:
                    futs[i + 1] = ex.submit(tensors[i + 1].produce)
                data = futs.pop(i).result()
                yield t, _as_bytes(data, t)
                del data
        finally:
            for f in futs.values():
                f.cancel()
