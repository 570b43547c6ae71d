"""Tiny random hybrid checkpoints (Qwen3-Next, DeepSeek V3.2, MiniMax) made with transformers' own classes.

Norm weights, routers and the DeltaNet decay parameters are perturbed away from their init so each of them
shows in the logits; routers are scaled up so top-k choices are clear-cut (no near-ties float rounding could
flip between implementations)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

QWEN3_NEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                  linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                  full_attention_interval=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                  tie_word_embeddings=False)


def _perturb(model, routers=("mlp.gate.weight", "shared_expert_gate.weight")):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 and not n.endswith(("A_log", "dt_bias")):
                p.add_(torch.randn_like(p) * 0.1)
            elif n.endswith(routers):
                p.normal_(0.0, 0.5)
            elif ".experts." in n or ".shared_expert." in n:
                p.normal_(0.0, 0.05)
            elif n.endswith("dt_bias"):
                p.copy_(torch.randn_like(p) * 0.5)


def make_qwen3_next(out: Path, seed: int = 0, vocab: int = 256, tok_dir: Path | None = None, **overrides) -> Path:
    import transformers
    cfg = transformers.Qwen3NextConfig(vocab_size=vocab, **{**QWEN3_NEXT, **overrides})
    torch.manual_seed(seed)
    model = transformers.Qwen3NextForCausalLM(cfg).eval()
    _perturb(model)
    model.save_pretrained(out, safe_serialization=True)
    if tok_dir is not None:
        for f in tok_dir.iterdir():
            shutil.copy(f, out / f.name)
    return out


def hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits.float()


def ids_for(vocab: int, t: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (1, t), generator=torch.Generator().manual_seed(seed))


DEEPSEEK_V32 = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                    n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                    qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256,
                    n_group=2, topk_group=1, routed_scaling_factor=2.5, index_topk=8, index_head_dim=64,
                    index_n_heads=16, initializer_range=0.1, rms_norm_eps=1e-6, tie_word_embeddings=False)


def make_deepseek_v32(out: Path, seed: int = 0, vocab: int = 256, tok_dir: Path | None = None, **overrides) -> Path:
    import transformers
    cfg = transformers.DeepseekV32Config(vocab_size=vocab, **{**DEEPSEEK_V32, **overrides})
    torch.manual_seed(seed)
    model = transformers.DeepseekV32ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.2)
    model.save_pretrained(out, safe_serialization=True)
    if tok_dir is not None:
        for f in tok_dir.iterdir():
            shutil.copy(f, out / f.name)
    return out


MINIMAX = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, num_local_experts=4, num_experts_per_tok=2, block_size=16, max_position_embeddings=128,
               full_attn_alpha_factor=1.5, full_attn_beta_factor=0.8, linear_attn_alpha_factor=1.2,
               linear_attn_beta_factor=0.9, mlp_alpha_factor=1.1, mlp_beta_factor=0.7, rms_norm_eps=1e-5,
               tie_word_embeddings=False)


def make_minimax(out: Path, seed: int = 0, vocab: int = 256, tok_dir: Path | None = None, **overrides) -> Path:
    """block_size 16: sequences past it exercise transformers' block-wise lightning attention."""
    import transformers
    cfg = transformers.MiniMaxConfig(vocab_size=vocab, **{**MINIMAX, **overrides})
    torch.manual_seed(seed)
    model = transformers.MiniMaxForCausalLM(cfg).eval()
    _perturb(model, routers=("block_sparse_moe.gate.weight",))
    model.save_pretrained(out, safe_serialization=True)
    if tok_dir is not None:
        for f in tok_dir.iterdir():
            shutil.copy(f, out / f.name)
    return out
