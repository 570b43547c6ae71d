"""DeepSeek V2 / V2-Lite (DeepseekV2ForCausalLM) and V3 / R1 / Kimi-K2 (DeepseekV3ForCausalLM).

Layers: RMSNorm -> multi-head latent attention (blocks/mla.py), RMSNorm -> dense SwiGLU for the first
`first_k_dense_replace` layers, then MoE with `n_shared_experts * moe_intermediate_size` shared expert.
Routing: V2 softmax, top-k (or group-limited greedy: groups scored by their best expert); V3 sigmoid with the
selection bias e_score_correction_bias (canonical blk.{i}.exp_probs_b.bias, as llama.cpp), groups scored by
their best two; both scale the routed weights by routed_scaling_factor.
GGUF: llama.cpp's "deepseek2" (both versions): MQA view of MLA (head_count_kv 1, key/value_length over the
latent, *_mla over the decompressed heads), kv_b split into attn_k_b [H, rank, nope] and attn_v_b
[H, v, rank] (`gguf_tensors`, joined back on read), q_lora_rank 0 for a plain q projection; llama.cpp
rotates adjacent pairs (the checkpoints' order), so rotate-half checkpoints (rope_interleave False) have their
rope rows reordered on write.
MTP layers (model.layers.{n_layers + k}, num_nextn_predict_layers) are not read: llama.cpp's deepseek2
converter drops them too (this llama.cpp names nextn tensors, but its converter does not export them).
"""

from __future__ import annotations

import logging

import torch

from ..blocks import Branch, GatedMLP, LayerSpec, MoE, Norm
from ..blocks.mla import ATTN_KV_A_MQA, ATTN_KV_A_NORM, ATTN_KV_B, ATTN_Q_A, ATTN_Q_A_NORM, ATTN_Q_B, MLA, mla_dims
from ..blocks.moe import EXP_PROBS_B
from ..errors import BadInput, UnsupportedArchitecture
from ..graph import (ATTN_NORM, ATTN_OUT, ATTN_Q, FFN_DOWN, FFN_DOWN_EXPS, FFN_DOWN_SHEXP, FFN_GATE, FFN_GATE_EXPS,
                     FFN_GATE_SHEXP, FFN_NORM, FFN_ROUTER, FFN_UP, FFN_UP_EXPS, FFN_UP_SHEXP, OUTPUT,
                     OUTPUT_NORM, TOKEN_EMBD, HParams, LazyTensor, blk, parse_name)
from .base import Family, core_gguf_kv, gguf_get, lazy, need, rope_scaling_kv, stack_experts, unstack
from .hf_decoder import cfg_get, decoder_hparams, rope_to_config
from .registry import register

log = logging.getLogger("quantkit")

ATTN_K_B, ATTN_V_B = "attn_k_b", "attn_v_b"  # llama.cpp's split of kv_b
GATING = {"softmax": 1, "sigmoid": 2}  # llama.cpp's expert_gating_func

_ATTN = {"q_a_proj": ATTN_Q_A, "q_a_layernorm": ATTN_Q_A_NORM, "q_b_proj": ATTN_Q_B, "q_proj": ATTN_Q,
         "kv_a_proj_with_mqa": ATTN_KV_A_MQA, "kv_a_layernorm": ATTN_KV_A_NORM, "kv_b_proj": ATTN_KV_B,
         "o_proj": ATTN_OUT}
_DENSE = {"gate_proj": FFN_GATE, "up_proj": FFN_UP, "down_proj": FFN_DOWN}
_SHARED = {"gate_proj": FFN_GATE_SHEXP, "up_proj": FFN_UP_SHEXP, "down_proj": FFN_DOWN_SHEXP}
_EXPERTS = {"gate_proj": FFN_GATE_EXPS, "up_proj": FFN_UP_EXPS, "down_proj": FFN_DOWN_EXPS}


