"""Calibrated outputs do not depend on the number of CPU threads (torchrun ranks run on one thread, a plain run
on all cores). MKL's potrf/potri, some of its GEMMs and torch's full sums give other bits at other thread
counts; GPTQ's factor of H^-1 (quant/cholesky), hessian.total and few-row products (threads.few_rows) must not:
checked bit for bit at 1, 2 and 3 threads and against float64 references, then whole conversions (GPTQ
safetensors, --optimizer gptq GGUF) in processes with OMP_NUM_THREADS=1 and 2 (torchrun against one process on
2 threads: tests/test_distributed.py)."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.quant import cholesky
from quantkit.quant.gptq import inverse_hessian_cholesky
from quantkit.quant.hessian import diag_mean, total
from quantkit.threads import FEW_ROWS, few_rows, map_single_threaded
from test_distributed import tree_bytes, with_tokenizer
from tiny_models import make_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def hessian(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """2/T X^T X (float32) of correlated inputs whose column scales span e^0..e^4, as real activations do;
    tokens < n makes it singular (the damping must carry it)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    mix = torch.randn(n, n, generator=g, dtype=f64) / n ** 0.5 + torch.eye(n, dtype=f64)
    X = torch.randn(tokens, n, generator=g, dtype=f64) @ mix
    X *= torch.rand(n, generator=g, dtype=f64).mul(4).exp()
    return (X.T @ X * (2 / tokens)).float()


@pytest.mark.parametrize("n,tokens", [(64, 256), (135, 300), (300, 150), (1000, 2000)])  # not multiples of 128 but 64
def test_factor_same_bits_at_1_2_3_threads_and_close_to_float64(n, tokens, restore_threads):
    H = hessian(n, tokens)
    got = []
    for t in (1, 2, 3):
        torch.set_num_threads(t)
        U, dp, failed = inverse_hessian_cholesky(H, 0.01, 0.0025)
        assert dp == 0.01 and failed == []
        got.append(U)
    assert all(torch.equal(got[0], u) for u in got[1:])
    U = got[0].double()
    Hd = H.clone()
    Hd.diagonal().add_(0.01 * diag_mean(H))  # the float32 matrix it factors
    inv = torch.linalg.inv(Hd.double())
    assert torch.equal(U, U.triu()) and bool((U.diagonal() > 0).all())
    # float32 LAPACK (the previous code: potrf, potri, potrf) is at 2e-7 .. 3.4e-6 on these, this at 2e-7 .. 3.2e-6
    assert float((U.T @ U - inv).norm() / inv.norm()) < 1e-5
    Uref = torch.linalg.cholesky(inv, upper=True)
    assert float((U - Uref).norm() / Uref.norm()) < 1e-5


