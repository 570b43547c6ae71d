"""GGUF input: metadata + lazily dequantized tensors (each tensor is read with a positioned read when asked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants as gquants

from ..checks import check_gguf_kv, check_hparams
from ..errors import BadInput
from ..graph import ATTN_K, ATTN_Q, Graph, LazyTensor, RopeScaling, Tokenizer, parse_name
from .gguf_arch import unpermute_qk
from .gguf_parse import GGUFFile, parse_gguf
from .safetensors_io import read_at

FLOAT_TYPES = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def open_gguf(path: Path) -> GGUFFile:
    return parse_gguf(Path(path))


def read_kv(r: GGUFFile) -> dict:
    return dict(r.fields)


def kv_types(r: GGUFFile) -> dict:
    """key -> the GGUF value types (so metadata can be copied through unchanged)."""
    return dict(r.types)


def tensor_bytes(t, path: Path | str) -> np.ndarray:
    """The tensor's stored bytes (uint8), read with a positioned read rather than through the mmap so that
    peak memory follows the largest tensor."""
    return np.frombuffer(read_at(Path(path), int(t.data_offset), int(t.n_bytes)), dtype=np.uint8)


def tensor_to_torch(t, path: Path | str = "") -> torch.Tensor:
    """A GGUF tensor as float (dequantized if block-quantized), in torch (row-major, [.., rows, ne0]) order."""
    shape = tuple(int(x) for x in reversed(t.shape))
    qt = QT(int(t.tensor_type))
    raw = tensor_bytes(t, path)
    if qt in FLOAT_TYPES:
        return torch.frombuffer(raw, dtype=FLOAT_TYPES[qt]).reshape(shape)
    try:
        a = gquants.dequantize(raw.reshape(-1, raw.size // max(1, int(np.prod(shape[:-1])))), qt)
    except NotImplementedError:
        raise BadInput(f"{path}: tensor '{t.name}' has type {qt.name}, which cannot be dequantized") from None
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).reshape(shape)


def _packed(t, qt: QT, perm, shape, path):
    """The stored blocks as a kernel weight (quantkit.kernels), rows in canonical order."""
    from ..kernels import PackedWeight
    data = torch.from_numpy(tensor_bytes(t, path).copy()).reshape(int(np.prod(shape[:-1])), -1)
    if perm is not None:
        data = data[perm]
    data = data.reshape(*shape[:-1], -1)
    return PackedWeight.ggml(data, qt, shape[-1])


def load_gguf(path: Path, drop_mtp: bool = False) -> Graph:
    from ..families.registry import gguf_family, validate
    r = open_gguf(path)
    kv = read_kv(r)
    check_gguf_kv(kv, path)
    fam = gguf_family(kv.get("general.architecture"), str(path))
    names = {fam.canonical_tensor_name(t.name) for t in r.tensors}
    hp = fam.hparams_from_gguf(kv, str(path), names)
    if drop_mtp:
        hp.extra["drop_mtp"] = True
    check_hparams(hp, path, names)
    for t in r.tensors:
        if t.name == "rope_freqs.weight":  # llama3-style scaling as llama.cpp stores it
            hp.rope_scaling = RopeScaling("freq_factors", freq_factors=tensor_to_torch(t, path).tolist())
    tensors: dict[str, LazyTensor] = {}
    for t in r.tensors:
        if t.name == "rope_freqs.weight":
            continue  # derived from the rope scaling hyperparameters
        shape = tuple(int(x) for x in reversed(t.shape))
        qt = QT(int(t.tensor_type))
        layer, suffix, kind = parse_name(t.name)

        def load(t=t):
            return tensor_to_torch(t, path)

        lt = LazyTensor(shape, qt.name if qt in FLOAT_TYPES else "F32", load,
                        qtype=None if qt in FLOAT_TYPES else qt.name, source=f"{path}:{t.name}",
                        raw=lambda t=t: (QT(int(t.tensor_type)), tensor_bytes(t, path)), nbytes=int(t.n_bytes))
        perm = None
        if fam.gguf_permute_qk and suffix in (ATTN_Q, ATTN_K):
            heads = hp.n_heads if suffix == ATTN_Q else hp.n_kv_heads
            perm = unpermute_qk(torch.arange(shape[0]), heads)  # rows are independent blocks: permute bytes
            lt = lt.map(lambda w, h=heads: unpermute_qk(w, h))  # (raw bytes no longer match: map drops them)
        untf = fam.gguf_untransform(fam.canonical_tensor_name(t.name))
        if untf is not None:
            lt = lt.map(untf)  # (no packed form either: the stored values are not the canonical ones)
        elif qt not in FLOAT_TYPES and len(shape) in (2, 3):
            lt.packed = lambda t=t, qt=qt, perm=perm, shape=shape: _packed(t, qt, perm, shape, path)
        tensors[fam.canonical_tensor_name(t.name)] = lt
    _drop_unit_dims(tensors, hp)
    tensors = fam.from_gguf_tensors(hp, tensors, str(path))
    tok = {k: v for k, v in kv.items() if k.startswith("tokenizer.")}
    ftype = kv.get("general.file_type")
    g = Graph(hp, tensors, Tokenizer(gguf_kv=tok), source=str(path), source_format="gguf",
              quantization={"gguf_file_type": ftype} if ftype is not None else None,
              metadata={"gguf_kv": kv, "gguf_kv_types": kv_types(r)})
    validate(g)
    return g


def _drop_unit_dims(tensors: dict[str, LazyTensor], hp) -> None:
    """Tensors stored with extra size-1 dims take the canonical shape (llama.cpp's converter keeps HF's [1, d]
    Qwen2-MoE shared-expert gate as ne {d, 1}; llama.cpp loads it as {d})."""
    from ..families.registry import expected_shapes
    for name, shape in expected_shapes(hp).items():
        lt = tensors.get(name)
        if lt is not None and lt.shape != shape and [d for d in lt.shape if d != 1] == [d for d in shape if d != 1]:
            tensors[name] = lt.map(lambda w, s=shape: w.reshape(s), shape)
