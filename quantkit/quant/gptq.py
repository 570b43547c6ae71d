"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) on the shared integer grid.

Follows the reference implementation: H = 2/N * sum x x^T over calibration tokens,
dead columns, relative damping with automatic increase, upper Cholesky factor of H^-1,
lazy block updates, group params taken at each group's first column, act-order
(descending diag H) with optional static groups, GPTQModel's g_idx convention.

One deliberate difference: when a group starts inside a lazy block, its scale/zero are
computed from the fully updated weights (the reference reads the block-stale copy),
so the result equals the column-by-column algorithm of the paper for any block size.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import torch

from quantkit.errors import QuantkitError
from quantkit.quant import gptq_columns, hessian
from quantkit.quant.cholesky import upper_inverse_factor
from quantkit.quant.grid import (
    QuantizedLinear,
    check_grid_args,
    contiguous_g_idx,
    group_params,
    minmax_params,
    n_groups_for,
)
from quantkit.threads import one_thread

log = logging.getLogger("quantkit.gptq")


def inverse_hessian_cholesky(
    H: torch.Tensor, damp_percent: float, damp_auto_increment: float, name: str = "linear"
) -> tuple[torch.Tensor, float, list[float]]:
    """Upper Cholesky factor U of (H + damp*I)^-1, damp = damp_percent * mean(diag H).

    On failure the damping grows by damp_auto_increment (GPTQModel's rule: the first of damp_percent +
    k * increment, k = 1, 2 ..., below 1 that factors). The k is found by doubling steps, then bisection
    (success grows with the damping), so a Hessian that needs 100 steps costs about 14 factorizations, not
    100. Returns (U, damp_percent used, damp_percents that failed, in the order tried)."""
    if not 0 < damp_percent < 1:
        raise QuantkitError(f"{name}: damp_percent={damp_percent}; expected 0 < damp_percent < 1")
    mean = hessian.diag_mean(H)
    failed: list[float] = []

    def dp(k: int) -> float:
        return round(damp_percent + k * damp_auto_increment, 10)

    def attempt(k: int):
        Hd = H.clone()
        Hd.diagonal().add_(dp(k) * mean)
        U, info = upper_inverse_factor(Hd)
        del Hd
        if info == 0 and bool(torch.isfinite(U).all()):
            return U
        failed.append(dp(k))
        return None

    U = attempt(0)
    if U is not None:
        return U, dp(0), failed
    if damp_auto_increment > 0:
        last = int((1 - damp_percent) / damp_auto_increment)  # the largest k with dp(k) < 1
        while last > 0 and dp(last) >= 1:
            last -= 1
        lo, hi, step, good = 0, None, 1, None  # dp(lo) fails; dp(hi) factors (good)
        while hi is None and lo < last:
            k = min(lo + step, last)
            got = attempt(k)
            if got is None:
                lo, step = k, 2 * step
            else:
                hi, good = k, got
        while hi is not None and hi - lo > 1:
            mid = (lo + hi) // 2
            got = attempt(mid)
            if got is None:
                lo = mid
            else:
                hi, good = mid, got
        if hi is not None:
            log.warning("%s: damp_percent=%.5f too low for Cholesky; %.5f factors (%d tried)", name,
                        damp_percent, dp(hi), len(failed) + 1)
            return good, dp(hi), failed
    raise QuantkitError(
        f"{name}: Hessian is not positive definite with damp_percent up to {max(failed):.4f}; "
        "use more calibration tokens or a larger damp_percent"
    )


GATHER_TOKENS = 2048
GATHER_BYTES = 32 * 2**20