def hparams(cfg: dict, arch: str, v3: bool) -> HParams:
    c = dict(cfg)
    c.pop("head_dim", None)  # HF sets it to qk_rope_head_dim; ours is the full q/k head
    hp = decoder_hparams(c, arch)
    if cfg.get("attention_bias"):
        raise UnsupportedArchitecture(f"{arch}: attention_bias=True is not supported (llama.cpp has no MLA biases)")
    hp.attn_bias = hp.attn_out_bias = hp.mlp_bias = False
    nope, rope = int(cfg_get(c, "qk_nope_head_dim", 128)), int(cfg_get(c, "qk_rope_head_dim", 64))
    hp.n_kv_heads = hp.n_heads
    hp.head_dim, hp.rope_dim = nope + rope, rope
    n_group = int(cfg_get(c, "n_group", 1))
    method = cfg_get(c, "topk_method", "noaux_tc" if v3 else "greedy")
    grouped = n_group > 1 and method in ("group_limited_greedy", "noaux_tc")
    hp.n_experts = int(cfg_get(c, "n_routed_experts", 0))
    hp.n_experts_used = int(cfg_get(c, "num_experts_per_tok", 0))
    hp.expert_ffn_size = int(cfg_get(c, "moe_intermediate_size", hp.ffn_size))
    hp.n_shared_experts = int(cfg_get(c, "n_shared_experts", 0))
    hp.norm_topk_prob = bool(cfg_get(c, "norm_topk_prob", v3))
    first = int(cfg_get(c, "first_k_dense_replace", 0))
    if int(cfg_get(c, "moe_layer_freq", 1)) != 1:
        raise UnsupportedArchitecture(f"{arch}: moe_layer_freq != 1 is not supported (llama.cpp has no key for it)")
    hp.moe_layers = list(range(first, hp.n_layers)) if hp.n_experts else []
    hp.extra = {
        **hp.extra, "q_lora_rank": cfg.get("q_lora_rank", None if "q_lora_rank" in cfg else 1536),
        "kv_lora_rank": int(cfg_get(c, "kv_lora_rank", 512)), "qk_nope_head_dim": nope, "qk_rope_head_dim": rope,
        "v_head_dim": int(cfg_get(c, "v_head_dim", 128)),
        "scoring": cfg_get(c, "scoring_func", "sigmoid" if v3 else "softmax"),
        "n_group": n_group if grouped else 1, "topk_group": int(cfg_get(c, "topk_group", 1)) if grouped else 1,
        "group_score": "top2" if method == "noaux_tc" else "max",
        "routed_scaling_factor": float(cfg_get(c, "routed_scaling_factor", 1.0)),
        "rope_interleave": bool(cfg_get(c, "rope_interleave", True)) if v3 else True,
        "v3": v3,
    }
    if hp.extra["scoring"] not in GATING:
        raise UnsupportedArchitecture(f"{arch}: scoring_func '{hp.extra['scoring']}' (supported: softmax, sigmoid)")
    mtp = int(cfg_get(c, "num_nextn_predict_layers", 0))
    if mtp:
        log.info("%s: %d MTP (next-token prediction) layer(s) not read: llama.cpp's deepseek2 does not export "
                 "them", arch, mtp)
    hp.extra["mtp_dropped"] = mtp
    hp.extra["mtp_reason"] = "llama.cpp's deepseek2 converter does not export them"
    return hp


