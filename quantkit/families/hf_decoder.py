"""What the standard HF decoder layouts (Llama, Mistral, Qwen2/3 ...) share: config reading and tensor names."""

from __future__ import annotations

from ..errors import BadInput
from ..graph import (ATTN_K, ATTN_K_NORM, ATTN_NORM, ATTN_OUT, ATTN_Q, ATTN_Q_NORM, ATTN_V, FFN_DOWN, FFN_GATE,
                     FFN_NORM, FFN_UP, OUTPUT, OUTPUT_NORM, TOKEN_EMBD, HParams, RopeScaling, blk)

# per-layer HF suffix -> canonical suffix
LAYER_NAMES = {
    "input_layernorm": ATTN_NORM,
    "self_attn.q_proj": ATTN_Q, "self_attn.k_proj": ATTN_K, "self_attn.v_proj": ATTN_V,
    "self_attn.o_proj": ATTN_OUT,
    "self_attn.q_norm": ATTN_Q_NORM, "self_attn.k_norm": ATTN_K_NORM,
    "post_attention_layernorm": FFN_NORM,
    "mlp.gate_proj": FFN_GATE, "mlp.up_proj": FFN_UP, "mlp.down_proj": FFN_DOWN,
}
GLOBAL_NAMES = {"model.embed_tokens.weight": TOKEN_EMBD, "model.norm.weight": OUTPUT_NORM, "lm_head.weight": OUTPUT}


def cfg_get(cfg: dict, key: str, default=None, *, required: bool = False, source: str = "config.json"):
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if required:
        raise BadInput(f"{source}: missing required key '{key}'")
    return default


def _rope_num(sc: dict, key: str, kind: str, default=None, cast=float):
    v = sc.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf") or \
            (cast is int and v != int(v)):
        need = "missing" if v is None else f"{v!r}"
        raise BadInput(f"config.json: rope scaling '{kind}' needs '{key}' as a positive number ({need})")
    return cast(v)


def rope_from_config(cfg: dict) -> tuple[float, RopeScaling]:
    """Old-style (rope_theta + rope_scaling) and transformers-5 style (rope_parameters) configs."""
    params = cfg.get("rope_parameters") or {}
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type dicts: take the full one
        params = params["full_attention"]
    sc = cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(sc, dict):
        raise BadInput("config.json: 'rope_parameters' / 'rope_scaling' must be JSON objects")
    theta = _rope_num({"rope_theta": params.get("rope_theta", cfg.get("rope_theta", 10000.0))}, "rope_theta",
                      "default")
    if not sc and params.get("rope_type", "default") != "default":
        sc = params
    kind = sc.get("rope_type", sc.get("type", "default")) if sc else "default"
    if kind in ("default", None):
        return theta, RopeScaling()
    if kind not in ("linear", "llama3", "yarn"):
        raise BadInput(f"config.json: rope scaling type {kind!r} is not supported (supported: linear, llama3, yarn)")
    factor = _rope_num(sc, "factor", kind, 1.0 if kind == "yarn" else None)
    if kind == "linear":
        return theta, RopeScaling("linear", factor)
    if kind == "llama3":
        return theta, RopeScaling("llama3", factor, _rope_num(sc, "original_max_position_embeddings", kind, cast=int),
                                  _rope_num(sc, "low_freq_factor", kind), _rope_num(sc, "high_freq_factor", kind))
    orig = sc.get("original_max_position_embeddings") or cfg.get("max_position_embeddings")
    return theta, RopeScaling(
        "yarn", factor, _rope_num({"original_max_position_embeddings": orig}, "original_max_position_embeddings",
                                  kind, cast=int),
        beta_fast=sc.get("beta_fast"), beta_slow=sc.get("beta_slow"),
        attention_factor=sc.get("attention_factor"), mscale=sc.get("mscale"),
        mscale_all_dim=sc.get("mscale_all_dim"), truncate=sc.get("truncate", True))


