"""GPT-OSS (openai/gpt-oss-20b/120b): loader onto the canonical graph and the executor pieces it needs.

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
GGUF (llama.cpp arch "gpt-oss", see formats/gguf_arch): ffn_norm is stored as blk.{i}.post_attention_norm,
q/k keep HF's row order (NEOX rope), and the SwiGLU alpha/limit are llama.cpp's fixed 1.702 / 7.0.
`config_of(hp)` gives a GptOssConfig config.json for graphs read from GGUF (formats/mxfp4_writer).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as QT
from torch import nn

from ..errors import BadInput
from ..graph import (ATTN_NORM, ATTN_OUT, FFN_DOWN_EXPS, FFN_GATE_EXPS, FFN_NORM, FFN_ROUTER, FFN_UP_EXPS, OUTPUT,
                     OUTPUT_NORM, TOKEN_EMBD, Graph, HParams, LazyTensor, Tokenizer, blk, expected_shapes)
from ..runtime.model import Attention, CausalLM, DecoderLayer, RMSNorm, make_linear
from .hf_decoder import decoder_hparams

HF_ARCHITECTURES = ("GptOssForCausalLM",)
ARCH = "gpt-oss"
ATTN_SINKS = "attn_sinks"

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


def gpt_oss_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    s = expected_shapes(hp)
    e, f, d = hp.n_experts, hp.expert_ffn_size or hp.ffn_size, hp.hidden_size
    for i in range(hp.n_layers):
        s[blk(i, ATTN_SINKS)] = (hp.n_heads,)
        s[blk(i, FFN_ROUTER, "bias")] = (e,)
        s[blk(i, FFN_GATE_EXPS, "bias")] = (e, f)
        s[blk(i, FFN_UP_EXPS, "bias")] = (e, f)
        s[blk(i, FFN_DOWN_EXPS, "bias")] = (e, d)
    return s


def _lazy(src: LazyTensor, fn, shape) -> LazyTensor:
    return LazyTensor(shape, src.dtype, lambda: fn(src.load()), source=src.source)


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
            out[blk(i, FFN_GATE_EXPS)] = _lazy(gu, lambda w: w[..., 0::2].transpose(1, 2).contiguous(), (e, f, d))
            out[blk(i, FFN_UP_EXPS)] = _lazy(gu, lambda w: w[..., 1::2].transpose(1, 2).contiguous(), (e, f, d))
            out[blk(i, FFN_DOWN_EXPS)] = _lazy(down, lambda w: w.transpose(1, 2).contiguous(), (e, d, f))
        gub = need(p + "gate_up_proj_bias")
        out[blk(i, FFN_GATE_EXPS, "bias")] = _lazy(gub, lambda b: b[..., 0::2].contiguous(), (e, f))
        out[blk(i, FFN_UP_EXPS, "bias")] = _lazy(gub, lambda b: b[..., 1::2].contiguous(), (e, f))
        out[blk(i, FFN_DOWN_EXPS, "bias")] = need(p + "down_proj_bias")
    return out


def validate(graph: Graph) -> None:
    for name, shape in gpt_oss_shapes(graph.hparams).items():
        if name == OUTPUT and graph.hparams.tie_embeddings:
            continue
        if name not in graph.tensors:
            raise BadInput(f"{graph.source}: tensor '{name}' is missing (expected shape {shape})")
        if tuple(graph.tensors[name].shape) != tuple(shape):
            raise BadInput(f"{graph.source}: tensor '{name}' has shape {graph.tensors[name].shape}, expected {shape}")


def load(model_dir) -> Graph:
    """An HF gpt-oss directory (bf16 or MXFP4 experts) -> canonical Graph."""
    from pathlib import Path

    from . import family_for, hf_tensor_sources, read_config
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    if not any(a in HF_ARCHITECTURES for a in cfg.get("architectures") or []):
        family_for(cfg, str(model_dir))  # raises the standard "not supported" error when nothing matches
        raise BadInput(f"{model_dir}: architecture {cfg.get('architectures')} is not GptOssForCausalLM")
    hp = hparams(cfg)
    g = Graph(hp, tensors(hp, hf_tensor_sources(model_dir, cfg), str(model_dir)), Tokenizer(hf_dir=model_dir),
              source=str(model_dir), source_format="hf", hf_config=cfg, quantization=cfg.get("quantization_config"))
    validate(g)
    return g


# ---------------------------------------------------------------- executor

class SinkAttention(Attention):
    """Attention whose softmax includes one learned logit per head (the sink) that takes probability but no value."""

    def __init__(self, hp: HParams, layer: int, get):
        super().__init__(hp, layer, get)
        self.sinks = nn.Parameter(get(ATTN_SINKS), requires_grad=False)

    def forward(self, x, cos, sin):
        from ..runtime.rope import apply_rope
        hp = self.hp
        b, t, _ = x.shape
        q = self.q(x).view(b, t, hp.n_heads, hp.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, hp.n_kv_heads, hp.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, hp.n_kv_heads, hp.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = hp.n_heads // hp.n_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        i = torch.arange(t, device=x.device)
        allowed = i[None, :] <= i[:, None]
        if self.window is not None:
            allowed = allowed & (i[:, None] - i[None, :] < self.window)
        logits = (q @ k.transpose(-1, -2)) * hp.head_dim ** -0.5
        logits = logits.masked_fill(~allowed, float("-inf"))
        sink = self.sinks.to(logits.dtype).view(1, -1, 1, 1).expand(b, -1, t, 1)
        probs = torch.softmax(torch.cat([logits, sink], dim=-1).float(), dim=-1)[..., :-1].to(v.dtype)
        y = probs @ v
        return self.o(y.transpose(1, 2).reshape(b, t, hp.n_heads * hp.head_dim))


class ClampedSwiGLUMoE(nn.Module):
    """Biased router: top-k of the logits, softmax over those k; experts with biases and the clamped SwiGLU."""

    def __init__(self, hp: HParams, get, get_bias):
        super().__init__()
        self.hp = hp
        self.router = get(FFN_ROUTER, linear=True)
        self.gate_exps = nn.Parameter(get(FFN_GATE_EXPS), requires_grad=False)
        self.up_exps = nn.Parameter(get(FFN_UP_EXPS), requires_grad=False)
        self.down_exps = nn.Parameter(get(FFN_DOWN_EXPS), requires_grad=False)
        self.gate_b = nn.Parameter(get_bias(FFN_GATE_EXPS), requires_grad=False)
        self.up_b = nn.Parameter(get_bias(FFN_UP_EXPS), requires_grad=False)
        self.down_b = nn.Parameter(get_bias(FFN_DOWN_EXPS), requires_grad=False)
        self.alpha = hp.extra.get("swiglu_alpha", 1.702)
        self.limit = hp.extra.get("swiglu_limit", 7.0)
        self.expert_hook = None  # hook(expert, tokens_in) for calibration, as in runtime.model.MoE

    def expert(self, e: int, xe: torch.Tensor) -> torch.Tensor:
        gate = (xe @ self.gate_exps[e].T + self.gate_b[e]).clamp(max=self.limit)
        up = (xe @ self.up_exps[e].T + self.up_b[e]).clamp(-self.limit, self.limit)
        h = (up + 1) * gate * torch.sigmoid(gate * self.alpha)
        return h @ self.down_exps[e].T + self.down_b[e]

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        top, idx = self.router(x).topk(self.hp.n_experts_used, dim=-1)
        w = torch.softmax(top.float(), dim=-1)
        out = torch.zeros_like(x)
        for e in range(self.hp.n_experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            xe = x[tok]
            if self.expert_hook is not None:
                self.expert_hook(e, xe)
            out.index_add_(0, tok, self.expert(e, xe) * w[tok, slot, None].to(x.dtype))
        return out.reshape(shape)


class GptOssLayer(DecoderLayer):
    def __init__(self, hp: HParams, layer: int, get, get_bias):
        nn.Module.__init__(self)
        self.attn_norm = RMSNorm(get(ATTN_NORM), hp.norm_eps)
        self.attn = SinkAttention(hp, layer, get)
        self.ffn_norm = RMSNorm(get(FFN_NORM), hp.norm_eps)
        self.mlp = ClampedSwiGLUMoE(hp, get, get_bias)


class GptOssCausalLM(CausalLM):
    """runtime.model.CausalLM with gpt-oss layers (sinks, clamped-SwiGLU biased experts)."""

    def build_layer(self, i: int) -> nn.Module:
        def get(suffix, linear=False):
            w = self._tensor(f"blk.{i}.{suffix}.weight")
            if not linear:
                return w
            bname = f"blk.{i}.{suffix}.bias"
            return make_linear(w, self._tensor(bname) if bname in self.graph else None)

        def get_bias(suffix):
            return self._tensor(f"blk.{i}.{suffix}.bias")
        return GptOssLayer(self.hp, i, get, get_bias)