class GPTQ:
    """Accumulates the layer-input Hessian and runs GPTQ on one linear weight [out, in]."""

    def __init__(self, in_features: int, device: torch.device | str | None = None, name: str = "linear",
                 gather: bool = False):
        if in_features <= 0:
            raise QuantkitError(f"{name}: in_features={in_features}; expected > 0")
        self.in_features = in_features
        self.name = name
        self.device = device
        # gather: bf16 inputs on the CPU wait in a buffer until GATHER_TOKENS rows (at most GATHER_BYTES) are
        # there, then go into the sums as one product: a bf16 product's float32 add into the sums is memory-bound,
        # so fewer, deeper products are ~1.6x faster. For dense layers (one accumulator per group); the buffer
        # is flushed whenever the sums are read, so the result depends on the sequence of batches only.
        self._gather = max(1, min(GATHER_TOKENS, GATHER_BYTES // (2 * in_features))) if gather else 0
        self._buf: torch.Tensor | None = None
        self._buf_n = 0
        # H = 2/N * sum x x^T, kept as the raw sum (its lower block triangle) in the canonical order
        # (calibration.dist): a partial per shard of samples, folded into the total shard by shard
        self._raw = self._part = None
        self._n = torch.zeros(1, dtype=torch.int64)
        self._n_part = torch.zeros(1, dtype=torch.int64)
        self._H: torch.Tensor | None = None

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=self.device)

    def _part_sum(self) -> torch.Tensor:
        if self._part is None:
            self._part = self._zeros()
        return self._part

    def parts(self) -> list[torch.Tensor]:
        self._flush()
        return [self._part_sum(), self._n_part]

    def totals(self) -> list[torch.Tensor]:
        self._flush()
        if self._raw is None:
            self._raw = self._zeros()
        self._H = None
        return [self._raw, self._n]

    def _settle(self) -> None:
        """Folds a pending partial (add_batch outside a sharded pass: one shard)."""
        self._flush()
        if int(self._n_part) > 0:
            for tot, part in zip(self.totals(), self.parts()):
                tot += part
                part.zero_()

    @property
    def nsamples(self) -> int:
        """Tokens seen."""
        self._settle()
        return int(self._n)

    @nsamples.setter
    def nsamples(self, value: int) -> None:  # with an H set directly
        self._n.fill_(value)
        self._n_part.zero_()

    @property
    def H(self) -> torch.Tensor:
        if self._H is None:
            self._settle()
            n = int(self._n)
            raw = hessian.symmetric(self.totals()[0])
            self._H = raw.mul_(2.0 / n) if n else raw
        return self._H

    @H.setter
    def H(self, value: torch.Tensor) -> None:
        self._H = value

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add activations x [..., in] (e.g. [batch, seq, in]); mask [...] (bool) keeps real tokens.
        The sums live on the first batch's device."""
        if x.shape[-1] != self.in_features:
            raise QuantkitError(f"{self.name}: activations have {x.shape[-1]} features; expected {self.in_features}")
        if mask is not None:
            if mask.shape != x.shape[:-1]:
                raise QuantkitError(f"{self.name}: mask shape {tuple(mask.shape)}; expected {tuple(x.shape[:-1])}")
            x = x[mask.to(torch.bool)]
        x = x.reshape(-1, self.in_features)
        n = x.shape[0]
        if n == 0:
            return
        if self.device is None:
            self.device = x.device
        x = x.to(self._part_sum().device)  # add_xtx takes it as float32 unless it is bf16 on the CPU
        if self._gather and hessian.bf16_products(x):
            if self._buf_n + n > self._gather:
                self._flush()
            if n < self._gather:
                if self._buf is None:
                    self._buf = x.new_empty(self._gather, self.in_features)
                self._buf[self._buf_n:self._buf_n + n] = x
                self._buf_n += n
                self._H = None
                return
        self._add(x)

    def product(self, x: torch.Tensor) -> tuple:
        """x's share of the sums (hessian.xtx_blocks) and its token count, computed apart from them: on the
        thread that ran the forward, side by side with other samples; add_product adds it in sample order."""
        if x.shape[-1] != self.in_features:
            raise QuantkitError(f"{self.name}: activations have {x.shape[-1]} features; expected {self.in_features}")
        x = x.reshape(-1, self.in_features)
        return (hessian.xtx_blocks(x) if x.shape[0] else None), x.shape[0]

    def add_product(self, share: tuple) -> None:
        blocks, n = share
        if n == 0:
            return
        self._flush()  # gathered batches first: the sums keep the order of the batches
        if self.device is None:
            self.device = blocks[0][0].device
        hessian.add_blocks(self._part_sum(), blocks)
        self._n_part += n
        self._H = None

    def _add(self, x: torch.Tensor) -> None:
        hessian.add_xtx(self._part_sum(), x)  # lower block triangle only; the H property mirrors it
        self._n_part += x.shape[0]
        self._H = None

    def _flush(self) -> None:
        if self._buf_n:
            n, self._buf_n = self._buf_n, 0
            self._add(self._buf[:n])

    @torch.no_grad()
    def _factor(self, dev, dtype, desc_act: bool, damp_percent: float, damp_auto_increment: float):
        """(dead columns, act-order permutation, U, damp_percent used, failed, damp) of the Hessian; kept
        for the next linear of a group sharing this input (q/k/v, gate/up), since it depends on H only."""
        key = (str(dev), dtype, desc_act, damp_percent, damp_auto_increment)
        cache = getattr(self, "_factors", None)
        if cache is not None and cache[0] == key and cache[1] is self._H:
            return cache[2]
        H = self.H.to(device=dev, dtype=dtype).clone()
        if not bool(torch.isfinite(H).all()):
            raise QuantkitError(f"{self.name}: Hessian has non-finite values (NaN/inf activations)")
        dead = H.diagonal() == 0
        H.diagonal()[dead] = 1
        perm = torch.argsort(H.diagonal(), descending=True, stable=True) if desc_act else None
        if perm is not None:
            H = H[perm][:, perm]
        U, dp, failed = inverse_hessian_cholesky(H, damp_percent, damp_auto_increment, self.name)
        out = (dead, perm, U, dp, failed, float(dp * hessian.diag_mean(H)))
        self._factors = (key, self._H, out)
        return out

    @torch.no_grad()
    def quantize(
        self,
        w: torch.Tensor,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        desc_act: bool = False,
        static_groups: bool = False,
        damp_percent: float = 0.01,
        block_size: int = 128,
        damp_auto_increment: float = 0.0025,
        scale_dtype: torch.dtype = torch.float16,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> tuple[QuantizedLinear, dict]:
        """Quantize w [out, in] with the accumulated H; runs on w's device.

        Scales are rounded to scale_dtype before the codes are chosen, so the error feedback
        sees the weights as they will be stored. compute_dtype=float64 is for verification.
        Returns (QuantizedLinear, info) with info: damp_percent (used), damp (absolute),
        damp_failed (percents that failed Cholesky), loss (sum of the per-weight OBS
        losses (w-q)^2 / (2 [H^-1]_qq)), nsamples, dead_columns, time_s.
        """
        t0 = time.perf_counter()
        name = self.name
        if w.dim() != 2 or not w.is_floating_point() or w.shape[1] != self.in_features:
            raise QuantkitError(
                f"{name}: expected a float weight [out, {self.in_features}], got {w.dtype} {tuple(w.shape)}"
            )
        check_grid_args(bits, group_size, self.in_features, name)
        if block_size <= 0:
            raise QuantkitError(f"{name}: block_size={block_size}; expected > 0")
        if self.nsamples == 0:
            raise QuantkitError(f"{name}: no calibration activations were added (call add_batch first)")
        dev = w.device
        W = w.to(dtype=compute_dtype).clone()
        if not bool(torch.isfinite(W).all()):
            raise QuantkitError(f"{name}: weight has non-finite values")
        out_f, n = W.shape
        maxq = 2**bits - 1
        dead, perm, U, dp, failed, damp = self._factor(dev, compute_dtype, desc_act, damp_percent, damp_auto_increment)
        W[:, dead] = 0

        dynamic = group_size != -1 and not static_groups
        gs = n if group_size == -1 else group_size
        n_groups = n_groups_for(n, group_size)
        if dynamic:
            scales = W.new_zeros(out_f, n_groups)
            zeros = torch.zeros(out_f, n_groups, dtype=torch.int32, device=dev)
        else:
            scales, zeros = group_params(W, bits, group_size, sym, scale_dtype)
        zeros_f = zeros.to(compute_dtype)
        if perm is not None:
            W = W[:, perm]

        # group of each column in processing order (fixed params only)
        fixed_group = contiguous_g_idx(n, group_size, dev)
        if perm is not None:
            fixed_group = fixed_group[perm]
        fixed_group = fixed_group.tolist()

        codes = torch.empty(out_f, n, dtype=torch.uint8, device=dev)
        loss = W.new_zeros(())
        s = z = None
        # small weights: one thread throughout (GPTQ's per-column steps are small ops, which a thread team only
        # slows down: 17 s vs 0.7 s for a 576 x 1536 solve on a busy 2-core machine); large ones keep the
        # caller's threads for the lazy updates
        big = out_f * n >= 1 << 24
        compiled = gptq_columns.usable(W, U)
        threads = torch.get_num_threads()  # the compiled column steps split rows over the caller's threads
        with one_thread() if not big else contextlib.nullcontext():
            for i1 in range(0, n, block_size):
                i2 = min(i1 + block_size, n)
                W1 = W[:, i1:i2].clone()
                Err1 = torch.zeros_like(W1)
                U1 = U[i1:i2, i1:i2]
                i = 0
                while i < i2 - i1:  # segments of columns sharing one scale/zero
                    j = i1 + i
                    if dynamic:
                        if j % gs == 0:
                            je = min(j + gs, n)
                            cols = W1[:, i : min(je, i2) - i1]
                            if je > i2:  # group runs past the block: apply the pending lazy update
                                rest = W[:, i2:je] - Err1[:, :i] @ U[i1:j, i2:je]
                                cols = torch.cat([cols, rest], dim=1)
                            s, zi = minmax_params(cols, bits, sym, scale_dtype)
                            scales[:, j // gs] = s
                            zeros[:, j // gs] = zi
                            z = zi.to(compute_dtype)
                        end = min(i2, (j // gs + 1) * gs) - i1
                    else:
                        g = fixed_group[j]
                        s, z = scales[:, g], zeros_f[:, g]
                        end = i + 1
                        while end < i2 - i1 and fixed_group[i1 + end] == g:
                            end += 1
                    if compiled:
                        loss += gptq_columns.segment(W1, Err1, U1, codes, s, z, i, end, i1, maxq, threads)
                    else:
                        with one_thread() if big else contextlib.nullcontext():
                            for ii in range(i, end):
                                wc = W1[:, ii]
                                c = torch.clamp(torch.round(wc / s) + z, 0, maxq)
                                codes[:, i1 + ii] = c.to(torch.uint8)
                                err = (wc - s * (c - z)) / U1[ii, ii]
                                loss += err.square().sum()
                                W1[:, ii:].addmm_(err[:, None], U1[ii, ii:][None], alpha=-1)  # addr_ is ~100x slower
                                Err1[:, ii] = err
                    i = end
                if i2 < n:
                    W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)

        g_idx = contiguous_g_idx(n, group_size, dev)
        if perm is not None:
            invperm = torch.argsort(perm)
            codes = codes[:, invperm]
            if dynamic:
                g_idx = g_idx[invperm]
        ql = QuantizedLinear(
            codes=codes,
            scales=scales.to(scale_dtype),
            zeros=zeros,
            g_idx=g_idx,
            bits=bits,
            group_size=group_size,
            sym=sym,
            desc_act=desc_act,
            bias=bias,
        )
        info = {
            "damp_percent": dp,
            "damp": damp,
            "damp_failed": failed,
            "loss": float(loss) / 2,
            "nsamples": self.nsamples,
            "dead_columns": int(dead.sum()),
            "time_s": time.perf_counter() - t0,
        }
        return ql, info


class Timed:
    """A GPTQ accumulator whose Hessian work (add_batch, product / add_product, and the flush of gathered
    batches when a pass reads its parts) counts as phases["statistics_s"]."""

    def __init__(self, acc: GPTQ, phases: dict):
        self.acc, self.phases = acc, phases
        self.share, self._lock = 1.0, threading.Lock()

    def _timed(self, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        with self._lock:
            self.phases["statistics_s"] += time.perf_counter() - t
        return out

    def add_batch(self, x) -> None:
        self._timed(self.acc.add_batch, x)

    def product(self, x):
        """acc.product on a forward's thread: its seconds count as `share` of their time (1 / the threads
        that run side by side), so that the phases still add up to the wall time."""
        t = time.perf_counter()
        out = self.acc.product(x)
        with self._lock:
            self.phases["statistics_s"] += (time.perf_counter() - t) * self.share
        return out

    def add_product(self, share) -> None:
        self._timed(self.acc.add_product, share)

    def parts(self):
        return self._timed(self.acc.parts)

    def totals(self):
        return self._timed(self.acc.totals)
