"""--optimizer gptq: Hessian-aware rounding inside the GGUF block formats.

Oracles: gguf's own dequantizer (the bytes are valid blocks), llama.cpp's ggml_quantize_chunk (with H = I
the optimizer must reduce to llama.cpp's imatrix quantizer), a textbook H-weighted error, llama.cpp loading
the CLI's output file.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

from quantkit.errors import QuantkitError
from quantkit.quant.ggml_types import dequantize, quantize
from quantkit.quant.kquant_gptq import gptq_quantize

TYPES = [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q4_0, QT.Q5_0, QT.Q4_1, QT.Q5_1, QT.Q8_0]
KQ = (QT.Q4_K, QT.Q5_K, QT.Q6_K)


pytestmark = pytest.mark.usefixtures("one_thread")


def problem(seed=0, rows=48, n=512, tokens=1536):
    """Correlated activations with uneven column scales, as real layer inputs have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * 0.15 + torch.eye(n)
    X = (torch.randn(tokens, n, generator=g) @ mix) * (0.2 + 2 * torch.rand(n, generator=g))
    H = X.T @ X / tokens
    W = torch.randn(rows, n, generator=g) * 0.05
    W[:, :3] *= 8  # a few outlier columns
    return W, H.double()


def h_err(W, Q, H):
    d = (W.double() - Q.double())
    return float(((d @ H) * d).sum())


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_valid_bytes_and_lower_h_error(qt):
    W, H = problem()
    data, info = gptq_quantize(W, qt, H.float())
    assert data.dtype == torch.uint8
    ref = torch.from_numpy(gguf_dequantize(data.numpy(), qt).reshape(W.shape).astype(np.float32))
    assert torch.equal(ref, dequantize(data, qt, W.shape[1]))
    plain = dequantize(quantize(W, qt, H.diagonal().float()), qt, W.shape[1])
    e_opt, e_plain = h_err(W, ref, H), h_err(W, plain, H)
    assert e_opt < 0.85 * e_plain, (e_opt, e_plain)
    assert info["loss_h"] == pytest.approx(e_opt, rel=1e-3)


@pytest.mark.llamacpp
@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_identity_hessian_reduces_to_llamacpp(qt):
    """H = I: no error feedback, so every column is rounded to nearest on llama.cpp's own grid."""
    from oracles import ggml_lib
    W, _ = problem(seed=1, rows=32, n=256)
    n = W.shape[1]
    ones = torch.ones(n)
    data, _ = gptq_quantize(W, qt, torch.eye(n), imatrix=ones)
    ref = torch.from_numpy(ggml_lib.quantize(W.numpy(), int(qt), None if qt == QT.Q8_0 else ones.numpy()))
    if qt in KQ:  # k-quants: llama.cpp's final codes are the nearest ones on the stored grid too
        assert torch.equal(data, ref)
        return
    hb = {QT.Q4_1: 4, QT.Q5_1: 4}.get(qt, 2)
    blk_bytes = data.shape[1] // (n // 32)
    assert torch.equal(data.reshape(-1, blk_bytes)[:, :hb], ref.reshape(-1, blk_bytes)[:, :hb])  # same d (, m)
    deq = torch.from_numpy(gguf_dequantize(data.numpy(), qt).reshape(W.shape).astype(np.float32))
    d = torch.from_numpy(gguf_dequantize(ref.numpy(), qt).reshape(W.shape).astype(np.float32))
    step = torch.from_numpy(np.frombuffer(ref.reshape(-1, blk_bytes)[:, :2].numpy().tobytes(), np.float16)
                            .astype(np.float32)).repeat_interleave(32).reshape(W.shape)  # signed d
    lo, hi = {QT.Q4_0: (-8, 7), QT.Q5_0: (-16, 15), QT.Q8_0: (-128, 127)}.get(qt, (None, None))
    # nearest grid point: never farther from W than llama.cpp's value, and within half a step unless clamped
    assert bool(((W - deq).abs() <= (W - d).abs() + 1e-6).all())
    if lo is not None:
        inside = ((W / step) > lo) & ((W / step) < hi)
        assert bool(((W - deq).abs()[inside] <= 0.5 * step.abs()[inside] * (1 + 1e-5)).all())


