"""DeepSeek V3.2 (MLA + DSA lightning indexer) and MiniMax-Text-01 / M1 (lightning attention + softmax
attention, MoE): tiny random models from transformers' own classes are the oracle; GGUF against llama.cpp
where llama.cpp has the architecture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hybrid_models import hf_logits, ids_for, make_deepseek_v32, make_minimax

from quantkit.export import convert_to_gguf, convert_to_safetensors
from quantkit.families import load
from quantkit.runtime import executor_for

transformers = pytest.importorskip("transformers")

VOCAB = 49152  # SmolLM2's tokenizer (conftest's smollm_tokenizer_dir) gives GGUF files a vocabulary


def _kld(base: torch.Tensor, q: torch.Tensor) -> float:
    p, lq = torch.log_softmax(base.double(), -1), torch.log_softmax(q.double(), -1)
    return float((p.exp() * (p - lq)).sum(-1).mean())


# ------------------------------------------------------------------------------------------ DeepSeek V3.2

@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    return make_deepseek_v32(tmp_path_factory.mktemp("v32") / "hf")


@pytest.fixture(scope="module")
def v32_tok(tmp_path_factory, smollm_tokenizer_dir):
    return make_deepseek_v32(tmp_path_factory.mktemp("v32_tok") / "hf", vocab=VOCAB, tok_dir=smollm_tokenizer_dir)


@pytest.fixture(scope="module")
def v32_gguf(v32_tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("v32_gguf") / "f32.gguf"
    convert_to_gguf(load(v32_tok), out, q="f32", progress=False)
    return out


@pytest.mark.support("load", "run", family="deepseek32")
@pytest.mark.parametrize("t", [8, 32])  # index_topk 8: dense attention, then the indexer's top-8 of 32
def test_v32_executor_matches_transformers(v32, t, one_thread):
    ids = ids_for(256, t)
    g = load(v32)
    assert g.hparams.arch == "deepseek32" and "blk.0.indexer.attn_q_b.weight" in g
    torch.testing.assert_close(executor_for(g)(ids), hf_logits(v32, ids), atol=2e-5, rtol=1e-4)


def test_v32_sparse_selection_matters(v32, one_thread):
    """Past index_topk the indexer changes the output (so the comparison above checks it)."""
    g = load(v32)
    ids = ids_for(256, 32)
    sparse = executor_for(g)(ids)
    g.hparams.extra["index_topk"] = 64
    assert (executor_for(g)(ids) - sparse)[0, 8:].abs().max() > 1e-3


@pytest.mark.support("out_safetensors", family="deepseek32")
def test_v32_safetensors_export_loads_in_transformers(v32, tmp_path, one_thread):
    convert_to_safetensors(load(v32), tmp_path / "out", dtype="f32", progress=False)
    ids = ids_for(256, 32)
    torch.testing.assert_close(hf_logits(tmp_path / "out", ids), hf_logits(v32, ids), atol=0, rtol=0)


@pytest.mark.support("out_gguf", family="deepseek32")
def test_v32_gguf_metadata_and_tensor_names(v32_gguf):
    from gguf import GGUFReader
    r = GGUFReader(v32_gguf)
    kv = {f.name: f.contents() for f in r.fields.values()}
    t = {x.name: tuple(int(s) for s in x.shape) for x in r.tensors}
    a = "deepseek32"
    assert kv["general.architecture"] == a and kv[f"{a}.attention.indexer.head_count"] == 16
    assert kv[f"{a}.attention.indexer.key_length"] == 64 and kv[f"{a}.attention.indexer.top_k"] == 8
    assert kv[f"{a}.expert_gating_func"] == 2 and kv[f"{a}.attention.q_lora_rank"] == 32
    assert t["blk.0.indexer.attn_q_b.weight"] == (32, 1024) and t["blk.0.indexer.attn_k.weight"] == (64, 64)
    assert t["blk.0.indexer.proj.weight"] == (64, 16) and t["blk.0.indexer.k_norm.bias"] == (64,)
    assert "blk.1.attn_k_b.weight" in t and "blk.1.attn_kv_b.weight" not in t


@pytest.mark.support("out_gguf", "llamacpp", family="deepseek32")
@pytest.mark.llamacpp
@pytest.mark.parametrize("t", [8, 32])
def test_v32_llamacpp_logits_match_transformers(v32_tok, v32_gguf, t):
    from oracles.llamacpp_model import LlamaModel
    ids = ids_for(VOCAB, t)
    ref = hf_logits(v32_tok, ids)[0].numpy()
    with LlamaModel(v32_gguf, n_ctx=64, exact=True) as m:
        got = m.logits(ids[0].tolist())
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.support("out_gguf", "gguf_in", "out_safetensors", family="deepseek32")
def test_v32_gguf_read_back_matches_transformers(v32_tok, v32_gguf, tmp_path, one_thread):
    g = load(v32_gguf)
    assert g.hparams.arch == "deepseek32" and g.hparams.extra["index_topk"] == 8
    ids = ids_for(VOCAB, 32)
    ref = hf_logits(v32_tok, ids)
    torch.testing.assert_close(executor_for(g)(ids), ref, atol=2e-5, rtol=1e-4)
    convert_to_safetensors(g, tmp_path / "hf", dtype="f32", progress=False)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["DeepseekV32ForCausalLM"]
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), ref, atol=2e-5, rtol=1e-4)


def test_v32_gguf_refuses_small_indexer_heads(tmp_path, smollm_tokenizer_dir):
    from quantkit.errors import UnsupportedArchitecture
    d = make_deepseek_v32(tmp_path / "hf", vocab=VOCAB, tok_dir=smollm_tokenizer_dir, index_head_dim=16)
    with pytest.raises(UnsupportedArchitecture, match="index_head_dim 16 is not a multiple of 64"):
        convert_to_gguf(load(d), tmp_path / "x.gguf", q="f32", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def _dequantized(g, res):
    from quantkit.graph import LazyTensor
    new = dict(g.tensors)
    for n, ql in res.linears.items():
        w = ql.dequantize().float()
        new[n] = LazyTensor(w.shape, "F32", lambda w=w: w)
    for n, qls in res.experts.items():
        w = torch.stack([q.dequantize().float() for q in qls])
        new[n] = LazyTensor(w.shape, "F32", lambda w=w: w)
    return g.with_tensors(new)


def _gptq_vs_rtn(g, vocab, expect, float_only, t=32):
    """4-bit g16 RTN and GPTQ over every declared linear; KLD of each dequantized model vs the float one."""
    from quantkit.quant.gptq_driver import GridOptions, quantize_graph
    samples = [ids_for(vocab, t, seed=s)[0] for s in range(16)]
    ids = ids_for(vocab, t, seed=99)
    base = executor_for(g)(ids)
    kld = {}
    for method in ("rtn", "gptq"):
        res = quantize_graph(g, samples if method == "gptq" else None,
                             GridOptions(method=method, bits=4, group_size=16, min_expert_tokens=4), progress=False)
        assert expect <= set(res.linears), expect - set(res.linears)
        assert not any(k in n for n in res.linears for k in float_only)
        got = executor_for(_dequantized(g, res))(ids)
        assert torch.isfinite(got).all()
        kld[method] = _kld(base, got)
    return kld


@pytest.mark.support("gptq", family="deepseek32")
def test_v32_gptq_end_to_end(v32, one_thread):
    """GPTQ reaches the indexer's q/k projections (sharing Hessians with q_b / q_a) besides MLA and the
    experts; the indexer's head weights and key norm stay float. Compared at seq_len = index_topk: past it,
    which 8 keys the indexer keeps flips under any 4-bit rounding (even with a float indexer, as the hidden
    states move) and those discrete flips, not the weight error, dominate the KLD at this size."""
    kld = _gptq_vs_rtn(load(v32), 256, {"blk.1.indexer.attn_q_b.weight", "blk.1.indexer.attn_k.weight",
                                        "blk.1.attn_q_b.weight", "blk.2.ffn_down_shexp.weight"},
                       ("indexer.proj", "indexer.k_norm"), t=8)
    print(f"\ndeepseek32 4-bit g16 KLD vs float (seq 8): {kld}")
    assert 0 < kld["gptq"] < 0.9 * kld["rtn"], kld


@pytest.mark.support("kquants", family="deepseek32")
@pytest.mark.llamacpp
def test_v32_q4_k_m_equals_llama_quantize_and_runs_in_llamacpp(tmp_path, smollm_tokenizer_dir, one_thread):
    """Hidden 256 (real k-quant blocks): our q4_k_m file holds llama.cpp's llama_model_quantize bytes and types
    for every tensor (indexer included), and llama.cpp runs it close to the f32 GGUF. Weights at transformers'
    init 0.02: at the fixtures' 0.1 each 256-wide projection has gain ~1.6 and the random net amplifies any
    rounding (q4_k_m KLD 0.61 there, llama-quantize's file and our executor on the same weights alike)."""
    from gguf import GGUFReader

    from oracles.llamacpp_model import LlamaModel, quantize_file
    from quantkit.export import FILE_TYPES
    d = make_deepseek_v32(tmp_path / "hf", vocab=VOCAB, tok_dir=smollm_tokenizer_dir, hidden_size=256,
                          intermediate_size=256, moe_intermediate_size=256, initializer_range=0.02)
    g = load(d)
    for q in ("f32", "q4_k_m"):
        convert_to_gguf(g, tmp_path / f"{q}.gguf", q=q, progress=False)
    quantize_file(tmp_path / "f32.gguf", tmp_path / "ref.gguf", int(FILE_TYPES["q4_k_m"]))
    a, b = ({t.name: t for t in GGUFReader(tmp_path / p).tensors} for p in ("q4_k_m.gguf", "ref.gguf"))
    assert {k: t.tensor_type.name for k, t in a.items()} == {k: t.tensor_type.name for k, t in b.items()}
    assert a["blk.1.indexer.attn_q_b.weight"].tensor_type.name != "F32"  # quantized, as llama-quantize does
    assert [k for k in a if not np.array_equal(np.asarray(a[k].data), np.asarray(b[k].data))] == []
    ids = ids_for(VOCAB, 8)
    logits = {}
    for q in ("f32", "q4_k_m"):
        with LlamaModel(tmp_path / f"{q}.gguf", n_ctx=64, exact=True) as m:
            logits[q] = torch.from_numpy(np.asarray(m.logits(ids[0].tolist())))
    k = _kld(logits["f32"], logits["q4_k_m"])
    print(f"\nDeepSeek V3.2 hidden 256: q4_k_m KLD vs f32 in llama.cpp {k:.5f}")
    assert 0 < k < 0.01, k


# ------------------------------------------------------------------------------------------ MiniMax

@pytest.fixture(scope="module")
def minimax(tmp_path_factory):
    return make_minimax(tmp_path_factory.mktemp("minimax") / "hf")


@pytest.mark.support("load", "run", family="minimax")
@pytest.mark.parametrize("t", [10, 40])  # 40: past transformers' 16-token lightning blocks
def test_minimax_executor_matches_transformers(minimax, t, one_thread):
    ids = ids_for(256, t)
    g = load(minimax)
    assert g.hparams.extra["linear_layers"] == [1, 3] and "blk.1.attn_qkv.weight" in g and "blk.0.attn_q.weight" in g
    torch.testing.assert_close(executor_for(g)(ids), hf_logits(minimax, ids), atol=2e-5, rtol=1e-4)


def test_minimax_residual_factors_and_decay_matter(minimax, one_thread):
    """The comparison above checks the post-norm residual factors and the lightning decay only if they
    change the output."""
    from quantkit.blocks import lightning
    g = load(minimax)
    ids = ids_for(256, 40)
    base = executor_for(g)(ids)
    g.hparams.extra["linear_attn_alpha_factor"] = 1.0
    assert (executor_for(g)(ids) - base).abs().max() > 1e-3
    g.hparams.extra["linear_attn_alpha_factor"] = 1.2
    orig = lightning.slopes
    try:
        lightning.slopes = lambda hp, layer: orig(hp, layer) * 2
        assert (executor_for(g)(ids) - base).abs().max() > 1e-4
    finally:
        lightning.slopes = orig


@pytest.mark.support("out_safetensors", family="minimax")
def test_minimax_safetensors_export_loads_in_transformers(minimax, tmp_path, one_thread):
    """Written without the decay buffers (transformers recomputes them on load)."""
    convert_to_safetensors(load(minimax), tmp_path / "out", dtype="f32", progress=False)
    from safetensors import safe_open
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert "model.layers.1.self_attn.qkv_proj.weight" in f.keys()
        assert not any(k.endswith("slope_rate") for k in f.keys())
    ids = ids_for(256, 40)
    torch.testing.assert_close(hf_logits(tmp_path / "out", ids), hf_logits(minimax, ids), atol=0, rtol=0)


@pytest.mark.support("gptq", family="minimax")
def test_minimax_gptq_end_to_end(tmp_path, one_thread):
    """GPTQ reaches the lightning projections (qkv and the output gate share one Hessian), attention and
    every expert; the lightning norm stays float. Weights at init 0.1 (at transformers' 0.02 the post-norm
    residual leaves the logits nearly independent of them: KLDs ~1e-6)."""
    d = make_minimax(tmp_path / "hf", initializer_range=0.1)
    kld = _gptq_vs_rtn(load(d), 256, {"blk.1.attn_qkv.weight", "blk.1.attn_gate.weight", "blk.1.attn_output.weight",
                                      "blk.0.attn_q.weight"}, ("attn_norm_2",))
    print(f"\nminimax 4-bit g16 KLD vs float: {kld}")
    assert 0 < kld["gptq"] < kld["rtn"], kld


# llama.cpp's minimax-01 holds one residual scale for every alpha and no betas
GGUF_FACTORS = dict(full_attn_alpha_factor=1.3, linear_attn_alpha_factor=1.3, mlp_alpha_factor=1.3,
                    full_attn_beta_factor=1.0, linear_attn_beta_factor=1.0, mlp_beta_factor=1.0, rms_norm_eps=1e-6)


@pytest.fixture(scope="module")
def minimax_gguf(tmp_path_factory, smollm_tokenizer_dir):
    work = tmp_path_factory.mktemp("minimax_gguf")
    d = make_minimax(work / "hf", vocab=VOCAB, tok_dir=smollm_tokenizer_dir, **GGUF_FACTORS)
    convert_to_gguf(load(d), work / "f32.gguf", q="f32", progress=False)
    return d, work / "f32.gguf"


@pytest.mark.support("out_gguf", family="minimax")
def test_minimax_gguf_metadata(minimax_gguf):
    from gguf import GGUFReader
    r = GGUFReader(minimax_gguf[1])
    kv = {f.name: f.contents() for f in r.fields.values()}
    t = {x.name: tuple(int(s) for s in x.shape) for x in r.tensors}
    a = "minimax-01"
    assert kv["general.architecture"] == a and abs(kv[f"{a}.residual_scale"] - 1.3) < 1e-6
    assert kv[f"{a}.attention.recurrent_layers"] == [False, True, False, True]
    assert t["blk.1.attn_qkv.weight"] == (64, 192) and t["blk.1.attn_gate.weight"] == (64, 64)
    assert t["blk.1.attn_norm_2.weight"] == (64,) and "blk.0.attn_q.weight" in t and "blk.1.attn_q.weight" not in t
    assert t["blk.0.ffn_gate_exps.weight"] == (64, 96, 4)


@pytest.mark.support("out_gguf", "llamacpp", family="minimax")
@pytest.mark.llamacpp
def test_minimax_llamacpp_logits_match_transformers(minimax_gguf):
    from oracles.llamacpp_model import LlamaModel
    d, out = minimax_gguf
    ids = ids_for(VOCAB, 40)
    ref = hf_logits(d, ids)[0].numpy()
    with LlamaModel(out, n_ctx=64, exact=True) as m:
        got = m.logits(ids[0].tolist())
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.support("out_gguf", "gguf_in", "out_safetensors", family="minimax")
def test_minimax_gguf_read_back_matches_transformers(minimax_gguf, tmp_path, one_thread):
    d, out = minimax_gguf
    g = load(out)
    assert g.hparams.arch == "minimax" and g.hparams.extra["linear_layers"] == [1, 3]
    ids = ids_for(VOCAB, 40)
    ref = hf_logits(d, ids)
    torch.testing.assert_close(executor_for(g)(ids), ref, atol=2e-5, rtol=1e-4)
    convert_to_safetensors(g, tmp_path / "hf", dtype="f32", progress=False)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), ref, atol=2e-5, rtol=1e-4)


