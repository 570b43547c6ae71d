"""GPTQ-style Hessian-aware rounding inside llama.cpp's block formats (k-quants and the 32-element types).

The input columns are processed in order with GPTQ's error feedback (upper Cholesky factor of H^-1, lazy
32-column updates). When a block starts (256 columns for k-quants, 32 for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0) its
scales/mins are chosen by llama.cpp's own importance-weighted search on the *current*, error-updated weights
and rounded exactly as the format stores them (6-bit sub-block scales, fp16 d/dmin); the block's columns are
then rounded one by one on that fixed grid. The result is ordinary GGUF block bytes.

Every supported format decodes as value = a * (code - z) + b with per-element float32 a, b from the stored
header, an integer code in [0, qmax] and a fixed offset z; `_FORMATS` lists (block, qmax, z) per type.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

import torch
from gguf import GGMLQuantizationType as QT

from ..errors import QuantkitError
from ..threads import map_single_threaded
from . import gptq_columns, kquants as kq
from .ggml_types import all_finite, dequantize, quantize, supported_types
from .gptq import inverse_hessian_cholesky
from .hessian import diag_mean, quad

# type -> (elements per block, qmax, z)
_FORMATS = {
    QT.Q4_K: (256, 15, 0), QT.Q5_K: (256, 31, 0), QT.Q6_K: (256, 63, 32),
    QT.Q4_0: (32, 15, 8), QT.Q5_0: (32, 31, 16), QT.Q4_1: (32, 15, 0), QT.Q5_1: (32, 31, 0),
    QT.Q8_0: (32, 255, 128),
}
LAZY = 32  # lazy-update width: a divisor of every block size above
# fewest rows per side-by-side chunk: each chunk pays the Python of every block once (576 x 1536 Q4_K on 2
# threads: 2 chunks 59 ms, 9 chunks of 64 rows 125 ms, the whole on 2 torch threads 83 ms)
MIN_CHUNK_ROWS = 64
# Less damping than GPTQ's usual 1 %: on permuted SmolLM2 (8 x 512 eval tokens) 0.3 % lowered the KLD ratio
# to llama.cpp+imatrix from 0.74 to 0.71 (q5_k_m) and 0.66 to 0.63 (q4_k_m), q6_k unchanged; 0.1 % was worse.
DEFAULT_DAMP = 0.003
log = logging.getLogger("quantkit")
_clock = time.perf_counter  # the phase clock (a profiling run may set time.process_time)
PHASES = ("forward_s", "statistics_s", "solve_s", "experts_s")


def supports(qtype) -> bool:
    return QT(qtype) in _FORMATS


# ---------------------------------------------------------------- grids: header bytes -> (a, b) per element

def _grid(qt: QT, head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """head: one block's bytes [rows, block_bytes] (only the scale fields are read) -> a, b [rows, block]."""
    if qt in (QT.Q4_K, QT.Q5_K):
        d, dmin = kq.fp16_from(head[:, 0:2]), kq.fp16_from(head[:, 2:4])
        sc, m = kq.get_scale_min_k4(head[:, 4:16].int())
        a = d[:, None] * sc.float()
        b = -(dmin[:, None] * m.float())
        return a.repeat_interleave(32, 1), b.repeat_interleave(32, 1)
    if qt == QT.Q6_K:
        sc = head[:, 192:208].contiguous().view(torch.int8).float()
        a = (kq.fp16_from(head[:, 208:210])[:, None] * sc).repeat_interleave(16, 1)
        return a, torch.zeros_like(a)
    d = kq.fp16_from(head[:, 0:2])[:, None].expand(-1, 32)
    if qt in (QT.Q4_1, QT.Q5_1):
        return d, kq.fp16_from(head[:, 2:4])[:, None].expand(-1, 32)
    return d, torch.zeros_like(d)


# ---------------------------------------------------------------- packing: header + codes -> block bytes

def _nibbles(L: torch.Tensor) -> torch.Tensor:  # [r, 32] -> [r, 16]: low nibble j, high nibble j+16
    return (L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)


