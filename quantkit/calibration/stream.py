"""Layer-by-layer calibration: only one decoder layer's weights are materialized at a time.

The calibration samples are embedded once; then for each layer the caller sees the layer and its inputs,
may change the layer (quantize it), and the layer's outputs -- computed with the changed layer, as GPTQ's
sequential mode needs -- become the next layer's inputs. Activations live on the CPU, or in a temporary
file when they exceed the memory budget.

The forwards run in the calibration dtype (`--calib-dtype`: float32, or bfloat16/float16 as GPU peers
calibrate): the executor's layers, cos/sin and the activation stores are in it. Accumulators (Hessians, imatrix
sums) receive those activations and convert them to float32 per batch; quantizers read their weights in
float32 (`master_weight`), not the rounded copies the forward runs with.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .. import threads
from ..errors import BadInput, QuantkitError
from ..graph import Graph, blk

CALIB_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# numpy has no bfloat16: a disk-backed store holds its bits as int16 and is viewed as bfloat16
_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


def calib_dtype_name(value: str | None, device: str, graph: Graph | None = None) -> str:
    """--calib-dtype -> float32 | bfloat16 | float16. auto (or None): bfloat16 on CUDA; on the CPU bfloat16 when
    the model's weight matrices are stored in bfloat16 (or FP8) and the CPU has bf16 dot products (`native_bf16`),
    as llama.cpp computes a BF16 GGUF and GPTQModel / llm-compressor a bf16 checkpoint; else float32."""
    if isinstance(value, torch.dtype):
        value = str(value).replace("torch.", "")
    v = "auto" if value is None else str(value).lower()
    if v == "auto":
        if str(device).startswith("cuda"):
            return "bfloat16"
        return "bfloat16" if graph is not None and stored_bf16(graph) and native_bf16() else "float32"
    if v not in CALIB_DTYPES:
        raise BadInput(f"--calib-dtype {value}: expected one of float32, bfloat16, float16, auto")
    return v


def stored_bf16(graph: Graph) -> bool:
    """Most of the first layer's weight matrices are stored in bfloat16 or FP8 (what --calib-dtype auto reads)."""
    mats = [t for n, t in graph.tensors.items() if n.startswith("blk.0.") and len(t.shape) >= 2]
    low = sum(1 for t in mats if t.dtype == "BF16" or str(t.qtype or "").startswith("FP8"))
    return bool(mats) and 2 * low > len(mats)


def native_bf16() -> bool:
    """The CPU computes bf16 dot products natively (AVX512-BF16 or AMX), where bf16 GEMMs run about twice as fast
    as float32 ones. Under torchrun every rank must have them (one dtype for all, same bytes)."""
    ok = False
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(getattr(torch, "cpu", None), probe, None)
        try:
            ok = ok or bool(fn is not None and fn())
        except Exception:  # an older torch without the probe: float32
            pass
    from .dist import gather_objects
    return all(gather_objects(ok))


def calib_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """A resolved --calib-dtype name (or a torch dtype) as a torch dtype; None: float32."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    if name not in CALIB_DTYPES:
        raise BadInput(f"--calib-dtype {name}: expected one of float32, bfloat16, float16, auto")
    return CALIB_DTYPES[name]


def master_weight(graph: Graph, i: int, suffix: str, current: torch.Tensor, device) -> torch.Tensor:
    """The float32 weight a quantizer works on: the layer's own when the layer computes in float32, else the
    graph's tensor (the layer holds a copy rounded to the calibration dtype)."""
    if current.dtype == torch.float32:
        return current
    w = graph[blk(i, suffix)].load().to(device=device, dtype=torch.float32)
    if w.shape != current.shape:  # a block that builds this linear from other tensors: the graph's is not it
        raise QuantkitError(f"{blk(i, suffix)}: the layer's linear is {tuple(current.shape)}, the graph's tensor "
                            f"{tuple(w.shape)}; use --calib-dtype float32")
    return w