def test_minimax_gguf_refuses_factors_llamacpp_lacks(minimax, tmp_path):
    """The default tiny model has distinct alphas and betas != 1: llama.cpp would compute another model."""
    from quantkit.errors import UnsupportedArchitecture
    with pytest.raises(UnsupportedArchitecture, match="residual alphas .* differ.*mlp_beta_factor"):
        convert_to_gguf(load(minimax), tmp_path / "x.gguf", q="f32", progress=False)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.support("llamacpp", family="deepseek32")
@pytest.mark.llamacpp
def test_v32_llamacpp_runs_our_q8_0(v32_tok, tmp_path, one_thread):
    """Quantized deepseek32 (the indexer's attn_q_b / attn_k / proj as Q8_0, as llama-quantize types them):
    llama.cpp loads it and, at seq_len <= index_topk, follows our executor on the same dequantized weights up
    to its Q8_0 activations. (Past index_topk, near-tied index scores flip under that activation rounding, so
    single positions can differ a lot: not compared.)"""
    from gguf import GGUFReader

    from oracles.llamacpp_model import LlamaModel
    out = tmp_path / "q8.gguf"
    convert_to_gguf(load(v32_tok), out, q="q8_0", progress=False)
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.1.indexer.attn_q_b.weight"] == "Q8_0" and types["blk.1.indexer.k_norm.weight"] == "F32"
    ids = ids_for(VOCAB, 8)
    ours = executor_for(load(out))(ids)[0].numpy()
    with LlamaModel(out, n_ctx=64, exact=True) as m:
        got = m.logits(ids[0].tolist())
    assert np.abs(got - ours).max() < 0.25


