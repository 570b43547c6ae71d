"""GPT-OSS family: tiny random GptOssForCausalLM made with transformers' own classes is the oracle.

Checks our loader + executor logits against transformers' (float32) for a bf16-style checkpoint and for an
MXFP4 checkpoint (experts stored as *_blocks/*_scales, read by transformers' own MXFP4 dequantizer), and
that MXFP4 experts reach the graph without requantization (raw GGUF bytes decode, via the gguf package,
to transformers' dequantized experts).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from quantkit.errors import QuantkitError

transformers = pytest.importorskip("transformers")

E, TOPK, HIDDEN, FF, LAYERS, VOCAB = 4, 2, 64, 64, 2, 256


def make_tiny_gpt_oss(out: Path, seed: int = 0) -> Path:
    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FF, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=E, num_experts_per_tok=TOPK,
        sliding_window=5, max_position_embeddings=256, rms_norm_eps=1e-5,
        swiglu_limit=1.5,  # small enough that the clamps bite with these random weights
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 64, "rope_theta": 150000.0},
        initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, biases and sinks so each of them matters
        for n, p in model.named_parameters():
            if p.dim() == 1 or n.endswith("_bias"):
                p.add_(torch.randn_like(p) * (0.5 if "sinks" in n else 0.1))
    model.save_pretrained(out, safe_serialization=True)
    return out


def hf_logits(model_dir: Path, ids: torch.Tensor, **kw) -> torch.Tensor:
    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return m(ids).logits.float()


def to_mxfp4_checkpoint(src: Path, dst: Path) -> Path:
    """Rewrite the experts as gpt-oss MXFP4 blocks/scales (quantized by us), like openai/gpt-oss-* on the hub."""
    from safetensors.torch import load_file, save_file

    from quantkit.formats.mxfp4_layouts import to_gpt_oss
    from quantkit.quant.mxfp4 import quantize_mxfp4

    dst.mkdir(parents=True)
    sd = load_file(src / "model.safetensors")
    for name in [n for n in sd if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = sd.pop(name).transpose(1, 2).contiguous()  # HF param [E, in, out] -> packed orientation [E, out, in]
        blocks, scales = to_gpt_oss(*quantize_mxfp4(w, name=name))
        sd[name + "_blocks"], sd[name + "_scales"] = blocks, scales
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_gpt_oss(tmp_path_factory.mktemp("gptoss") / "bf16")


@pytest.fixture(scope="module")
def tiny_mxfp4(tiny, tmp_path_factory) -> Path:
    return to_mxfp4_checkpoint(tiny, tmp_path_factory.mktemp("gptoss") / "mxfp4")


IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def test_hparams(tiny):
    from quantkit.families import load
    from quantkit.runtime.model import CausalLM
    g = load(tiny)
    hp = g.hparams
    assert hp.arch == "gpt-oss" and hp.n_experts == E and hp.n_experts_used == TOPK
    assert hp.layer_types == ["sliding", "full"] and hp.sliding_window == 5
    assert hp.rope_scaling.kind == "yarn" and hp.rope_scaling.truncate is False and hp.rope_scaling.factor == 4.0
    assert hp.extra["swiglu_limit"] == 1.5 and hp.extra["swiglu_alpha"] == pytest.approx(1.702)
    assert g["blk.1.attn_sinks.weight"].shape == (4,)
    assert g["blk.0.ffn_gate_exps.weight"].shape == (E, FF, HIDDEN)
    assert g["blk.0.ffn_down_exps.weight"].shape == (E, HIDDEN, FF)
    assert g["blk.0.ffn_gate_inp.bias"].shape == (E,)


@pytest.mark.support("load", "run", family="gpt-oss")
def test_executor_matches_transformers(tiny):
    from quantkit.families import load
    from quantkit.runtime.model import CausalLM
    ref = hf_logits(tiny, IDS)
    ours = CausalLM(load(tiny))(IDS)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_expert_split_matches_transformers_modules(tiny):
    # canonical gate/up/down rows are transformers' expert parameters, re-oriented
    from quantkit.families import load
    from quantkit.runtime.model import CausalLM
    m = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    ex = m.model.layers[1].mlp.experts
    g = load(tiny)
    assert torch.equal(g["blk.1.ffn_gate_exps.weight"].load(), ex.gate_up_proj[..., ::2].transpose(1, 2))
    assert torch.equal(g["blk.1.ffn_up_exps.weight"].load(), ex.gate_up_proj[..., 1::2].transpose(1, 2))
    assert torch.equal(g["blk.1.ffn_down_exps.weight"].load(), ex.down_proj.transpose(1, 2))
    assert torch.equal(g["blk.1.ffn_up_exps.bias"].load(), ex.gate_up_proj_bias[..., 1::2])


def test_gpt_oss_specifics_matter(tiny):
    # the comparison above is sensitive to the gpt-oss specifics: dropping any of them changes the logits
    import dataclasses

    from quantkit.families import load
    from quantkit.runtime.model import CausalLM
    from quantkit.graph import RopeScaling
    g = load(tiny)
    base = CausalLM(g)(IDS)
    for change in ({"rope_scaling": RopeScaling()}, {"layer_types": ["full"] * LAYERS}):
        other = g.with_tensors(g.tensors, hparams=dataclasses.replace(g.hparams, **change))
        assert (CausalLM(other)(IDS) - base).abs().max() > 1e-3, change
    lm = CausalLM(g)
    for i in range(LAYERS):
        lm.layer(i).mlp.limit = 1e9
    assert (lm(IDS) - base).abs().max() > 1e-3
    lm = CausalLM(g)
    for i in range(LAYERS):
        lm.layer(i).attn.sinks.fill_(-1e4)
    assert (lm(IDS) - base).abs().max() > 1e-3


@pytest.mark.support("load", family="gpt-oss")
def test_mxfp4_checkpoint_matches_transformers(tiny_mxfp4):
    from quantkit.families import load
    from quantkit.runtime.model import CausalLM
    # transformers dequantizes the MXFP4 experts itself (its own code); asked explicitly, since with the `kernels`
    # package installed it otherwise fetches Triton kernels from the hub
    ref = hf_logits(tiny_mxfp4, IDS, quantization_config=transformers.Mxfp4Config(dequantize=True))
    g = load(tiny_mxfp4)
    assert g["blk.0.ffn_gate_exps.weight"].qtype == "MXFP4"
    ours = CausalLM(g)(IDS)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_mxfp4_experts_pass_through_as_gguf_bytes(tiny_mxfp4):
    gguf = pytest.importorskip("gguf")
    from safetensors.torch import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from quantkit.families import load
    from quantkit.runtime.model import CausalLM
    g = load(tiny_mxfp4)
    sd = load_file(tiny_mxfp4 / "model.safetensors")
    p = "model.layers.1.mlp.experts."
    gate_up = convert_moe_packed_tensors(sd[p + "gate_up_proj_blocks"], sd[p + "gate_up_proj_scales"],
                                         dtype=torch.float32)  # [E, in, 2*ff]
    down = convert_moe_packed_tensors(sd[p + "down_proj_blocks"], sd[p + "down_proj_scales"], dtype=torch.float32)
    want = {"ffn_gate_exps": gate_up[..., ::2].transpose(1, 2), "ffn_up_exps": gate_up[..., 1::2].transpose(1, 2),
            "ffn_down_exps": down.transpose(1, 2)}
    for suffix, ref in want.items():
        lt = g[f"blk.1.{suffix}.weight"]
        qt, data = lt.raw()
        assert qt == gguf.GGMLQuantizationType.MXFP4
        rows = gguf.quants.dequantize(np.asarray(data).reshape(-1, data.shape[-1]), qt)
        np.testing.assert_array_equal(rows.reshape(ref.shape), ref.numpy(), err_msg=suffix)
        assert torch.equal(lt.load().float(), ref)


def test_registered_reader_and_errors(tiny_mxfp4, tmp_path):
    from quantkit.formats import hf_quantized
    from quantkit.families import load
    from quantkit.runtime.model import CausalLM
    hf_quantized._load_builtin()
    assert "mxfp4" in hf_quantized.READERS
    # a blocks tensor without its scales is named in the error
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"
    bad.mkdir()
    sd = load_file(tiny_mxfp4 / "model.safetensors")
    del sd["model.layers.0.mlp.experts.down_proj_scales"]
    save_file(sd, bad / "model.safetensors")
    (bad / "config.json").write_text((tiny_mxfp4 / "config.json").read_text())
    with pytest.raises(QuantkitError, match="down_proj_blocks"):
        load(bad)
