"""MiniMax-M2 (MiniMaxM2ForCausalLM): tiny random models from transformers' own class are the oracle.

Our executor against transformers (float32, eager attention); our GGUF (llama.cpp's minimax-m2) against
llama.cpp, read back by quantkit, and against what llama.cpp's converter writes; GPTQ and q4_k_m + imatrix end
to end; safetensors export read by transformers.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from frontier_models import (VOCAB, assert_same_tensors, dequantized, gguf_contents, gguf_of, hf_logits, ids_for,
                             kld, llamacpp_logits, make_tiny, their_gguf)

transformers = pytest.importorskip("transformers")
A = "minimax-m2"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm_tokenizer_dir):
    root, made = tmp_path_factory.mktemp("minimax"), {}

    def get(vocab=256):
        if vocab not in made:
            tok = smollm_tokenizer_dir if vocab == VOCAB else None
            made[vocab] = make_tiny("minimax_m2", root / f"m_{vocab}", vocab=vocab, tok_dir=tok)
        return made[vocab]
    return get


@pytest.mark.support("load", "run", family="minimax-m2")
def test_executor_matches_transformers(tiny, one_thread):
    from quantkit.families import load
    from quantkit.runtime import executor_for
    d = tiny()
    g = load(d)
    hp = g.hparams
    assert (hp.arch, hp.rope_dim, hp.n_experts, hp.expert_ffn_size, hp.moe_layers) == (A, 16, 4, 32, None)
    assert g["blk.0.attn_q_norm.weight"].shape == (128,) and g["blk.0.attn_k_norm.weight"].shape == (64,)
    assert g["blk.1.exp_probs_b.bias"].shape == (4,) and g["blk.1.ffn_down_exps.weight"].shape == (4, 64, 32)
    ids = ids_for(256, batch=2)
    torch.testing.assert_close(executor_for(g)(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)


def test_options_matter(tiny, one_thread):
    """The selection bias, the partial rotary and the full-width q/k norm each change the logits here."""
    from quantkit.families import load
    from quantkit.runtime import executor_for
    ids = ids_for(256)
    ref = hf_logits(tiny(), ids)

    def bias(g):
        for i in (0, 1):
            g.tensors[f"blk.{i}.exp_probs_b.bias"] = g[f"blk.{i}.exp_probs_b.bias"].map(
                lambda b: b + 5 * (torch.arange(4) == 3))

    def ones(g):
        for i in (0, 1):
            g.tensors[f"blk.{i}.attn_q_norm.weight"] = g[f"blk.{i}.attn_q_norm.weight"].map(torch.ones_like)
    for change in (bias, ones, lambda g: setattr(g.hparams, "rope_dim", None)):
        g = load(tiny())
        change(g)
        assert (executor_for(g)(ids) - ref).abs().max() > 1e-3


@pytest.mark.support("out_gguf", "llamacpp", family="minimax-m2")
@pytest.mark.llamacpp
def test_llamacpp_logits_match_transformers(tiny, tmp_path):
    d = tiny(VOCAB)
    out = gguf_of(d, tmp_path / "m.gguf")
    ids = ids_for(VOCAB, 32)
    np.testing.assert_allclose(llamacpp_logits(out, ids), hf_logits(d, ids)[0].numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.support("out_gguf", "gguf_in", family="minimax-m2")
def test_gguf_read_back_matches_transformers(tiny, tmp_path, one_thread):
    from quantkit.families import load
    from quantkit.runtime import executor_for
    d = tiny(VOCAB)
    out = gguf_of(d, tmp_path / "m.gguf")
    tensors, kv = gguf_contents(out, A)
    assert kv[f"{A}.rope.dimension_count"] == 16 and kv[f"{A}.expert_gating_func"] == 2
    assert kv[f"{A}.expert_feed_forward_length"] == 32
    assert [int(x) for x in tensors["blk.0.attn_q_norm.weight"].shape] == [128]
    assert "blk.1.exp_probs_b.bias" in tensors and "blk.1.ffn_gate_exps.weight" in tensors
    g = load(out)
    assert g.hparams.arch == A and g.hparams.rope_dim == 16
    ids = ids_for(VOCAB)
    torch.testing.assert_close(executor_for(g)(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)


@pytest.mark.support("out_gguf", "llamacpp", family="minimax-m2")
@pytest.mark.llamacpp
def test_gguf_equals_llamacpp_converter(tiny, tmp_path, llamacpp_src, one_thread):
    """Same tensors (names, types, shapes, bytes) and minimax-m2 metadata as convert_hf_to_gguf.py on the
    checkpoint with the released models' `scoring_func: sigmoid` (transformers' config drops it; without it the
    converter writes no expert_gating_func, and llama.cpp, which has no default for this arch, aborts), except
    vocab_size (we always write it). Its file read by quantkit gives transformers' logits."""
    from quantkit.families import load
    from quantkit.runtime import executor_for
    d = tmp_path / "ckpt"
    shutil.copytree(tiny(VOCAB), d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "scoring_func": "sigmoid"}))
    ours = gguf_of(d, tmp_path / "ours.gguf")
    theirs = their_gguf(llamacpp_src, d, tmp_path / "theirs.gguf")
    (ta, fa), (tb, fb) = gguf_contents(ours, A), gguf_contents(theirs, A)
    assert_same_tensors(ta, tb)
    assert {k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)} == {f"{A}.vocab_size"}
    ids = ids_for(VOCAB)
    torch.testing.assert_close(executor_for(load(theirs))(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)


def test_gptq_end_to_end(tiny, one_thread):
    """GPTQ over attention and every routed expert. On random weights and random tokens (near-isotropic
    inputs) GPTQ gains little over round-to-nearest: checked to stay small and no worse than 1.25x RTN."""
    from quantkit.families import load
    from quantkit.quant.gptq_driver import GridOptions, quantize_graph
    from quantkit.runtime import executor_for
    g = load(tiny())
    samples = [ids_for(256, 32, seed=s)[0] for s in range(32)]
    ids = ids_for(256, 32, seed=99)
    base = executor_for(g)(ids)
    out = {}
    for method in ("rtn", "gptq"):
        res = quantize_graph(g, samples if method == "gptq" else None,
                             GridOptions(method=method, bits=4, group_size=32, min_expert_tokens=4), progress=False)
        assert {"blk.0.attn_q.weight", "blk.1.attn_output.weight"} <= set(res.linears)
        assert len(res.experts["blk.1.ffn_down_exps.weight"]) == 4
        out[method] = kld(base, executor_for(dequantized(g, res))(ids))
    print(f"\nMiniMax-M2 tiny: KLD vs base rtn {out['rtn']:.5f} gptq {out['gptq']:.5f}")
    assert 0 < out["gptq"] < 0.05 and out["gptq"] < 1.25 * out["rtn"], out


@pytest.mark.support("kquants", "llamacpp", family="minimax-m2")
@pytest.mark.llamacpp
def test_q4_k_m_imatrix_end_to_end(tiny, tmp_path, jargon_text, one_thread):
    from quantkit.calibration.imatrix import imatrix_from_calib, write_imatrix_gguf
    from quantkit.cli import main
    from quantkit.families import load
    d = tiny(VOCAB)
    (tmp_path / "calib.txt").write_text(jargon_text[:20_000])
    im = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(imatrix_from_calib(load(d), tmp_path / "calib.txt", n_ctx=64, n_chunks=4, progress=False), im)
    ids = ids_for(VOCAB, 32, seed=7)
    base = hf_logits(d, ids)[0]
    out = {}
    for name, extra in (("q4_k_m", []), ("q4_k_m imatrix", ["--imatrix", str(im)])):
        path = tmp_path / f"{name.replace(' ', '_')}.gguf"
        main(["-q", "convert", str(d), "--to", "gguf", "--q", "q4_k_m", "-o", str(path), *extra])
        got = torch.from_numpy(llamacpp_logits(path, ids))
        assert torch.isfinite(got).all()
        out[name] = kld(base, got)
    print(f"\nMiniMax-M2 tiny: KLD vs transformers {out}")
    assert all(0 < v < 0.1 for v in out.values()), out


@pytest.mark.support("out_safetensors", family="minimax-m2")
@pytest.mark.parametrize("via_gguf", [False, True])
def test_safetensors_export_loads_in_transformers(via_gguf, tiny, tmp_path, one_thread):
    from quantkit.export import convert_to_gguf, convert_to_safetensors
    from quantkit.families import load
    d = tiny(VOCAB)
    g = load(d)
    if via_gguf:
        convert_to_gguf(g, tmp_path / "m.gguf", q="f32", progress=False)
        g = load(tmp_path / "m.gguf")
    convert_to_safetensors(g, tmp_path / "hf", dtype="f32", progress=False)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["MiniMaxM2ForCausalLM"]
    ids = ids_for(VOCAB)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)
