"""GLM-4.5 (Glm4MoeForCausalLM): tiny random models from transformers' own class are the oracle.

Our executor against transformers (float32, eager attention); our GGUF (llama.cpp's glm4moe) against llama.cpp,
read back by quantkit, and against what llama.cpp's converter writes; MTP layers kept (as llama.cpp's converter
does) or dropped; GPTQ and q4_k_m + imatrix end to end; safetensors export read by transformers.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from frontier_models import (VOCAB, assert_same_tensors, dequantized, gguf_contents, gguf_of, hf_logits, ids_for,
                             kld, llamacpp_logits, make_tiny, their_gguf)

transformers = pytest.importorskip("transformers")

KINDS = ("glm", "glm_air")
GPT2_VOCAB = "conversion.glm.Glm4MoeModel"  # the tiny models carry SmolLM2's tokenizer, not GLM's


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm_tokenizer_dir):
    """(kind, vocab) -> checkpoint, made once per module (vocab 49152 ones carry SmolLM2's tokenizer)."""
    root, made = tmp_path_factory.mktemp("glm"), {}

    def get(kind, vocab=256):
        if (kind, vocab) not in made:
            tok = smollm_tokenizer_dir if vocab == VOCAB else None
            made[kind, vocab] = make_tiny(kind, root / f"{kind}_{vocab}", vocab=vocab, tok_dir=tok)
        return made[kind, vocab]
    return get


def with_mtp(src, dst):
    """A copy of checkpoint `src` with one MTP layer (model.layers.3: the last layer's tensors plus eh_proj,
    enorm, hnorm and shared_head.norm, as GLM-4.5's checkpoints hold) and num_nextn_predict_layers 1."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    for k in [k for k in sd if k.startswith("model.layers.2.")]:
        sd[k.replace("model.layers.2.", "model.layers.3.")] = sd[k] + 0.01 * torch.randn(sd[k].shape, generator=g)
    sd["model.layers.3.eh_proj.weight"] = 0.05 * torch.randn(64, 128, generator=g)
    for n in ("enorm", "hnorm", "shared_head.norm"):
        sd[f"model.layers.3.{n}.weight"] = 1 + 0.1 * torch.randn(64, generator=g)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    return dst


@pytest.mark.support("load", "run", family="glm4moe")
@pytest.mark.parametrize("kind", KINDS)
def test_executor_matches_transformers(kind, tiny, one_thread):
    from quantkit.families import load
    from quantkit.runtime import executor_for
    d = tiny(kind)
    ids = ids_for(256, batch=2)
    g = load(d)
    hp = g.hparams
    assert (hp.arch, hp.rope_dim, hp.moe_layers, hp.n_shared_experts) == ("glm4moe", 16, [1, 2], 1)
    assert hp.qk_norm == (kind == "glm") and hp.attn_bias and not hp.attn_out_bias
    assert g["blk.0.ffn_up.weight"].shape == (96, 64) and g["blk.1.ffn_up_exps.weight"].shape == (4, 32, 64)
    assert g["blk.1.exp_probs_b.bias"].shape == (4,) and g["blk.1.ffn_down_shexp.weight"].shape == (64, 32)
    torch.testing.assert_close(executor_for(g)(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)


def test_routing_options_matter(tiny, one_thread):
    """What the comparisons check changes the logits here: group limit, selection bias, routed scale."""
    from quantkit.families import load
    from quantkit.runtime import executor_for
    ids = ids_for(256)
    ref = hf_logits(tiny("glm"), ids)
    def bias(g):  # expert 3 (and so its group) picked for every token
        for i in (1, 2):
            g.tensors[f"blk.{i}.exp_probs_b.bias"] = g[f"blk.{i}.exp_probs_b.bias"].map(
                lambda b: b + 5 * (torch.arange(4) == 3))
    for change in (lambda g: g.hparams.extra.update(n_group=1),
                   lambda g: g.hparams.extra.update(routed_scaling_factor=1.0),
                   bias, lambda g: setattr(g.hparams, "rope_dim", None)):
        g = load(tiny("glm"))
        change(g)
        assert (executor_for(g)(ids) - ref).abs().max() > 1e-3


@pytest.mark.support("out_gguf", "llamacpp", family="glm4moe")
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", KINDS)
def test_llamacpp_logits_match_transformers(kind, tiny, tmp_path):
    d = tiny(kind, VOCAB)
    out = gguf_of(d, tmp_path / f"{kind}.gguf")
    ids = ids_for(VOCAB, 32)
    np.testing.assert_allclose(llamacpp_logits(out, ids), hf_logits(d, ids)[0].numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.support("out_gguf", "gguf_in", family="glm4moe")
@pytest.mark.parametrize("kind", KINDS)
def test_gguf_read_back_matches_transformers(kind, tiny, tmp_path, one_thread):
    from gguf import GGUFReader

    from quantkit.families import load
    from quantkit.runtime import executor_for
    d = tiny(kind, VOCAB)
    out = gguf_of(d, tmp_path / "m.gguf")
    r = GGUFReader(out)
    kv = {k: f.contents() for k, f in r.fields.items()}
    names = {t.name for t in r.tensors}
    assert kv["general.architecture"] == "glm4moe" and kv["glm4moe.rope.dimension_count"] == 16
    assert kv["glm4moe.leading_dense_block_count"] == 1 and kv["glm4moe.expert_gating_func"] == 2
    assert kv["glm4moe.expert_group_count"] == (2 if kind == "glm" else 1)
    assert "blk.0.post_attention_norm.weight" in names and "blk.0.ffn_norm.weight" not in names
    assert ("blk.0.attn_q_norm.weight" in names) == (kind == "glm") and "blk.0.attn_q.bias" in names
    g = load(out)
    assert g.hparams.arch == "glm4moe" and g.hparams.n_layers == 3 and g.hparams.rope_dim == 16
    ids = ids_for(VOCAB)
    torch.testing.assert_close(executor_for(g)(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)


@pytest.mark.support("out_gguf", "llamacpp", family="glm4moe")
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", KINDS)
def test_gguf_equals_llamacpp_converter(kind, tiny, tmp_path, llamacpp_src, one_thread):
    """Same tensors (names, types, shapes, bytes) and glm4moe metadata as convert_hf_to_gguf.py, except:
    vocab_size (we always write it; llama.cpp's default is the token count), and block_count /
    nextn_predict_layers: transformers' config declares one MTP layer (num_nextn_predict_layers 1) that its
    checkpoint does not hold; the converter still counts it (block_count 4, nextn 1: llama.cpp then loads a
    trunk-only file), we write the layers the file holds (3, no nextn key). Its file read by quantkit gives
    transformers' logits."""
    from quantkit.families import load
    from quantkit.runtime import executor_for
    d = tiny(kind, VOCAB)
    ours = gguf_of(d, tmp_path / "ours.gguf")
    theirs = their_gguf(llamacpp_src, d, tmp_path / "theirs.gguf", gpt2_vocab=GPT2_VOCAB)
    (ta, fa), (tb, fb) = gguf_contents(ours, "glm4moe"), gguf_contents(theirs, "glm4moe")
    assert_same_tensors(ta, tb)
    differ = {k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)}
    assert differ == {"glm4moe.vocab_size", "glm4moe.block_count", "glm4moe.nextn_predict_layers"}, differ
    assert (fa["glm4moe.block_count"], fb["glm4moe.block_count"], fb["glm4moe.nextn_predict_layers"]) == (3, 4, 1)
    g = load(theirs)
    assert g.hparams.n_layers == 3 and g.hparams.extra["mtp_layers"] == 0
    ids = ids_for(VOCAB)
    torch.testing.assert_close(executor_for(g)(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)


@pytest.mark.llamacpp
def test_mtp_layers_kept_like_llamacpp_converter(tiny, tmp_path, llamacpp_src, caplog, one_thread):
    """A checkpoint with an MTP layer: kept as blk.3.* (the layer's tensors and blk.3.nextn.*), block_count 4 and
    nextn_predict_layers 1, exactly as the converter writes it; llama.cpp loads it and its main graph still
    gives transformers' logits; quantkit reads it back with the MTP layer, and writes it to safetensors."""
    from safetensors import safe_open

    from quantkit.export import convert_to_safetensors
    from quantkit.families import load
    from quantkit.runtime import executor_for
    d = with_mtp(tiny("glm", VOCAB), tmp_path / "mtp")
    with caplog.at_level(logging.INFO, logger="quantkit"):
        g = load(d)
    assert "1 MTP" in caplog.text and "kept" in caplog.text
    assert g.hparams.n_layers == 3 and g.hparams.extra["mtp_layers"] == 1
    assert g["blk.3.nextn.eh_proj.weight"].shape == (64, 128) and g["blk.3.ffn_gate_exps.weight"].shape == (4, 32, 64)
    ours = gguf_of(d, tmp_path / "ours.gguf")
    theirs = their_gguf(llamacpp_src, d, tmp_path / "theirs.gguf", gpt2_vocab=GPT2_VOCAB)
    (ta, fa), (tb, fb) = gguf_contents(ours, "glm4moe"), gguf_contents(theirs, "glm4moe")
    assert_same_tensors(ta, tb)
    assert {"blk.3.nextn.eh_proj.weight", "blk.3.nextn.shared_head_norm.weight",
            "blk.3.post_attention_norm.weight", "blk.3.ffn_up_exps.weight"} <= set(ta)
    assert {k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)} == {"glm4moe.vocab_size"}
    assert fa["glm4moe.block_count"] == 4 and fa["glm4moe.nextn_predict_layers"] == 1
    ids = ids_for(VOCAB, 32)
    ref = hf_logits(d, ids)  # transformers ignores the MTP layer
    np.testing.assert_allclose(llamacpp_logits(ours, ids), ref[0].numpy(), atol=1e-4, rtol=1e-4)
    back = load(ours)
    assert back.hparams.n_layers == 3 and back.hparams.extra["mtp_layers"] == 1
    assert torch.equal(back["blk.3.nextn.hnorm.weight"].load(), g["blk.3.nextn.hnorm.weight"].load())
    torch.testing.assert_close(executor_for(back)(ids), ref, atol=2e-5, rtol=1e-4)
    convert_to_safetensors(back, tmp_path / "hf", dtype="f32", progress=False)
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert torch.equal(f.get_tensor("model.layers.3.eh_proj.weight"), g["blk.3.nextn.eh_proj.weight"].load())
    assert {"model.layers.3.mlp.experts.3.down_proj.weight", "model.layers.3.shared_head.norm.weight"} <= keys
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.support("kquants", family="glm4moe")
@pytest.mark.llamacpp
def test_q4_k_m_with_mtp_equals_llama_quantize(tiny, tmp_path, one_thread):
    """q4_k_m of the f32 GGUF with its MTP layer: every tensor's type and bytes as llama.cpp's own quantizer
    (which counts the MTP layer among the layers its mixture rules see), and llama.cpp runs it."""
    from gguf import GGUFReader

    from oracles.llamacpp_model import quantize_file
    from quantkit.export import FILE_TYPES
    from quantkit.pipeline import convert
    d = with_mtp(tiny("glm", VOCAB), tmp_path / "mtp")
    f32, ours, ref = gguf_of(d, tmp_path / "f32.gguf"), tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    convert(f32, ours, to="gguf", q="q4_k_m", progress=False)
    quantize_file(f32, ref, int(FILE_TYPES["q4_k_m"]))
    a, b = ({t.name: t for t in GGUFReader(p).tensors} for p in (ours, ref))
    assert {k: t.tensor_type.name for k, t in a.items()} == {k: t.tensor_type.name for k, t in b.items()}
    bad = [k for k in a if not np.array_equal(np.asarray(a[k].data), np.asarray(b[k].data))]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"
    ids = ids_for(VOCAB, 32)
    assert kld(hf_logits(d, ids)[0], torch.from_numpy(llamacpp_logits(ours, ids))) < 0.05


def test_mtp_layers_dropped_on_request(tiny, tmp_path, caplog, capsys):
    """--drop-mtp (load(..., drop_mtp=True)) leaves the MTP layer out of HF and GGUF inputs; convert's summary
    says kept or dropped either way."""
    from gguf import GGUFReader

    from quantkit.cli import main
    from quantkit.families import load
    d = with_mtp(tiny("glm", VOCAB), tmp_path / "mtp")
    with caplog.at_level(logging.INFO, logger="quantkit"):
        g = load(d, drop_mtp=True)
    assert "1 MTP" in caplog.text and "dropped" in caplog.text
    assert g.hparams.extra["mtp_layers"] == 0 and g.hparams.extra["mtp_dropped"] == 1
    assert not any(n.startswith("blk.3.") for n in g.tensors)
    runs = {"kept": [], "dropped": ["--drop-mtp"]}
    for what, extra in runs.items():
        out = tmp_path / f"{what}.gguf"
        main(["convert", str(d), "--to", "gguf", "--q", "f32", "-o", str(out), "--no-progress", *extra])
        said = capsys.readouterr().out
        assert f"1 MTP layer {what}" in said, said
        r = GGUFReader(out)
        kv = {k: f.contents() for k, f in r.fields.items()}
        assert kv["glm4moe.block_count"] == (4 if what == "kept" else 3)
        assert ("glm4moe.nextn_predict_layers" in kv) == (what == "kept")
        assert any(t.name.startswith("blk.3.") for t in r.tensors) == (what == "kept")
    # a GGUF that keeps it, read with drop_mtp
    g = load(tmp_path / "kept.gguf", drop_mtp=True)
    assert g.hparams.extra["mtp_dropped"] == 1 and not any(n.startswith("blk.3.") for n in g.tensors)


@pytest.mark.support("gptq", family="glm4moe")
def test_gptq_end_to_end(tiny, one_thread):
    """GPTQ over attention, the dense layer, the shared expert and every routed expert; closer to the float
    model than round-to-nearest."""
    from quantkit.families import load
    from quantkit.quant.gptq_driver import GridOptions, quantize_graph
    from quantkit.runtime import executor_for
    g = load(tiny("glm"))
    samples = [ids_for(256, 32, seed=s)[0] for s in range(16)]
    ids = ids_for(256, 32, seed=99)
    base = executor_for(g)(ids)
    out = {}
    for method in ("rtn", "gptq"):
        res = quantize_graph(g, samples if method == "gptq" else None,
                             GridOptions(method=method, bits=4, group_size=16, min_expert_tokens=4), progress=False)
        assert {"blk.0.ffn_down.weight", "blk.1.attn_q.weight", "blk.2.ffn_up_shexp.weight"} <= set(res.linears)
        assert len(res.experts["blk.2.ffn_gate_exps.weight"]) == 4
        out[method] = kld(base, executor_for(dequantized(g, res))(ids))
    print(f"\nGLM-4.5 tiny: KLD vs base rtn {out['rtn']:.5f} gptq {out['gptq']:.5f}")
    assert 0 < out["gptq"] < 0.2 and out["gptq"] < out["rtn"], out


def test_gptq_checkpoint_with_mtp(tiny, tmp_path, jargon_text, capsys, one_thread):
    """`convert --method gptq` on a checkpoint with an MTP layer: the decoder layers' linears and experts packed
    (GPTQ layout), the MTP layer kept float under its HF names; read back it stays near the float model."""
    from safetensors import safe_open

    from quantkit.cli import main
    from quantkit.families import load
    from quantkit.runtime import executor_for
    d = with_mtp(tiny("glm", VOCAB), tmp_path / "mtp")
    (tmp_path / "calib.txt").write_text(jargon_text[:20_000])
    out = tmp_path / "gptq"
    main(["convert", str(d), "--to", "safetensors", "--method", "gptq", "--bits", "4", "--group-size", "32",
          "--calib", str(tmp_path / "calib.txt"), "--calib-samples", "8", "--calib-seqlen", "64", "-o", str(out),
          "--no-progress"])
    assert "1 MTP layer kept" in capsys.readouterr().out
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"model.layers.1.mlp.experts.0.down_proj.qweight", "model.layers.2.self_attn.q_proj.qweight",
            "model.layers.2.mlp.shared_experts.up_proj.qweight"} <= keys
    assert {"model.layers.3.eh_proj.weight", "model.layers.3.mlp.experts.0.down_proj.weight"} <= keys
    g = load(out)
    assert g.hparams.extra["mtp_layers"] == 1
    ids = ids_for(VOCAB, 32)
    k = kld(hf_logits(d, ids)[0], executor_for(g)(ids)[0])
    print(f"\nGLM-4.5 tiny: GPTQ w4g32 checkpoint KLD vs transformers {k:.5f}")
    assert 0 < k < 0.05


