"""GLM-4.5 / 4.5-Air / 4.6 (Glm4MoeForCausalLM).

Layers: RMSNorm -> GQA attention (q/k/v biases when `attention_bias`, o without; per-head q/k RMSNorm when
`use_qk_norm`; RoPE on the first `partial_rotary_factor` (default 0.5) of each head, rotate-half), RMSNorm ->
a dense SwiGLU for the first `first_k_dense_replace` layers, then MoE: a sigmoid router whose selection bias
`e_score_correction_bias` (canonical blk.{i}.exp_probs_b.bias) shifts which experts are picked, groups
(n_group / topk_group) scored by their best two experts, renormalised top-k weights (norm_topk_prob) scaled by
routed_scaling_factor, plus `n_shared_experts * moe_intermediate_size` shared expert.
Experts `mlp.experts.{e}.{gate,up,down}_proj`, stacked canonically.

MTP: checkpoints carry `num_nextn_predict_layers` next-token-prediction layers after the last decoder layer
(model.layers.{n_layers + k}: a full decoder layer plus eh_proj, enorm, hnorm and shared_head.*). They are
kept, as llama.cpp's converter does for glm4moe: canonical blk.{n+k}.* (the layer's tensors under their
usual suffixes, blk.{n+k}.nextn.* for the MTP-only ones), written to GGUF with block_count n + k and
`glm4moe.nextn_predict_layers` k (llama.cpp's main graph runs n layers, its MTP graph the rest). The
executor and the calibrated quantizers run the n decoder layers only; MTP tensors are RTN-quantized to GGUF
and stay float in GPTQ/AWQ checkpoints. --drop-mtp (`load(..., drop_mtp=True)`, HF or GGUF input) leaves
them out instead; either way it is logged and `convert`'s summary says so.
GGUF: llama.cpp's "glm4moe" (NEOX rope: q/k rows as HF has them), post_attention_layernorm as
blk.{i}.post_attention_norm, expert_gating_func 2 (sigmoid), leading_dense_block_count.
"""

from __future__ import annotations

import dataclasses
import logging

from ..blocks import Attention, Branch, GatedMLP, LayerSpec, MoE, Norm
from ..blocks.moe import EXP_PROBS_B
from ..errors import BadInput
from ..graph import (ATTN_NORM, FFN_DOWN_SHEXP, FFN_GATE_SHEXP, FFN_NORM, FFN_UP_SHEXP, HParams, LazyTensor, blk,
                     parse_name)
from . import hf_moe
from .base import by_layer, gguf_get, need
from .hf_decoder import cfg_get, decoder_config, decoder_hparams
from .registry import register

log = logging.getLogger("quantkit")

LAYOUT = hf_moe.ExpertLayout()
SHARED = {"gate_proj": FFN_GATE_SHEXP, "up_proj": FFN_UP_SHEXP, "down_proj": FFN_DOWN_SHEXP}
# MTP-only tensors: HF name inside model.layers.{i}. -> canonical (= llama.cpp's) suffix
NEXTN = {"eh_proj": "nextn.eh_proj", "enorm": "nextn.enorm", "hnorm": "nextn.hnorm",
         "embed_tokens": "nextn.embed_tokens", "shared_head.head": "nextn.shared_head_head",
         "shared_head.norm": "nextn.shared_head_norm"}
NEXTN_OPTIONAL = ("nextn.embed_tokens", "nextn.shared_head_head")  # llama.cpp falls back to the main model's
SIGMOID = 2  # llama.cpp's expert_gating_func


def partial_rotary_factor(cfg: dict, default: float) -> float:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params.get("partial_rotary_factor") is not None:
        return float(params["partial_rotary_factor"])
    return float(cfg_get(cfg, "partial_rotary_factor", default))


def rope_dim_of(head_dim: int, factor: float) -> int | None:
    """Rotary dims per head (None: all of them), as transformers computes it (int(head_dim * factor))."""
    if not 0 < factor <= 1:
        raise BadInput(f"config.json: partial_rotary_factor {factor} (expected 0 < factor <= 1)")
    rd = int(head_dim * factor)
    if rd % 2:
        raise BadInput(f"config.json: {rd} rotary dims per head (head_dim {head_dim} * {factor}) is odd")
    return None if rd == head_dim else rd


def with_layers(hp: HParams, n: int) -> HParams:
    """hp for `n` layers, the extra ones MoE (an MTP layer is built like the last decoder layer)."""
    moe = hp.moe_layers
    if moe is not None and hp.n_layers - 1 in moe:
        moe = list(moe) + list(range(hp.n_layers, n))
    return dataclasses.replace(hp, n_layers=n, moe_layers=moe)