class ActivationStore:
    """Per-sample hidden states [T, d] kept in RAM, or in a disk-backed memmap past `budget_bytes`."""

    def __init__(self, n: int, seqlen: int, dim: int, dtype=torch.float32, budget_bytes: int = 4 * 2**30,
                 index: list[int] | None = None, n_total: int | None = None):
        self.n, self.seqlen, self.dim, self.dtype = n, seqlen, dim, dtype
        # global sample index of each stored sample (a rank holds its shards only: calibration.dist)
        self.index = list(range(n)) if index is None else list(index)
        self.n_total = n if n_total is None else n_total
        self.on_batch: Callable[[int], None] | None = None  # progress inside a layer: called with samples done
        self.on_phase: Callable[[str], None] | None = None  # ... and with the step a quantizer is in
        nbytes = n * seqlen * dim * torch.empty((), dtype=dtype).element_size()
        self._file = None
        if nbytes > budget_bytes:
            self._file = tempfile.NamedTemporaryFile(prefix="quantkit-act-", suffix=".bin")
            mm = np.memmap(self._file.name, dtype=_NP_DTYPES[dtype], mode="w+", shape=(n, seqlen, dim))
            self.data = torch.from_numpy(mm).view(dtype)
        else:
            self.data = torch.empty(n, seqlen, dim, dtype=dtype)

    def phase(self, text: str) -> None:
        """Quantizers name their current step (scale search, GPTQ of q/k/v ...) for the progress line."""
        if self.on_phase is not None:
            self.on_phase(text)

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def __len__(self):
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]

    def __setitem__(self, i: int, x: torch.Tensor) -> None:
        self.data[i] = x.reshape(self.seqlen, self.dim).to("cpu", self.dtype)

    def sample(self, i: int, device) -> torch.Tensor:
        """Sample i as a batch of one [1, T, d] on `device`, in the store's dtype."""
        return self.data[i:i + 1].to(device=device, dtype=self.dtype)

    def batches(self, device, dtype, batch: int = 1) -> Iterator[torch.Tensor]:
        for s in self.indices(batch):
            yield self.data[s:s + batch].to(device=device, dtype=dtype)

    def indices(self, batch: int = 1) -> Iterator[int]:
        """The first sample of each batch, in order, with the progress call that batches() makes."""
        for s in range(0, self.n, batch):
            if self.on_batch is not None:
                self.on_batch(s)
            yield s


def sharded_indices(store: ActivationStore, accs: list) -> Iterator[int]:
    """store.indices() for passes that accumulate sums over samples: `accs` (GPTQ-like accumulators) fold in
    the canonical shard order after each shard, across ranks when there are several (calibration.dist)."""
    from .dist import SHARD, Ring
    ring = Ring(accs, store.n_total)
    for j in store.indices():
        yield j
        k = store.index[j] // SHARD
        if j + 1 == store.n or store.index[j + 1] // SHARD != k:
            ring.fold(k)
    ring.finish()


class Tape:
    """Side effects of forwards that run side by side: hooks hand them to `put`. Inside a forward run by
    `run_layer` they are kept on the thread that runs it and replayed on the caller's thread in sample order
    (`sample`: the global index of the sample being replayed), so accumulators see what one thread would;
    anywhere else they apply at once."""

    def __init__(self):
        self._tls = threading.local()
        self.sample = 0

    def put(self, fn: Callable, *args) -> None:
        rec = getattr(self._tls, "rec", None)
        if rec is None:
            fn(*args)
        else:
            rec.append((fn, args))

    def recorded(self, fn: Callable) -> Callable:
        """fn wrapped to return (its result, the side effects put while it ran on this thread)."""
        def run(*args):
            self._tls.rec = rec = []
            try:
                return fn(*args), rec
            finally:
                self._tls.rec = None
        return run


def run_layer(layer: nn.Module, store: ActivationStore, rope, device, dtype, out: ActivationStore | None = None,
              tape: Tape | None = None, accs: list | None = None) -> None:
    """Forward every sample through `layer`, one per forward; write outputs into `out` (when given). With a
    `tape` (given, or the layer's `tape` attribute) the samples run side by side on the CPU
    (`forward_width`), and what the layer's hooks `put` on it is replayed in sample order; `accs` (GPTQ-like
    accumulators fed by those puts) fold after each shard (`sharded_indices`). Without one, a layer may have
    side effects of its own: the samples run one after another. A hook may raise Stop once it has what the
    pass needs: that sample's forward ends there (no output)."""
    cos, sin = rope
    tape = tape or getattr(layer, "tape", None)
    width = forward_width(device) if tape is not None else 1
    tape = tape or Tape()

    def forward(j):
        with torch.no_grad():  # grad mode is per thread
            try:
                return layer(store.sample(j, device).to(dtype), cos, sin)
            except Stop:
                return None
    order = sharded_indices(store, accs) if accs is not None else store.indices()
    with contextlib.closing(threads.in_order(tape.recorded(forward), store.n, width)) as results:
        for j, (y, rec) in zip(order, results):
            tape.sample = store.index[j]
            for fn, args in rec:
                fn(*args)
            if out is not None:
                if y is None:
                    raise QuantkitError("run_layer: a hook stopped the forward whose outputs were asked for")
                out[j] = y[0]