def decoder_hparams(cfg: dict, arch: str, acts: tuple[str, ...] = ("silu",), **overrides) -> HParams:
    n_heads = cfg_get(cfg, "num_attention_heads", required=True)
    hidden = cfg_get(cfg, "hidden_size", required=True)
    theta, scaling = rope_from_config(cfg)
    hp = HParams(
        arch=arch,
        vocab_size=cfg_get(cfg, "vocab_size", required=True),
        hidden_size=hidden,
        n_layers=cfg_get(cfg, "num_hidden_layers", required=True),
        n_heads=n_heads,
        n_kv_heads=cfg_get(cfg, "num_key_value_heads", n_heads),
        head_dim=cfg_get(cfg, "head_dim", hidden // n_heads),
        ffn_size=cfg_get(cfg, "intermediate_size", required=True),
        norm_eps=float(cfg_get(cfg, "rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        context_length=cfg_get(cfg, "max_position_embeddings", 4096),
        tie_embeddings=bool(cfg_get(cfg, "tie_word_embeddings", False)),
        attn_bias=bool(cfg_get(cfg, "attention_bias", False)),
        attn_out_bias=bool(cfg_get(cfg, "attention_bias", False)),
        mlp_bias=bool(cfg_get(cfg, "mlp_bias", False)),
        act=cfg_get(cfg, "hidden_act", "silu"),
        name=cfg_get(cfg, "_name_or_path", ""),
    )
    for k, v in overrides.items():
        setattr(hp, k, v)
    if hp.act not in acts:
        raise BadInput(f"config.json: hidden_act '{hp.act}' is not supported for {arch} (expected "
                       f"{' or '.join(acts)})")
    return hp


def decoder_name_map(hp: HParams) -> dict[str, str]:
    """Every HF tensor name of a standard decoder -> canonical name."""
    m = {k: v for k, v in GLOBAL_NAMES.items() if not (v == OUTPUT and hp.tie_embeddings)}
    for i in range(hp.n_layers):
        for hf, c in LAYER_NAMES.items():
            if c in (ATTN_Q_NORM, ATTN_K_NORM) and not hp.qk_norm:
                continue
            m[f"model.layers.{i}.{hf}.weight"] = blk(i, c)
            bias = ((c in (ATTN_Q, ATTN_K, ATTN_V) and hp.attn_bias) or (c == ATTN_OUT and hp.attn_out_bias)
                    or (c in (FFN_GATE, FFN_UP, FFN_DOWN) and hp.mlp_bias))
            if bias:
                m[f"model.layers.{i}.{hf}.bias"] = blk(i, c, "bias")
    return m


def rope_to_config(hp: HParams) -> dict:
    rs = hp.rope_scaling
    out: dict = {"rope_theta": hp.rope_theta}
    if rs.kind == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": rs.factor}
    elif rs.kind == "llama3":
        out["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                               "high_freq_factor": rs.high_freq_factor,
                               "original_max_position_embeddings": rs.original_context}
    elif rs.kind == "yarn":
        d = {"rope_type": "yarn", "factor": rs.factor, "original_max_position_embeddings": rs.original_context}
        for k in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
            if getattr(rs, k) is not None:
                d[k] = getattr(rs, k)
        out["rope_scaling"] = d
    elif rs.kind == "freq_factors":
        raise BadInput("rope scaling stored as GGUF rope_freqs factors has no HF config equivalent; "
                       "convert from the original HF checkpoint instead")
    else:
        out["rope_scaling"] = None
    return out


def decoder_config(hp: HParams, architecture: str, model_type: str, **extra) -> dict:
    cfg = {
        "architectures": [architecture], "model_type": model_type,
        "vocab_size": hp.vocab_size, "hidden_size": hp.hidden_size, "num_hidden_layers": hp.n_layers,
        "num_attention_heads": hp.n_heads, "num_key_value_heads": hp.n_kv_heads, "head_dim": hp.head_dim,
        "intermediate_size": hp.ffn_size, "rms_norm_eps": hp.norm_eps, "max_position_embeddings": hp.context_length,
        "tie_word_embeddings": hp.tie_embeddings, "hidden_act": hp.act, "torch_dtype": "bfloat16",
    }
    cfg.update(rope_to_config(hp))
    cfg.update(extra)
    return cfg


def layer_types_of(cfg: dict, n_layers: int, sliding) -> list[str]:
    """Per-layer "sliding" / "full" from config.json's layer_types, else `sliding(i)` (the model's default
    pattern)."""
    types = cfg.get("layer_types") or ["sliding_attention" if sliding(i) else "full_attention"
                                       for i in range(n_layers)]
    if len(types) != n_layers:
        raise BadInput(f"config.json: layer_types has {len(types)} entries for {n_layers} layers")
    return ["sliding" if t in ("sliding_attention", "sliding") else "full" for t in types]


def sliding_rope(cfg: dict, default_theta: float, *local_keys: str) -> float:
    """The sliding layers' RoPE base: rope_parameters["sliding_attention"] (transformers 5), an older
    per-model key (Gemma 3's rope_local_base_freq), else `default_theta`. Sliding layers use no scaling."""
    params = cfg.get("rope_parameters") or {}
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    if local:
        if local.get("rope_type", "default") != "default":
            raise BadInput(f"config.json: sliding layers' rope_type '{local['rope_type']}' is not supported "
                           "(expected default)")
        return float(local.get("rope_theta", default_theta))
    for k in local_keys:
        if cfg.get(k) is not None:
            return float(cfg[k])
    return float(default_theta)
