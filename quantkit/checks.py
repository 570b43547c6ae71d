"""Sanity checks on what a model file claims, made before anything is allocated from it, and on the weights
before they are encoded. Each failure names the file, key or tensor and what was expected."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from .errors import BadInput

# Far beyond any real model, small enough that per-layer / per-head Python structures stay cheap.
MAX_LAYERS = 4096
MAX_DIM = 2**24  # hidden / ffn / heads / head_dim / experts
MAX_VOCAB = 2**31 - 1  # GGUF stores token ids as int32
MAX_CONTEXT = 2**31 - 1


def parse_json(text: str | bytes, where: str):
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise BadInput(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:  # json's C scanner counts its nesting against the recursion limit
        raise BadInput(f"{where}: JSON nested too deeply") from None


def read_json(path: Path, what: str = "", max_bytes: int = 256 * 2**20, expect: type | None = dict):
    """A JSON file with its size, encoding, syntax, nesting and top-level type checked."""
    path = Path(path)
    where = f"{what} {path}".strip()
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise BadInput(f"{where}: {size} bytes, larger than the {max_bytes} a JSON file here may have")
        data = parse_json(path.read_bytes(), where)
    except IsADirectoryError:
        raise BadInput(f"{where}: is a directory, expected a JSON file") from None
    except OSError as e:
        from .errors import os_error
        raise BadInput(os_error(e, path, "cannot read")) from None
    if expect is not None and not isinstance(data, expect):
        raise BadInput(f"{where}: top level is a JSON {type(data).__name__}, expected "
                       f"{'an object' if expect is dict else expect.__name__}")
    return data


def inside(base: Path, rel, what: str) -> Path:
    """base / rel, refused when rel is absolute or climbs out with '..'. (Judged on the name, not on where
    symlinks lead: hub caches link every snapshot file into a blob folder beside it.)"""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise BadInput(f"{what}: file name {str(rel)[:60]!r} is not a non-empty string")
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise BadInput(f"{what}: '{rel}' lies outside {base}; only files inside that folder are read")
    return Path(base) / rel


# ---------------------------------------------------------------- hyperparameters

def _int(v, key: str, where: str, lo: int = 1, hi: int = MAX_DIM) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadInput(f"{where}: '{key}' is {str(v)[:40]!r} ({type(v).__name__}), expected an integer")
    if not lo <= v <= hi:
        raise BadInput(f"{where}: '{key}' is {v}, expected an integer in [{lo}, {hi}]")
    return v


def _num(v, key: str, where: str, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise BadInput(f"{where}: '{key}' is {v!r}, expected a finite{' positive' if positive else ''} number")
    return float(v)


HF_INT_KEYS = {"vocab_size": MAX_VOCAB, "hidden_size": MAX_DIM, "num_hidden_layers": MAX_LAYERS,
               "num_attention_heads": MAX_DIM, "num_key_value_heads": MAX_DIM, "head_dim": MAX_DIM,
               "intermediate_size": MAX_DIM, "max_position_embeddings": MAX_CONTEXT, "num_local_experts": MAX_DIM,
               "num_experts_per_tok": MAX_DIM, "sliding_window": MAX_CONTEXT, "max_window_layers": MAX_LAYERS}
HF_NUM_KEYS = ("rms_norm_eps", "rope_theta", "swiglu_alpha", "swiglu_limit")


def check_hf_config(cfg, path) -> dict:
    """config.json's sizes: integers, positive, bounded; rope settings objects. Returns cfg."""
    where = str(path)
    if not isinstance(cfg, dict):
        raise BadInput(f"{where}: top level is a JSON {type(cfg).__name__}, expected an object")
    archs = cfg.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise BadInput(f"{where}: 'architectures' is {archs!r}, expected a list of class names")
    for k, hi in HF_INT_KEYS.items():
        if cfg.get(k) is not None:  # (a window or window-layer count of 0 means "none")
            _int(cfg[k], k, where, 0 if k in ("sliding_window", "max_window_layers") else 1, hi)
    for k in HF_NUM_KEYS:
        if cfg.get(k) is not None:
            _num(cfg[k], k, where, positive=k != "swiglu_limit")
    for k in ("rope_scaling", "rope_parameters", "quantization_config"):
        if cfg.get(k) is not None and not isinstance(cfg[k], dict):
            raise BadInput(f"{where}: '{k}' is a JSON {type(cfg[k]).__name__}, expected an object")
    lt = cfg.get("layer_types")
    if lt is not None and not (isinstance(lt, list) and all(isinstance(t, str) for t in lt)):
        raise BadInput(f"{where}: 'layer_types' is {str(lt)[:40]!r}, expected a list of strings")
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise BadInput(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    return cfg


GGUF_INT_KEYS = {"block_count": MAX_LAYERS, "embedding_length": MAX_DIM, "feed_forward_length": MAX_DIM,
                 "attention.head_count": MAX_DIM, "attention.head_count_kv": MAX_DIM,
                 "attention.key_length": MAX_DIM, "attention.value_length": MAX_DIM,
                 "rope.dimension_count": MAX_DIM, "context_length": MAX_CONTEXT, "vocab_size": MAX_VOCAB,
                 "expert_count": MAX_DIM, "expert_used_count": MAX_DIM, "expert_feed_forward_length": MAX_DIM,
                 "attention.sliding_window": MAX_CONTEXT, "rope.scaling.original_context_length": MAX_CONTEXT}
GGUF_NUM_KEYS = ("attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.factor",
                 "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow")
_TOKEN_ARRAYS = {"tokenizer.ggml.tokens": str, "tokenizer.ggml.merges": str, "tokenizer.ggml.scores": float,
                 "tokenizer.ggml.token_type": int}


def check_gguf_kv(kv: dict, path) -> None:
    """The architecture keys a GGUF's hyperparameters come from: types, signs, bounds."""
    where = str(path)
    a = kv.get("general.architecture")
    if not isinstance(a, str):
        raise BadInput(f"{where}: GGUF metadata 'general.architecture' is {a!r}, expected a string")
    for k, hi in GGUF_INT_KEYS.items():
        key = f"{a}.{k}"
        if key in kv:
            lo = 0 if k in ("rope.dimension_count", "expert_count", "expert_used_count", "vocab_size",
                            "rope.scaling.original_context_length") else 1
            _int(kv[key], key, where, lo, hi)
    for k in GGUF_NUM_KEYS:
        if f"{a}.{k}" in kv:
            _num(kv[f"{a}.{k}"], f"{a}.{k}", where, positive=k != "rope.scaling.yarn_beta_slow")
    st = kv.get(f"{a}.rope.scaling.type", "none")
    if not isinstance(st, str):
        raise BadInput(f"{where}: '{a}.rope.scaling.type' is {st!r}, expected a string")
    if st in ("linear", "yarn") and f"{a}.rope.scaling.factor" not in kv:
        raise BadInput(f"{where}: rope scaling type '{st}' needs '{a}.rope.scaling.factor', which is missing")
    heads, kvh = kv.get(f"{a}.attention.head_count"), kv.get(f"{a}.attention.head_count_kv")
    if isinstance(heads, int) and isinstance(kvh, int) and kvh and heads % kvh:
        raise BadInput(f"{where}: '{a}.attention.head_count' {heads} is not a multiple of "
                       f"'{a}.attention.head_count_kv' {kvh}")
    for k, t in _TOKEN_ARRAYS.items():
        v = kv.get(k)
        if v is None:
            continue
        if not isinstance(v, list) or not all(isinstance(x, t) and not isinstance(x, bool) or
                                              (t is float and isinstance(x, int) and not isinstance(x, bool))
                                              for x in v):
            raise BadInput(f"{where}: GGUF metadata '{k}' must be an array of {t.__name__}")
    tokens = kv.get("tokenizer.ggml.tokens")
    for k in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if tokens is not None and k in kv and len(kv[k]) != len(tokens):
            raise BadInput(f"{where}: '{k}' has {len(kv[k])} entries for {len(tokens)} tokens")
    for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template", "general.name"):
        if k in kv and not isinstance(kv[k], str):
            raise BadInput(f"{where}: GGUF metadata '{k}' is {str(kv[k])[:40]!r}, expected a string")
    for k, v in kv.items():
        if k.startswith("tokenizer.ggml.") and k.endswith("_token_id") and \
                (isinstance(v, bool) or not isinstance(v, int)):
            raise BadInput(f"{where}: GGUF metadata '{k}' is {v!r}, expected an integer token id")


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:blk|layers|h)\.(\d+)\.")