@register
class Glm4Moe(hf_moe.PerExpertFamily):
    hf_layout = LAYOUT
    arch = "glm4moe"
    hf_architectures = ("Glm4MoeForCausalLM",)
    hf_model_type = "glm4_moe"
    gguf_arch = "glm4moe"
    gguf_renames = {FFN_NORM: "post_attention_norm"}

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        x = hp.extra
        attn = Attention(bias=hp.attn_bias, out_bias=hp.attn_out_bias, qk_norm="head" if hp.qk_norm else None)
        if hp.is_moe(i):
            ffn = MoE(router="sigmoid", shared_size=hp.n_shared_experts * hp.expert_ffn_size, select_bias=True,
                      n_group=x.get("n_group", 1), topk_group=x.get("topk_group", 1), group_score="top2",
                      scale=x.get("routed_scaling_factor", 1.0))
        else:
            ffn = GatedMLP(hp.act)
        return LayerSpec([Branch(attn, Norm(ATTN_NORM)), Branch(ffn, Norm(FFN_NORM))])

    # ------------------------------------------------------------------ HF
    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        hp = decoder_hparams(cfg, cls.arch, qk_norm=bool(cfg_get(cfg, "use_qk_norm", False)),
                             attn_out_bias=False, mlp_bias=False)
        hp.rope_dim = rope_dim_of(hp.head_dim, partial_rotary_factor(cfg, 0.5))
        hp.n_experts = int(cfg_get(cfg, "n_routed_experts", cfg_get(cfg, "num_local_experts", 0)))
        if not hp.n_experts:
            raise BadInput("config.json: missing 'n_routed_experts'")
        hp.n_experts_used = int(cfg_get(cfg, "num_experts_per_tok", required=True))
        hp.expert_ffn_size = int(cfg_get(cfg, "moe_intermediate_size", required=True))
        hp.n_shared_experts = int(cfg_get(cfg, "n_shared_experts", 1))
        hp.norm_topk_prob = bool(cfg_get(cfg, "norm_topk_prob", True))
        first = int(cfg_get(cfg, "first_k_dense_replace", 1))
        hp.moe_layers = list(range(first, hp.n_layers))
        n_group = int(cfg_get(cfg, "n_group", 1))
        if n_group < 1 or hp.n_experts % n_group:
            raise BadInput(f"config.json: n_group {n_group} does not divide {hp.n_experts} experts")
        hp.extra = {**hp.extra, "n_group": n_group, "topk_group": int(cfg_get(cfg, "topk_group", 1)),
                    "routed_scaling_factor": float(cfg_get(cfg, "routed_scaling_factor", 1.0)),
                    "mtp_declared": int(cfg_get(cfg, "num_nextn_predict_layers", cfg_get(cfg, "num_mtp_layers", 0))),
                    "mtp_layers": 0}
        return hp

    @classmethod
    def hf_name_map(cls, hp: HParams) -> dict[str, str]:
        return name_map(hp, hp.extra.get("mtp_layers", 0))

    @classmethod
    def hf_tensors(cls, hp, src, source):
        n, declared = hp.n_layers, hp.extra.get("mtp_declared", 0)
        present = sorted({int(k.split(".")[2]) for k in src if k.startswith("model.layers.")
                          and k.split(".")[2].isdigit() and int(k.split(".")[2]) >= n})
        mtp = len(present)
        if mtp and present != list(range(n, n + mtp)):
            raise BadInput(f"{source}: layers {present} after the {n} decoder layers are not consecutive")
        if mtp and hp.extra.get("drop_mtp"):
            log.info("%s: %d MTP (next-token prediction) layer(s) dropped (--drop-mtp)", source, mtp)
            hp.extra.update(mtp_dropped=mtp, mtp_reason="--drop-mtp")
            mtp = 0
        elif mtp:
            log.info("%s: %d MTP (next-token prediction) layer(s) kept as blk.%d.. (llama.cpp's glm4moe runs them "
                     "as its MTP draft; --drop-mtp leaves them out)", source, mtp, n)
        elif declared:
            log.info("%s: config declares %d MTP layer(s), but the checkpoint holds none", source, declared)
        hp.extra["mtp_layers"] = mtp
        out = {c: need(src, h, source) for h, c in name_map(hp, mtp).items()
               if h in src or parse_name(c)[1] not in NEXTN_OPTIONAL}
        out.update(hf_moe.stacked_tensors(with_layers(hp, n + mtp), src, source, cls.hf_layout))
        return out

    @classmethod
    def hf_export(cls, hp: HParams):
        mtp = hp.extra.get("mtp_layers", 0)
        return ([(h, (c,), None) for h, c in name_map(hp, mtp).items()]
                + hf_moe.expert_export(with_layers(hp, hp.n_layers + mtp), cls.hf_layout))

    @classmethod
    def hf_experts(cls, hp: HParams):
        return hf_moe.expert_names(hp, cls.hf_layout)  # the decoder layers' (MTP experts stay float)

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        x = hp.extra
        cfg = decoder_config(
            hp, "Glm4MoeForCausalLM", "glm4_moe", n_routed_experts=hp.n_experts,
            num_experts_per_tok=hp.n_experts_used, moe_intermediate_size=hp.expert_ffn_size,
            n_shared_experts=hp.n_shared_experts, first_k_dense_replace=first_dense(hp),
            norm_topk_prob=hp.norm_topk_prob, routed_scaling_factor=x.get("routed_scaling_factor", 1.0),
            n_group=x.get("n_group", 1), topk_group=x.get("topk_group", 1), use_qk_norm=hp.qk_norm,
            attention_bias=hp.attn_bias, partial_rotary_factor=hp.rotary_dim / hp.head_dim,
            num_nextn_predict_layers=x.get("mtp_layers", 0))
        return cfg

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def gguf_kv(cls, hp: HParams):
        from gguf import GGUFValueType as VT
        a, x = cls.gguf_arch, hp.extra
        mtp = x.get("mtp_layers", 0)
        kv = [(k, hp.n_layers + mtp, t) if k == f"{a}.block_count" else (k, v, t) for k, v, t in super().gguf_kv(hp)]
        kv += [(f"{a}.expert_shared_count", hp.n_shared_experts, VT.UINT32),
               (f"{a}.leading_dense_block_count", first_dense(hp), VT.UINT32),
               (f"{a}.expert_gating_func", SIGMOID, VT.UINT32),
               (f"{a}.expert_weights_scale", float(x.get("routed_scaling_factor", 1.0)), VT.FLOAT32),
               (f"{a}.expert_weights_norm", bool(hp.norm_topk_prob), VT.BOOL),
               (f"{a}.expert_group_count", int(x.get("n_group", 1)), VT.UINT32),
               (f"{a}.expert_group_used_count", int(x.get("topk_group", 1)), VT.UINT32)]
        if mtp:
            kv.append((f"{a}.nextn_predict_layers", mtp, VT.UINT32))
        return kv

    @classmethod
    def hparams_from_gguf(cls, kv: dict, path: str, names: set[str]) -> HParams:
        a = kv["general.architecture"]
        hp = super().hparams_from_gguf(kv, path, names)
        nextn = int(kv.get(f"{a}.nextn_predict_layers", 0) or 0)
        hp.n_layers -= nextn  # block_count counts the MTP layers
        mtp = nextn if any(n.startswith(f"blk.{hp.n_layers}.nextn.") for n in names) else 0
        if not hp.n_experts:
            raise BadInput(f"{path}: GGUF metadata key '{a}.expert_count' is missing")
        hp.expert_ffn_size = int(gguf_get(kv, f"{a}.expert_feed_forward_length", path))
        hp.n_shared_experts = int(kv.get(f"{a}.expert_shared_count", 0))
        hp.norm_topk_prob = bool(kv.get(f"{a}.expert_weights_norm", False))
        first = int(kv.get(f"{a}.leading_dense_block_count", 0))
        hp.moe_layers = list(range(first, hp.n_layers))
        hp.qk_norm = "blk.0.attn_q_norm.weight" in names
        gating = int(kv.get(f"{a}.expert_gating_func", SIGMOID))
        if gating != SIGMOID:
            raise BadInput(f"{path}: glm4moe expert_gating_func {gating} (only sigmoid, 2, is supported)")
        hp.extra = {**hp.extra, "n_group": int(kv.get(f"{a}.expert_group_count", 1) or 1),
                    "topk_group": int(kv.get(f"{a}.expert_group_used_count", 1) or 1),
                    "routed_scaling_factor": float(kv.get(f"{a}.expert_weights_scale", 1.0) or 1.0),
                    "mtp_declared": nextn, "mtp_layers": mtp}
        return hp

    @classmethod
    def from_gguf_tensors(cls, hp: HParams, tensors: dict[str, LazyTensor], path: str) -> dict[str, LazyTensor]:
        if hp.extra.get("mtp_layers") and not hp.extra.get("drop_mtp"):
            return tensors
        if hp.extra.get("mtp_layers"):
            log.info("%s: %d MTP (next-token prediction) layer(s) dropped (--drop-mtp)", path, hp.extra["mtp_layers"])
            hp.extra.update(mtp_dropped=hp.extra["mtp_layers"], mtp_layers=0, mtp_reason="--drop-mtp")
        # (also a file that declares MTP layers but holds none: llama.cpp's converter on such a checkpoint)
        return {n: t for n, t in tensors.items() if (parse_name(n)[0] or 0) < hp.n_layers}


def first_dense(hp: HParams) -> int:
    return min(hp.moe_layers) if hp.moe_layers else hp.n_layers


def name_map(hp: HParams, mtp: int) -> dict[str, str]:
    """HF -> canonical names of the decoder layers and of `mtp` MTP layers after them (their routers,
    selection biases and shared experts; stacked experts come from hf_moe)."""
    full = with_layers(hp, hp.n_layers + mtp)
    m = hf_moe.name_map(full, LAYOUT)
    for i in range(full.n_layers):
        if full.is_moe(i):
            p = f"model.layers.{i}.mlp."
            m[p + "gate.e_score_correction_bias"] = blk(i, EXP_PROBS_B, "bias")
            if hp.n_shared_experts:
                m.update({f"{p}shared_experts.{h}.weight": blk(i, c) for h, c in SHARED.items()})
        if i >= hp.n_layers:
            m.update({f"model.layers.{i}.{h}.weight": blk(i, c) for h, c in NEXTN.items()})
    return by_layer(m)
