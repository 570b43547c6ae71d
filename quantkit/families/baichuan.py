"""Baichuan 1 and 2 (BaichuanForCausalLM / BaiChuanForCausalLM, remote code; llama.cpp "baichuan"). Read from
the published tensor names and config keys only; its modeling code is never run.

A Llama layout (model.embed_tokens, model.layers.N.{input_layernorm, self_attn.o_proj,
post_attention_layernorm, mlp.gate_proj/up_proj/down_proj}, model.norm, lm_head) with q/k/v fused as
self_attn.W_pack = [q; k; v] (split into canonical attn_q/k/v; HF export packs them again).
Position encoding: the 7B models use RoPE, the 13B models ALiBi (max bias 8). The checkpoints say so only
through their modeling code; like llama.cpp (which decides by layer count when it loads the GGUF), a model
with 40 layers is taken as ALiBi, any other as RoPE. llama.cpp applies RoPE only to 32-layer models, so a
RoPE model of another depth cannot be written to GGUF.
Baichuan 2 (vocabulary of 125696) normalizes its lm_head rows (NormHead) at inference: done once, at load.
"""

from __future__ import annotations

import torch

from ..blocks import Attention, Branch, GatedMLP, LayerSpec, Norm
from ..errors import BadInput, UnsupportedArchitecture
from ..graph import ATTN_K, ATTN_NORM, ATTN_Q, ATTN_V, FFN_NORM, OUTPUT, HParams, blk
from .base import Family, _vt, lazy, need
from .hf_decoder import cfg_get, decoder_hparams, decoder_name_map
from .registry import register

ALIBI_LAYERS = 40  # llama.cpp's baichuan: 40 layers = 13B = ALiBi, 32 = 7B = RoPE
ROPE_LAYERS = 32
BAICHUAN2_VOCAB = 125696  # Baichuan 2's vocabulary: its lm_head is a NormHead


def _w_pack(i: int) -> str:
    return f"model.layers.{i}.self_attn.W_pack.weight"


@register
class Baichuan(Family):
    arch = "baichuan"
    hf_architectures = ("BaichuanForCausalLM", "BaiChuanForCausalLM")
    hf_model_type = "baichuan"
    gguf_arch = "baichuan"
    gguf_permute_qk = True  # llama.cpp's baichuan applies RoPE to interleaved pairs (NORM rope)

    @staticmethod
    def alibi(hp: HParams) -> bool:
        return hp.n_layers == ALIBI_LAYERS

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        attn = Attention(alibi=8.0 if cls.alibi(hp) else None)
        return LayerSpec([Branch(attn, Norm(ATTN_NORM)), Branch(GatedMLP("silu"), Norm(FFN_NORM))])

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        ctx = cfg_get(cfg, "max_position_embeddings") or cfg_get(cfg, "model_max_length", 4096)
        hp = decoder_hparams({**cfg, "max_position_embeddings": ctx}, cls.arch)
        if hp.n_kv_heads != hp.n_heads or hp.head_dim * hp.n_heads != hp.hidden_size:
            raise BadInput(f"config.json: Baichuan's W_pack holds q, k and v of hidden_size {hp.hidden_size} each "
                           f"({hp.n_heads} heads, {hp.n_kv_heads} kv heads of {hp.head_dim} do not fit it)")
        hp.attn_bias = hp.attn_out_bias = hp.mlp_bias = False
        return hp

    @classmethod
    def hf_name_map(cls, hp: HParams) -> dict[str, str]:
        qkv = {blk(i, s) for i in range(hp.n_layers) for s in (ATTN_Q, ATTN_K, ATTN_V)}
        return {h: c for h, c in decoder_name_map(hp).items() if c not in qkv}

    @classmethod
    def hf_tensors(cls, hp, src, source):
        out = super().hf_tensors(hp, src, source)
        d = hp.hidden_size
        for i in range(hp.n_layers):
            w = need(src, _w_pack(i), source)
            for j, s in enumerate((ATTN_Q, ATTN_K, ATTN_V)):
                out[blk(i, s)] = lazy(w, lambda t, j=j: t[j * d:(j + 1) * d], (d, d))
        if hp.vocab_size == BAICHUAN2_VOCAB and OUTPUT in out:
            out[OUTPUT] = lazy(out[OUTPUT], lambda t: torch.nn.functional.normalize(t.float()).to(t.dtype),
                               out[OUTPUT].shape)
        return out

    @classmethod
    def hf_export(cls, hp: HParams):
        out = super().hf_export(hp)
        for i in range(hp.n_layers):
            out.append((_w_pack(i), tuple(blk(i, s) for s in (ATTN_Q, ATTN_K, ATTN_V)),
                        lambda q, k, v: torch.cat([q, k, v])))
        return out

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        cfg = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "vocab_size": hp.vocab_size,
               "hidden_size": hp.hidden_size, "num_hidden_layers": hp.n_layers, "num_attention_heads": hp.n_heads,
               "intermediate_size": hp.ffn_size, "rms_norm_eps": hp.norm_eps, "hidden_act": "silu",
               "model_max_length": hp.context_length, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
        if not cls.alibi(hp):
            cfg["max_position_embeddings"] = hp.context_length
        return cfg

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def gguf_kv(cls, hp: HParams):
        VT = _vt()
        why = None
        if not cls.alibi(hp) and hp.n_layers != ROPE_LAYERS:
            why = (f"RoPE and {hp.n_layers} layers: llama.cpp's baichuan applies RoPE only to 32-layer models "
                   "(ALiBi to 40-layer ones)")
        elif hp.tie_embeddings:
            why = "tied embeddings: llama.cpp's baichuan requires a separate output.weight"
        elif hp.rope_scaling.kind != "none":
            why = "rope scaling (llama.cpp's baichuan reads none)"
        if why:
            raise UnsupportedArchitecture(f"baichuan with {why}; GGUF cannot hold this model")
        # as llama.cpp's converter writes it
        return super().gguf_kv(hp) + [("baichuan.tensor_data_layout", "Meta AI original pth", VT.STRING)]