def check_hparams(hp, source, tensor_names) -> None:
    """Hyperparameters against each other and against the tensors the file holds (before any per-layer
    structure is built from them)."""
    where = str(source)
    for k in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_size"):
        _int(getattr(hp, k), k, where, 1, MAX_VOCAB if k == "vocab_size" else
             MAX_LAYERS if k == "n_layers" else MAX_DIM)
    if hp.n_heads % hp.n_kv_heads:
        raise BadInput(f"{where}: {hp.n_heads} attention heads are not a multiple of {hp.n_kv_heads} KV heads")
    if hp.n_heads * hp.head_dim > MAX_DIM:
        raise BadInput(f"{where}: {hp.n_heads} heads of {hp.head_dim} is not a plausible attention width")
    if hp.n_experts and not 0 < hp.n_experts_used <= hp.n_experts:
        raise BadInput(f"{where}: {hp.n_experts_used} experts used per token out of {hp.n_experts}")
    layers = {int(m.group(1)) for n in tensor_names for m in [_LAYER_INDEX.search(n)] if m}
    have = max(layers) + 1 if layers else 0
    have += any(".topQueryLayer." in n for n in tensor_names)  # CodeGeeX's unnumbered last layer
    if hp.n_layers > have:
        raise BadInput(f"{where}: {hp.n_layers} layers declared, but the file holds tensors for {have}")