@pytest.mark.parametrize("n,block", [(1, 4), (37, 8), (64, 16), (130, 32)])
def test_blocked_steps_match_float64_lapack(n, block):
    H = hessian(n, 2 * n + 4, seed=n).double()
    H.diagonal().add_(0.01 * H.diagonal().mean())
    L, info = cholesky.cholesky_lower(H, block)
    assert info == 0 and torch.allclose(L, torch.linalg.cholesky(H), rtol=0, atol=1e-10 * float(L.abs().max()))
    X = cholesky.tri_inverse_lower(L, block)
    ref = torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype), upper=False)
    assert torch.allclose(X, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    ref = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    for U, info in (cholesky.upper_inverse_factor(H, block), cholesky._upper_inverse_factor_whole(H)):  # CPU, CUDA
        assert info == 0 and torch.allclose(U, ref, rtol=1e-8, atol=1e-10 * float(U.abs().max()))


def test_not_positive_definite_reports_the_column():
    """Leading block PD, a later pivot negative: LAPACK's info (1-based column), no factor."""
    A = torch.eye(40, dtype=torch.float64) * 2
    A[25, 25] = -1
    assert cholesky.cholesky_lower(A, 8)[1] == 26
    assert cholesky.upper_inverse_factor(A, 8) == (None, 40 - 25)  # it factors the reversed matrix
    assert cholesky._upper_inverse_factor_whole(A) == (None, 40 - 25)  # the CUDA path


def test_indefinite_hessian_increases_damping_then_fails_without_increment(caplog):
    """min eigenvalue -3.1 % of mean diag on n = 300 (several blocks): the damping is the first 0.25 % step past
    it (GPTQModel's rule), found with a few factorizations (doubling steps, then bisection), one warning."""
    n = 300
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(1.0, 3.0, n, dtype=torch.float64)
    lam[0] = -0.031 * float(lam[1:].sum()) / (n + 0.031)  # -3.1 % of the mean eigenvalue (= mean diag)
    H = (Q * lam) @ Q.T
    H = ((H + H.T) / 2).float()
    with caplog.at_level(logging.WARNING, logger="quantkit.gptq"):
        U, dp, failed = inverse_hessian_cholesky(H, 0.01, 0.0025, "blk.0.q")
    Hd = H.double()
    mean = Hd.diagonal().mean()
    eye = torch.eye(n, dtype=torch.float64)
    k = round((dp - 0.01) / 0.0025)
    assert failed and failed[0] == 0.01 and dp == pytest.approx(0.01 + 0.0025 * k) and dp not in failed
    assert torch.linalg.eigvalsh(Hd + max(failed) * mean * eye).min() < 0
    assert torch.linalg.eigvalsh(Hd + (dp - 0.0025) * mean * eye).min() < 0  # the step below does not factor
    assert torch.linalg.eigvalsh(Hd + dp * mean * eye).min() > 0
    assert k >= 8 and len(failed) + 1 <= 2 * math.ceil(math.log2(k)) + 2  # not one factorization per step
    assert sum("too low for Cholesky" in r.message for r in caplog.records) == 1
    inv = torch.linalg.inv(Hd + dp * mean * eye)
    assert float((U.double().T @ U.double() - inv).norm() / inv.norm()) < 1e-5  # 1.9e-6 measured (cond 1e3)
    with pytest.raises(QuantkitError, match="blk.0.q: Hessian is not positive definite"):
        inverse_hessian_cholesky(H, 0.01, 0, "blk.0.q")


def test_map_single_threaded_runs_items_side_by_side_on_one_torch_thread_each(restore_threads):
    """The linears of a group (q/k/v, gate/up) and a layer's experts are rounded side by side: every item sees
    one torch thread, results come back in order, and the caller's thread count is restored."""
    import threading
    torch.set_num_threads(2)
    seen = []

    def fn(x):
        seen.append((torch.get_num_threads(), threading.current_thread().name))
        return x * x
    assert map_single_threaded(fn, list(range(7))) == [x * x for x in range(7)]
    assert {n for n, _ in seen} == {1} and torch.get_num_threads() == 2
    assert all(t.startswith("quantkit-map") for _, t in seen)
    seen.clear()
    torch.set_num_threads(1)
    assert map_single_threaded(fn, [3, 4]) == [9, 16] and {n for n, _ in seen} == {1}


def test_in_order_computes_ahead_on_one_thread_and_stops_cleanly(restore_threads):
    """Calibration forwards samples side by side (threads.in_order): results in order, each on one torch
    thread, at most AHEAD * width submitted ahead of the consumer; closing early leaves nothing running."""
    import contextlib
    import threading
    import time
    from quantkit.threads import AHEAD, in_order
    started, running = [], []

    def fn(i):
        started.append(i)
        running.append(i)
        time.sleep(0.02)
        running.remove(i)
        return i, torch.get_num_threads(), threading.current_thread().name
    got = list(in_order(fn, 9, 3))
    assert [r[0] for r in got] == list(range(9)) and {r[1] for r in got} == {1}
    assert all(r[2].startswith("quantkit-ahead") for r in got)
    started.clear()
    with contextlib.closing(in_order(fn, 50, 2)) as it:
        for i, _n, _t in it:
            assert max(started) <= i + AHEAD * 2 - 1  # never more than AHEAD * width in flight
            if i == 4:
                break
    assert not running and max(started) <= 4 + AHEAD * 2 - 1
    torch.set_num_threads(1)
    assert [r[:2] for r in in_order(fn, 3, 1)] == [(0, 1), (1, 1), (2, 1)]


def test_run_layer_replays_side_effects_in_sample_order(restore_threads):
    """Layer passes with hooks (imatrix, AWQ capture, MoE expert Hessians) forward samples side by side on the
    CPU: what a hook puts on the tape reaches the caller's thread in sample order, with the sample's global
    index; the outputs are each sample's one-thread outputs; a Stop ends that sample's forward."""
    import threading
    from quantkit.calibration.stream import ActivationStore, Stop, Tape, run_layer
    torch.manual_seed(0)
    n, t, d = 7, 48, 32
    w = torch.randn(d, d) / d ** 0.5
    store = ActivationStore(n, t, d, index=[10 + 2 * j for j in range(n)], n_total=30)
    for j in range(n):
        store[j] = torch.randn(t, d)

    class Layer(torch.nn.Module):
        def __init__(self, tape, stop=False):
            super().__init__()
            self.tape, self.stop = tape, stop
            self.lin = torch.nn.Linear(d, d, bias=False)
            self.lin.weight.data = w

        def forward(self, x, cos, sin):
            y = self.lin(x)
            self.tape.put(lambda y=y: seen.append((self.tape.sample, threading.current_thread().name,
                                                   y.clone())))
            if self.stop:
                raise Stop
            return torch.tanh(y) + x

    ref = []
    with torch.no_grad():
        torch.set_num_threads(1)
        for j in range(n):
            ref.append(torch.tanh(store[j][None] @ w.T) + store[j][None])
    for threads_ in (1, 2, 3):
        torch.set_num_threads(threads_)
        seen = []
        out = ActivationStore(n, t, d)
        run_layer(Layer(Tape()), store, (None, None), "cpu", torch.float32, out)
        assert [s[0] for s in seen] == store.index  # replayed in sample order, with the global index
        assert {s[1] for s in seen} == {threading.current_thread().name}
        assert all(torch.equal(out[j], ref[j][0]) for j in range(n))
        seen = []
        run_layer(Layer(Tape(), stop=True), store, (None, None), "cpu", torch.float32)
        assert [s[0] for s in seen] == store.index
        assert torch.get_num_threads() == threads_


def test_total_same_bits_at_1_2_3_threads(restore_threads):
    """Full sums that steer choices (GPTQ's damping unit, AWQ's search losses): torch's own sum of this tensor
    (float32 or float64) takes other bits at 2 or 3 threads than at 1 (torch 2.13, MKL); total() must not, and
    stays float64-accurate."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6144, 1536, generator=g).square()
    H = torch.rand(5000, 5000, generator=g)
    got = []
    for k in (1, 2, 3):
        torch.set_num_threads(k)
        got.append((total(t), total(t[:, 7]), diag_mean(H)))
    assert all(a == b for a, b in zip(got[0], got[1])) and all(a == b for a, b in zip(got[0], got[2]))
    assert got[0][0].dtype == torch.float64
    assert float(got[0][0]) == pytest.approx(float(t.double().sum()), rel=1e-13)
    assert float(got[0][1]) == pytest.approx(math.fsum(t[:, 7].double().tolist()), rel=1e-14)
    assert got[0][2].dtype == torch.float32
    assert float(got[0][2]) == pytest.approx(math.fsum(H.diagonal().double().tolist()) / 5000, rel=1e-7)


def test_products_with_few_rows_same_bits_at_1_2_3_threads(restore_threads):
    """An expert's handful of routed tokens: MKL computes x [5..11 rows] @ W with other bits at 2 threads than
    at 1 (MKL 2024.2 in torch 2.13); under few_rows they must not differ, and stay float64-close."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(96, 64, generator=g)
    for rows in (1, 5, 7, 9, 11, FEW_ROWS - 1):
        x = torch.randn(rows, 64, generator=g)
        got = []
        for k in (1, 2, 3):
            torch.set_num_threads(k)
            with few_rows(x):
                got.append(x @ W.T)
            assert torch.get_num_threads() == k
        assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
        assert torch.allclose(got[0].double(), x.double() @ W.double().T, rtol=0, atol=1e-4)


@pytest.mark.parametrize("qtype,rows,n", [("Q4_K", 577, 512), ("Q6_K", 200, 256), ("Q5_0", 300, 96),
                                           ("Q8_0", 130, 64)])
def test_gptq_rounding_row_chunks_same_bytes_at_1_2_3_threads(qtype, rows, n, monkeypatch, restore_threads):
    """--optimizer gptq rounds a linear's rows in one chunk per torch thread, each chunk on one thread (rows are
    independent given the factor of H^-1): the bytes must be those of the whole matrix on one thread."""
    from gguf import GGMLQuantizationType as QT

    from quantkit.quant import kquant_gptq
    g = torch.Generator().manual_seed(3)
    W = torch.randn(rows, n, generator=g) * torch.rand(n, generator=g).mul(3).exp()
    H = hessian(n, 2 * n, seed=4)
    calls = []
    real = kquant_gptq._round_rows
    monkeypatch.setattr(kquant_gptq, "_round_rows", lambda W, *a: calls.append(W.shape[0]) or real(W, *a))
    got = []
    for t in (1, 2, 3):
        torch.set_num_threads(t)
        calls.clear()
        got.append(kquant_gptq.gptq_quantize(W, QT[qtype], H, loss=False)[0])
        k = max(1, min(t, rows // kquant_gptq.MIN_CHUNK_ROWS))  # chunks of at least MIN_CHUNK_ROWS rows
        assert sorted(calls) == sorted(rows * (i + 1) // k - rows * i // k for i in range(k))
        assert torch.get_num_threads() == t
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


# ---------------------------------------------------------------- whole conversions in processes

CASES = {
    "gptq": (["--to", "safetensors", "--method", "gptq", "--bits", "4", "--group-size", "64"], "q"),
    "optimizer": (["--to", "gguf", "--q", "q4_k_m", "--optimizer", "gptq"], "q.gguf"),
    "awq": (["--to", "safetensors", "--method", "awq", "--bits", "4", "--group-size", "64"], "q"),
    # bf16 forwards (oneDNN) and their float32 statistics
    "gptq_bf16": (["--to", "safetensors", "--method", "gptq", "--bits", "4", "--group-size", "64",
                   "--calib-dtype", "bfloat16"], "q"),
    "optimizer_bf16": (["--to", "gguf", "--q", "q4_k_m", "--optimizer", "gptq", "--calib-dtype", "bfloat16"],
                       "q.gguf"),
    # `quantkit imatrix` (its own command: chunks of the token stream)
    "imatrix": (["imatrix", "--ctx", "128", "--chunks", "8"], "imatrix.gguf"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm_tokenizer_dir, jargon_text):
    d = tmp_path_factory.mktemp("threads")
    m = with_tokenizer(make_tiny("llama_gqa_llama3", d / "m", hidden=256, ffn=768, layers=2, vocab=49152),
                       smollm_tokenizer_dir)
    (d / "calib.txt").write_text(jargon_text[:100_000])
    return m, d / "calib.txt"


@pytest.mark.parametrize("case", sorted(CASES))
def test_conversion_same_bytes_at_1_and_2_threads(case, tiny, tmp_path):
    model, calib = tiny
    flags, name = CASES[case]
    got = {}
    for t in (1, 2):
        out = tmp_path / f"t{t}" / name
        out.parent.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("MKL_NUM_THREADS", "QUANTKIT_THREADS")}
        env.update(OMP_NUM_THREADS=str(t), PYTHONPATH=str(ROOT))
        cmd = (["imatrix", str(model), *flags[1:]] if flags[0] == "imatrix" else
               ["convert", str(model), *flags, "--calib-samples", "8", "--calib-seqlen", "128"])
        r = subprocess.run([sys.executable, "-m", "quantkit", *cmd, "--calib", str(calib), "-o", str(out),
                            "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        got[t] = tree_bytes(out)
    assert got[1] and got[1] == got[2]