def _gptq_checkpoint_in_transformers(src, tmp_path, jargon_text, t):
    """The CLI end to end: GPTQ from calibration text into a compressed-tensors checkpoint that transformers
    loads and runs like our executor on the same checkpoint (and away from the float model)."""
    from quantkit.cli import main
    (tmp_path / "calib.txt").write_text(jargon_text[:20_000])
    out = tmp_path / "ct"
    main([str(a) for a in ("convert", src, "-o", out, "--to", "safetensors", "--method", "gptq", "--format",
                           "compressed-tensors", "--group-size", "16", "--calib", tmp_path / "calib.txt",
                           "--calib-samples", "8", "--calib-seqlen", "32", "--no-progress")])
    ids = ids_for(VOCAB, t)
    got = hf_logits(out, ids)
    torch.testing.assert_close(got, executor_for(load(out))(ids), atol=2e-2, rtol=2e-2)
    assert (got - hf_logits(src, ids)).abs().max() > 1e-3
    return json.loads((out / "config.json").read_text())["quantization_config"]


@pytest.mark.support("out_ct", family="deepseek32")
def test_v32_gptq_checkpoint_runs_in_transformers(v32_tok, tmp_path, jargon_text, one_thread):
    """At seq_len = index_topk (past it, f16 weight rounding between the two engines flips near-tied index
    scores). The indexer's float head weights are listed in the config's ignore (transformers has a Linear)."""
    qc = _gptq_checkpoint_in_transformers(v32_tok, tmp_path, jargon_text, 8)
    assert "model.layers.1.self_attn.indexer.weights_proj" in qc["ignore"]


