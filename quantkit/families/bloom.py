"""BLOOM (BloomForCausalLM; llama.cpp "bloom").

LayerNorms with biases everywhere (also one right after the token embeddings, `word_embeddings_layernorm`),
ALiBi instead of RoPE (max bias 8, llama.cpp's fixed value), one fused query_key_value projection, a tanh-GELU
MLP of width 4 * hidden with biases, tied head by default. HF names with or without the `transformer.`
prefix (the original bigscience checkpoints have none).

query_key_value's rows are interleaved per head ([head][q|k|v][head_dim]); the canonical attn_qkv is
[q; k; v] (what llama.cpp's converter reorders it to and loads), HF export interleaves back. A BLOOM GPTQ /
AWQ checkpoint therefore has no one-to-one name for attn_qkv: quantized HF writers refuse it.
"""

from __future__ import annotations

import torch

from ..blocks import Attention, Branch, LayerSpec, Norm, PlainMLP
from ..blocks.norms import make_norm
from ..errors import BadInput, UnsupportedArchitecture
from ..graph import (ATTN_NORM, ATTN_OUT, ATTN_QKV, FFN_DOWN, FFN_NORM, FFN_UP, OUTPUT, OUTPUT_NORM, TOKEN_EMBD,
                     HParams, LazyTensor, blk)
from .base import Family, _vt, gguf_get, lazy, need
from .hf_decoder import cfg_get
from .registry import register

TOKEN_EMBD_NORM = "token_embd_norm"
ALIBI_MAX_BIAS = 8.0  # llama.cpp's bloom sets f_max_alibi_bias = 8 (BLOOM's slopes)

_LAYER = {"input_layernorm": ATTN_NORM, "self_attention.dense": ATTN_OUT, "post_attention_layernorm": FFN_NORM,
          "mlp.dense_h_to_4h": FFN_UP, "mlp.dense_4h_to_h": FFN_DOWN}


