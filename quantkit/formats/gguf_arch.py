"""GGUF architecture metadata <-> canonical hyperparameters, and the tensor layout changes GGUF archs expect."""

from __future__ import annotations

import math

import torch
from gguf import GGUFValueType as VT

from ..errors import BadInput, UnsupportedArchitecture
from ..graph import HParams, RopeScaling

# canonical arch -> GGUF arch (llama.cpp's converter writes Mistral as "llama")
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# GGUF arch -> canonical arch when reading
CANON_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# archs whose q/k rows llama.cpp expects in the interleaved (GPT-J) RoPE order
PERMUTE_QK = {"llama"}


def gguf_arch(hp: HParams) -> str:
    try:
        return GGUF_ARCH[hp.arch]
    except KeyError:
        raise UnsupportedArchitecture(
            f"architecture '{hp.arch}' cannot be written to GGUF yet (supported: {', '.join(sorted(GGUF_ARCH))})") from None


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
    if hp.head_dim * hp.n_heads != hp.hidden_size or a == "qwen3":
        kv += [(f"{a}.attention.key_length", hp.head_dim, VT.UINT32),
               (f"{a}.attention.value_length", hp.head_dim, VT.UINT32)]
    rs = hp.rope_scaling
    if rs.kind == "linear":
        kv += [(f"{a}.rope.scaling.type", "linear", VT.STRING), (f"{a}.rope.scaling.factor", rs.factor, VT.FLOAT32)]
    elif rs.kind == "yarn":
        kv += [(f"{a}.rope.scaling.type", "yarn", VT.STRING), (f"{a}.rope.scaling.factor", rs.factor, VT.FLOAT32),
               (f"{a}.rope.scaling.original_context_length", rs.original_context, VT.UINT32)]
    if hp.sliding_window and hp.arch == "qwen2" and hp.layer_types:
        pass  # llama.cpp's qwen2 has no sliding-window support; Qwen2 checkpoints ship with it disabled
    return kv


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
        rs = RopeScaling("yarn", float(kv[f"{a}.rope.scaling.factor"]),
                         int(kv.get(f"{a}.rope.scaling.original_context_length", 0)) or None)
    return HParams(
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


def finish_hparams_from_tensors(hp: HParams, names: set[str]) -> None:
    """Biases are implied by which tensors a GGUF holds (llama.cpp reads them when present)."""
    hp.attn_bias = "blk.0.attn_q.bias" in names
    hp.attn_out_bias = "blk.0.attn_output.bias" in names
    hp.mlp_bias = "blk.0.ffn_up.bias" in names