@pytest.mark.support("out_ct", family="minimax")
def test_minimax_gptq_checkpoint_runs_in_transformers(tmp_path, jargon_text, smollm_tokenizer_dir, one_thread):
    d = make_minimax(tmp_path / "hf", vocab=VOCAB, tok_dir=smollm_tokenizer_dir, initializer_range=0.1)
    _gptq_checkpoint_in_transformers(d, tmp_path, jargon_text, 40)


@pytest.mark.support("kquants", "llamacpp", family="minimax")
def test_minimax_q4_k_m_with_imatrix_in_llamacpp(tmp_path, smollm_tokenizer_dir, jargon_text, one_thread):
    """Widths that take real k-quant blocks (256 columns): an importance matrix from our calibration reaches the
    lightning and softmax attention and the experts; q4_k_m with and without it runs in llama.cpp close to the
    f32 GGUF there (KLD on text like the calibration's, reported)."""
    from oracles.llamacpp_model import LlamaModel
    from quantkit.calibration.imatrix import imatrix_from_calib, write_imatrix_gguf
    from quantkit.cli import main
    from quantkit.eval.tokens import encode
    d = make_minimax(tmp_path / "hf", vocab=VOCAB, tok_dir=smollm_tokenizer_dir, hidden_size=256,
                     intermediate_size=256, head_dim=64, **GGUF_FACTORS)
    (tmp_path / "calib.txt").write_text(jargon_text[:30_000])
    im = imatrix_from_calib(load(d), tmp_path / "calib.txt", n_ctx=64, n_chunks=8, progress=False)
    assert {"blk.0.attn_q.weight", "blk.0.ffn_gate_exps.weight"} <= set(im.sums)
    write_imatrix_gguf(im, tmp_path / "im.gguf")
    ids = torch.tensor(encode(load(d), jargon_text[-6000:])[0][:40])[None]
    logits = {}
    for k, args in {"f32": ["--q", "f32"], "q4_k_m": ["--q", "q4_k_m"],
                    "q4_k_m imatrix": ["--q", "q4_k_m", "--imatrix", tmp_path / "im.gguf"]}.items():
        out = tmp_path / f"{k.replace(' ', '_')}.gguf"
        main([str(a) for a in ("convert", d, "-o", out, "--no-progress", *args)])
        with LlamaModel(out, n_ctx=64, exact=True) as m:
            logits[k] = torch.from_numpy(np.asarray(m.logits(ids[0].tolist())))
    kl = {k: _kld(logits["f32"], v) for k, v in logits.items() if k != "f32"}
    print(f"\nMiniMax tiny: KLD vs f32 in llama.cpp {kl}")
    assert all(0 < v < 0.1 for v in kl.values()), kl



