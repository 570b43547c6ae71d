"""Importance matrix: llama-imatrix's statistics computed with our executor, and its two file formats.

What llama.cpp's tools/imatrix collects (via the ggml scheduler's eval callback): for every matrix multiply
whose weight is a `blk.*` tensor (attn_q/k/v/output, ffn_gate/up/down, the MoE router ffn_gate_inp, and the
stacked experts through MUL_MAT_ID; `output.weight` only with --process-output), the per-input-column sum
of squared activations over every token of every chunk (all n_ctx positions, not only the second half that
perplexity scores), and a token count. Experts keep one count per expert (tokens routed to it). The text is
tokenized once (BOS first when the vocab adds one) and cut into consecutive n_ctx chunks; each chunk's first
token becomes BOS when the vocab adds one; at least 2*n_ctx tokens are required.

Files: GGUF (general.type=imatrix; `<name>.in_sum2` F32 [n_mat, ne0] and `<name>.counts` F32 [n_mat, 1]) and
the legacy `.dat` (per entry ncall = ceil(max count / chunk_size) and values (sum/count)*ncall, then
the chunk count and dataset name). `read_imatrix` returns what llama-quantize hands its quantizers: per
column sum/count (1.0 for experts that saw no token; legacy: value/ncall).

Values are per INPUT column (ne0), so the GGUF q/k row permutation of llama-arch models does not touch them.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import BadInput, QuantkitError
from ..graph import (FFN_DOWN_EXPS, FFN_GATE_EXPS, FFN_ROUTER, FFN_UP_EXPS, OUTPUT, Graph,
                     parse_name)
from .stream import Tape

log = logging.getLogger("quantkit")

KV_DATASETS, KV_CHUNK_COUNT, KV_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
EXPERT_SUFFIXES = (FFN_GATE_EXPS, FFN_UP_EXPS, FFN_DOWN_EXPS)


@dataclass
class IMatrix:
    """Raw statistics: sums [n_mat, ne0] (float64) and counts [n_mat] (int64) per canonical weight name."""
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    chunk_count: int = 0
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)
    # side effects of forwards run side by side (calibration.stream.Tape): additions are replayed in sample
    # order; under torchrun they wait (with the sample's global index) to be applied in global order
    tape: Tape = field(default_factory=Tape, repr=False, compare=False)
    _pending: list | None = field(default=None, repr=False, compare=False)
    _local: threading.local = field(default_factory=threading.local, repr=False, compare=False)
    stats_s: float = field(default=0.0, repr=False, compare=False)  # seconds in add() (all threads' sum)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, x: torch.Tensor, mat: int = 0, n_mat: int = 1) -> None:
        """Accumulate x [..., ne0]: sum of squares per column into matrix `mat`, count += tokens. The sums are
        computed on the calling thread (a forward's), and added in sample order (`tape`)."""
        t = time.perf_counter()
        try:
            src = x
            x = x.reshape(-1, x.shape[-1])
            # one chunk's tokens summed in f32 (as llama.cpp does), chunks accumulated in f64; projections
            # that read one input (q/k/v, gate/up) get the same tensor: summed once (per thread)
            last = getattr(self._local, "last", None)
            if last is not None and last[0] is src:
                s = last[1]
            else:
                s = x.float().square().sum(0).cpu().double()
                self._local.last = (src, s)
        finally:
            with self._lock:
                self.stats_s += time.perf_counter() - t
        self.tape.put(self._take, name, mat, n_mat, s, x.shape[0])

    def _take(self, name: str, mat: int, n_mat: int, s: torch.Tensor, count: int) -> None:
        if self._pending is not None:
            self._pending.append((self.tape.sample, name, mat, n_mat, s, count))
        else:
            self._apply(name, mat, n_mat, s, count)

    def _apply(self, name: str, mat: int, n_mat: int, s: torch.Tensor, count: int) -> None:
        if name not in self.sums:
            self.sums[name] = torch.zeros(n_mat, s.shape[0], dtype=torch.float64)
            self.counts[name] = torch.zeros(n_mat, dtype=torch.int64)
        self.sums[name][mat] += s
        self.counts[name][mat] += count

    def flush(self) -> None:
        """Applies every rank's pending additions in global sample order (calibration.dist)."""
        if self._pending is None:
            return
        from .dist import gather_objects
        merged = sorted((e for part in gather_objects(self._pending) for e in part), key=lambda e: e[0])
        for _, name, mat, n_mat, s, count in merged:  # sorted() is stable: a sample's own order is kept
            self._apply(name, mat, n_mat, s, count)
        self._pending = []

    def means(self) -> dict[str, torch.Tensor]:
        """llama-quantize's quant_weights: sum/count per column ([ne0], or [E, ne0] for experts); 1.0 for an
        expert that received no token."""
        out = {}
        for name, s in self.sums.items():
            c = self.counts[name].double()[:, None]
            m = torch.where(c > 0, s / c.clamp(min=1), torch.ones_like(s)).float()
            out[name] = m if _is_expert(name) or m.shape[0] > 1 else m[0]
        return out


def _is_expert(name: str) -> bool:
    return parse_name(name)[1] in EXPERT_SUFFIXES


# ---------------------------------------------------------------- chunking (llama-imatrix's protocol)

def chunk_tokens(ids: list[int], n_ctx: int, n_chunks: int | None = None, bos: int | None = None,
                 source: str = "text") -> list[torch.Tensor]:
    """Consecutive n_ctx chunks of the token stream, first token replaced by `bos` when given."""
    if n_ctx <= 0:
        raise BadInput(f"--ctx {n_ctx}: must be positive")
    if n_chunks is not None and n_chunks <= 0:
        raise BadInput(f"--chunks {n_chunks}: must be positive")
    if len(ids) < 2 * n_ctx:
        raise BadInput(f"{source}: {len(ids)} tokens, but a context of {n_ctx} needs at least {2 * n_ctx} "
                       f"(llama-imatrix's minimum); give more text or a smaller --ctx")
    n = len(ids) // n_ctx
    if n_chunks is not None:
        n = min(n, n_chunks)
    t = torch.tensor(ids[:n * n_ctx], dtype=torch.long).view(n, n_ctx).clone()
    if bos is not None:
        t[:, 0] = bos
    return list(t)


# ---------------------------------------------------------------- collection

class _ExpertTap(TorchFunctionMode):
    """Sees every matmul in a MoE block; one whose weight operand is a slice of a stacked-expert tensor
    (gate/up/down_exps[e]) adds its activation operand to that expert's statistics, as MUL_MAT_ID does."""

    _MM = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.nn.functional.linear, torch.mm}

    def __init__(self, im: IMatrix, experts: dict[str, torch.Tensor]):
        super().__init__()
        self.im = im
        self.experts = []
        for name, w in experts.items():
            es = w.stride(0) * w.element_size()
            self.experts.append((name, w.data_ptr(), es, w.shape[0], w.shape[2]))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._MM and len(args) >= 2 and isinstance(args[1], torch.Tensor) \
                and isinstance(args[0], torch.Tensor):
            x, w = args[0], args[1]
            ptr = w.data_ptr()
            for name, base, es, n_exp, ne0 in self.experts:
                if base <= ptr < base + es * n_exp:
                    if w.dim() != 2 or x.shape[-1] != ne0:
                        raise QuantkitError(f"imatrix: {name}: expert matmul of shape {tuple(w.shape)} is not "
                                            f"one expert's [in={ne0}] slice; cannot attribute tokens")
                    self.im.add(name, x, mat=(ptr - base) // es, n_mat=n_exp)
                    break
        return func(*args, **kwargs)


def _hook(im: IMatrix, name: str):
    def fn(mod, args, res):
        im.add(name, args[0].detach())
    return fn


class _Collecting(nn.Module):
    """The layer, run with statistics collection (forward hooks + the expert tap)."""

    def __init__(self, layer: nn.Module, layer_idx: int, im: IMatrix, head_norm: nn.Module | None = None,
                 route_all: bool = False):
        super().__init__()
        self.layer, self.im, self.head_norm = layer, im, head_norm
        self.tape = im.tape  # run_layer replays the additions of its side-by-side forwards in sample order
        p = f"blk.{layer_idx}."
        mods = {f"{p}{s}.weight": m for s, m in layer.linears().items()}
        mlp = getattr(layer, "mlp", None)
        self.experts = {}
        if mlp is not None and hasattr(mlp, "router"):
            mods[f"{p}{FFN_ROUTER}.weight"] = mlp.router
            for s, attr in ((FFN_GATE_EXPS, "gate_exps"), (FFN_UP_EXPS, "up_exps"), (FFN_DOWN_EXPS, "down_exps")):
                if isinstance(getattr(mlp, attr, None), torch.Tensor):
                    self.experts[f"{p}{s}.weight"] = getattr(mlp, attr)
        for name, m in mods.items():
            m.register_forward_hook(_hook(im, name))
        moe = layer.moe() if hasattr(layer, "moe") else None
        if route_all and moe is not None and self.experts:
            # forced routing: each expert's rows see every token (its down rows: every token through its
            # gate/up); the module's own matmuls then stay untapped
            names = {s: f"{p}{s}.weight" for s in EXPERT_SUFFIXES}

            def hook(e, x, moe=moe, n=moe.n_experts):
                im.add(names[FFN_GATE_EXPS], x, e, n)
                im.add(names[FFN_UP_EXPS], x, e, n)
                im.add(names[FFN_DOWN_EXPS], moe.hidden(e, x), e, n)
            moe.expert_hook, moe.route_all = hook, True
            self.experts = {}

    def forward(self, x, cos, sin):
        if self.experts:  # a torch function mode: this thread's only
            with _ExpertTap(self.im, self.experts):
                y = self.layer(x, cos, sin)
        else:
            y = self.layer(x, cos, sin)
        if self.head_norm is not None:  # --process-output: output.weight's input is the final norm
            self.im.add(OUTPUT, self.head_norm(y))
        return y


def compute_imatrix(graph: Graph, chunks: list[torch.Tensor], device: str = "cpu",
                    dtype: torch.dtype = torch.float32, process_output: bool = False, progress: bool = True,
                    budget_bytes: int = 4 * 2**30, route_all: bool = False) -> IMatrix:
    """Statistics over `chunks` (equal-length token tensors, one sequence each), one layer at a time.
    route_all: every expert's statistics see every token (forced routing; not what llama-imatrix does)."""
    from ..runtime import executor_for
    from .stream import forward_width, stream_layers
    if not chunks:
        raise BadInput("imatrix: no chunks to compute over")
    im = IMatrix(chunk_size=int(chunks[0].numel()))
    hp = graph.hparams
    head_norm = None
    if process_output and OUTPUT in graph:  # llama-imatrix matches the name: a tied head is token_embd
        # the family's final norm (RMSNorm, Gemma's (1 + w), OLMo's non-parametric LayerNorm ...)
        head_norm = executor_for(graph, device=device, dtype=dtype, keep=False).head_norm()

    from .dist import world
    if world().active:
        im._pending = []

    def on_layer(i, layer, inputs, rope):
        im.flush()  # the previous layer's additions, in sample order
        return _Collecting(layer, i, im, head_norm if i == hp.n_layers - 1 else None, route_all)

    with torch.no_grad():
        stream_layers(graph, chunks, on_layer, device=device, dtype=dtype, budget_bytes=budget_bytes,
                      progress=progress)
    im.stats_s /= forward_width(device)  # the sums ran on the forwards' threads, side by side
    im.flush()
    im._pending = None
    tokens = len(chunks) * im.chunk_size
    im.chunk_count = max((int(c.max()) for c in im.counts.values()), default=tokens) // im.chunk_size
    return im


def imatrix_from_calib(graph: Graph, calib: Path, n_ctx: int = 512, n_chunks: int | None = None,
                       device: str = "cpu", process_output: bool = False, progress: bool = True,
                       route_all: bool = False, dtype: torch.dtype = torch.float32) -> IMatrix:
    """llama-imatrix on a calibration source: one token stream, consecutive chunks (see data.token_stream).
    dtype: the forwards' (--calib-dtype); the sums are float32 per chunk, float64 across chunks."""
    from .data import token_stream
    from .data import as_calib
    calib = as_calib(calib)
    ids, bos = token_stream(graph, calib)
    chunks = chunk_tokens(ids, n_ctx, n_chunks, bos, source=f"--calib {calib}")
    im = compute_imatrix(graph, chunks, device=device, dtype=dtype, process_output=process_output,
                         progress=progress, route_all=route_all)
    im.datasets = [str(calib)]
    return im


# ---------------------------------------------------------------- files

def write_imatrix_gguf(im: IMatrix, path: Path) -> None:
    from gguf import GGMLQuantizationType as QT
    from gguf import GGUFValueType as VT

    from ..formats.gguf_writer import GGUFTensor, write_gguf
    kv = [("general.type", "imatrix", VT.STRING), (KV_DATASETS, list(im.datasets), [VT.ARRAY, VT.STRING]),
          (KV_CHUNK_COUNT, int(im.chunk_count), VT.UINT32), (KV_CHUNK_SIZE, int(im.chunk_size), VT.UINT32)]
    tensors = []
    for name in sorted(im.sums):  # llama-imatrix sorts names too
        s, c = im.sums[name].float(), im.counts[name].float()[:, None]
        tensors.append(GGUFTensor(f"{name}.in_sum2", QT.F32, tuple(s.shape), lambda s=s: s))
        tensors.append(GGUFTensor(f"{name}.counts", QT.F32, tuple(c.shape), lambda c=c: c))
    write_gguf(Path(path), kv, tensors)


def write_imatrix_dat(im: IMatrix, path: Path) -> None:
    """The legacy format as llama-imatrix's save_imatrix_legacy writes it (entries with no data skipped)."""
    cs = max(int(im.chunk_size), 1)
    out = bytearray()
    names = [n for n in sorted(im.sums) if int(im.counts[n].max()) > 0]
    out += struct.pack("<i", len(names))
    for name in names:
        b = name.encode()
        counts = im.counts[name]
        ncall = (int(counts.max()) + cs - 1) // cs
        c = counts.double()[:, None]
        v = torch.where(c > 0, im.sums[name] / c.clamp(min=1), torch.ones_like(im.sums[name])) * ncall
        vals = v.float().reshape(-1).numpy().astype("<f4").tobytes()
        out += struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, v.numel()) + vals
    ds = (im.datasets[-1] if im.datasets else "").encode()
    out += struct.pack("<i", int(im.chunk_count)) + struct.pack("<i", len(ds)) + ds
    Path(path).write_bytes(bytes(out))