def capture_inputs(layer: nn.Module, modules: dict[str, nn.Module], store: ActivationStore, rope, device, dtype,
                   on_input: Callable[[str, torch.Tensor], None], out: ActivationStore | None = None) -> None:
    """Run the layer over all samples, calling on_input(name, x) with each listed module's input, in sample
    order on the caller's thread; the layer's outputs go to `out` when given."""
    tape = Tape()
    handles = [m.register_forward_hook(lambda mod, args, res, n=n: tape.put(on_input, n, args[0].detach()))
               for n, m in modules.items()]
    try:
        run_layer(layer, store, rope, device, dtype, out, tape)
    finally:
        for h in handles:
            h.remove()


class LayerSlot:
    """One layer of the stream: its module, its inputs and rope. Set `replacement` to run another module
    (e.g. the quantized layer) to compute the next layer's inputs, or fill `out` (the next layer's input
    store) and set `outputs_written` when the consumer computed them itself (`run_sequential`)."""

    def __init__(self, i: int, layer: nn.Module, store: ActivationStore, rope, out: ActivationStore | None = None):
        self.i, self.layer, self.store, self.rope, self.out = i, layer, store, rope, out
        self.replacement: nn.Module | None = None
        self.outputs_written = False


class Stop(Exception):
    """Raised from a hook once the input a pass needs was captured (skips the rest of the branch)."""


class BranchView:
    """Branch k of a decoder layer called like a layer (x, cos, sin): passes that need one branch only."""

    def __init__(self, layer: nn.Module, k: int):
        self.layer, self.k = layer, k

    def __call__(self, x, cos, sin):
        return self.layer.branch(self.k, x, cos, sin)


def _like(store: ActivationStore, dim: int, budget_bytes: int) -> ActivationStore:
    s = ActivationStore(store.n, store.seqlen, dim, store.dtype, budget_bytes, store.index, store.n_total)
    s.on_batch, s.on_phase = store.on_batch, store.on_phase
    return s


SHARE_BYTES = 2**30  # Hessian shares of samples computed ahead (GPTQ.product), at most


def shares_fit(device, widths: list[int]) -> bool:
    """Whether the Hessian shares of inputs this wide (about 2 n^2 bytes each, per sample) fit SHARE_BYTES for
    the samples in flight (threads.in_order's AHEAD * forward_width, and the one being added): then they are
    computed on the forward threads."""
    return (threads.AHEAD * forward_width(device) + 1) * sum(2 * n * n for n in widths) <= SHARE_BYTES


def forward_width(device) -> int:
    """Samples forwarded side by side, one torch thread each, on the CPU: a forward of one 512-token sample
    leaves cores idle between its ops (small ops, Python, waits at every op's barrier); independent samples
    on one thread each do not. The same bits: each sample is computed on one thread wherever it runs."""
    return torch.get_num_threads() if torch.device(device).type == "cpu" else 1


