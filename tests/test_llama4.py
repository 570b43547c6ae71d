"""Llama 4 text (Llama4ForCausalLM + Llama4TextConfig): tiny random models from transformers' own class are
the oracle.

Our executor against transformers (float32, eager attention), with llama.cpp's fixed chunk (8192) and
temperature floor (8192), and with short ones (8 and 4) so that 24 tokens exercise chunked attention and
temperature tuning; our GGUF (llama.cpp's llama4) against llama.cpp on 32 tokens and on 8200 (past llama.cpp's
fixed chunk and temperature floor: the only lengths at which llama.cpp computes either), read back by quantkit,
and against what llama.cpp's converter writes; GPTQ and q4_k_m + imatrix end to end; safetensors export read
by transformers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from frontier_models import (VOCAB, assert_same_tensors, dequantized, executor_last_logits, gguf_contents, gguf_of,
                             hf_last_logits, hf_logits, ids_for, kld, llamacpp_last_logits, llamacpp_logits,
                             make_tiny, their_gguf)

transformers = pytest.importorskip("transformers")
KINDS = ("llama4", "llama4_scaled", "llama4_chunked")
GGUF_KINDS = ("llama4", "llama4_scaled")  # llama4_scaled: Scout's llama3 RoPE scaling (GGUF rope_freqs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm_tokenizer_dir):
    root, made = tmp_path_factory.mktemp("llama4"), {}

    def get(kind, vocab=256):
        if (kind, vocab) not in made:
            tok = smollm_tokenizer_dir if vocab == VOCAB else None
            made[kind, vocab] = make_tiny(kind, root / f"{kind}_{vocab}", vocab=vocab, tok_dir=tok)
        return made[kind, vocab]
    return get


@pytest.mark.support("load", "run", family="llama4")
@pytest.mark.parametrize("kind", KINDS)
def test_executor_matches_transformers(kind, tiny, one_thread):
    from quantkit.families import load
    from quantkit.runtime import executor_for
    d = tiny(kind)
    g = load(d)
    hp = g.hparams
    assert (hp.arch, hp.moe_layers, hp.extra["nope_layers"], hp.extra["chunked_layers"]) == \
        ("llama4", [1, 3], [3], [0, 1, 2])
    assert hp.rope_scaling.kind == ("llama3" if kind == "llama4_scaled" else "none")
    assert (hp.ffn_size, hp.expert_ffn_size, hp.n_experts_used) == (96, 32, 1)
    assert g["blk.0.ffn_up.weight"].shape == (96, 64) and g["blk.1.ffn_up_shexp.weight"].shape == (32, 64)
    assert "blk.0.attn_q_norm.weight" not in g  # Llama 4's q/k norm has no weight
    ids = ids_for(256, batch=2)
    torch.testing.assert_close(executor_for(g)(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)


def test_experts_are_the_checkpoints_fused_experts(tiny):
    from safetensors.torch import load_file

    from quantkit.families import load
    d = tiny("llama4")
    g, sd = load(d), load_file(d / "model.safetensors")
    gu, down = sd["model.layers.3.feed_forward.experts.gate_up_proj"], sd["model.layers.3.feed_forward.experts.down_proj"]
    assert torch.equal(g["blk.3.ffn_gate_exps.weight"].load(), gu[:, :, :32].transpose(1, 2))
    assert torch.equal(g["blk.3.ffn_up_exps.weight"].load(), gu[:, :, 32:].transpose(1, 2))
    assert torch.equal(g["blk.3.ffn_down_exps.weight"].load(), down.transpose(1, 2))
    # q/k rows: HF's adjacent-pair RoPE order -> the canonical rotate-half order (per head of 16: 0, 2, .. 14, 1, ..)
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(g["blk.0.attn_q.weight"].load()[:16], q[:16][list(range(0, 16, 2)) + list(range(1, 16, 2))])


def test_options_matter(tiny, one_thread):
    """Chunks, temperature tuning, the NoPE layer, the q/k L2 norm and routing weights on the expert input
    each change the logits of the short-chunk model (so matching transformers checks them)."""
    from quantkit.blocks import MoE
    from quantkit.families import load
    from quantkit.runtime import executor_for
    d = tiny("llama4_chunked")
    ids = ids_for(256)
    ref = hf_logits(d, ids)
    changes = {"chunk": lambda g: g.hparams.extra.update(chunk=None),
               "temperature": lambda g: g.hparams.extra.update(temperature_tuning=False),
               "nope": lambda g: g.hparams.extra.update(nope_layers=[]),
               "qk norm": lambda g: setattr(g.hparams, "qk_norm", False)}
    for what, change in changes.items():
        g = load(d)
        change(g)
        assert (executor_for(g)(ids) - ref).abs().max() > 1e-3, what
    g = load(d)
    ex = executor_for(g)
    for i in (1, 3):  # weights on the expert output instead
        ex.layer(i).mlp.spec = MoE(router="sigmoid", norm_topk=False, shared_size=32)
    assert (ex(ids) - ref).abs().max() > 1e-3


@pytest.mark.support("out_gguf", "llamacpp", family="llama4")
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_llamacpp_logits_match_transformers(kind, tiny, tmp_path):
    """32 tokens: the NoPE layer, L2 q/k norm, interleaved dense/MoE layers, top-1 sigmoid routing on the expert
    input and the shared expert (chunks and the temperature floor, 8192, are out of reach: see the long test)."""
    d = tiny(kind, VOCAB)
    out = gguf_of(d, tmp_path / "m.gguf")
    ids = ids_for(VOCAB, 32)
    np.testing.assert_allclose(llamacpp_logits(out, ids), hf_logits(d, ids)[0].numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.support("llamacpp", family="llama4")
@pytest.mark.llamacpp
@pytest.mark.slow
def test_llamacpp_long_sequence_chunks_and_temperature(tiny, tmp_path):
    """8200 tokens: positions 8192.. start llama.cpp's second attention chunk and its first temperature step
    (q * (1 + 0.1 ln 2) on the NoPE layer). The NoPE layer's q/k are scaled up so that the temperature visibly
    changes its attention. The last 16 positions agree across transformers, llama.cpp and our executor; without
    chunks or without temperature tuning ours would not."""
    import shutil

    from safetensors.torch import load_file, save_file

    from quantkit.families import load
    d = tmp_path / "sharp"
    shutil.copytree(tiny("llama4", VOCAB), d)
    sd = load_file(d / "model.safetensors")
    for p in ("q_proj", "k_proj"):
        sd[f"model.layers.3.self_attn.{p}.weight"] *= 10
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    out = gguf_of(d, tmp_path / "m.gguf")
    ids, last = ids_for(VOCAB, 8200, seed=11), 16
    ref = hf_last_logits(d, ids, last)[0]
    np.testing.assert_allclose(llamacpp_last_logits(out, ids, last), ref.numpy(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(executor_last_logits(load(d), ids, last)[0], ref, atol=2e-5, rtol=1e-4)
    for change in (dict(chunk=None), dict(temperature_tuning=False)):
        g = load(d)
        g.hparams.extra.update(change)
        assert (executor_last_logits(g, ids, last)[0] - ref).abs().max() > 1e-3, change


@pytest.mark.support("gguf_in", family=lambda kind: None if kind == "llama4_chunked" else "llama4")
@pytest.mark.parametrize("kind", KINDS)
def test_gguf_read_back_matches_transformers_or_is_refused(kind, tiny, tmp_path, one_thread):
    from quantkit.errors import UnsupportedArchitecture
    from quantkit.families import load
    from quantkit.runtime import executor_for
    d = tiny(kind, VOCAB)
    if kind == "llama4_chunked":  # llama.cpp fixes the chunk and the temperature floor and scale
        with pytest.raises(UnsupportedArchitecture) as e:
            gguf_of(d, tmp_path / "m.gguf")
        assert "attention_chunk_size 8" in str(e.value) and "floor_scale 4 / attn_scale 0.5" in str(e.value)
        assert not (tmp_path / "m.gguf").exists()
        return
    out = gguf_of(d, tmp_path / "m.gguf")
    tensors, kv = gguf_contents(out, "llama4")
    assert kv["llama4.interleave_moe_layer_step"] == 2 and kv["llama4.expert_feed_forward_length"] == 32
    assert kv["llama4.feed_forward_length"] == 96 and "llama4.attention.sliding_window" not in kv
    assert "blk.1.ffn_gate_inp.weight" in tensors and "blk.0.ffn_gate_inp.weight" not in tensors
    g = load(out)
    assert g.hparams.extra["nope_layers"] == [3] and g.hparams.extra["chunk"] == 8192 and g.hparams.qk_norm
    ids = ids_for(VOCAB)
    torch.testing.assert_close(executor_for(g)(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)


def test_gguf_refuses_what_llamacpp_computes_differently(tiny, tmp_path):
    from quantkit.errors import UnsupportedArchitecture
    for overrides, reason in ((dict(no_rope_layers=[1, 0, 1, 1]), "NoPE layers [1]"),
                              (dict(use_qk_norm=False), "use_qk_norm=False with 4 experts"),
                              (dict(attention_chunk_size=None), "NoPE layers [3] without chunked attention"),
                              (dict(moe_layers=[0, 1, 2, 3]), "MoE layers [0, 1, 2, 3]")):
        d = make_tiny("llama4", tmp_path / reason.replace(" ", "_"), vocab=VOCAB, **overrides)
        with pytest.raises(UnsupportedArchitecture) as e:
            gguf_of(d, tmp_path / "x.gguf")
        assert reason in str(e.value)


@pytest.mark.support("out_gguf", "llamacpp", family="llama4")
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_gguf_equals_llamacpp_converter(kind, tiny, tmp_path, llamacpp_src, one_thread):
    """Same tensors (names, types, shapes, bytes; q/k rows in HF's order; llama3 scaling's rope_freqs) and the
    same llama4 metadata as convert_hf_to_gguf.py; its file read by quantkit gives transformers' logits."""
    from quantkit.families import load
    from quantkit.runtime import executor_for
    d = tiny(kind, VOCAB)
    ours = gguf_of(d, tmp_path / "ours.gguf")
    theirs = their_gguf(llamacpp_src, d, tmp_path / "theirs.gguf")
    (ta, fa), (tb, fb) = gguf_contents(ours, "llama4"), gguf_contents(theirs, "llama4")
    assert_same_tensors(ta, tb)
    assert fa == fb
    ids = ids_for(VOCAB)
    torch.testing.assert_close(executor_for(load(theirs))(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)


def test_gptq_end_to_end(tiny, one_thread):
    """GPTQ over attention, the dense layers, the shared expert and every routed expert (Hessians from the
    router-weighted inputs the experts read)."""
    from quantkit.families import load
    from quantkit.quant.gptq_driver import GridOptions, quantize_graph
    from quantkit.runtime import executor_for
    g = load(tiny("llama4"))
    samples = [ids_for(256, 32, seed=s)[0] for s in range(32)]
    ids = ids_for(256, 32, seed=99)
    base = executor_for(g)(ids)
    out = {}
    for method in ("rtn", "gptq"):
        res = quantize_graph(g, samples if method == "gptq" else None,
                             GridOptions(method=method, bits=4, group_size=16, min_expert_tokens=4), progress=False)
        assert {"blk.0.ffn_down.weight", "blk.3.attn_q.weight", "blk.3.ffn_up_shexp.weight"} <= set(res.linears)
        assert len(res.experts["blk.1.ffn_gate_exps.weight"]) == 4
        out[method] = kld(base, executor_for(dequantized(g, res))(ids))
    print(f"\nLlama 4 tiny: KLD vs base rtn {out['rtn']:.5f} gptq {out['gptq']:.5f}")
    assert 0 < out["gptq"] < 0.05 and out["gptq"] < 1.25 * out["rtn"], out


@pytest.mark.support("kquants", "llamacpp", family="llama4")
@pytest.mark.llamacpp
def test_q4_k_m_imatrix_end_to_end(tiny, tmp_path, jargon_text, one_thread):
    from quantkit.calibration.imatrix import imatrix_from_calib, write_imatrix_gguf
    from quantkit.cli import main
    from quantkit.families import load
    d = tiny("llama4", VOCAB)
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
    print(f"\nLlama 4 tiny: KLD vs transformers {out}")
    assert all(0 < v < 0.1 for v in out.values()), out


@pytest.mark.support("out_safetensors", family="llama4")
@pytest.mark.parametrize("kind,via_gguf", [("llama4", False), ("llama4", True), ("llama4_chunked", False)])
def test_safetensors_export_loads_in_transformers(kind, via_gguf, tiny, tmp_path, one_thread):
    from quantkit.export import convert_to_gguf, convert_to_safetensors
    from quantkit.families import load
    d = tiny(kind, VOCAB)
    g = load(d)
    if via_gguf:
        convert_to_gguf(g, tmp_path / "m.gguf", q="f32", progress=False)
        g = load(tmp_path / "m.gguf")
    convert_to_safetensors(g, tmp_path / "hf", dtype="f32", progress=False)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["Llama4ForCausalLM"]
    ids = ids_for(VOCAB)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)
