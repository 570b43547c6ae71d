"""Tiny random MoE checkpoints made with transformers' own classes (the family oracle).

Routers are scaled up from transformers' init so top-k choices are clear-cut (no near-ties that float
rounding, e.g. llama.cpp's f16 KV cache, could flip between implementations), experts so that their
routing weights show in the logits; attention keeps the small init (llama.cpp's f16 KV cache error grows
with k/v)."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2)
QWEN2 = dict(COMMON, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64)
QWEN3 = dict(COMMON, num_experts=4, moe_intermediate_size=32, head_dim=32)
OLMOE = dict(COMMON, num_experts=4, num_key_value_heads=4)

# kind -> (config class, model class, config kwargs); "gguf" kinds are ones llama.cpp's graph can represent
MOE_SPECS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(COMMON, num_local_experts=4)),
    "mixtral_swa": ("MixtralConfig", "MixtralForCausalLM", dict(COMMON, num_local_experts=4, sliding_window=6)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(QWEN2, norm_topk_prob=False)),
    "qwen2_moe_dense": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(QWEN2, num_hidden_layers=3,
                                                                      decoder_sparse_step=2, mlp_only_layers=[2],
                                                                      norm_topk_prob=True)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(QWEN3, norm_topk_prob=True)),
    "qwen3_moe_dense": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(QWEN3, mlp_only_layers=[0],
                                                                      norm_topk_prob=False, attention_bias=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(OLMOE, norm_topk_prob=False)),
    "olmoe_clip": ("OlmoeConfig", "OlmoeForCausalLM", dict(COMMON, num_experts=4, norm_topk_prob=True,
                                                           clip_qkv=0.5)),
}
GGUF_KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def make_tiny_moe(kind: str, out: Path, seed: int = 0, hidden: int = 64, layers: int = 2, ffn: int = 128,
                  vocab: int = 256, **overrides) -> Path:
    import transformers
    cfg_cls, model_cls, extra = MOE_SPECS[kind]
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
              max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
    kw.update(extra)
    kw.update(overrides)
    cfg = getattr(transformers, cfg_cls)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases so they matter
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif n.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):  # routers, shared-expert gate
                p.normal_(0.0, 0.5)
            elif ".experts." in n or ".shared_expert." in n:
                p.normal_(0.0, 0.05)
    model.save_pretrained(out, safe_serialization=True)
    return out