def run_sequential(layer: nn.Module, store: ActivationStore, rope, device, out: ActivationStore,
                   on_input: Callable[[tuple[str, ...]], object | None],
                   on_group: Callable[[tuple[str, ...]], None],
                   on_branch: Callable[[int, BranchView, ActivationStore], None] | None = None,
                   budget_bytes: int = 4 * 2**30) -> None:
    """True-sequential calibration of one decoder layer, branch by branch, writing its outputs into `out`.

    For each input group g of each branch (execution order): on_input(g) gives the accumulator (GPTQ-like:
    add_batch, parts, totals; with product / add_product a sample's share is computed on the thread that ran
    its forward and added in sample order) that receives every sample's input of g (None: skip the group), then
    on_group(g) may change g's weights (quantize).
    Each pass starts from the branch's input and stops at the group, so every earlier group already
    computes with its changed weights, and nothing before the branch is recomputed: the branch norm's
    outputs (the mixer's inputs, which no group changes) are kept from the first pass for the later ones.
    on_branch(k, view, inputs) runs after the branch's groups (per-expert work of a MoE; `view` runs the
    branch). When a branch ends in a declared `output_linear`, that linear's inputs are kept (RAM or disk)
    and the branch output is that linear applied to them: the rest of the branch is not recomputed.
    On the CPU the samples of a pass run side by side (`forward_width`); accumulators and stores get them in order."""
    cos, sin = rope
    lin = layer.linears()
    cur = store
    width = forward_width(device)
    for k in range(layer.n_branches):
        spec = layer.spec.branches[k].mixer
        groups = [g for g in spec.input_groups() if all(s in lin for s in g)]
        last = spec.output_linear
        cache, normed = None, None
        for gi, g in enumerate(groups):
            acc = on_input(g)
            add = acc.add_batch if acc is not None else None
            # an accumulator that takes a sample's share computed apart (GPTQ.product): on the forward's thread,
            # while the shares in flight fit (shares_fit); else on this one (add_batch)
            prod = getattr(acc, "product", None) if shares_fit(device, [lin[g[0]].in_features]) else None
            if prod is not None and hasattr(acc, "share"):
                acc.share = 1 / width  # its seconds there count for the phases as a share of the wall time
            keep = gi == len(groups) - 1 and g == (last,)
            if add is None and not keep:
                continue
            if keep:
                cache = _like(cur, lin[g[0]].in_features, budget_bytes)
            # the first pass that runs keeps the norm's outputs when more passes may follow
            grab = normed is None and layer.has_norm(k) and gi < len(groups) - 1
            kept = normed
            got = threading.local()  # samples run side by side (forward_width): each thread's captures

            def pre(mod, args):
                got.inp = args[0]
                raise Stop

            def pre_mixer(mod, args):
                got.normed = args[0]

            def probe(j):
                got.inp = got.normed = None
                x = cur.sample(j, device)
                try:
                    with torch.no_grad():  # grad mode is per thread
                        layer.branch(k, x, cos, sin, normed=kept[j][None].to(device) if kept is not None else None)
                except Stop:
                    pass
                with torch.no_grad():
                    share = prod(got.inp) if prod is not None and got.inp is not None else None
                return got.inp, got.normed, share
            hooks = [lin[g[0]].register_forward_pre_hook(pre)]
            if grab:
                hooks.append(layer.mixer(k).register_forward_pre_hook(pre_mixer))
            try:
                with torch.no_grad(), contextlib.closing(threads.in_order(probe, cur.n, width)) as results:
                    # sharded_indices: progress and the accumulators' folds, in sample order
                    for j, (inp, nrm, share) in zip(sharded_indices(cur, [acc] if acc is not None else []),
                                                    results):
                        if share is not None:
                            acc.add_product(share)
                        elif add is not None:
                            add(inp)
                        if keep:
                            cache[j] = inp
                        if grab and nrm is not None and nrm.dtype == cur.dtype:  # else a store would round it
                            if normed is None:
                                normed = _like(cur, nrm.shape[-1], budget_bytes)
                            normed[j] = nrm
            finally:
                for h in hooks:
                    h.remove()
            on_group(g)
        if on_branch is not None:
            on_branch(k, BranchView(layer, k), cur)
        nxt = out if k == layer.n_branches - 1 else _like(cur, cur.dim, budget_bytes)
        with torch.no_grad():
            def forward(j, cache):
                x = cur.sample(j, device)
                with torch.no_grad():
                    if cache is None:
                        return layer.branch(k, x, cos, sin), True
                    y = layer.branch(k, x, cos, sin, lin[last](cache[j][None].to(device)))
                    # the declared output linear: checked once against the whole branch (on a pool thread)
                    return y, j > 0 or torch.equal(layer.branch(k, x, cos, sin), y)
            same = True
            while True:
                with contextlib.closing(threads.in_order(lambda j, c=cache: forward(j, c), cur.n, width)) as ys:
                    for j, (y, same) in zip(cur.indices(), ys):
                        if not same:
                            break
                        nxt[j] = y[0]
                if same:
                    break
                cache = None  # the branch does more after it: all of it again
        cur = nxt