def interleaved_to_qkv(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """BLOOM's [head][q|k|v][head_dim] rows -> [q; k; v] (llama.cpp's converter does the same)."""
    return w.reshape(n_heads, 3, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def qkv_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    return w.reshape(3, n_heads, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


@register
class Bloom(Family):
    arch = "bloom"
    hf_architectures = ("BloomForCausalLM",)
    hf_model_type = "bloom"
    gguf_arch = "bloom"

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        attn = Attention(bias=True, out_bias=True, fused=True, alibi=ALIBI_MAX_BIAS)
        return LayerSpec([Branch(attn, Norm(ATTN_NORM, "layer", bias=True)),
                          Branch(PlainMLP("gelu_tanh", bias=True), Norm(FFN_NORM, "layer", bias=True))])

    @classmethod
    def global_tensors(cls, hp: HParams):
        d = hp.hidden_size
        return {**super().global_tensors(hp), f"{TOKEN_EMBD_NORM}.weight": (d,), f"{TOKEN_EMBD_NORM}.bias": (d,),
                "output_norm.bias": (d,)}

    @classmethod
    def embed_post(cls, hp, x, tensor):
        return make_norm("layer", hp.norm_eps, hp.hidden_size, lambda k: tensor(f"{TOKEN_EMBD_NORM}.{k}"), True)(x)

    # ------------------------------------------------------------------ HF
    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        if cfg.get("apply_residual_connection_post_layernorm"):
            raise UnsupportedArchitecture("config.json: BLOOM with apply_residual_connection_post_layernorm is "
                                          "not supported (llama.cpp's bloom adds the pre-norm residual)")
        hidden = cfg_get(cfg, "hidden_size") or cfg_get(cfg, "n_embed", required=True)
        heads = cfg_get(cfg, "n_head") or cfg_get(cfg, "num_attention_heads", required=True)
        if hidden % heads:
            raise BadInput(f"config.json: hidden_size {hidden} is not a multiple of n_head {heads}")
        return HParams(
            arch=cls.arch, vocab_size=cfg_get(cfg, "vocab_size", required=True), hidden_size=hidden,
            n_layers=cfg_get(cfg, "n_layer") or cfg_get(cfg, "num_hidden_layers", required=True), n_heads=heads,
            n_kv_heads=heads, head_dim=hidden // heads, ffn_size=4 * hidden, norm="layer",
            norm_eps=float(cfg_get(cfg, "layer_norm_epsilon", 1e-5)),
            context_length=int(cfg_get(cfg, "seq_length", hidden)),  # what llama.cpp's converter writes
            tie_embeddings=bool(cfg_get(cfg, "tie_word_embeddings", True)), attn_bias=True, attn_out_bias=True,
            mlp_bias=True, act="gelu_tanh", name=cfg_get(cfg, "_name_or_path", ""))

    @classmethod
    def hf_name_map(cls, hp: HParams) -> dict[str, str]:
        p = "transformer."
        m = {p + "word_embeddings.weight": TOKEN_EMBD}
        for k in ("weight", "bias"):
            m[f"{p}word_embeddings_layernorm.{k}"] = f"{TOKEN_EMBD_NORM}.{k}"
        for i in range(hp.n_layers):
            for hf, c in _LAYER.items():
                for k in ("weight", "bias"):
                    m[f"{p}h.{i}.{hf}.{k}"] = blk(i, c, k)
        m[p + "ln_f.weight"], m[p + "ln_f.bias"] = OUTPUT_NORM, "output_norm.bias"
        if not hp.tie_embeddings:
            m["lm_head.weight"] = OUTPUT
        return m

    @classmethod
    def hf_tensors(cls, hp: HParams, src: dict[str, LazyTensor], source: str) -> dict[str, LazyTensor]:
        if "transformer.word_embeddings.weight" not in src and "word_embeddings.weight" in src:
            src = {(n if n.startswith("lm_head.") else "transformer." + n): t for n, t in src.items()}
        out = {c: need(src, h, source) for h, c in cls.hf_name_map(hp).items()}
        for i in range(hp.n_layers):
            for k in ("weight", "bias"):
                t = need(src, f"transformer.h.{i}.self_attention.query_key_value.{k}", source)
                out[blk(i, ATTN_QKV, k)] = lazy(t, lambda w: interleaved_to_qkv(w, hp.n_heads), t.shape)
        return out

    @classmethod
    def hf_export(cls, hp: HParams):
        out = super().hf_export(hp)
        for i in range(hp.n_layers):
            for k in ("weight", "bias"):
                out.append((f"transformer.h.{i}.self_attention.query_key_value.{k}", (blk(i, ATTN_QKV, k),),
                            lambda w: qkv_to_interleaved(w, hp.n_heads)))
        return out

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        return {"architectures": ["BloomForCausalLM"], "model_type": "bloom", "vocab_size": hp.vocab_size,
                "hidden_size": hp.hidden_size, "n_layer": hp.n_layers, "n_head": hp.n_heads,
                "layer_norm_epsilon": hp.norm_eps, "seq_length": hp.context_length,
                "tie_word_embeddings": hp.tie_embeddings, "apply_residual_connection_post_layernorm": False,
                "torch_dtype": "bfloat16"}

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def gguf_kv(cls, hp: HParams):
        VT = _vt()
        if hp.ffn_size != 4 * hp.hidden_size:
            raise UnsupportedArchitecture(f"bloom with ffn {hp.ffn_size} != 4 x hidden {hp.hidden_size}")
        a = cls.gguf_arch
        return [("general.architecture", a, VT.STRING), (f"{a}.vocab_size", hp.vocab_size, VT.UINT32),
                (f"{a}.context_length", hp.context_length, VT.UINT32),
                (f"{a}.embedding_length", hp.hidden_size, VT.UINT32),
                (f"{a}.feed_forward_length", hp.ffn_size, VT.UINT32), (f"{a}.block_count", hp.n_layers, VT.UINT32),
                (f"{a}.attention.head_count", hp.n_heads, VT.UINT32),
                (f"{a}.attention.head_count_kv", hp.n_kv_heads, VT.UINT32),
                (f"{a}.attention.layer_norm_epsilon", float(hp.norm_eps), VT.FLOAT32)]

    @classmethod
    def hparams_from_gguf(cls, kv: dict, path: str, names: set[str]) -> HParams:
        a = cls.gguf_arch
        eps = float(gguf_get(kv, f"{a}.attention.layer_norm_epsilon", path))
        hp = super().hparams_from_gguf({**kv, f"{a}.attention.layer_norm_rms_epsilon": eps}, path, names)
        if hp.n_kv_heads != hp.n_heads:
            raise BadInput(f"{path}: bloom with {hp.n_kv_heads} kv heads != {hp.n_heads} heads")
        hp.norm, hp.act, hp.rope_dim = "layer", "gelu_tanh", None
        hp.attn_bias = hp.attn_out_bias = hp.mlp_bias = True
        return hp
