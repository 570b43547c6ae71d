"""CodeGeeX (the 13B model in THUDM's original format: CodeGeeXModel; not CodeGeeX2/4, which are ChatGLM).
llama.cpp has no architecture for it: GGUF writing refuses.

The layout supported is CodeGeeXModel's state dict, flattened with dots and stored as safetensors:
  language_model.embedding.word_embeddings.weight              [vocab, hidden] (also the tied head)
  language_model.embedding.position_embeddings.weight          [max_position_embeddings, hidden]
  language_model.topQueryEmbedding.top_query_embeddings.weight [max_position_embeddings, hidden]
  language_model.transformer.layers.N.{input_layernorm, attention.query, attention.key, attention.value,
      attention.dense, post_attention_layernorm, mlp.dense_h_to_4h, mlp.dense_4h_to_h}.{weight, bias}
  language_model.transformer.final_layernorm.{weight, bias}
  language_model.transformer.topQueryLayer.<the same as a layer>
with a config.json {"architectures": ["CodeGeeXForCausalLM"], "model_type": "codegeex", "vocab_size",
"hidden_size", "num_layers" (the ordinary layers, without the top query layer; 39 for the 13B),
"num_attention_heads", "max_position_embeddings", "layernorm_epsilon", "intermediate_size" (default 4 x
hidden)}.

The computation: x = word + position embeddings; the layers (pre-LayerNorm, causal attention with biases
scaled by 1/sqrt(head_dim), FastGeLU MLP with biases); then final_layernorm; then the top query layer, whose
queries are top_query_embeddings[position] and whose residual stream starts from the final norm's output;
logits = its output times the word embeddings (no norm after it). In the canonical graph the top query layer
is the last layer: a first branch (residual=False) applies final_layernorm (blk.L.top_norm), then the
attention (TopQueryAttention, blk.L.top_query_embd) and the MLP branches.
"""

from __future__ import annotations

from ..blocks import Attention, Branch, LayerSpec, Norm, PlainMLP
from ..blocks.top_query import TOP_QUERY_EMBD, TopQueryAttention
from ..errors import BadInput
from ..graph import ATTN_K, ATTN_NORM, ATTN_OUT, ATTN_Q, ATTN_V, FFN_DOWN, FFN_NORM, FFN_UP, TOKEN_EMBD, HParams, blk
from .base import Family
from .hf_decoder import cfg_get
from .registry import register

POSITION_EMBD = "position_embd.weight"
TOP_NORM = "top_norm"  # final_layernorm, applied at the start of the top query layer
_P = "language_model."
_LAYER = {"input_layernorm": ATTN_NORM, "attention.query": ATTN_Q, "attention.key": ATTN_K,
          "attention.value": ATTN_V, "attention.dense": ATTN_OUT, "post_attention_layernorm": FFN_NORM,
          "mlp.dense_h_to_4h": FFN_UP, "mlp.dense_4h_to_h": FFN_DOWN}


@register
class CodeGeeX(Family):
    arch = "codegeex"
    hf_architectures = ("CodeGeeXForCausalLM",)
    hf_model_type = "codegeex"
    gguf_arch = None  # llama.cpp has no CodeGeeX (1) architecture

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        ln = dict(kind="layer", bias=True)
        mlp = Branch(PlainMLP("fast_gelu", bias=True), Norm(FFN_NORM, **ln))
        if i < hp.n_layers - 1:
            return LayerSpec([Branch(Attention(bias=True, out_bias=True, rope=False), Norm(ATTN_NORM, **ln)), mlp])
        return LayerSpec([Branch(Norm(TOP_NORM, **ln), residual=False),
                          Branch(TopQueryAttention(hp.context_length), Norm(ATTN_NORM, **ln)), mlp])

    @classmethod
    def global_tensors(cls, hp: HParams):
        return {TOKEN_EMBD: (hp.vocab_size, hp.hidden_size), POSITION_EMBD: (hp.context_length, hp.hidden_size)}

    @classmethod
    def output_norm(cls, hp: HParams) -> bool:
        return False

    @classmethod
    def embed_post(cls, hp, x, tensor):
        t = x.shape[1]
        if t > hp.context_length:
            raise BadInput(f"{t} tokens exceed CodeGeeX's {hp.context_length} learned positions")
        return x + tensor(POSITION_EMBD)[:t].to(x.dtype)

    # ------------------------------------------------------------------ HF
    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        hidden = cfg_get(cfg, "hidden_size", required=True)
        heads = cfg_get(cfg, "num_attention_heads", required=True)
        if hidden % heads:
            raise BadInput(f"config.json: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        return HParams(
            arch=cls.arch, vocab_size=cfg_get(cfg, "vocab_size", required=True), hidden_size=hidden,
            n_layers=cfg_get(cfg, "num_layers", required=True) + 1, n_heads=heads, n_kv_heads=heads,
            head_dim=hidden // heads, ffn_size=cfg_get(cfg, "intermediate_size", 4 * hidden), norm="layer",
            norm_eps=float(cfg_get(cfg, "layernorm_epsilon", 1e-5)),
            context_length=cfg_get(cfg, "max_position_embeddings", required=True), tie_embeddings=True,
            attn_bias=True, attn_out_bias=True, mlp_bias=True, act="fast_gelu", name=cfg_get(cfg, "_name_or_path", ""))

    @classmethod
    def hf_name_map(cls, hp: HParams) -> dict[str, str]:
        m = {_P + "embedding.word_embeddings.weight": TOKEN_EMBD,
             _P + "embedding.position_embeddings.weight": POSITION_EMBD}
        top = hp.n_layers - 1
        for i in range(hp.n_layers):
            pre = f"{_P}transformer.layers.{i}." if i < top else f"{_P}transformer.topQueryLayer."
            for hf, c in _LAYER.items():
                for k in ("weight", "bias"):
                    m[pre + f"{hf}.{k}"] = blk(i, c, k)
        for k in ("weight", "bias"):
            m[f"{_P}transformer.final_layernorm.{k}"] = blk(top, TOP_NORM, k)
        m[_P + "topQueryEmbedding.top_query_embeddings.weight"] = blk(top, TOP_QUERY_EMBD)
        return m

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        return {"architectures": ["CodeGeeXForCausalLM"], "model_type": "codegeex", "vocab_size": hp.vocab_size,
                "hidden_size": hp.hidden_size, "num_layers": hp.n_layers - 1,
                "num_attention_heads": hp.n_heads, "max_position_embeddings": hp.context_length,
                "layernorm_epsilon": hp.norm_eps, "intermediate_size": hp.ffn_size, "torch_dtype": "float16"}
