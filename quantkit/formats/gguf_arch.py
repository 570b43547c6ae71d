"""GGUF architecture metadata <-> canonical hyperparameters, and the tensor layout changes GGUF archs expect."""

from __future__ import annotations

import math

import torch
from gguf import GGUFValueType as VT

from ..errors import BadInput, UnsupportedArchitecture
from ..graph import HParams, RopeScaling

# canonical arch -> GGUF arch (llama.cpp's converter writes Mistral as "llama")
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt-oss": "gpt-oss"}
# GGUF arch -> canonical arch when reading
CANON_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt-oss": "gpt-oss"}
# per GGUF arch: canonical layer-tensor suffix -> the suffix llama.cpp's arch loads it under
TENSOR_RENAMES = {"gpt-oss": {"ffn_norm": "post_attention_norm"}}
# llama.cpp hard-codes gpt-oss's clamped SwiGLU (LLM_FFN_SWIGLU_OAI_MOE); GGUF has no key for them
GPT_OSS_SWIGLU = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}
# archs whose q/k rows llama.cpp expects in the interleaved (GPT-J) RoPE order
PERMUTE_QK = {"llama"}


def gguf_arch(hp: HParams) -> str:
    try:
        return GGUF_ARCH[hp.arch]
    except KeyError:
        raise UnsupportedArchitecture(
            f"architecture '{hp.arch}' cannot be written to GGUF yet (supported: {', '.join(sorted(GGUF_ARCH))})") from None


def _gguf_arch_name(arch: str) -> str:
    return arch if arch in CANON_ARCH else GGUF_ARCH.get(arch, arch)


def gguf_tensor_name(arch: str, name: str) -> str:
    """Canonical tensor name -> the name llama.cpp's arch expects (arch: canonical or GGUF arch)."""
    ren = TENSOR_RENAMES.get(_gguf_arch_name(arch))
    if ren and name.startswith("blk."):
        i, rest = name[4:].split(".", 1)
        suffix, _, kind = rest.rpartition(".")
        if suffix in ren:
            return f"blk.{i}.{ren[suffix]}.{kind}"
    return name