def name_map(hp: HParams) -> dict[str, str]:
    m = {"model.embed_tokens.weight": TOKEN_EMBD, "model.norm.weight": OUTPUT_NORM}
    if not hp.tie_embeddings:
        m["lm_head.weight"] = OUTPUT
    q_lora = hp.extra.get("q_lora_rank") is not None
    for i in range(hp.n_layers):
        p = f"model.layers.{i}."
        m[p + "input_layernorm.weight"] = blk(i, ATTN_NORM)
        m[p + "post_attention_layernorm.weight"] = blk(i, FFN_NORM)
        for hf, c in _ATTN.items():
            if (hf == "q_proj" and q_lora) or (hf.startswith("q_") and hf != "q_proj" and not q_lora):
                continue
            m[f"{p}self_attn.{hf}.weight"] = blk(i, c)
        if hp.is_moe(i):
            m[p + "mlp.gate.weight"] = blk(i, FFN_ROUTER)
            if hp.extra["scoring"] == "sigmoid":
                m[p + "mlp.gate.e_score_correction_bias"] = blk(i, EXP_PROBS_B, "bias")
            if hp.n_shared_experts:
                m.update({f"{p}mlp.shared_experts.{hf}.weight": blk(i, c) for hf, c in _SHARED.items()})
        else:
            m.update({f"{p}mlp.{hf}.weight": blk(i, c) for hf, c in _DENSE.items()})
    return m


def expert_names(hp: HParams) -> dict[str, list[str]]:
    out = {}
    for i in hp.moe_layers or []:
        for hf, c in _EXPERTS.items():
            out[blk(i, c)] = [f"model.layers.{i}.mlp.experts.{e}.{hf}.weight" for e in range(hp.n_experts)]
    return out


def tensors(hp: HParams, src: dict[str, LazyTensor], source: str) -> dict[str, LazyTensor]:
    out = {c: need(src, h, source) for h, c in name_map(hp).items()}
    e, f, d = hp.n_experts, hp.expert_ffn_size, hp.hidden_size
    for i in hp.moe_layers or []:
        p = f"model.layers.{i}.mlp.experts."
        if p + "gate_up_proj" in src:  # transformers' fused in-memory layout [E, 2f, d], [E, d, f]
            gu = src[p + "gate_up_proj"]
            out[blk(i, FFN_GATE_EXPS)] = lazy(gu, lambda w: w[:, :f].contiguous(), (e, f, d))
            out[blk(i, FFN_UP_EXPS)] = lazy(gu, lambda w: w[:, f:].contiguous(), (e, f, d))
            out[blk(i, FFN_DOWN_EXPS)] = need(src, p + "down_proj", source)
    for name, parts in expert_names(hp).items():
        if name not in out:
            shape = (e, d, f) if FFN_DOWN_EXPS in name else (e, f, d)
            out[name] = stack_experts([need(src, h, source) for h in parts], shape, source)
    return out


def config_of(hp: HParams) -> dict:
    x = hp.extra
    v3 = x.get("v3", x.get("scoring") == "sigmoid")
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2", "vocab_size": hp.vocab_size,
        "hidden_size": hp.hidden_size, "intermediate_size": hp.ffn_size, "num_hidden_layers": hp.n_layers,
        "num_attention_heads": hp.n_heads, "num_key_value_heads": hp.n_heads, "rms_norm_eps": hp.norm_eps,
        "max_position_embeddings": hp.context_length, "tie_word_embeddings": hp.tie_embeddings, "hidden_act": "silu",
        "q_lora_rank": x["q_lora_rank"], "kv_lora_rank": x["kv_lora_rank"], "qk_nope_head_dim": x["qk_nope_head_dim"],
        "qk_rope_head_dim": x["qk_rope_head_dim"], "v_head_dim": x["v_head_dim"],
        "n_routed_experts": hp.n_experts, "num_experts_per_tok": hp.n_experts_used,
        "moe_intermediate_size": hp.expert_ffn_size, "n_shared_experts": hp.n_shared_experts,
        "first_k_dense_replace": min(hp.moe_layers) if hp.moe_layers else hp.n_layers,
        "norm_topk_prob": hp.norm_topk_prob, "routed_scaling_factor": x["routed_scaling_factor"],
        "n_group": x["n_group"], "topk_group": x["topk_group"], "scoring_func": x["scoring"],
        "topk_method": ("noaux_tc" if v3 else "group_limited_greedy" if x["n_group"] > 1 else "greedy"),
        "attention_bias": False, "torch_dtype": "bfloat16",
    }
    if v3:
        cfg["rope_interleave"] = x.get("rope_interleave", True)
    cfg.update(rope_to_config(hp))
    return cfg


