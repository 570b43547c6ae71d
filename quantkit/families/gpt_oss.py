"""GPT-OSS (openai/gpt-oss-20b/120b): the family class (blocks: sink attention, clamped-SwiGLU MoE).

Architecture (transformers' GptOssForCausalLM): RMSNorm pre-norm decoder; attention with q/k/v/o biases,
a learned per-head "sink" logit joining every softmax, alternating sliding/full layers, YaRN RoPE;
MoE with a biased router (top-k of the logits, softmax over those k), experts with biases and a clamped
SwiGLU: gate <= limit, -limit <= up <= limit, out = (up + 1) * gate * sigmoid(alpha * gate).

Canonical tensors beyond the standard MoE decoder: blk.{i}.attn_sinks.weight [n_heads],
blk.{i}.ffn_gate_inp.bias [E], blk.{i}.ffn_{gate,up}_exps.bias [E, ff], blk.{i}.ffn_down_exps.bias [E, d].
HF stores experts input-major (gate_up_proj [E, d, 2ff] with gate/up interleaved on the last dim,
down_proj [E, ff, d]); MXFP4 checkpoints store them packed output-major (gate_up_proj_blocks
[E, 2ff, d/32, 16]). Both become canonical [E, out, in]; MXFP4 experts stay MXFP4 (qtype "MXFP4",
raw() = GGUF MXFP4 bytes) so writing MXFP4 GGUF needs no requantization.
GGUF (llama.cpp arch "gpt-oss"): ffn_norm is stored as blk.{i}.post_attention_norm,
q/k keep HF's row order (NEOX rope), and the SwiGLU alpha/limit are llama.cpp's fixed 1.702 / 7.0.
`config_of(hp)` gives a GptOssConfig config.json for graphs read from GGUF (formats/mxfp4_writer).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as QT

from ..blocks import Attention, Branch, LayerSpec, MoE, Norm
from ..blocks.attention import ATTN_SINKS
from ..errors import BadInput, UnsupportedArchitecture
from ..graph import (ATTN_NORM, ATTN_OUT, FFN_DOWN_EXPS, FFN_GATE_EXPS, FFN_NORM, FFN_ROUTER, FFN_UP_EXPS,
                     OUTPUT, OUTPUT_NORM, TOKEN_EMBD, HParams, LazyTensor, blk)
from .base import ExpertModule, Family, gguf_get, lazy
from .hf_decoder import decoder_hparams
from .registry import register

HF_ARCHITECTURES = ("GptOssForCausalLM",)
ARCH = "gpt-oss"
# llama.cpp hard-codes gpt-oss's clamped SwiGLU (LLM_FFN_SWIGLU_OAI_MOE); GGUF has no key for them
GPT_OSS_SWIGLU = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}

# GptOssConfig's defaults, for config.json files that leave them out
DEFAULTS = {
    "head_dim": 64, "sliding_window": 128, "rms_norm_eps": 1e-5, "attention_bias": True, "rope_theta": 150000.0,
    "num_local_experts": 128, "num_experts_per_tok": 4, "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "hidden_act": "silu",
}
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}

_LAYER = {
    "input_layernorm.weight": blk(0, ATTN_NORM), "post_attention_layernorm.weight": blk(0, FFN_NORM),
    "self_attn.sinks": blk(0, ATTN_SINKS),
    "mlp.router.weight": blk(0, FFN_ROUTER), "mlp.router.bias": blk(0, FFN_ROUTER, "bias"),
}
for _hf, _c in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", ATTN_OUT)):
    _LAYER[f"self_attn.{_hf}.weight"] = blk(0, _c)
    _LAYER[f"self_attn.{_hf}.bias"] = blk(0, _c, "bias")


def hparams(cfg: dict) -> HParams:
    c = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    if not cfg.get("rope_parameters") and not cfg.get("rope_scaling"):
        c["rope_parameters"] = {**DEFAULT_ROPE, "rope_theta": c["rope_theta"]}
    hp = decoder_hparams(c, ARCH)
    bias = bool(c["attention_bias"])
    hp.attn_bias = hp.attn_out_bias = bias
    hp.mlp_bias = False  # expert biases are separate canonical tensors
    hp.n_experts, hp.n_experts_used = int(c["num_local_experts"]), int(c["num_experts_per_tok"])
    hp.expert_ffn_size = hp.ffn_size
    hp.norm_topk_prob = True  # softmax over the top-k logits == renormalised top-k of the full softmax
    hp.sliding_window = c["sliding_window"]
    types = c.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                     for i in range(hp.n_layers)]
    if len(types) != hp.n_layers:
        raise BadInput(f"config.json: layer_types has {len(types)} entries for {hp.n_layers} layers")
    hp.layer_types = ["sliding" if t in ("sliding_attention", "sliding") else "full" for t in types]
    hp.extra = {**hp.extra, "swiglu_alpha": float(c["swiglu_alpha"]), "swiglu_limit": float(c["swiglu_limit"])}
    return hp


def name_map(hp: HParams) -> dict[str, str]:
    """HF names that map 1:1 onto canonical names (experts need `tensors`, which splits and transposes)."""
    m = {"model.embed_tokens.weight": TOKEN_EMBD, "model.norm.weight": OUTPUT_NORM}
    if not hp.tie_embeddings:
        m["lm_head.weight"] = OUTPUT
    for i in range(hp.n_layers):
        for hf, canon in _LAYER.items():
            if canon.endswith(".bias") and "attn_" in canon and not hp.attn_bias:
                continue
            m[f"model.layers.{i}.{hf}"] = canon.replace("blk.0.", f"blk.{i}.", 1)
    return m


def config_of(hp: HParams) -> dict:
    """A GptOssConfig config.json for these hyperparameters (for graphs read from GGUF)."""
    rs = hp.rope_scaling
    rope = {"rope_type": "default", "rope_theta": hp.rope_theta}
    if rs.kind == "yarn":
        rope = {"rope_type": "yarn", "factor": rs.factor, "original_max_position_embeddings": rs.original_context,
                "beta_fast": rs.beta_fast or 32.0, "beta_slow": rs.beta_slow or 1.0, "truncate": rs.truncate,
                "rope_theta": hp.rope_theta}
        if rs.attention_factor is not None:
            rope["attention_factor"] = rs.attention_factor
    elif rs.kind != "none":
        raise BadInput(f"gpt-oss: rope scaling '{rs.kind}' cannot be written as a GptOssConfig (expected yarn)")
    types = hp.layer_types or ["sliding" if i % 2 == 0 else "full" for i in range(hp.n_layers)]
    return {
        "architectures": list(HF_ARCHITECTURES), "model_type": "gpt_oss", "vocab_size": hp.vocab_size,
        "hidden_size": hp.hidden_size, "intermediate_size": hp.expert_ffn_size or hp.ffn_size,
        "num_hidden_layers": hp.n_layers, "num_attention_heads": hp.n_heads, "num_key_value_heads": hp.n_kv_heads,
        "head_dim": hp.head_dim, "num_local_experts": hp.n_experts, "num_experts_per_tok": hp.n_experts_used,
        "sliding_window": hp.sliding_window, "rms_norm_eps": hp.norm_eps, "max_position_embeddings": hp.context_length,
        "tie_word_embeddings": hp.tie_embeddings, "hidden_act": "silu", "attention_bias": hp.attn_bias,
        "layer_types": [("sliding_attention" if t == "sliding" else "full_attention") for t in types],
        "swiglu_limit": hp.extra.get("swiglu_limit", 7.0), "swiglu_alpha": hp.extra.get("swiglu_alpha", 1.702),
        "rope_parameters": rope, "torch_dtype": "bfloat16",
    }


def _mxfp4_lazy(src, pick, shape) -> LazyTensor:
    """Canonical expert tensor cut from an MXFP4 source without touching the codes."""
    from ..formats.mxfp4_layouts import to_gguf_mxfp4
    from ..quant.mxfp4 import dequantize_mxfp4

    def codes():
        return pick(*src.codes())
    return LazyTensor(shape, "MXFP4", lambda: dequantize_mxfp4(*codes(), dtype=torch.bfloat16), qtype="MXFP4",
                      source=src.source, raw=lambda: (QT.MXFP4, to_gguf_mxfp4(*codes(), name=src.source)))


def tensors(hp: HParams, src: dict[str, LazyTensor], source: str) -> dict[str, LazyTensor]:
    """HF tensors (plain, or from the MXFP4 reader) -> canonical lazy tensors."""
    from ..formats.mxfp4_layouts import MXFP4LazyTensor, split_gate_up

    def need(name):
        if name not in src:
            raise BadInput(f"{source}: tensor '{name}' is missing from the checkpoint")
        return src[name]

    out = {canon: need(hf) for hf, canon in name_map(hp).items()}
    e, f, d = hp.n_experts, hp.expert_ffn_size or hp.ffn_size, hp.hidden_size
    for i in range(hp.n_layers):
        p = f"model.layers.{i}.mlp.experts."
        gu, down = need(p + "gate_up_proj"), need(p + "down_proj")
        if isinstance(gu, MXFP4LazyTensor) and isinstance(down, MXFP4LazyTensor):
            out[blk(i, FFN_GATE_EXPS)] = _mxfp4_lazy(gu, lambda c, x: split_gate_up(c, x)[0], (e, f, d))
            out[blk(i, FFN_UP_EXPS)] = _mxfp4_lazy(gu, lambda c, x: split_gate_up(c, x)[1], (e, f, d))
            out[blk(i, FFN_DOWN_EXPS)] = _mxfp4_lazy(down, lambda c, x: (c, x), (e, d, f))
        else:  # plain HF parameters, input-major
            out[blk(i, FFN_GATE_EXPS)] = lazy(gu, lambda w: w[..., 0::2].transpose(1, 2).contiguous(), (e, f, d))
            out[blk(i, FFN_UP_EXPS)] = lazy(gu, lambda w: w[..., 1::2].transpose(1, 2).contiguous(), (e, f, d))
            out[blk(i, FFN_DOWN_EXPS)] = lazy(down, lambda w: w.transpose(1, 2).contiguous(), (e, d, f))
        gub = need(p + "gate_up_proj_bias")
        out[blk(i, FFN_GATE_EXPS, "bias")] = lazy(gub, lambda b: b[..., 0::2].contiguous(), (e, f))
        out[blk(i, FFN_UP_EXPS, "bias")] = lazy(gub, lambda b: b[..., 1::2].contiguous(), (e, f))
        out[blk(i, FFN_DOWN_EXPS, "bias")] = need(p + "down_proj_bias")
    return out


def _gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Canonical gate/up [E, f, d] -> HF's interleaved, input-major gate_up_proj [E, d, 2f]."""
    e, f, d = gate.shape
    return torch.stack([gate, up], dim=2).reshape(e, f * 2, d).transpose(1, 2).contiguous()