@pytest.mark.support("kquants", "llamacpp", family="glm4moe")
@pytest.mark.llamacpp
def test_q4_k_m_imatrix_end_to_end(tiny, tmp_path, jargon_text, one_thread):
    """imatrix over calibration text, then q4_k_m with it (and without): llama.cpp loads both and stays near
    transformers; their KLDs against the base are reported."""
    from quantkit.calibration.imatrix import imatrix_from_calib, write_imatrix_gguf
    from quantkit.cli import main
    from quantkit.families import load
    d = tiny("glm", VOCAB)
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
    print(f"\nGLM-4.5 tiny: KLD vs transformers {out}")
    assert all(0 < v < 0.1 for v in out.values()), out


@pytest.mark.support("out_safetensors", family="glm4moe")
@pytest.mark.parametrize("via_gguf", [False, True])
def test_safetensors_export_loads_in_transformers(via_gguf, tiny, tmp_path, one_thread):
    import json

    from quantkit.export import convert_to_gguf, convert_to_safetensors
    from quantkit.families import load
    d = tiny("glm", VOCAB)
    g = load(d)
    if via_gguf:
        convert_to_gguf(g, tmp_path / "m.gguf", q="f32", progress=False)
        g = load(tmp_path / "m.gguf")
    convert_to_safetensors(g, tmp_path / "hf", dtype="f32", progress=False)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    # from GGUF the config is rebuilt from the metadata: no MTP layer in the file, none declared
    assert cfg["architectures"] == ["Glm4MoeForCausalLM"] and cfg["num_nextn_predict_layers"] == (0 if via_gguf else 1)
    ids = ids_for(VOCAB)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)