def split_kv_b(hp: HParams):
    """kv_b [H*(nope+v), rank] -> llama.cpp's k_b [H, rank, nope] and v_b [H, v, rank]."""
    _, rank, nope, _, v = mla_dims(hp)
    h = hp.n_heads

    def k_b(w):
        return w.view(h, nope + v, rank)[:, :nope].transpose(1, 2).contiguous()

    def v_b(w):
        return w.view(h, nope + v, rank)[:, nope:].contiguous()
    return (k_b, (h, rank, nope)), (v_b, (h, v, rank))


def hp_shape(hp: HParams, suffix: str) -> tuple[int, ...]:
    return MLA(q_lora=hp.extra.get("q_lora_rank") is not None).tensors(hp, 0)[f"{suffix}.weight"]


def rope_rows_to_pairs(hp: HParams, suffix: str):
    """Rows of q (per head [nope | rope]) or kv_a_mqa ([latent | rope]) with the rope rows reordered from
    rotate-half (x0..x_{h-1}, y0..y_{h-1}) to adjacent pairs (x0, y0, x1, y1 ...)."""
    _, rank, nope, rope, _ = mla_dims(hp)
    pairs = torch.arange(rope).view(2, rope // 2).t().reshape(-1)
    if suffix == ATTN_KV_A_MQA:
        order = torch.cat([torch.arange(rank), rank + pairs])
    else:
        head = torch.cat([torch.arange(nope), nope + pairs])
        order = torch.cat([h * (nope + rope) + head for h in range(hp.n_heads)])
    return lambda w: w[order].contiguous()


def join_kv_b(hp: HParams, k_b: LazyTensor, v_b: LazyTensor) -> LazyTensor:
    _, rank, nope, _, v = mla_dims(hp)
    h = hp.n_heads

    def load():
        k, vv = k_b.load(), v_b.load()
        return torch.cat([k.transpose(1, 2), vv.to(k.dtype)], dim=1).reshape(h * (nope + v), rank)
    return LazyTensor((h * (nope + v), rank), k_b.dtype, load, source=f"{k_b.source} + {v_b.source}")


@register
class DeepseekV2(Family):
    arch = "deepseek2"
    hf_architectures = ("DeepseekV2ForCausalLM",)
    hf_model_type = "deepseek_v2"
    gguf_arch = "deepseek2"
    v3 = False

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        x = hp.extra
        attn = MLA(q_lora=x.get("q_lora_rank") is not None)
        if hp.is_moe(i):
            ffn = MoE(router=x["scoring"], shared_size=hp.n_shared_experts * hp.expert_ffn_size,
                      select_bias=x["scoring"] == "sigmoid", n_group=x["n_group"], topk_group=x["topk_group"],
                      group_score=x["group_score"], scale=x["routed_scaling_factor"])
        else:
            ffn = GatedMLP()
        return LayerSpec([Branch(attn, Norm(ATTN_NORM)), Branch(ffn, Norm(FFN_NORM))])

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        return hparams(cfg, cls.arch, cls.v3)

    @classmethod
    def hf_name_map(cls, hp):
        return name_map(hp)

    @classmethod
    def hf_tensors(cls, hp, src, source):
        return tensors(hp, src, source)

    @classmethod
    def hf_experts(cls, hp):
        return expert_names(hp)

    @classmethod
    def hf_export(cls, hp):
        out = super().hf_export(hp)
        for name, parts in expert_names(hp).items():
            out += [(h, (name,), unstack(e)) for e, h in enumerate(parts)]
        return out

    @classmethod
    def hf_config(cls, hp):
        return config_of(hp)

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def gguf_kv(cls, hp: HParams):
        from gguf import GGUFValueType as VT
        x, a = hp.extra, cls.gguf_arch
        qr, kvr, nope, rope, v = mla_dims(hp)
        first = min(hp.moe_layers) if hp.moe_layers else hp.n_layers
        kv = core_gguf_kv(a, hp, n_kv_heads=1) + [  # MLA as MQA over the latent
            (f"{a}.leading_dense_block_count", first, VT.UINT32),
            # 0 = plain q projection; written always: llama.cpp requires the key unless n_layer is V2-Lite's
            (f"{a}.attention.q_lora_rank", int(qr or 0), VT.UINT32),
            (f"{a}.attention.kv_lora_rank", kvr, VT.UINT32),
            (f"{a}.attention.key_length", kvr + rope, VT.UINT32),
            (f"{a}.attention.value_length", kvr, VT.UINT32),
            (f"{a}.attention.key_length_mla", nope + rope, VT.UINT32),
            (f"{a}.attention.value_length_mla", v, VT.UINT32),
            (f"{a}.expert_feed_forward_length", hp.expert_ffn_size or hp.ffn_size, VT.UINT32),
            (f"{a}.expert_shared_count", hp.n_shared_experts, VT.UINT32),
            (f"{a}.rope.dimension_count", rope, VT.UINT32),
        ]
        if hp.n_experts:
            kv += [(f"{a}.expert_count", hp.n_experts, VT.UINT32),
                   (f"{a}.expert_used_count", hp.n_experts_used, VT.UINT32),
                   (f"{a}.expert_weights_scale", float(x["routed_scaling_factor"]), VT.FLOAT32),
                   (f"{a}.expert_weights_norm", bool(hp.norm_topk_prob), VT.BOOL),
                   # written always: without it llama.cpp assumes softmax, wrong for V3
                   (f"{a}.expert_gating_func", GATING[x["scoring"]], VT.UINT32)]
            if x["n_group"] > 1:
                if x["group_score"] == "max":
                    log.warning("deepseek2: llama.cpp scores expert groups by their best two experts; V2's "
                                "group_limited_greedy uses the best one, so llama.cpp may route differently")
                kv += [(f"{a}.expert_group_count", x["n_group"], VT.UINT32),
                       (f"{a}.expert_group_used_count", x["topk_group"], VT.UINT32)]
        rs = hp.rope_scaling
        if rs.kind == "yarn" and rs.mscale and rs.mscale_all_dim and rs.mscale != rs.mscale_all_dim:
            log.warning("deepseek2: YaRN mscale %s != mscale_all_dim %s: llama.cpp applies no extra cos/sin "
                        "factor (transformers applies their ratio), so its logits will differ", rs.mscale,
                        rs.mscale_all_dim)
        kv += rope_scaling_kv(a, rs)
        if rs.kind == "yarn" and rs.mscale_all_dim is not None:
            # llama.cpp divides this key by 0.1 for deepseek2 (its converter writes 0.1 * mscale_all_dim)
            kv.append((f"{a}.rope.scaling.yarn_log_multiplier", 0.1 * float(rs.mscale_all_dim), VT.FLOAT32))
        return kv

    @classmethod
    def hparams_from_gguf(cls, kv: dict, path: str, names: set[str]) -> HParams:
        a = kv["general.architecture"]
        hp = super().hparams_from_gguf(kv, path, names)
        kvr = int(gguf_get(kv, f"{a}.attention.kv_lora_rank", path))
        rope = int(gguf_get(kv, f"{a}.rope.dimension_count", path))
        # files from before the MLA split (unsplit attn_kv_b) give the decompressed head sizes without _mla
        legacy = f"{a}.attention.key_length_mla" not in kv
        k_mla = int(gguf_get(kv, f"{a}.attention.key_length" + ("" if legacy else "_mla"), path))
        v_mla = int(gguf_get(kv, f"{a}.attention.value_length" + ("" if legacy else "_mla"), path))
        qr = int(kv.get(f"{a}.attention.q_lora_rank", 0)) or None
        hp.n_kv_heads, hp.head_dim, hp.rope_dim = hp.n_heads, k_mla, rope
        hp.attn_bias = hp.attn_out_bias = hp.mlp_bias = False
        first = int(kv.get(f"{a}.leading_dense_block_count", 0))
        hp.moe_layers = list(range(first, hp.n_layers)) if hp.n_experts else []
        hp.expert_ffn_size = int(gguf_get(kv, f"{a}.expert_feed_forward_length", path))
        hp.n_shared_experts = int(kv.get(f"{a}.expert_shared_count", 0))
        hp.norm_topk_prob = bool(kv.get(f"{a}.expert_weights_norm", False))
        gating = int(kv.get(f"{a}.expert_gating_func", 1))
        scoring = {v: k for k, v in GATING.items()}.get(gating)
        if scoring is None:
            raise UnsupportedArchitecture(f"{path}: deepseek2 expert_gating_func {gating} is not supported")
        n_group = int(kv.get(f"{a}.expert_group_count", 1) or 1)
        hp.extra = {**hp.extra, "q_lora_rank": qr, "kv_lora_rank": kvr, "qk_nope_head_dim": k_mla - rope,
                    "qk_rope_head_dim": rope, "v_head_dim": v_mla, "scoring": scoring,
                    "n_group": n_group, "topk_group": int(kv.get(f"{a}.expert_group_used_count", 1) or 1),
                    "group_score": "top2",  # what llama.cpp computes
                    "routed_scaling_factor": float(kv.get(f"{a}.expert_weights_scale", 1.0) or 1.0),
                    "rope_interleave": True, "v3": scoring == "sigmoid", "mtp_dropped": 0}
        log_mul = kv.get(f"{a}.rope.scaling.yarn_log_multiplier")
        if hp.rope_scaling.kind == "yarn" and log_mul is not None:
            # llama.cpp's cos/sin carry no extra factor (mscale == mscale_all_dim), the softmax scale does
            hp.rope_scaling.mscale = hp.rope_scaling.mscale_all_dim = float(log_mul) / 0.1
        return hp

    @classmethod
    def gguf_tensors(cls, hp: HParams, name: str):
        i, suffix, _ = parse_name(name)
        if suffix in (ATTN_Q, ATTN_Q_B, ATTN_KV_A_MQA) and not hp.extra.get("rope_interleave", True):
            # llama.cpp rotates adjacent pairs: rotate-half rope rows are reordered to pairs
            return [(name, hp_shape(hp, suffix), rope_rows_to_pairs(hp, suffix), True)]
        if suffix != ATTN_KV_B:
            return None
        (kf, ks), (vf, vs) = split_kv_b(hp)
        # v_b reads the latent as kv_b does; k_b (transposed) is applied to q_nope instead
        return [(f"blk.{i}.{ATTN_K_B}.weight", ks, kf, False), (f"blk.{i}.{ATTN_V_B}.weight", vs, vf, True)]

    @classmethod
    def from_gguf_tensors(cls, hp: HParams, tensors: dict[str, LazyTensor], path: str) -> dict[str, LazyTensor]:
        out = dict(tensors)
        for i in range(hp.n_layers):
            kb, vb = f"blk.{i}.{ATTN_K_B}.weight", f"blk.{i}.{ATTN_V_B}.weight"
            if kb in out and vb in out:
                out[blk(i, ATTN_KV_B)] = join_kv_b(hp, out.pop(kb), out.pop(vb))
            elif blk(i, ATTN_KV_B) not in out:
                raise BadInput(f"{path}: deepseek2 layer {i} has neither attn_k_b/attn_v_b nor attn_kv_b")
        return out


@register
class DeepseekV3(DeepseekV2):
    """V3 / R1 / Kimi-K2 (DeepseekV3ForCausalLM): sigmoid router with selection bias; GGUF arch deepseek2,
    read back by DeepseekV2 (the router kind comes from expert_gating_func)."""
    arch = "deepseek3"
    hf_architectures = ("DeepseekV3ForCausalLM",)
    hf_model_type = "deepseek_v3"
    gguf_reader = False
    v3 = True