@pytest.mark.support("rtn", family=lambda kind: {"v32": "deepseek32", "minimax": "minimax"}[kind])
@pytest.mark.parametrize("kind", ["v32", "minimax"])
def test_rtn_matches_textbook(kind, tmp_path, smollm_tokenizer_dir):
    """--method rtn on every projection (MLA and the indexer's, lightning qkv / gate, experts): each equals a
    textbook symmetric 4-bit RTN (scale 2 max|w| / 15 in fp16, codes round(w / scale) + 8)."""
    from quantkit.cli import main
    from quantkit.families.registry import quantizable
    make = make_deepseek_v32 if kind == "v32" else make_minimax
    src = make(tmp_path / "hf", vocab=VOCAB, tok_dir=smollm_tokenizer_dir)
    out = tmp_path / "rtn"
    main([str(a) for a in ("convert", src, "-o", out, "--to", "safetensors", "--method", "rtn", "--group-size",
                           "16", "--no-progress")])
    orig, back = load(src), load(out)
    names = quantizable(orig)
    assert any("exps" in n for n in names) and len(names) > 10
    for n in names:
        w = orig[n].load().float()
        g = w.reshape(*w.shape[:-1], -1, 16)
        scale = (2 * g.abs().amax(-1, keepdim=True) / 15).half().float()
        want = ((torch.clamp(torch.round(g / scale) + 8, 0, 15) - 8) * scale).reshape(w.shape)
        assert torch.equal(back[n].load().float(), want), n