def _load_gguf(path: Path) -> IMatrix:
    from ..formats.gguf_reader import open_gguf, read_kv, tensor_to_torch
    r = open_gguf(path)
    kv = read_kv(r)
    if kv.get("general.type") not in (None, "imatrix") or "general.architecture" in kv:
        raise BadInput(f"{path}: a model GGUF, not an importance matrix (general.type is not 'imatrix')")
    pairs: dict[str, dict] = {}
    for t in r.tensors:
        for suf, key in ((".in_sum2", "s"), (".counts", "c")):
            if t.name.endswith(suf):
                pairs.setdefault(t.name[:-len(suf)], {})[key] = tensor_to_torch(t, path)
    if not pairs:
        raise BadInput(f"{path}: importance matrix holds no <name>.in_sum2/<name>.counts tensors")
    for k in (KV_CHUNK_COUNT, KV_CHUNK_SIZE):
        if isinstance(kv.get(k, 0), bool) or not isinstance(kv.get(k, 0), int):
            raise BadInput(f"{path}: imatrix metadata '{k}' is {kv[k]!r}, expected an integer")
    if not isinstance(kv.get(KV_DATASETS) or [], list):
        raise BadInput(f"{path}: imatrix metadata '{KV_DATASETS}' is {kv[KV_DATASETS]!r}, expected a list of names")
    im = IMatrix(chunk_count=int(kv.get(KV_CHUNK_COUNT, 0)), chunk_size=int(kv.get(KV_CHUNK_SIZE, 0)),
                 datasets=[str(d) for d in (kv.get(KV_DATASETS) or [])])
    for name, p in sorted(pairs.items()):
        if "s" not in p or "c" not in p:
            raise BadInput(f"{path}: '{name}' has {'no counts' if 'c' not in p else 'no in_sum2'} tensor")
        s = p["s"].double().reshape(-1, p["s"].shape[-1])
        c = p["c"].reshape(-1)
        if c.numel() != s.shape[0]:
            raise BadInput(f"{path}: '{name}.counts' has {c.numel()} entries, in_sum2 has {s.shape[0]} matrices")
        im.sums[name], im.counts[name] = s, torch.round(c.double()).long()
    return im


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        if self.pos + n > len(self.data):
            raise BadInput(f"{self.path}: truncated legacy imatrix while reading {what}")
        v = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += n
        return v

    def raw(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise BadInput(f"{self.path}: truncated legacy imatrix while reading {what}")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b


def _load_dat(path: Path) -> IMatrix:
    """Legacy file -> IMatrix with counts = ncall (one per entry) and sums = the stored values, so that
    sums/counts is what llama-quantize uses (stored / ncall)."""
    rd = _Reader(path.read_bytes(), path)
    (n,) = rd.take("<i", "the entry count")
    if n <= 0:
        raise BadInput(f"{path}: legacy imatrix with {n} entries (not an imatrix file?)")
    im = IMatrix(chunk_size=0)
    for i in range(n):
        (ln,) = rd.take("<i", f"entry {i} name length")
        if not 0 < ln < 4096:
            raise BadInput(f"{path}: entry {i}: name length {ln} is not plausible (not a legacy imatrix?)")
        name = rd.raw(ln, f"entry {i} name").decode("utf-8", "replace")
        ncall, nval = rd.take("<ii", f"'{name}' ncall/nval")
        if ncall <= 0 or nval <= 0:
            raise BadInput(f"{path}: '{name}': invalid ncall {ncall} / nval {nval}")
        vals = torch.frombuffer(bytearray(rd.raw(4 * nval, f"'{name}' values")), dtype=torch.float32)
        im.sums[name] = vals.double()[None]
        im.counts[name] = torch.tensor([ncall], dtype=torch.int64)
    if rd.pos + 4 <= len(rd.data):
        (im.chunk_count,) = rd.take("<i", "chunk count")
        if rd.pos + 4 <= len(rd.data):
            (ln,) = rd.take("<i", "dataset name length")
            if 0 < ln <= len(rd.data) - rd.pos:
                im.datasets = [rd.raw(ln, "dataset name").decode("utf-8", "replace")]
    return im


def load_imatrix_file(path: Path) -> IMatrix:
    """Either format (GGUF by magic, else legacy .dat), as llama.cpp's loaders decide."""
    from ..formats.gguf_reader import is_gguf
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--imatrix {path}: no such file")
    return _load_gguf(path) if is_gguf(path) else _load_dat(path)


def read_imatrix(path: Path, graph: Graph) -> dict[str, torch.Tensor]:
    """Canonical weight name -> per-column importance ([ne0], or [E, ne0] for stacked experts), exactly the
    values llama-quantize passes as quant_weights. Entries are checked against the graph's shapes."""
    im = load_imatrix_file(path)
    out = {}
    for name, m in im.means().items():
        if name not in graph:
            log.warning("%s: imatrix entry '%s' matches no tensor of %s; ignored", path, name, graph.source)
            continue
        shape = graph[name].shape
        ne0 = shape[-1]
        if _is_expert(name) and len(shape) == 3:
            if m.numel() % ne0 == 0:  # legacy files store the experts' vectors back to back
                m = m.reshape(-1, ne0)
            if m.dim() == 2 and m.shape[0] == 1:  # one vector for all experts
                m = m.expand(shape[0], -1).contiguous()
            if tuple(m.shape) != (shape[0], ne0):
                raise BadInput(f"{path}: imatrix '{name}' has shape {tuple(m.shape)}, expected "
                               f"({shape[0]}, {ne0}) (experts x input columns of {graph.source})")
        elif m.numel() != ne0:
            raise BadInput(f"{path}: imatrix '{name}' has {m.numel()} values, the tensor has {ne0} input "
                           f"columns in {graph.source}")
        else:
            m = m.reshape(ne0)
        if not bool(torch.isfinite(m).all()):
            raise BadInput(f"{path}: imatrix '{name}' contains non-finite values")
        out[name] = m
    if not out:
        raise BadInput(f"{path}: no imatrix entry matches a tensor of {graph.source}")
    return out


def provenance_kv(path: Path) -> list[tuple]:
    """The keys llama-quantize writes into a GGUF quantized with --imatrix (tools/quantize/quantize.cpp):
    the file as given and the first dataset (strings cut to 127 bytes, as its kv override holds), the entry
    count and, when known, the chunk count (both UINT32)."""
    from gguf import GGUFValueType as VT
    im = load_imatrix_file(Path(path))

    def cut(s: str) -> str:
        return s.encode("utf-8")[:127].decode("utf-8", "ignore")
    kv = [("quantize.imatrix.file", cut(str(path)), VT.STRING)]
    if im.datasets:
        kv.append(("quantize.imatrix.dataset", cut(im.datasets[0]), VT.STRING))
    kv.append(("quantize.imatrix.entries_count", len(im.sums), VT.UINT32))
    if im.chunk_count > 0:
        kv.append(("quantize.imatrix.chunks_count", int(im.chunk_count), VT.UINT32))
    return kv


def timing(im: IMatrix, t0: float, t1: float) -> dict:
    """total_time_s and phase_times of a run that started at t0 and had its matrix at t1 (perf_counter), now
    written: forward (reading, tokenizing and the passes), statistics, write."""
    now = time.perf_counter()
    return {"total_time_s": round(now - t0, 3),
            "phase_times": {"forward_s": round(t1 - t0 - im.stats_s, 3), "statistics_s": round(im.stats_s, 3),
                            "write_s": round(now - t1, 3)}}


def summary(im: IMatrix) -> dict:
    return {"entries": len(im.sums), "chunk_count": im.chunk_count, "chunk_size": im.chunk_size,
            "tokens": int(max((int(c.max()) for c in im.counts.values()), default=0)),
            "datasets": im.datasets,
            "partial": sorted(n for n, c in im.counts.items() if int((c == 0).sum()) > 0)}


__all__ = ["IMatrix", "chunk_tokens", "compute_imatrix", "imatrix_from_calib", "write_imatrix_gguf",
           "write_imatrix_dat", "load_imatrix_file", "read_imatrix", "provenance_kv", "summary"]