# ---------------------------------------------------------------- weights

F16_MAX = 65504.0


def check_weight(name: str, w: torch.Tensor, target: torch.dtype | None = None, clamp_f16: bool = False,
                 source: str = "") -> torch.Tensor:
    """Refuse weights that would be silently corrupted: non-finite values, values beyond f16's range when
    writing f16 (unless clamping was asked for: then clamped, and logged), integers where floats belong."""
    where = f"{source}: tensor '{name}'" if source else f"tensor '{name}'"
    if not (w.is_floating_point()):
        raise BadInput(f"{where} is stored as {w.dtype} (integers); a float weight was expected")
    orig = w
    if w.element_size() == 1:  # float8: widen for the checks
        w = w.float()
    bad = ~torch.isfinite(w)
    if bad.any():
        i = _first(bad, w.shape)
        raise BadInput(f"{where} holds a non-finite value ({w[i].item()}) at index {list(i)}")
    if target == torch.float16 and w.dtype != torch.float16:
        over = w.abs() > F16_MAX
        if over.any():
            i = _first(over, w.shape)
            if not clamp_f16:
                raise BadInput(f"{where}: value {w[i].item():g} at index {list(i)} overflows float16 "
                               f"(max 65504); write bf16 or f32 instead")
            import logging
            logging.getLogger("quantkit").warning("%s: clamped %d values beyond float16's range to +-65504",
                                                  where, int(over.sum()))
            return w.clamp(-F16_MAX, F16_MAX)
    return orig


def check_raw(name: str, data, dtype: torch.dtype | None, source: str = "") -> None:
    """Stored float bytes copied through unchanged are checked for non-finite values too."""
    if dtype is not None:
        check_weight(name, torch.from_numpy(data).view(dtype), source=source)


def _first(mask: torch.Tensor, shape) -> tuple[int, ...]:
    flat = int(mask.reshape(-1).nonzero()[0, 0])
    idx = []
    for s in reversed(shape):
        idx.append(flat % s)
        flat //= s
    return tuple(reversed(idx))
