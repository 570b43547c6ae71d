"""Saved base-model log-probs (.qkld), llama-perplexity's --kl-divergence-base idea: score the base once, compare
many quantizations against the file.

Storage: the full log-prob row of every scored token, as llama-perplexity stores it: uint16 steps over
[max - 16, max] (2.4e-4 nats apart; smaller log-probs, below e^-16 of the top token, are clamped), plus the
exact float32 log-prob of the target token (so the base PPL is exact) and the exact argmax.

Layout: b"QKLD", uint32 version, uint32 header length, JSON header, int32 tokens[n_tokens], then per chunk
(n_scored = n_ctx - 1 - n_ctx // 2 rows): float32 top[s], float32 target_lp[s], int32 argmax[s], uint16 q[s, V].
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInput

MAGIC, VERSION, RANGE = b"QKLD", 1, 16.0
STORAGE = "full log-probs, uint16 over [max-16, max] per token + exact target log-prob and argmax"


def is_qkld(x) -> bool:
    if x is None or not isinstance(x, (str, os.PathLike)):
        return False
    p = Path(x)
    if p.suffix == ".qkld":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _n_scored(n_ctx: int) -> int:
    return n_ctx - 1 - n_ctx // 2


class BaseWriter:
    """Appends each chunk's base log-probs; the file appears under its name only after close()."""

    def __init__(self, path: Path, n_vocab: int, tokens: list[int], bos: int | None, n_ctx: int, source: str):
        self.path = Path(path)
        if self.path.exists():
            raise BadInput(f"--save-base {path}: exists (remove it or give another name)")
        if not self.path.parent.is_dir():
            raise BadInput(f"--save-base {path}: folder {self.path.parent} does not exist")
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self.n_vocab, self.n_ctx, self.next = n_vocab, n_ctx, 0
        head = json.dumps({"n_vocab": n_vocab, "n_ctx": n_ctx, "bos": bos, "n_tokens": len(tokens),
                           "source": source, "storage": STORAGE}).encode()
        self.f = open(self.tmp, "wb")
        self.f.write(MAGIC + struct.pack("<II", VERSION, len(head)) + head)
        self.f.write(np.asarray(tokens, dtype=np.int32).tobytes())

    def add(self, chunk, lp: torch.Tensor) -> None:
        if chunk.index != self.next:
            raise BadInput(f"saved base: chunk {chunk.index} out of order (expected {self.next})")
        lp = lp.float().cpu()
        top = lp.max(-1).values
        lo = top - RANGE
        q = ((lp - lo[:, None]).clamp_min(0) * (65535 / RANGE)).round().clamp(0, 65535).to(torch.int32)
        tgt = lp.gather(1, chunk.targets[:, None])[:, 0]
        for a in (top.numpy().astype(np.float32), tgt.numpy().astype(np.float32),
                  lp.argmax(-1).numpy().astype(np.int32), q.numpy().astype(np.uint16)):
            self.f.write(a.tobytes())
        self.next += 1

    def close(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        self.tmp.unlink(missing_ok=True)


class SavedBase:
    """A .qkld file read back: `chunk_logprobs(chunk)` gives the base's rows for that chunk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != MAGIC:
                raise BadInput(f"--base {path}: not a quantkit saved base (.qkld)")
            version, n = struct.unpack("<II", head[4:])
            if version != VERSION:
                raise BadInput(f"--base {path}: .qkld version {version}, this quantkit reads {VERSION}")
            try:
                self.meta = json.loads(f.read(n))
            except ValueError:
                raise BadInput(f"--base {path}: damaged header") from None
        self.n_vocab, self.n_ctx, self.bos = self.meta["n_vocab"], self.meta["n_ctx"], self.meta["bos"]
        self._tok_at = 12 + n
        self._data_at = self._tok_at + 4 * self.meta["n_tokens"]
        s = _n_scored(self.n_ctx)
        self._rec = s * (12 + 2 * self.n_vocab)
        size = self.path.stat().st_size - self._data_at
        if size < 0 or size % self._rec:
            raise BadInput(f"--base {path}: truncated file")
        self.n_chunks = size // self._rec

    @property
    def tokens(self) -> list[int]:
        with open(self.path, "rb") as f:
            f.seek(self._tok_at)
            return np.frombuffer(f.read(4 * self.meta["n_tokens"]), dtype=np.int32).tolist()

    def check_tokens(self, ids: list[int], n_ctx: int, n_chunks: int | None) -> None:
        if n_ctx != self.n_ctx:
            raise BadInput(f"--base {self.path}: saved with --ctx {self.n_ctx}, not {n_ctx}")
        want = len(ids) // n_ctx if not n_chunks else min(n_chunks, len(ids) // n_ctx)
        if want > self.n_chunks:
            raise BadInput(f"--base {self.path}: holds {self.n_chunks} chunks, {want} asked (use --chunks "
                           f"{self.n_chunks})")
        mine, theirs = ids[:want * n_ctx], self.tokens[:want * n_ctx]
        if mine != theirs:
            at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            raise BadInput(f"--base {self.path}: the text tokenizes differently from the saved base (first "
                           f"difference at token {at}); same --text, or --tokenizer base to score on the saved "
                           "tokens")

    def chunk_logprobs(self, chunk) -> torch.Tensor:
        if chunk.index >= self.n_chunks:
            raise BadInput(f"--base {self.path}: holds {self.n_chunks} chunks, chunk {chunk.index} asked")
        s, v = _n_scored(self.n_ctx), self.n_vocab
        with open(self.path, "rb") as f:
            f.seek(self._data_at + chunk.index * self._rec)
            raw = f.read(self._rec)
        top = torch.from_numpy(np.frombuffer(raw, np.float32, s, 0).copy())
        tgt = torch.from_numpy(np.frombuffer(raw, np.float32, s, 4 * s).copy())
        q = torch.from_numpy(np.frombuffer(raw, np.uint16, s * v, 12 * s).astype(np.float32)).reshape(s, v)
        lp = q * (RANGE / 65535) + (top - RANGE)[:, None]
        lp.scatter_(1, chunk.targets[:, None], tgt[:, None])  # the exact value where it matters for PPL
        return lp


def open_base(path) -> SavedBase:
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"--base {p}: no such file")
    return SavedBase(p)