def test_error_feedback_matches_textbook_for_one_block():
    """Q8_0 on one 32-column block: the codes equal GPTQ written out with the full inverse Hessian (OBS
    update of H^-1 after each column, float64) on the grid d = fp16(max|w| / 127) of the block."""
    W, H = problem(seed=2, rows=8, n=32, tokens=256)
    data, _ = gptq_quantize(W, QT.Q8_0, H.float(), damp_percent=0.01)
    d = torch.from_numpy((W.abs().amax(1).numpy() / np.float32(127)).astype(np.float16).astype(np.float64))
    stored = np.frombuffer(data[:, :2].numpy().tobytes(), np.float16).astype(np.float64)
    assert np.array_equal(stored, d.numpy())
    Hd = H.clone()
    Hd.diagonal().add_(0.01 * H.diagonal().mean())
    Hinv = torch.linalg.inv(Hd)
    Wk = W.double().clone()
    codes = torch.empty_like(Wk)
    for j in range(32):
        codes[:, j] = torch.clamp(torch.round(Wk[:, j] / d), -128, 127)
        err = (Wk[:, j] - codes[:, j] * d) / Hinv[j, j]
        Wk[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    got = data[:, 2:].contiguous().view(torch.int8).double()
    assert int((got != codes).sum()) <= 1  # float32 vs float64: at most a near-tie may round the other way


def test_bad_input():
    W, H = problem(rows=4, n=256)
    with pytest.raises(QuantkitError, match="Q3_K"):
        gptq_quantize(W, QT.Q3_K, H.float())
    with pytest.raises(QuantkitError, match="multiple"):
        gptq_quantize(W[:, :96], QT.Q4_K, H[:96, :96].float())
    with pytest.raises(QuantkitError, match="Hessian"):
        gptq_quantize(W, QT.Q4_K, H[:32, :32].float())


@pytest.mark.support("kquants", "llamacpp", family="llama")
@pytest.mark.llamacpp
def test_cli_optimizer_gptq_file_loads_in_llamacpp(tmp_path, smollm_tokenizer_dir, jargon_text):
    import os
    import subprocess
    import sys

    from gguf import GGUFReader
    from oracles.llamacpp_model import LlamaModel
    from tiny_models import make_tiny

    from quantkit.families import load
    from quantkit.pipeline import convert
    from quantkit.runtime import executor_for
    d = make_tiny("llama_gqa_llama3", tmp_path / "m", hidden=256, ffn=512, layers=2, vocab=49152)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    calib = tmp_path / "calib.txt"
    calib.write_text(jargon_text[:40_000])
    outs = {"none": tmp_path / "none.gguf", "gptq": tmp_path / "gptq.gguf"}
    convert(d, outs["none"], to="gguf", q="q4_k_m", progress=False)
    r = subprocess.run([sys.executable, "-m", "quantkit", "convert", str(d), "--to", "gguf", "--q", "q4_k_m", "-o",
                        str(outs["gptq"]), "--optimizer", "gptq", "--calib", str(calib), "--calib-samples", "8",
                        "--calib-seqlen", "64", "--json", "--no-progress"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "QUANTKIT_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["types"]["blk.0.ffn_down.weight"] in ("Q4_K", "Q6_K")
    # seconds per phase for benchmarks/calibrated_speed.py (no MoE here: no experts phase)
    assert set(summary["phase_times"]) == {"forward_s", "statistics_s", "solve_s", "write_and_other_s"}
    assert all(v >= 0 for v in summary["phase_times"].values())
    rd = {k: {t.name: t for t in GGUFReader(p).tensors} for k, p in outs.items()}
    assert {n: t.tensor_type for n, t in rd["none"].items()} == {n: t.tensor_type for n, t in rd["gptq"].items()}
    # outside the decoder layers: the plain quantizer; inside: different (Hessian-aware) codes
    assert np.array_equal(rd["none"]["token_embd.weight"].data, rd["gptq"]["token_embd.weight"].data)
    assert np.array_equal(rd["none"]["output.weight"].data, rd["gptq"]["output.weight"].data)
    assert not np.array_equal(rd["none"]["blk.1.ffn_down.weight"].data, rd["gptq"]["blk.1.ffn_down.weight"].data)
    ids = [1] + [int(t) for t in torch.randint(2, 49152, (47,), generator=torch.Generator().manual_seed(0))]
    with LlamaModel(outs["gptq"], n_ctx=64, n_threads=1) as m:
        ref = torch.from_numpy(m.logits(ids))
    ours = executor_for(load(outs["gptq"]))(torch.tensor([ids]))[0].float()
    assert torch.isfinite(ref).all()
    assert float((ours - ref).abs().max()) < 2e-2 * float(ref.abs().max())


def test_true_sequential_hessians_from_transformers(tmp_path, smollm_tokenizer_dir, jargon_text):
    """Layer 0 of a tiny Llama: q's bytes come from H of q_proj's input, o's bytes from H of o_proj's input
    *with q/k/v already on their quantized values* -- both Hessians recomputed here with transformers."""
    import transformers
    from tiny_models import make_tiny

    from quantkit.calibration.data import load_calibration
    from quantkit.export import plan_types
    from quantkit.families import load
    from quantkit.graph import blk
    from quantkit.quant.kquant_gptq import optimize_graph
    d = make_tiny("llama_gqa_llama3", tmp_path / "m", hidden=256, ffn=512, layers=2, vocab=49152)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    calib = tmp_path / "calib.txt"
    calib.write_text(jargon_text[:20_000])
    g = load(d)
    types = plan_types(g, "q4_k_m")
    samples = load_calibration(g, calib, 4, 64, 0)
    done = optimize_graph(g, types, samples, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    attn = model.model.layers[0].self_attn

    def hessian(mod):
        xs = []
        h = mod.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).double()))
        with torch.no_grad():
            model(torch.stack(samples))
        h.remove()
        x = torch.cat(xs)
        return (2 * x.T @ x / x.shape[0]).float()

    def match(name, mod, H):
        qt, data = done[name]
        mine, _ = gptq_quantize(mod.weight.detach(), qt, H)
        return float((mine == data).float().mean())
    assert match(blk(0, "attn_q"), attn.q_proj, hessian(attn.q_proj)) > 0.99
    H_float = hessian(attn.o_proj)
    for s, mod in (("attn_q", attn.q_proj), ("attn_k", attn.k_proj), ("attn_v", attn.v_proj)):
        qt, data = done[blk(0, s)]
        mod.weight.data = dequantize(data, qt, mod.weight.shape[1])
    seq = match(blk(0, "attn_output"), attn.o_proj, hessian(attn.o_proj))
    assert seq > 0.99
    assert seq > match(blk(0, "attn_output"), attn.o_proj, H_float)


def test_bad_options(tmp_path):
    from tiny_models import make_tiny

    from quantkit.families import load
    from quantkit.quant.gguf_calibrated import calibrated_gguf_kwargs
    g = load(make_tiny("llama_mha", tmp_path / "m", hidden=64, ffn=128, layers=1, vocab=256))
    with pytest.raises(QuantkitError, match="--calib"):
        calibrated_gguf_kwargs(g, q="q4_k_m", optimizer="gptq", progress=False)
    with pytest.raises(QuantkitError, match="--awq"):
        calibrated_gguf_kwargs(g, q="q4_k_m", optimizer="gptq", awq_fold=True, progress=False)
    with pytest.raises(QuantkitError, match="--damp"):
        calibrated_gguf_kwargs(g, q="q4_k_m", optimizer="gptq", damp=1.5, progress=False)


def test_row_parts_accepts_only_row_gathers_covering_every_row():
    """What --optimizer gptq optimizes under a split tensor's own name: row subsets of the projection (checked
    by probing the family's function), together covering it; a value change, a reshape, a part with other
    inputs or uncovered rows leave the split to the writer's plain rounding."""
    from quantkit.quant.kquant_gptq import row_parts

    class Fam:
        def __init__(self, parts):
            self.parts = parts

        def gguf_tensors(self, hp, name):
            return self.parts
    w, types = torch.zeros(6, 4), {"x": 1, "a": 2, "b": 3}
    odd, even = (lambda w: w[[5, 3, 1]]), (lambda w: w[[0, 2, 4]])
    got = row_parts(Fam([("a", (3, 4), odd, True), ("b", (3, 4), even, True)]), None, "x", w, types)
    assert [(n, t, r.tolist()) for n, t, r in got] == [("a", 2, [5, 3, 1]), ("b", 3, [0, 2, 4])]
    for parts in ([("a", (6, 4), lambda w: w * 2, True)], [("a", (3, 8), lambda w: w.reshape(3, 8), True)],
                  [("a", (3, 4), odd, True), ("b", (3, 4), even, False)], [("a", (3, 4), odd, True)]):
        assert row_parts(Fam(parts), None, "x", w, types) is None
