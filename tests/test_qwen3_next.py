"""Qwen3-Next (Gated DeltaNet + gated attention + MoE with a gated shared expert): tiny random models from
transformers' own Qwen3NextForCausalLM are the oracle (its torch fallback of the chunked delta rule, float32);
our GGUF (llama.cpp's qwen3next layout) is run by llama.cpp and read back by quantkit; GPTQ and q4_k_m with an
importance matrix end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hybrid_models import hf_logits, ids_for, make_qwen3_next

from quantkit.errors import UnsupportedArchitecture
from quantkit.export import convert_to_gguf, convert_to_safetensors
from quantkit.families import load
from quantkit.runtime import executor_for

transformers = pytest.importorskip("transformers")

VOCAB = 49152  # SmolLM2's tokenizer (conftest's smollm_tokenizer_dir) gives GGUF files a vocabulary


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_qwen3_next(tmp_path_factory.mktemp("q3n") / "hf")


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory, smollm_tokenizer_dir):
    return make_qwen3_next(tmp_path_factory.mktemp("q3n_tok") / "hf", vocab=VOCAB, tok_dir=smollm_tokenizer_dir)


@pytest.fixture(scope="module")
def f32_gguf(tiny_tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("q3n_gguf") / "f32.gguf"
    convert_to_gguf(load(tiny_tok), out, q="f32", progress=False)
    return out


@pytest.mark.parametrize("t", [24, 80])  # 80: past transformers' 64-token chunk
def test_executor_matches_transformers(tiny, t, one_thread):
    ids = ids_for(256, t)
    g = load(tiny)
    assert g.hparams.extra["linear_layers"] == [0, 2] and g.hparams.rotary_dim == 8
    torch.testing.assert_close(executor_for(g)(ids), hf_logits(tiny, ids), atol=2e-5, rtol=1e-4)


def test_delta_rule_parameters_matter(tiny, one_thread):
    """The comparison above only checks A_log / dt_bias / conv / the output gate if they change the output."""
    g = load(tiny)
    ids = ids_for(256)
    base = executor_for(g)(ids)
    for name in ("blk.0.ssm_a_log.weight", "blk.0.ssm_dt.bias", "blk.0.ssm_conv1d.weight", "blk.1.attn_q.weight"):
        w = g[name].load().clone()
        if name.endswith("attn_q.weight"):  # the output-gate half of each head's rows
            w.view(4, 2, 32, -1)[:, 1] *= -1
        else:
            w = w * 0.5
        from quantkit.graph import LazyTensor
        g2 = g.with_tensors({**g.tensors, name: LazyTensor(w.shape, "F32", lambda w=w: w)})
        assert (executor_for(g2)(ids) - base).abs().max() > 1e-4, name


def test_safetensors_export_loads_in_transformers(tiny, tmp_path, one_thread):
    convert_to_safetensors(load(tiny), tmp_path / "out", dtype="f32", progress=False)
    ids = ids_for(256)
    torch.testing.assert_close(hf_logits(tmp_path / "out", ids), hf_logits(tiny, ids), atol=0, rtol=0)


def test_gguf_metadata_and_tensor_names(f32_gguf):
    """llama.cpp's qwen3next names (src/llama-arch.cpp) and keys (qwen3next.cpp's load_arch_hparams)."""
    from gguf import GGUFReader
    r = GGUFReader(f32_gguf)
    kv = {f.name: f.contents() for f in r.fields.values()}
    t = {x.name: (tuple(int(s) for s in x.shape), x.tensor_type.name) for x in r.tensors}
    a = "qwen3next"
    assert kv["general.architecture"] == a
    assert kv[f"{a}.ssm.conv_kernel"] == 4 and kv[f"{a}.ssm.state_size"] == 16 and kv[f"{a}.ssm.group_count"] == 2
    assert kv[f"{a}.ssm.time_step_rank"] == 4 and kv[f"{a}.ssm.inner_size"] == 64
    assert kv[f"{a}.attention.recurrent_layers"] == [True, False, True, False]
    assert kv[f"{a}.rope.dimension_count"] == 8 and kv[f"{a}.attention.key_length"] == 32
    assert kv[f"{a}.expert_shared_feed_forward_length"] == 48
    # ne order: attn_qkv {d, 2*16*2 + 64}, attn_gate {d, 64}; ssm_a has no .weight suffix
    assert t["blk.0.attn_qkv.weight"][0] == (64, 128) and t["blk.0.attn_gate.weight"][0] == (64, 64)
    assert t["blk.0.ssm_a"][0] == (4,) and t["blk.0.ssm_dt.bias"][0] == (4,) and t["blk.0.ssm_ba.weight"][0] == (64, 8)
    assert t["blk.0.ssm_conv1d.weight"] == ((4, 128), "F32") and t["blk.0.ssm_norm.weight"][0] == (16,)
    assert t["blk.1.attn_q.weight"][0] == (64, 256) and "blk.1.post_attention_norm.weight" in t
    assert "blk.0.ssm_in.weight" not in t and "blk.0.attn_q.weight" not in t
    assert t["blk.0.ffn_gate_inp_shexp.weight"][0] == (64,)


@pytest.mark.llamacpp
def test_llamacpp_logits_match_transformers(tiny_tok, f32_gguf):
    from oracles.llamacpp_model import LlamaModel
    ids = ids_for(VOCAB, 40)
    ref = hf_logits(tiny_tok, ids)[0].numpy()
    with LlamaModel(f32_gguf, n_ctx=64, exact=True) as m:
        got = m.logits(ids[0].tolist())
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_gguf_read_back_matches_transformers(tiny_tok, f32_gguf, tmp_path, one_thread):
    g = load(f32_gguf)
    assert g.hparams.arch == "qwen3next" and "blk.0.ssm_in.weight" in g and "blk.0.ssm_a_log.weight" in g
    ids = ids_for(VOCAB)
    ref = hf_logits(tiny_tok, ids)
    torch.testing.assert_close(executor_for(g)(ids), ref, atol=2e-5, rtol=1e-4)
    convert_to_safetensors(g, tmp_path / "hf", dtype="f32", progress=False)  # config rebuilt from metadata
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["layer_types"][:2] == \
        ["linear_attention", "full_attention"]
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), ref, atol=2e-5, rtol=1e-4)