def _gate_up_bias(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.stack([gate, up], dim=-1).reshape(gate.shape[0], -1)


def gpt_oss_layer_types(n_layers: int) -> list[str]:
    """llama.cpp's gpt-oss SWA pattern (load_swa_pattern with n_pattern 2): even layers sliding, odd full."""
    return ["sliding" if i % 2 == 0 else "full" for i in range(n_layers)]


@register
class GptOss(Family):
    arch = ARCH
    hf_architectures = HF_ARCHITECTURES
    hf_model_type = "gpt_oss"
    gguf_arch = "gpt-oss"
    gguf_renames = {FFN_NORM: "post_attention_norm"}

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        attn = Attention(bias=hp.attn_bias, out_bias=hp.attn_out_bias, sinks=True)
        moe = MoE(router="topk_softmax", router_bias=True, expert_bias=True, act="swiglu_oai")
        return LayerSpec([Branch(attn, Norm(ATTN_NORM)), Branch(moe, Norm(FFN_NORM))])

    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        return hparams(cfg)

    @classmethod
    def hf_name_map(cls, hp: HParams) -> dict[str, str]:
        return name_map(hp)

    @classmethod
    def hf_tensors(cls, hp, src, source):
        return tensors(hp, src, source)

    @classmethod
    def hf_export(cls, hp: HParams):
        out = super().hf_export(hp)
        for i in range(hp.n_layers):
            p = f"model.layers.{i}.mlp.experts."
            out += [
                (p + "gate_up_proj", (blk(i, FFN_GATE_EXPS), blk(i, FFN_UP_EXPS)), _gate_up),
                (p + "gate_up_proj_bias", (blk(i, FFN_GATE_EXPS, "bias"), blk(i, FFN_UP_EXPS, "bias")),
                 _gate_up_bias),
                (p + "down_proj", (blk(i, FFN_DOWN_EXPS),), lambda w: w.transpose(1, 2).contiguous()),
                (p + "down_proj_bias", (blk(i, FFN_DOWN_EXPS, "bias"),), None),
            ]
        return out

    @classmethod
    def hf_quantized_experts(cls, hp: HParams, fmt: str) -> list[ExpertModule]:
        """HF keeps gpt-oss experts fused (gate_up_proj [E, d, 2f]); quantized checkpoints use the layouts the
        quantizers that engines read write: GPTQ as GPTQModel's gpt-oss definition (per expert
        `mlp.experts.gate_up.{e}`, d -> 2f with gate/up rows interleaved as in gate_up_proj, and
        `mlp.experts.down.{e}`, both with bias); compressed-tensors as llm-compressor's linearized experts
        (`mlp.experts.{e}.gate_proj|up_proj|down_proj`, with bias). AutoAWQ has no gpt-oss model, so no
        engine reads AWQ-GEMM gpt-oss experts: refused."""
        g, u, dn = FFN_GATE_EXPS, FFN_UP_EXPS, FFN_DOWN_EXPS
        out = []
        for i in range(hp.n_layers):
            p = f"model.layers.{i}.mlp.experts."
            bi = {s: blk(i, s, "bias") for s in (g, u, dn)}
            for e in range(hp.n_experts):
                if fmt == "gptq":
                    out += [ExpertModule(f"{p}gate_up.{e}", (blk(i, g), blk(i, u)), e, (bi[g], bi[u])),
                            ExpertModule(f"{p}down.{e}", (blk(i, dn),), e, (bi[dn],))]
                elif fmt == "compressed-tensors":
                    out += [ExpertModule(f"{p}{e}.{hf}", (blk(i, s),), e, (bi[s],))
                            for hf, s in (("gate_proj", g), ("up_proj", u), ("down_proj", dn))]
                else:
                    raise UnsupportedArchitecture(
                        f"gpt-oss experts in the {fmt} layout: no engine loads them (AutoAWQ has no gpt-oss "
                        "model; transformers/vLLM read AWQ-GEMM experts only for per-expert-linear families); "
                        "write --format compressed-tensors (llm-compressor's gpt-oss layout) or --format gptq")
        return out

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        return config_of(hp)

    @classmethod
    def gguf_kv(cls, hp: HParams):
        from gguf import GGUFValueType as VT
        for k, v in GPT_OSS_SWIGLU.items():
            if abs(float(hp.extra.get(k, v)) - v) > 1e-6:
                raise UnsupportedArchitecture(f"gpt-oss {k}={hp.extra[k]}: llama.cpp's gpt-oss graph hard-codes "
                                              f"{k}={v}; GGUF cannot hold another value")
        if not hp.sliding_window:
            raise BadInput("gpt-oss: sliding_window is missing; llama.cpp's gpt-oss needs attention.sliding_window")
        if hp.layer_types is not None and hp.layer_types != gpt_oss_layer_types(hp.n_layers):
            raise UnsupportedArchitecture(f"gpt-oss layer_types {hp.layer_types}: llama.cpp's gpt-oss alternates "
                                          "sliding (even) / full (odd) layers")
        if not hp.n_experts or not hp.expert_ffn_size:
            raise BadInput("gpt-oss: expert count / expert FFN size missing from the hyperparameters")
        return super().gguf_kv(hp) + [("gpt-oss.attention.sliding_window", int(hp.sliding_window), VT.UINT32)]

    @classmethod
    def hparams_from_gguf(cls, kv: dict, path: str, names: set[str]) -> HParams:
        hp = super().hparams_from_gguf(kv, path, names)
        if not hp.n_experts:
            raise BadInput(f"{path}: GGUF metadata key 'gpt-oss.expert_count' is missing")
        hp.expert_ffn_size = int(gguf_get(kv, "gpt-oss.expert_feed_forward_length", path))
        hp.sliding_window = int(gguf_get(kv, "gpt-oss.attention.sliding_window", path))
        pat = kv.get("gpt-oss.attention.sliding_window_pattern", 2)
        if isinstance(pat, (list, tuple)):  # per-layer flags
            if len(pat) != hp.n_layers:
                raise BadInput(f"{path}: gpt-oss.attention.sliding_window_pattern has {len(pat)} entries for "
                               f"{hp.n_layers} layers")
            hp.layer_types = ["sliding" if bool(f) else "full" for f in pat]
        else:  # llama_hparams::set_swa_pattern: layer il is sliding when il % n < n - 1
            n = int(pat)
            hp.layer_types = ["sliding" if n == 0 or i % n < n - 1 else "full" for i in range(hp.n_layers)]
        hp.norm_topk_prob = True
        hp.attn_out_bias = hp.attn_bias
        hp.mlp_bias = False
        hp.extra = {**hp.extra, **GPT_OSS_SWIGLU}
        return hp