def iter_layers(graph: Graph, samples: list[torch.Tensor], device: str = "cpu", dtype: torch.dtype = torch.float32,
                budget_bytes: int = 4 * 2**30, progress: bool = True, executor=None, start: int = 0,
                inputs: torch.Tensor | None = None,
                on_done: Callable[[int, ActivationStore], None] | None = None) -> Iterator[LayerSlot]:
    """samples: equal-length token-id tensors [T]. Yields each layer in turn; when the caller resumes the
    generator, the (replaced) layer's outputs become the next layer's inputs. Only one layer is built at a
    time, so a consumer can interleave other work (writing the previous layer's tensors) between layers.
    start/inputs: begin at layer `start` with these inputs [n, T, d] (a resumed run); on_done(i, outputs)
    is called once layer i's outputs are final."""
    from tqdm import tqdm

    from ..runtime import executor_for
    ex = executor or executor_for(graph, device=device, dtype=dtype, keep=False)
    from .dist import local_samples
    hp = graph.hparams
    t = int(samples[0].numel())
    index = local_samples(len(samples))  # every sample in one process; this rank's shards under torchrun
    cur = ActivationStore(len(index), t, hp.hidden_size, dtype, budget_bytes=budget_bytes, index=index,
                          n_total=len(samples))
    if inputs is not None:
        for j in range(len(index)):
            cur[j] = inputs[j]
    else:
        with torch.no_grad():  # embed in batches: each embed() call may load the embedding table
            for k0 in range(0, len(index), 32):
                e = ex.embed(torch.stack([samples[s] for s in index[k0:k0 + 32]]).to(device))
                for j in range(e.shape[0]):
                    cur[k0 + j] = e[j]
    # per-layer cos/sin (layers may use different RoPE bases: Gemma 3's local layers)
    ropes = ex.ropes(t) if hasattr(ex, "ropes") else [ex.rope(t)] * hp.n_layers
    nxt = ActivationStore(len(index), t, hp.hidden_size, dtype, budget_bytes=budget_bytes, index=index,
                          n_total=len(samples))
    bar = tqdm(total=hp.n_layers, initial=start, desc="layers", unit="layer", disable=not progress)
    tick = _inner_progress(bar, len(samples)) if progress else None
    try:
        for i in range(start, hp.n_layers):
            rope = ropes[i]
            slot = LayerSlot(i, ex.build_layer(i), cur, rope, nxt)
            cur.on_batch = tick
            cur.on_phase = (lambda text: bar.set_postfix_str(f"layer {bar.n}: {text}")) if progress else None
            yield slot
            if not slot.outputs_written:  # the executor's own layer has no side effects: side by side
                run_layer(slot.replacement if slot.replacement is not None else slot.layer, cur, rope, device,
                          dtype, nxt, tape=None if slot.replacement is not None else Tape())
            if on_done is not None:
                on_done(i, nxt)
            cur.on_batch = cur.on_phase = None
            cur, nxt = nxt, cur
            bar.update(1)
            del slot
    finally:
        bar.close()


def stream_layers(graph: Graph, samples: list[torch.Tensor],
                  on_layer: Callable[[int, nn.Module, ActivationStore, tuple], nn.Module | None],
                  device: str = "cpu", dtype: torch.dtype = torch.float32, budget_bytes: int = 4 * 2**30,
                  progress: bool = True, executor=None) -> None:
    """Callback form of `iter_layers`: on_layer(i, layer, inputs, rope) may return a replacement module whose
    outputs feed the next layer (or None to keep `layer`)."""
    for slot in iter_layers(graph, samples, device, dtype, budget_bytes, progress, executor):
        slot.replacement = on_layer(slot.i, slot.layer, slot.store, slot.rope)


def _inner_progress(bar, n: int) -> Callable[[int], None]:
    """Shows the pass and sample inside the current layer (a layer of a large model takes minutes), at most
    twice a second."""
    import time
    state = {"pass": 0, "t": 0.0, "layer": -1}

    def tick(done: int) -> None:
        if bar.n != state["layer"]:
            state["layer"], state["pass"] = bar.n, 0
        if done == 0:
            state["pass"] += 1
        now = time.monotonic()
        if now - state["t"] >= 0.5:
            state["t"] = now
            bar.set_postfix_str(f"layer {bar.n}: pass {state['pass']}, sample {done + 1}/{n}")
    return tick