def canonical_tensor_name(arch: str, name: str) -> str:
    """Inverse of gguf_tensor_name (arch: the GGUF arch)."""
    ren = TENSOR_RENAMES.get(_gguf_arch_name(arch))
    if ren and name.startswith("blk."):
        back = {g: c for c, g in ren.items()}
        i, rest = name[4:].split(".", 1)
        suffix, _, kind = rest.rpartition(".")
        if suffix in back:
            return f"blk.{i}.{back[suffix]}.{kind}"
    return name


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> interleaved pairs (what llama.cpp's 'llama' arch applies RoPE to)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(hp: HParams) -> torch.Tensor:
    """The rope_freqs.weight llama.cpp uses for llama3 scaling (it divides each frequency by its factor)."""
    rs = hp.rope_scaling
    dim = hp.rotary_dim
    freqs = 1.0 / (hp.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    low_wl = rs.original_context / rs.low_freq_factor
    high_wl = rs.original_context / rs.high_freq_factor
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(rs.factor)
        else:
            smooth = (rs.original_context / wl - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
            out.append(1.0 / ((1 - smooth) / rs.factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def hparams_kv(hp: HParams) -> list[tuple[str, object, VT]]:
    a = gguf_arch(hp)
    kv = [
        ("general.architecture", a, VT.STRING),
        (f"{a}.vocab_size", hp.vocab_size, VT.UINT32),
        (f"{a}.context_length", hp.context_length, VT.UINT32),
        (f"{a}.embedding_length", hp.hidden_size, VT.UINT32),
        (f"{a}.block_count", hp.n_layers, VT.UINT32),
        (f"{a}.feed_forward_length", hp.ffn_size, VT.UINT32),
        (f"{a}.attention.head_count", hp.n_heads, VT.UINT32),
        (f"{a}.attention.head_count_kv", hp.n_kv_heads, VT.UINT32),
        (f"{a}.rope.freq_base", float(hp.rope_theta), VT.FLOAT32),
        (f"{a}.attention.layer_norm_rms_epsilon", float(hp.norm_eps), VT.FLOAT32),
        (f"{a}.rope.dimension_count", hp.rotary_dim, VT.UINT32),
    ]
    kv += [(f"{a}.attention.key_length", hp.head_dim, VT.UINT32),  # llama.cpp's converter always writes them
           (f"{a}.attention.value_length", hp.head_dim, VT.UINT32)]
    rs = hp.rope_scaling
    if rs.kind == "linear":
        kv += [(f"{a}.rope.scaling.type", "linear", VT.STRING), (f"{a}.rope.scaling.factor", rs.factor, VT.FLOAT32)]
    elif rs.kind == "yarn":
        kv += [(f"{a}.rope.scaling.type", "yarn", VT.STRING), (f"{a}.rope.scaling.factor", rs.factor, VT.FLOAT32),
               (f"{a}.rope.scaling.original_context_length", rs.original_context, VT.UINT32)]
        for key, v in (("yarn_attn_factor", rs.attention_factor), ("yarn_beta_fast", rs.beta_fast),
                       ("yarn_beta_slow", rs.beta_slow)):
            if v is not None:  # what the converter copies from the config when present
                kv.append((f"{a}.rope.scaling.{key}", float(v), VT.FLOAT32))
    if hp.sliding_window and hp.arch == "qwen2" and hp.layer_types:
        pass  # llama.cpp's qwen2 has no sliding-window support; Qwen2 checkpoints ship with it disabled
    if hp.n_experts:
        kv += [(f"{a}.expert_count", hp.n_experts, VT.UINT32), (f"{a}.expert_used_count", hp.n_experts_used, VT.UINT32)]
        if hp.expert_ffn_size:
            kv.append((f"{a}.expert_feed_forward_length", hp.expert_ffn_size, VT.UINT32))
    if a == "gpt-oss":
        kv += _gpt_oss_kv(hp)
    return kv


def gpt_oss_layer_types(n_layers: int) -> list[str]:
    """llama.cpp's gpt-oss SWA pattern (load_swa_pattern with n_pattern 2): even layers sliding, odd full."""
    return ["sliding" if i % 2 == 0 else "full" for i in range(n_layers)]


def _gpt_oss_kv(hp: HParams) -> list:
    for k, v in GPT_OSS_SWIGLU.items():
        if abs(float(hp.extra.get(k, v)) - v) > 1e-6:
            raise UnsupportedArchitecture(
                f"gpt-oss {k}={hp.extra[k]}: llama.cpp's gpt-oss graph hard-codes {k}={v}; GGUF cannot hold another value")
    if not hp.sliding_window:
        raise BadInput("gpt-oss: sliding_window is missing; llama.cpp's gpt-oss needs attention.sliding_window")
    if hp.layer_types is not None and hp.layer_types != gpt_oss_layer_types(hp.n_layers):
        raise UnsupportedArchitecture(
            f"gpt-oss layer_types {hp.layer_types}: llama.cpp's gpt-oss alternates sliding (even) / full (odd) layers")
    if not hp.n_experts or not hp.expert_ffn_size:
        raise BadInput("gpt-oss: expert count / expert FFN size missing from the hyperparameters")
    return [("gpt-oss.attention.sliding_window", int(hp.sliding_window), VT.UINT32)]


def _get(kv: dict, key: str, path: str, default=None, required=True):
    if key in kv:
        return kv[key]
    if required and default is None:
        raise BadInput(f"{path}: GGUF metadata key '{key}' is missing")
    return default


def hparams_from_kv(kv: dict, path: str, has_output: bool) -> HParams:
    a = kv.get("general.architecture")
    if a not in CANON_ARCH:
        raise UnsupportedArchitecture(
            f"{path}: GGUF architecture '{a}' is not supported (supported: {', '.join(sorted(CANON_ARCH))})")
    n_heads = int(_get(kv, f"{a}.attention.head_count", path))
    hidden = int(_get(kv, f"{a}.embedding_length", path))
    head_dim = int(kv.get(f"{a}.attention.key_length", hidden // n_heads))
    vocab = kv.get(f"{a}.vocab_size") or len(kv.get("tokenizer.ggml.tokens", []))
    if not vocab:
        raise BadInput(f"{path}: GGUF has neither '{a}.vocab_size' nor tokenizer.ggml.tokens")
    st = kv.get(f"{a}.rope.scaling.type", "none")
    rs = RopeScaling()
    if st == "linear":
        rs = RopeScaling("linear", float(kv[f"{a}.rope.scaling.factor"]))
    elif st == "yarn":
        # llama.cpp: beta defaults 32/1, corr dims always floored/ceiled (truncate), attention
        # factor 0.1*ln(factor)+1 (the yarn_attn_factor key is overridden by its context setup)
        rs = RopeScaling("yarn", float(kv[f"{a}.rope.scaling.factor"]),
                         int(kv.get(f"{a}.rope.scaling.original_context_length", 0)) or None,
                         beta_fast=float(kv.get(f"{a}.rope.scaling.yarn_beta_fast", 32.0)),
                         beta_slow=float(kv.get(f"{a}.rope.scaling.yarn_beta_slow", 1.0)), truncate=True)
    hp = HParams(
        arch=CANON_ARCH[a], vocab_size=int(vocab), hidden_size=hidden,
        n_layers=int(_get(kv, f"{a}.block_count", path)), n_heads=n_heads,
        n_kv_heads=int(kv.get(f"{a}.attention.head_count_kv", n_heads)), head_dim=head_dim,
        ffn_size=int(_get(kv, f"{a}.feed_forward_length", path)),
        norm_eps=float(_get(kv, f"{a}.attention.layer_norm_rms_epsilon", path)),
        rope_theta=float(kv.get(f"{a}.rope.freq_base", 10000.0)),
        rope_dim=int(kv[f"{a}.rope.dimension_count"]) if f"{a}.rope.dimension_count" in kv and
        int(kv[f"{a}.rope.dimension_count"]) != head_dim else None,
        rope_scaling=rs, context_length=int(kv.get(f"{a}.context_length", 4096)),
        tie_embeddings=not has_output, qk_norm=(a == "qwen3"), name=str(kv.get("general.name", "")),
    )
    if f"{a}.expert_count" in kv:
        hp.n_experts = int(kv[f"{a}.expert_count"])
        hp.n_experts_used = int(_get(kv, f"{a}.expert_used_count", path))
        hp.expert_ffn_size = int(kv.get(f"{a}.expert_feed_forward_length", hp.ffn_size))
    if a == "gpt-oss":
        if not hp.n_experts:
            raise BadInput(f"{path}: GGUF metadata key 'gpt-oss.expert_count' is missing")
        hp.expert_ffn_size = int(_get(kv, "gpt-oss.expert_feed_forward_length", path))
        hp.sliding_window = int(_get(kv, "gpt-oss.attention.sliding_window", path))
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
        hp.extra = {**hp.extra, **GPT_OSS_SWIGLU}
    return hp


def finish_hparams_from_tensors(hp: HParams, names: set[str]) -> None:
    """Biases are implied by which tensors a GGUF holds (llama.cpp reads them when present)."""
    hp.attn_bias = "blk.0.attn_q.bias" in names
    hp.attn_out_bias = "blk.0.attn_output.bias" in names
    hp.mlp_bias = "blk.0.ffn_up.bias" in names
