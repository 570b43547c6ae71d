"""AWQ: scale folding keeps the float function (transformers as oracle), AWQ beats RTN with outlier channels,
keep-fp16 picks the salient channels (activations measured through transformers), the GGUF --awq fold keeps
llama.cpp's logits, and bad options fail with clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tiny_models import make_tiny

from quantkit.errors import QuantkitError
from quantkit.families import load
from quantkit.graph import LazyTensor, blk
from quantkit.quant.awq import (AWQConfig, AWQLinear, fold_graph, quantize_linear, quantized_graph, run_awq,
                                search_clip)
from quantkit.jobs.awq import awq_to_safetensors
from quantkit.runtime import executor_for


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("awq_tiny")
    return {k: make_tiny(k, root / k) for k in ("llama_mha", "llama_gqa_llama3", "mistral", "qwen2", "qwen3")}


def samples(n=4, t=32, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (t,), generator=g) for _ in range(n)]


def hf_model(d: Path):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()


@pytest.mark.support("awq")
@pytest.mark.parametrize("kind", ["llama_mha", "llama_gqa_llama3", "mistral", "qwen2", "qwen3"])
def test_scale_folding_keeps_float_function(tiny, kind):
    g = load(tiny[kind])
    res = run_awq(g, samples(), AWQConfig(group_size=32), progress=False, quantize=False)
    prevs = {(i, grp.prev) for i, grp, _ in res.scales}
    mha = g.hparams.n_kv_heads == g.hparams.n_heads
    assert ((0, "attn_v") in prevs) == mha  # v -> o only without GQA, as AutoAWQ
    assert {(0, "attn_norm"), (0, "ffn_norm"), (0, "ffn_up"), (1, "attn_norm")} <= prevs
    assert all(float(s.std()) > 1e-3 for *_, s in res.scales)  # the scales really move weights
    folded = fold_graph(g, res.fold_plan())
    assert not torch.equal(folded[blk(0, "attn_q")].load(), g[blk(0, "attn_q")].load())
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf_model(tiny[kind])(ids).logits
    got = executor_for(folded)(ids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def outlier_graph(d: Path, factor=30.0, channels=(3, 17, 40)):
    """Norm weights with a few large channels: activation outliers, as in real LLMs."""
    g = load(d)
    idx = torch.tensor(channels)

    def boost(w):
        w = w.clone()
        w[idx] *= factor
        return w
    t = dict(g.tensors)
    for i in range(g.hparams.n_layers):
        for s in ("attn_norm", "ffn_norm"):
            t[blk(i, s)] = g[blk(i, s)].map(boost)
    return g.with_tensors(t)


def logits_error(graph, ref, ids):
    return float((executor_for(graph)(ids) - ref).pow(2).mean())


def rtn_graph(g, bits, gs):
    t = dict(g.tensors)
    for i in range(g.hparams.n_layers):
        for s in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            w = g[blk(i, s)].load().float()
            ql = quantize_linear(w, bits, gs, False)
            t[blk(i, s)] = LazyTensor(w.shape, "F32", lambda ql=ql: ql.dequantize())
    return g.with_tensors(t)


@pytest.mark.support("awq", family="llama")
def test_awq_beats_rtn_with_outlier_channels(tiny):
    g = outlier_graph(tiny["llama_mha"])
    cal = samples(8, 32, seed=1)
    ids = torch.stack(samples(2, 32, seed=2))
    ref = executor_for(g)(ids)
    e_rtn = logits_error(rtn_graph(g, 4, 32), ref, ids)
    res = run_awq(g, cal, AWQConfig(group_size=32), progress=False)
    e_awq = logits_error(quantized_graph(g, res), ref, ids)
    res_k = run_awq(g, cal, AWQConfig(group_size=32, keep_fp16=5.0), progress=False)
    e_keep = logits_error(quantized_graph(g, res_k), ref, ids)
    assert e_awq < 0.7 * e_rtn, (e_awq, e_rtn)
    assert e_keep < e_awq, (e_keep, e_awq)


def test_awq_8bit_and_per_channel(tiny):
    g = load(tiny["qwen2"])
    ids = torch.stack(samples(2, 32, seed=2))
    ref = executor_for(g)(ids)
    errs = {}
    for bits, gs in ((8, 32), (4, -1), (4, 16)):
        res = run_awq(g, samples(), AWQConfig(bits=bits, group_size=gs), progress=False)
        a = res.quantized[blk(0, "ffn_down")]
        assert a.ql.bits == bits and a.ql.group_size == gs
        assert a.ql.scales.shape[1] == (1 if gs == -1 else 128 // gs)
        errs[bits, gs] = logits_error(quantized_graph(g, res), ref, ids)
    assert errs[8, 32] < errs[4, 16] < errs[4, -1]


def test_partial_last_group_in_memory():
    """576 = 4.5 * 128: the grid holds a last partial group (the file layouts refuse it)."""
    w = torch.randn(16, 72, generator=torch.Generator().manual_seed(0))
    ql = quantize_linear(w, 4, 32, False)
    assert ql.scales.shape == (16, 3)
    last = w[:, 64:].abs() + 0.05  # all positive: zero padding would wrongly stretch the range down to 0
    ql = quantize_linear(torch.cat([w[:, :64], last], 1), 4, 32, False)
    step = (last.amax(1) - last.amin(1)) / 15  # the partial group's own min/max range
    assert torch.equal(ql.scales[:, 2], step.to(torch.float16).float())
    # AutoAWQ's pseudo_quantize_tensor on the 8 columns alone (its zero is clamped into [0, 15] too)
    sc = step.to(torch.float16).float()[:, None]
    z = (-torch.round(last.amin(1, keepdim=True) / sc)).clamp(0, 15)
    want = (torch.clamp(torch.round(last / sc) + z, 0, 15) - z) * sc
    assert torch.equal(ql.dequantize()[:, 64:], want)


def test_clip_search_reduces_output_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    w[:, 5] *= 12  # an outlier weight column widens its group's range
    x = torch.randn(256, 64, generator=g)
    mv = search_clip(w, x, 4, 32, False, AWQConfig())
    org = w.abs().reshape(32, 2, 32).amax(-1)
    assert bool((mv <= org + 1e-6).all()) and bool((mv >= 0.5 * org - 1e-6).all())
    assert bool((mv < org).any())
    from quantkit.quant.awq import apply_clip, fake_quant
    e0 = (x @ (fake_quant(w, 4, 32, False) - w).T).pow(2).mean()
    e1 = (x @ (fake_quant(apply_clip(w, mv, 32), 4, 32, False) - w).T).pow(2).mean()
    assert e1 < e0


def test_keep_fp16_picks_salient_channels(tiny):
    """The kept columns are the top-k of mean |x / s| of the linear's input, with x measured by hooks on
    the transformers model, and hold the float16 of the scaled float weight."""
    d = tiny["llama_gqa_llama3"]
    g = load(d)
    cal = samples(4, 32, seed=3)
    res = run_awq(g, cal, AWQConfig(group_size=16, keep_fp16=10.0), progress=False)
    plan = res.fold_plan()
    folded = fold_graph(g, plan)
    model = hf_model(d)
    seen = {}
    mods = {"attn_q": model.model.layers[1].self_attn.q_proj, "ffn_down": model.model.layers[1].mlp.down_proj,
            "attn_output": model.model.layers[1].self_attn.o_proj}
    def hook(n):
        return lambda m, a, o: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))
    hooks = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    with torch.no_grad():
        model(torch.stack(cal))
    for h in hooks:
        h.remove()
    for n in mods:
        x = torch.cat(seen[n])
        col = plan.get(blk(1, n), (None, None))[0]
        if col is not None:
            x = x / col
        a: AWQLinear = res.quantized[blk(1, n)]
        k = math.floor(x.shape[1] * 0.10 + 0.5)
        want = torch.topk(x.abs().mean(0), k).indices.sort().values
        assert torch.equal(a.fp16_idx.long(), want), n
        w = folded[blk(1, n)].load()
        assert torch.equal(a.fp16_cols, w[:, want].to(torch.float16))
        assert a.ql.in_features == x.shape[1] - k
        dense = a.dequantize()
        assert torch.equal(dense[:, want], w[:, want].to(torch.float16).float())


@pytest.mark.support("awq", "out_awq", family="llama")
def test_awq_checkpoint_end_to_end(tiny, tmp_path):
    """convert --method awq (samples given directly): the written checkpoint loads, its weights are the
    run's dequantized weights, and the executor's logits stay close to the float model's."""
    g = load(tiny["llama_mha"])
    out = tmp_path / "awq"
    r = awq_to_safetensors(g, out, group_size=32, samples=samples(), progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "awq"
    assert (out / "quantkit_report.json").exists() and r["bits_per_weight"] < 16
    back = load(out)
    ids = torch.stack(samples(2, 24, seed=9))
    ref = executor_for(g)(ids)
    got = executor_for(back)(ids)
    assert float((got - ref).pow(2).mean()) < 0.05 * float(ref.var())
    # same run in memory gives the same weights (deterministic), norms folded the same way
    res = run_awq(g, samples(), AWQConfig(group_size=32), progress=False)
    mem = quantized_graph(g, res)
    for n in ("attn_v", "ffn_down"):  # read back exactly: (code - zero) * fp16 scale
        assert torch.equal(back[blk(1, n)].load(), mem[blk(1, n)].load())
    assert torch.equal(back[blk(1, "attn_norm")].load(), mem[blk(1, "attn_norm")].load().to(torch.float16))


def test_awq_features_past_the_budget_spill_to_disk_same_checkpoint(tiny, tmp_path, monkeypatch):
    """A layer's captured inputs past FEATURE_BUDGET live in temporary files: the checkpoint is the same."""
    import quantkit.calibration.stream as stream
    import quantkit.quant.awq as awq
    g = load(tiny["llama_gqa_llama3"])
    awq_to_safetensors(g, tmp_path / "ram", group_size=32, keep_fp16=1.0, samples=samples(), progress=False)
    made = []
    real = stream.tempfile.NamedTemporaryFile
    monkeypatch.setattr(stream.tempfile, "NamedTemporaryFile", lambda **kw: made.append(kw) or real(**kw))
    monkeypatch.setattr(awq, "FEATURE_BUDGET", 0)
    awq_to_safetensors(g, tmp_path / "disk", group_size=32, keep_fp16=1.0, samples=samples(), progress=False)
    assert len(made) >= 4 * 2  # q, o, gate, down inputs of both layers went to files
    files = sorted(p.name for p in (tmp_path / "ram").iterdir() if p.suffix == ".safetensors")
    assert files
    for f in files:
        assert (tmp_path / "ram" / f).read_bytes() == (tmp_path / "disk" / f).read_bytes(), f


def test_option_errors(tiny, tmp_path):
    g = load(tiny["llama_mha"])
    with pytest.raises(QuantkitError, match="4-bit weights only"):
        awq_to_safetensors(g, tmp_path / "a", bits=8, group_size=32, samples=samples())
    with pytest.raises(QuantkitError, match="multiple of --group-size 128"):
        awq_to_safetensors(g, tmp_path / "b", group_size=128, samples=samples())
    with pytest.raises(QuantkitError, match="keep-fp16"):
        awq_to_safetensors(g, tmp_path / "c", st_format="compressed-tensors", keep_fp16=1.0, group_size=32,
                           samples=samples())
    with pytest.raises(QuantkitError, match="percentage"):
        awq_to_safetensors(g, tmp_path / "d", keep_fp16=100.0, group_size=32, samples=samples())
    with pytest.raises(QuantkitError, match="GPTQ options"):
        awq_to_safetensors(g, tmp_path / "e", desc_act=True, samples=samples())
    from quantkit.quant.gguf_calibrated import calibrated_gguf_kwargs
    with pytest.raises(QuantkitError, match="GGUF cannot hold per-channel"):
        calibrated_gguf_kwargs(g, "q4_k_m", awq_fold=True, keep_fp16=1.0)
    assert not any(tmp_path.iterdir())  # nothing written on failure


# ---------------------------------------------------------------- GGUF --awq, llama.cpp as the oracle

def small_smollm(smollm_gguf, n_layers=2):
    """The real SmolLM2 (its tokenizer, its shapes) cut to its first layers."""
    import dataclasses
    g = load(smollm_gguf)
    hp = dataclasses.replace(g.hparams, n_layers=n_layers)
    keep = {n: t for n, t in g.tensors.items() if not n.startswith("blk.") or int(n.split(".")[1]) < n_layers}
    return g.with_tensors(keep, hparams=hp)


@pytest.mark.llamacpp
@pytest.mark.slow
def test_gguf_awq_fold_keeps_llamacpp_logits(smollm_gguf, jargon_text, tmp_path):
    from oracles.llamacpp_model import LlamaModel

    from quantkit.export import convert_to_gguf
    from quantkit.eval.tokens import encode
    from quantkit.quant.gguf_calibrated import awq_gguf_kwargs
    g = small_smollm(smollm_gguf)
    ids, _ = encode(g, jargon_text[:20000])
    cal = [torch.tensor(ids[k * 64:(k + 1) * 64]) for k in range(4)]
    kw = awq_gguf_kwargs(g, "f32", progress=False, samples=cal)
    plain, scaled = tmp_path / "plain.gguf", tmp_path / "awq.gguf"
    convert_to_gguf(g, plain, q="f32", progress=False)
    convert_to_gguf(g, scaled, q="f32", progress=False, **kw)
    test_ids = ids[1000:1064]
    with LlamaModel(plain, n_ctx=64) as m:
        a = m.logits(test_ids)
    with LlamaModel(scaled, n_ctx=64) as m:
        b = m.logits(test_ids)
    # the folded model is the same function: only float rounding differs
    assert abs(a - b).max() < 2e-3 * abs(a).max()
    w0 = load(plain)[blk(0, "attn_q")].load()
    w1 = load(scaled)[blk(0, "attn_q")].load()
    assert (w0 - w1).abs().max() > 1e-3  # the weights really were rescaled


def test_variants_share_one_search(tiny):
    """One scale search, several post-fold configs: each equals its own full run."""
    g = load(tiny["qwen3"])
    base, keep = AWQConfig(group_size=32), AWQConfig(group_size=32, keep_fp16=4.0)
    both = run_awq(g, samples(), base, progress=False, variants={"a": base, "k": keep})
    solo = run_awq(g, samples(), keep, progress=False)
    for name, a in solo.quantized.items():
        b = both["k"].quantized[name]
        assert torch.equal(a.fp16_idx, b.fp16_idx) and torch.equal(a.ql.codes, b.ql.codes), name
    assert all(torch.equal(s1, s2) for (*_, s1), (*_, s2) in zip(solo.scales, both["a"].scales))
    assert both["a"].quantized[blk(0, "attn_q")].fp16_idx is None
