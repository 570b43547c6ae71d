"""DeepSeek V3.2 (DeepseekV32ForCausalLM): DeepSeek V3 (families/deepseek.py) with DeepSeek Sparse Attention:
each MLA layer's lightning indexer (`self_attn.indexer.{wq_b, wk, k_norm, weights_proj}`) picks the
`index_topk` keys every query attends to (blocks/dsa.py; computed exactly, not approximated).

HF: the indexer needs q_lora (it reads the q_a_norm output); MLA rope is always interleaved (adjacent pairs),
the indexer's rotate-half. GGUF: llama.cpp's "deepseek32" (V3's deepseek2 keys and kv_b split, plus
attention.indexer.{head_count, key_length, top_k}; tensors blk.N.indexer.{attn_q_b, attn_k, k_norm, proj}).
MTP layers are not read (as for V3).
"""

from __future__ import annotations

from ..blocks import LayerSpec
from ..blocks.dsa import IDX_K, IDX_K_NORM, IDX_PROJ, IDX_Q_B, IndexedMLA
from ..errors import BadInput, UnsupportedArchitecture
from ..graph import HParams, blk
from .base import gguf_get, need
from .deepseek import DeepseekV3, hparams
from .hf_decoder import cfg_get
from .registry import register

_INDEXER = {"wq_b.weight": (IDX_Q_B, "weight"), "wk.weight": (IDX_K, "weight"), "k_norm.weight": (IDX_K_NORM, "weight"),
            "k_norm.bias": (IDX_K_NORM, "bias"), "weights_proj.weight": (IDX_PROJ, "weight")}
KEYS = ("index_n_heads", "index_head_dim", "index_topk")


@register
class DeepseekV32(DeepseekV3):
    arch = "deepseek32"
    hf_architectures = ("DeepseekV32ForCausalLM",)
    hf_model_type = "deepseek_v32"
    gguf_arch = "deepseek32"
    gguf_reader = True

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        spec = super().layer(hp, i)
        spec.branches[0].mixer = IndexedMLA()
        return spec

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        if cfg.get("q_lora_rank") is None:
            raise UnsupportedArchitecture("deepseek32: q_lora_rank is null (the sparse-attention indexer reads "
                                          "the q_a_norm output)")
        hp = hparams(cfg, cls.arch, True)
        hp.extra["rope_interleave"] = True  # transformers' V3.2 always rotates adjacent pairs
        hp.extra.update({k: int(cfg_get(cfg, k, required=True)) for k in KEYS})
        types = cfg.get("mlp_layer_types")
        first = min(hp.moe_layers) if hp.moe_layers else hp.n_layers
        if types is not None and list(types) != ["dense"] * first + ["sparse"] * (hp.n_layers - first):
            raise BadInput(f"config.json: mlp_layer_types {types} is not first_k_dense_replace={first} dense "
                           "layers then sparse ones")
        return hp

    @classmethod
    def hf_name_map(cls, hp):
        m = super().hf_name_map(hp)
        for i in range(hp.n_layers):
            for hf, (suffix, kind) in _INDEXER.items():
                m[f"model.layers.{i}.self_attn.indexer.{hf}"] = blk(i, suffix, kind)
        return m

    @classmethod
    def hf_tensors(cls, hp, src, source):
        out = super().hf_tensors(hp, src, source)  # V3's map (its module function), then the indexer
        for i in range(hp.n_layers):
            for hf, (suffix, kind) in _INDEXER.items():
                out[blk(i, suffix, kind)] = need(src, f"model.layers.{i}.self_attn.indexer.{hf}", source)
        return out

    @classmethod
    def hf_config(cls, hp):
        cfg = super().hf_config(hp)
        for k in ("rope_interleave", "topk_method"):  # not V3.2 config fields (it always does both)
            cfg.pop(k, None)
        first = cfg["first_k_dense_replace"]
        cfg.update(architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32",
                   mlp_layer_types=["dense"] * first + ["sparse"] * (hp.n_layers - first),
                   **{k: hp.extra[k] for k in KEYS})
        return cfg

    @classmethod
    def gguf_kv(cls, hp):
        from gguf import GGUFValueType as VT
        a = cls.gguf_arch
        if hp.extra["index_head_dim"] % 64:
            raise UnsupportedArchitecture(f"cannot write this model as GGUF arch '{a}': index_head_dim "
                                          f"{hp.extra['index_head_dim']} is not a multiple of 64 (llama.cpp "
                                          "Hadamard-rotates the indexer's q/k in blocks of 64 or more)")
        return super().gguf_kv(hp) + [
            (f"{a}.attention.indexer.head_count", hp.extra["index_n_heads"], VT.UINT32),
            (f"{a}.attention.indexer.key_length", hp.extra["index_head_dim"], VT.UINT32),
            (f"{a}.attention.indexer.top_k", hp.extra["index_topk"], VT.UINT32)]

    @classmethod
    def hparams_from_gguf(cls, kv, path, names):
        a = kv["general.architecture"]
        hp = super().hparams_from_gguf(kv, path, names)
        if hp.extra.get("q_lora_rank") is None:
            raise BadInput(f"{path}: deepseek32 GGUF without {a}.attention.q_lora_rank")
        hp.extra.update({"index_n_heads": int(gguf_get(kv, f"{a}.attention.indexer.head_count", path)),
                         "index_head_dim": int(gguf_get(kv, f"{a}.attention.indexer.key_length", path)),
                         "index_topk": int(gguf_get(kv, f"{a}.attention.indexer.top_k", path))})
        return hp