def _qh32(L: torch.Tensor) -> torch.Tensor:  # [r, 32] -> [r, 4]: bit k of a little-endian uint32 = bit 4 of L[k]
    bits = ((L >> 4) & 1).reshape(-1, 4, 8)
    return (bits << torch.arange(8, device=L.device)).sum(-1)


def _pack(qt: QT, head: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """head [r, block_bytes] uint8 (scale fields kept), L [r, block] int64 codes -> [r, block_bytes] uint8."""
    r = L.shape[0]
    if qt in (QT.Q4_K, QT.Q5_K):
        Lr = L.reshape(r, 4, 2, 32)
        lo, hi = Lr[:, :, 0], Lr[:, :, 1]
        parts = [head[:, :16].long()]
        if qt == QT.Q5_K:
            sh = (2 * torch.arange(4, device=L.device)).reshape(1, 4, 1)
            parts.append((((lo >> 4) & 1) << sh | ((hi >> 4) & 1) << (sh + 1)).sum(1))
        parts.append(((lo & 0xF) | ((hi & 0xF) << 4)).reshape(r, 128))
    elif qt == QT.Q6_K:
        Lr = L.reshape(r, 2, 4, 32)
        q1, q2, q3, q4 = Lr[:, :, 0], Lr[:, :, 1], Lr[:, :, 2], Lr[:, :, 3]
        ql = torch.stack([(q1 & 0xF) | ((q3 & 0xF) << 4), (q2 & 0xF) | ((q4 & 0xF) << 4)], dim=2).reshape(r, 128)
        qh = ((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)).reshape(r, 64)
        parts = [ql, qh, head[:, 192:210].long()]
    elif qt == QT.Q8_0:
        parts = [head[:, :2].long(), L - 128]
    else:
        n_head = 4 if qt in (QT.Q4_1, QT.Q5_1) else 2
        parts = [head[:, :n_head].long()]
        if qt in (QT.Q5_0, QT.Q5_1):
            parts.append(_qh32(L))
        parts.append(_nibbles(L))
    return (torch.cat(parts, dim=1) & 0xFF).to(torch.uint8)


# ---------------------------------------------------------------- llama.cpp's scale search on current weights

def _legacy_head(qt: QT, x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """One 32-column block of x [r, 32]: the scale fields llama.cpp's imatrix path (quantize_row_q*_impl)
    chooses with weights qw * sqrt(sigma2 + x^2) (sigma2: mean square of each current row); Q8_0 has no search."""
    if qt == QT.Q8_0:
        return kq.fp16_bytes(kq.fdiv(x.abs().amax(1), 127.0))
    xt = x.t().contiguous()  # the weights elementwise on the transposed block: no second transpose copy
    w = qw[:, None] * kq.fsqrt(sigma2[None, :] + xt * xt)
    if qt in (QT.Q4_0, QT.Q5_0):
        d, _ = kq.make_qx_quants(xt, 8 if qt == QT.Q4_0 else 16, w)
        return kq.fp16_bytes(d)
    d, neg_min, _ = kq.make_qkx_quants(xt, w, 15 if qt == QT.Q4_1 else 31, -0.9, 0.05, 36)
    return torch.cat([kq.fp16_bytes(d), kq.fp16_bytes(-neg_min)], dim=1)


def _block_head(qt: QT, x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor | None) -> torch.Tensor:
    """The scale fields llama.cpp's search picks for one block of columns x [rows, block]."""
    if x.shape[1] == 256:  # k-quants: the search (incl. its sigma2) only sees its own super-block
        return quantize(x.float().contiguous(), qt, qw)
    return _legacy_head(qt, x.float(), qw, sigma2)


# ---------------------------------------------------------------- the optimizer

def _block_rounding(Wb: torch.Tensor, a: torch.Tensor, b: torch.Tensor, Ub: torch.Tensor, qmax: int, z: int):
    """GPTQ over one block's columns on fixed grids (value = a * (code - z) + b), error fed forward inside the
    block only. Wb, a, b [R, blk]; Ub: the block's [blk, blk] part of the upper Cholesky factor of H^-1.
    Returns (codes [R, blk], scaled errors [R, blk]; a row's GPTQ loss is the sum of its squared errors).
    (Choosing each row's grid among scaled variants of llama.cpp's by this loss was tried: no KLD gain.)"""
    W1 = Wb.clone()
    R, blk = W1.shape
    codes = torch.empty(R, blk, dtype=torch.long, device=W1.device)
    err = torch.empty_like(W1)
    compiled = gptq_columns.usable(W1, a, b, Ub)
    for i1 in range(0, blk, LAZY):
        i2 = i1 + LAZY
        if compiled:  # the same steps, row by row
            gptq_columns.grid_segment(W1, err, codes, a, b, Ub, i1, i2, qmax, z, torch.get_num_threads())
        else:
            for c in range(i1, i2):
                ac, bc, wc = a[:, c], b[:, c], W1[:, c]
                code = torch.round(torch.where(ac != 0, (wc - bc) / ac, 0.0)) + z
                code = torch.where(ac != 0, code.clamp_(0, qmax), 0.0)
                e = (wc - (ac * (code - z) + bc)) / Ub[c, c]
                codes[:, c] = code.long()
                W1[:, c:i2].addmm_(e[:, None], Ub[c, c:i2][None], alpha=-1)  # addr_ is ~100x slower on CPU
                err[:, c] = e
        if i2 < blk:
            W1[:, i2:].addmm_(err[:, i1:i2], Ub[i1:i2, i2:], alpha=-1)
    return codes, err


_LAST: list = []  # the last factorization: q/k/v and gate/up share one Hessian
_FACTOR_LOCK = threading.Lock()


def _factor(H: torch.Tensor, dev, damp_percent: float, name: str):
    """(U, damp_percent used, dead columns) of H, reused while H is the same unchanged tensor. Linears that
    share H may be rounded on several threads: the first computes, the others wait for it."""
    with _FACTOR_LOCK:
        return _factor_locked(H, dev, damp_percent, name)


def _factor_locked(H: torch.Tensor, dev, damp_percent: float, name: str):
    key = (H._version, str(dev), damp_percent)
    if _LAST and _LAST[0]() is H and _LAST[1] == key:
        return _LAST[2]
    _LAST.clear()  # at most one factorization alive
    Hf = H.to(device=dev, dtype=torch.float32).clone()
    dead = Hf.diagonal() == 0
    Hf.diagonal()[dead] = 1  # unseen inputs: no coupling, so their columns just round to the grid
    U, dp, _ = inverse_hessian_cholesky(Hf, damp_percent, 0.0025, name)
    _LAST[:] = [weakref.ref(H, lambda _: _LAST.clear()), key, (U, dp, dead)]  # dropped with H
    return _LAST[2]


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, qtype, H: torch.Tensor, imatrix: torch.Tensor | None = None,
                  damp_percent: float = 0.01, name: str = "weight", loss: bool = True) -> tuple[torch.Tensor, dict]:
    """w [rows, n] float, H [n, n] (X^T X up to a factor) -> (uint8 [rows, row_bytes] block bytes, info).

    imatrix [n] weights llama.cpp's scale search (default diag(H)). info: loss_h = tr((W-Q) H (W-Q)^T)
    (with `loss`: a dequantization and a product with H, which a conversion does not need)."""
    qt = QT(qtype)
    if qt not in _FORMATS:
        raise QuantkitError(f"{name}: --optimizer gptq has no rounding for {qt.name}; "
                            f"expected one of {[t.name for t in _FORMATS]}")
    blk = _FORMATS[qt][0]
    if w.dim() != 2 or not w.is_floating_point():
        raise QuantkitError(f"{name}: expected a float weight [rows, n], got {w.dtype} {tuple(w.shape)}")
    rows, n = w.shape
    if n % blk:
        raise QuantkitError(f"{name}: {n} columns is not a multiple of the {qt.name} block size {blk}")
    if H.shape != (n, n):
        raise QuantkitError(f"{name}: Hessian is {tuple(H.shape)}, expected ({n}, {n})")
    if not all_finite(w) or not all_finite(H):
        raise QuantkitError(f"{name}: weight or Hessian contains NaN/Inf")
    dev = w.device
    W = w.detach().to(torch.float32).clone()
    if imatrix is not None:
        qw = imatrix.to(device=dev, dtype=torch.float32).reshape(-1)
        if qw.numel() != n:
            raise QuantkitError(f"{name}: imatrix has {qw.numel()} values, expected {n}")
    else:
        # damped diag(H): a column no calibration token used still counts a little in the search
        Hf = H.to(device=dev, dtype=torch.float32)
        qw = Hf.diagonal() + damp_percent * diag_mean(Hf)
    U, dp, dead = _factor(H, dev, damp_percent, name)
    cuts = _row_chunks(rows, dev)
    if len(cuts) > 1:  # rows are independent given U: a chunk per thread, each on one thread
        out = torch.cat(map_single_threaded(lambda c: _round_rows(W[c[0]:c[1]], qt, qw, U), cuts))
    else:
        out = _round_rows(W, qt, qw, U)
    info = {"damp_percent": dp, "dead_columns": int(dead.sum())}
    if loss:
        d = (w.float() - dequantize(out, qt, n)).to(dev)
        info["loss_h"] = float(quad(d, H.to(dev, torch.float32)).sum())
    return out, info


def _row_chunks(rows: int, dev) -> list[tuple[int, int]]:
    """Row ranges rounded side by side on the CPU: one per torch thread, at least MIN_CHUNK_ROWS each. The
    rounding is row by row and every chunk runs on one thread, so the bytes do not depend on the cut; a single
    range when there is one thread (a caller that rounds several linears side by side) or off the CPU."""
    k = min(torch.get_num_threads(), rows // MIN_CHUNK_ROWS) if torch.device(dev).type == "cpu" else 1
    if k <= 1:
        return [(0, rows)]
    bounds = [rows * i // k for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _round_rows(W: torch.Tensor, qt: QT, qw: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """GPTQ block by block over W's rows (W [rows, n] float32, changed in place) -> uint8 [rows, row_bytes]."""
    blk, qmax, z = _FORMATS[qt]
    rows, n = W.shape
    nb = n // blk
    # the 32-element types' search regularizes with the row's mean square: taken from the original row
    sigma2 = kq.fdiv(kq.seqsum(W.t().contiguous().square()), float(n)) if blk == 32 else None
    heads, codes = [], torch.empty(rows, nb, blk, dtype=torch.long, device=W.device)
    for j0 in range(0, n, blk):
        j1 = j0 + blk
        heads.append(_block_head(qt, W[:, j0:j1], qw[j0:j1], sigma2))
        a, b = _grid(qt, heads[-1])
        codes[:, j0 // blk], err = _block_rounding(W[:, j0:j1], a, b, U[j0:j1, j0:j1], qmax, z)
        if j1 < n:
            W[:, j1:].addmm_(err, U[j0:j1, j1:], alpha=-1)
    # packing is elementwise per block: all blocks in one call (row r's block b is row r * nb + b)
    head = torch.stack(heads, dim=1).reshape(rows * nb, -1)
    return _pack(qt, head, codes.reshape(rows * nb, blk)).reshape(rows, -1)


# ---------------------------------------------------------------- whole model, one decoder layer at a time

def _plain(w: torch.Tensor, qt: QT, im: torch.Tensor | None) -> torch.Tensor:
    """What convert's tensor_producer does without a quantizer."""
    if qt == QT.MXFP4:
        from ..formats.mxfp4_layouts import quantize_gguf_mxfp4
        return quantize_gguf_mxfp4(w, im)
    if w.dim() == 3:
        return torch.cat([quantize(w[e], qt, im[e] if im is not None and im.dim() == 2 else im)
                          for e in range(w.shape[0])])
    return quantize(w.reshape(-1, w.shape[-1]), qt, im)


def _expert_hessians(layer, moe, store, rope, device, route_all: bool, down: bool) -> list:
    """One GPTQ accumulator per expert: its gate/up input (its routed tokens) or, with `down`, its down
    projection's input computed with the current (already quantized) gate/up."""
    from .gptq import GPTQ
    n_in = moe.down_exps.shape[2] if down else moe.gate_exps.shape[2]
    gps = [GPTQ(n_in, name=f"expert {e}") for e in range(moe.n_experts)]

    from ..calibration.stream import Tape, run_layer
    tape = Tape()  # the forwards run side by side; the sums get their inputs in sample order

    def hook(e, x):
        tape.put(gps[e].add_batch, moe.hidden(e, x) if down else x)
    moe.expert_hook, moe.route_all = hook, route_all
    try:
        run_layer(layer, store, rope, device, store.dtype, tape=tape, accs=gps)
    finally:
        moe.expert_hook, moe.route_all = None, False
    return gps


def _optimize_experts(i, layer, moe, store, rope, types, imatrix, damp_percent, device, route_all: bool,
                      min_tokens: int, done: dict, fallbacks: list, graph=None) -> None:
    """Per-expert Hessian-aware rounding: gate/up on each expert's tokens, then down on the quantized
    gate/up's outputs. An expert with fewer than `min_tokens` tokens gets the plain quantizer (reported)."""
    from ..calibration.dist import spread
    from ..calibration.stream import master_weight
    from ..graph import FFN_DOWN_EXPS, FFN_GATE_EXPS, FFN_UP_EXPS, blk
    for suffixes, down in (((FFN_GATE_EXPS, FFN_UP_EXPS), False), ((FFN_DOWN_EXPS,), True)):
        gps = None
        for s in suffixes:
            name = blk(i, s)
            qt = types.get(name)
            if qt is None or qt in (QT.F32, QT.F16, QT.BF16):
                continue
            gps = gps or _expert_hessians(layer, moe, store, rope, device, route_all, down)
            p = moe.stacked[s]
            p.data = p.data.clone()  # written per expert below; never into the graph's own storage
            # float32 weights to round (the layer's own, or the graph's when it computes in another dtype)
            w32 = p.data if graph is None else master_weight(graph, i, s, p.data, p.device)
            im = imatrix.get(name) if imatrix else None
            parts = []

            def one(e, w32=w32, im=im, name=name, qt=qt):  # under torchrun the experts are spread over the ranks
                w = w32[e].float()
                ime = im[e] if im is not None and im.dim() == 2 else im
                if supports(qt) and w.shape[1] % _FORMATS[qt][0] == 0 and gps[e].nsamples >= min_tokens:
                    return gptq_quantize(w, qt, gps[e].H, ime, damp_percent, f"{name}[{e}]", loss=False)[0].cpu()
                return _plain(w, qt, ime).cpu()
            for e, data in enumerate(spread(list(range(p.shape[0])), one,
                                            map_single_threaded if p.device.type == "cpu" else None)):
                n = gps[e].nsamples
                if n < min_tokens:
                    fallbacks.append({"tensor": name, "expert": e, "tokens": n,
                                      "reason": f"fewer than {min_tokens} calibration tokens: plain {qt.name}"})
                p.data[e] = dequantize(data.to(p.device), qt, p.shape[2]).to(p.dtype)
                parts.append(data)
            done[name] = (qt, torch.cat(parts))


def optimize_graph(graph, types: dict, samples: list[torch.Tensor], imatrix: dict | None = None,
                   damp_percent: float = 0.01, device: str = "cpu", progress: bool = True, route_all: bool = False,
                   min_expert_tokens: int = 16, fallbacks: list | None = None) -> dict:
    """Every layer of `optimize_layers` at once: name -> (type, uint8 bytes)."""
    done: dict[str, tuple[QT, torch.Tensor]] = {}
    for _, part in optimize_layers(graph, types, samples, imatrix, damp_percent, device, progress, route_all,
                                   min_expert_tokens, fallbacks):
        done.update(part)
    return done


def optimize_layers(graph, types: dict, samples: list[torch.Tensor], imatrix: dict | None = None,
                    damp_percent: float = 0.01, device: str = "cpu", progress: bool = True, route_all: bool = False,
                    min_expert_tokens: int = 16, fallbacks: list | None = None, resume=None,
                    phases: dict | None = None, dtype: torch.dtype = torch.float32):
    """Quantize every decoder projection whose planned type has a rounding here, true-sequentially:
    each projection group's Hessian comes from a pass in which every earlier projection (this layer and
    the ones before) already computes with its dequantized bytes; stacked experts get one Hessian per
    expert (forced routing with `route_all`; fewer than `min_expert_tokens` tokens: the plain quantizer,
    appended to `fallbacks`). Yields (layer, {name: (type, uint8 bytes)}) as each layer finishes, rows in
    the graph's (HF) order; other projections of a layer are plainly quantized for the later passes. Only
    one layer's bytes are held at a time. phases (PHASES): seconds spent are added in. dtype: the calibration
    forwards' (the weights rounded stay float32, dequantized ones are cast to it for the later passes)."""
    from ..calibration.stream import iter_layers, master_weight, run_sequential
    from ..graph import blk
    from .gptq import GPTQ, Timed

    from ..families import family_of
    fam = family_of(graph.hparams.arch)
    ph = phases if phases is not None else dict.fromkeys(PHASES, 0.0)

    def encode(name, qt, w, H, im):  # (optimized?, bytes) or None
        if qt is None or qt in (QT.F32, QT.F16, QT.BF16):
            return None
        if supports(qt) and w.shape[1] % _FORMATS[qt][0] == 0:
            return True, gptq_quantize(w, qt, H, im, damp_percent, name, loss=False)[0].cpu()
        if qt in supported_types():
            return False, quantize(w, qt, im).cpu()
        return None

    def quantize_group(i, lin, g, gp, done) -> None:
        from ..calibration.dist import spread

        def one(s):  # [(gguf name, type, rows or None, (optimized?, bytes) or None)]; spread over torchrun ranks
            name = blk(i, s)
            w = master_weight(graph, i, s, lin[s].weight.data, lin[s].weight.device).float()
            im = imatrix.get(name) if imatrix else None
            parts = row_parts(fam, graph.hparams, name, w, types)
            if parts is None:
                return [(name, types.get(name), None, encode(name, types.get(name), w, gp.H, im))]
            return [(gname, qt, rows, encode(gname, qt, w[rows], gp.H, im)) for gname, qt, rows in parts]
        side = len(g) > 1 and all(lin[s].weight.device.type == "cpu" for s in g)
        if side and any(supports(types.get(blk(i, s)) or QT.F32) for s in g):
            _factor(gp.H, lin[g[0]].weight.device, damp_percent, blk(i, g[0]))  # shared: built once, on all cores
        results = spread(list(g), one, map_single_threaded if side else None)
        # the later passes compute with the dequantized bytes: decoded side by side too
        todo = [(k, j) for k, got in enumerate(results) for j, part in enumerate(got) if part[3] is not None]

        def decode(item):
            k, j = item
            _, qt, _, enc = results[k][j]
            w = lin[g[k]].weight
            return dequantize(enc[1].to(w.device), qt, w.shape[1])
        deqs = dict(zip(todo, map_single_threaded(decode, todo) if side else [decode(t) for t in todo]))
        for k, (s, got) in enumerate(zip(g, results)):
            mod = lin[s]
            w = mod.weight.data.clone()
            for j, (gname, qt, rows, enc) in enumerate(got):
                if enc is None:
                    continue
                if enc[0]:
                    done[gname] = (qt, enc[1])
                deq = deqs[(k, j)].to(w.dtype)
                if rows is None:
                    w = deq
                else:
                    w[rows.to(w.device)] = deq
            mod.weight.data = w

    def on_slot(slot):
        """Branch by branch (calibration.stream.run_sequential): each group's Hessian from a pass over its
        branch only; the slot's output store receives the quantized layer's outputs."""
        i, layer, store, rope = slot.i, slot.layer, slot.store, slot.rope
        done: dict[str, tuple[QT, torch.Tensor]] = {}
        lin = layer.linears()
        moe = layer.moe()
        gps: dict = {}

        def on_input(g):
            gps[g] = Timed(GPTQ(lin[g[0]].in_features, name=blk(i, g[0]), gather=True), ph)
            return gps[g]

        def on_group(g):
            t = _clock()
            quantize_group(i, lin, g, gps.pop(g).acc, done)
            ph["solve_s"] += _clock() - t

        def on_branch(k, view, inputs):
            if layer.mixer(k) is moe:
                t = _clock()
                _optimize_experts(i, view, moe, inputs, rope, types, imatrix, damp_percent, device, route_all,
                                  min_expert_tokens, done, fallbacks if fallbacks is not None else [], graph)
                ph["experts_s"] += _clock() - t
        t0, busy = _clock(), sum(ph[k] for k in PHASES[1:])
        run_sequential(layer, store, rope, device, slot.out, on_input, on_group,
                       on_branch if moe is not None else None)
        ph["forward_s"] += _clock() - t0 - (sum(ph[k] for k in PHASES[1:]) - busy)  # the passes, less the above
        slot.outputs_written = True
        return done

    start, inputs, last = 0, None, {}
    if resume is not None:  # finished layers of an interrupted run: their bytes from the resume state
        for i, part, rep in resume.finished():
            if fallbacks is not None:
                fallbacks.extend(rep["fallbacks"])
            yield i, part
        start = resume.done + 1
        inputs = resume.inputs(dtype) if start else None

    def on_done(i, out):
        resume.save(i, last["part"], {"fallbacks": last["fallbacks"]}, out.data)
    for slot in iter_layers(graph, samples, device=device, dtype=dtype, progress=progress, start=start,
                            inputs=inputs, on_done=on_done if resume is not None else None):
        nf = len(fallbacks) if fallbacks is not None else 0
        part = on_slot(slot)
        last = {"part": part, "fallbacks": list(fallbacks[nf:]) if fallbacks is not None else []}
        yield slot.i, part


def row_parts(fam, hp, name: str, w: torch.Tensor, types: dict):
    """[(GGUF name, type, row indices)] when GGUF stores the projection `name` as row subsets of it that read its
    input (Qwen3-Next's attn_qkv / attn_gate split from in_proj_qkvz, DeepSeek's rope-row reorder), together
    covering every row: each is optimized with the projection's Hessian under its own name and type. None
    otherwise (no split, or a part that is not a row subset: the writer rounds those plainly)."""
    from .plan import derived_type
    parts = fam.gguf_tensors(hp, name)
    if not parts or w.dim() != 2:
        return None
    r, c = w.shape
    i = torch.arange(r, dtype=torch.float64)
    probe = torch.stack([i, 3 * i + 1], dim=1)  # two columns: a value transform cannot pass for a row gather
    out, seen = [], torch.zeros(r, dtype=torch.bool)
    for gname, shape, fn, same_input in parts:
        if not same_input or len(shape) != 2 or shape[1] != c:
            return None
        try:
            p = fn(probe)
        except (RuntimeError, ValueError, IndexError):  # reshapes by the model's dims: not a row gather
            return None
        if p.shape != (shape[0], 2) or not bool((p[:, 1] == 3 * p[:, 0] + 1).all()) or \
                not bool(((p[:, 0] >= 0) & (p[:, 0] < r) & (p[:, 0] == p[:, 0].round())).all()):
            return None
        rows = p[:, 0].long()
        seen[rows] = True
        out.append((gname, types.get(gname) or derived_type(types[name], shape), rows))
    return out if bool(seen.all()) else None


def gptq_gguf_kwargs(graph, q: str, imatrix: dict | None = None, device: str = "cpu", progress: bool = True,
                     calib=None, calib_samples: int = 128, calib_seqlen: int = 512, seed: int = 0,
                     damp: float | None = None, overrides=None, pure: bool = False, samples=None,
                     min_expert_tokens: int = 16, moe_route_all: bool = False, out=None, resume: bool = False,
                     calib_dtype: str | None = None, **_unused) -> dict:
    """{"quantizer": fn} for convert_to_gguf: decoder projections (and experts) get the Hessian-aware
    rounding, computed layer by layer as the writer reaches each layer; everything else (token_embd, output)
    the plain quantizer. resume: finished layers kept next to `out` (calibration.checkpoint)."""
    from ..calibration.data import load_calibration
    from ..calibration.stream import calib_dtype as torch_dtype
    from .plan import plan_types
    from ..errors import BadInput
    from ..families import family_of
    from ..formats.gguf_arch import permute_qk
    from ..graph import ATTN_K, ATTN_Q, parse_name
    t0, phases = _clock(), dict.fromkeys(PHASES, 0.0)
    if damp is None:
        damp = DEFAULT_DAMP
    if not 0 < damp < 1:
        raise BadInput(f"--damp {damp}: expected 0 < damp < 1")
    types = plan_types(graph, q.lower(), overrides, pure, has_imatrix=imatrix is not None)
    if samples is None:
        samples = load_calibration(graph, calib, calib_samples, calib_seqlen, seed)
    hp = graph.hparams
    permute = family_of(hp.arch).gguf_permute_qk
    dtype = torch_dtype(calib_dtype)
    state = None
    if resume:
        from ..calibration.checkpoint import resume_key, resume_dir, ResumeState
        state = ResumeState(resume_dir(out), resume_key(graph, samples, {
            "q": q, "overrides": overrides, "pure": pure, "damp": damp, "imatrix": _digest(imatrix),
            "moe_route_all": moe_route_all, "min_expert_tokens": min_expert_tokens, "optimizer": "gptq",
            "calib_dtype": str(dtype).replace("torch.", "")}))
    pending = _LayerBytes(optimize_layers(graph, types, samples, imatrix, damp, device, progress, moe_route_all,
                                          min_expert_tokens, _LoggedFallbacks(), resume=state, phases=phases,
                                          dtype=dtype))

    def quantizer(name, w, qt, im):
        layer, suffix, _ = parse_name(name)
        got = pending.take(layer, name)
        if got is None:
            return _plain(w, qt, im)
        planned, data = got
        if planned != qt:
            raise BadInput(f"{name}: --optimizer gptq planned {planned.name} but the writer asks for {qt.name}")
        if permute and suffix in (ATTN_Q, ATTN_K):  # block rows follow the weight rows
            data = permute_qk(data, hp.n_heads if suffix == ATTN_Q else hp.n_kv_heads)
        return data.to(w.device)
    quantizer.drain = pending.drain  # a torchrun rank that does not write runs the optimizer without the writer

    def phase_times() -> dict:  # seconds per phase so far; the rest (calibration text, writer, embedding): other
        out = {k: round(v, 3) for k, v in phases.items() if v or k != "experts_s"}
        out["write_and_other_s"] = round(max(0.0, _clock() - t0 - sum(phases.values())), 3)
        return out
    quantizer.phase_times = phase_times
    return {"quantizer": quantizer}


def _digest(imatrix: dict | None) -> str | None:
    if not imatrix:
        return None
    import hashlib
    h = hashlib.sha256()
    for k in sorted(imatrix):
        h.update(k.encode())
        h.update(imatrix[k].float().contiguous().numpy().tobytes())
    return h.hexdigest()


class _LoggedFallbacks(list):
    """Experts the optimizer left to the plain quantizer, each logged as it is decided."""

    def append(self, fb: dict) -> None:
        log.warning("--optimizer gptq: %s expert %d (%d tokens): %s", fb["tensor"], fb["expert"], fb["tokens"],
                    fb["reason"])
        super().append(fb)


class _LayerBytes:
    """The optimizer's per-layer results, computed when the writer first asks for a tensor of that layer
    (the writer goes in layer order, so one layer's bytes are in memory at a time). The writer may ask from
    its producer thread: advancing the calibration is serialised."""

    def __init__(self, layers):
        import threading
        self._layers, self._lock = layers, threading.Lock()
        self._done: dict = {}
        self._last = -1

    def drain(self) -> None:
        """Runs the optimizer to its end, keeping nothing (a rank that does not write, calibration.dist)."""
        for _ in self._layers:
            pass

    def take(self, layer: int | None, name: str):
        if layer is None:
            return None
        with self._lock:
            while self._last < layer:
                try:
                    self._last, part = next(self._layers)
                except StopIteration:
                    self._last = 1 << 62
                    break
                self._done.update(part)
            return self._done.pop(name, None)
