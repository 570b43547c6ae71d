"""OLMo 1/2/3, Gemma 1/2/3 and Seed-OSS against transformers (executor logits) and llama.cpp (our GGUF)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from quantkit.families import load
from quantkit.runtime import executor_for

VOCAB = 49152
GEMMA_ROPE = {"rope_theta": 10000.0}

# kind -> (config class, model class, config overrides); every model: hidden 64, 4 heads
SPECS = {
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(num_key_value_heads=2)),
    "olmo_clip": ("OlmoConfig", "OlmoForCausalLM", dict(num_key_value_heads=4, clip_qkv=0.5)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2)),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(
        num_key_value_heads=2, num_hidden_layers=4, sliding_window=6,
        rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
                                            "original_max_position_embeddings": 32},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 50000.0}})),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=6, num_hidden_layers=3,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=6, num_hidden_layers=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        final_logit_softcapping=None)),
    "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM", dict(num_key_value_heads=2, head_dim=32,
                                                             attention_bias=True)),
}
# llama.cpp (0c1e570) architecture each family is written as (all of them have one)
GGUF_ARCH = {"olmo": "olmo", "olmo_clip": "olmo", "olmo2": "olmo2", "olmo3": "olmo2", "gemma": "gemma",
             "gemma2": "gemma2", "gemma3": "gemma3", "seed_oss": "seed_oss"}


def make(kind: str, out, vocab: int = 256, seed: int = 0, **over):
    import transformers
    cfg_cls, model_cls, extra = SPECS[kind]
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=kind.startswith("gemma"))
    kw.update(extra)
    kw.update(over)
    if kind in ("gemma", "gemma2"):
        kw["hidden_activation"] = "gelu_pytorch_tanh"
    cfg = getattr(transformers, cfg_cls)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases; larger weights so clipping and soft-caps bite
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif "embed" not in n:
                p.mul_(3.0)
    model.save_pretrained(out, safe_serialization=True)
    return out


def hf_logits(d, ids):
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return m.eval()(ids).logits.float()


def ids_of(n, t, seed):
    return torch.randint(0, n, (1, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_executor_matches_transformers(kind, tmp_path):
    d = make(kind, tmp_path / kind)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(d, ids)
    g = load(d)
    assert g.hparams.arch == kind.split("_clip")[0]
    torch.testing.assert_close(executor_for(g)(ids), ref, atol=2e-5, rtol=1e-4)
