"""llama.cpp's per-tensor type choice for a file type ("mixture"), as a pure function.

Reproduces `llama_tensor_get_type` of llama.cpp's src/llama-quant.cpp (commit 0c1e570): which
tensors are quantized at all, the ftype-specific bumps (use_more_bits layers, attn_v/ffn_down,
output/token_embd), --tensor-type overrides, --pure, and the shape fallbacks (Q4_K->Q5_0,
Q5_K->Q5_1, Q6_K->Q8_0, Q2_K/Q3_K->Q4_0, then F16 when a row is not a multiple of 32).
Shapes are torch/HF order ([..., out, in]); ggml's ne[0] is shape[-1].
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from quantkit.errors import QuantkitError

# llama_ftype ids (include/llama.h) and their default tensor type
FTYPES: dict[str, tuple[int, T]] = {
    "f32": (0, T.F32), "f16": (1, T.F16), "bf16": (32, T.BF16),
    "q4_0": (2, T.Q4_0), "q4_1": (3, T.Q4_1), "q5_0": (8, T.Q5_0), "q5_1": (9, T.Q5_1), "q8_0": (7, T.Q8_0),
    "q2_k": (10, T.Q2_K), "q3_k_s": (11, T.Q3_K), "q3_k_m": (12, T.Q3_K), "q3_k_l": (13, T.Q3_K),
    "q4_k_s": (14, T.Q4_K), "q4_k_m": (15, T.Q4_K), "q5_k_s": (16, T.Q5_K), "q5_k_m": (17, T.Q5_K),
    "q6_k": (18, T.Q6_K),
}

_UNQUANTIZED = (T.F32, T.F16, T.BF16)

# substrings that keep a tensor in its source type (tensor_allows_quantization)
_NEVER_QUANTIZE = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos",
    ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
_NEVER_QUANTIZE_EXACT = ("position_embd.weight", "token_types.weight")

# (arch, n_layer) that llama.cpp labels LLM_TYPE_70B (attn_v gets Q5_K instead of Q3_K/Q4_K)
_70B_LAYERS = {"llama": 80, "qwen2": 80, "olmo": 80, "deci": 80, "jais2": 68}


@dataclass(frozen=True)
class ArchInfo:
    """The model hyperparameters llama.cpp's mixture rules look at."""
    n_layer: int
    n_head: int = 1
    n_head_kv: int = 1
    n_expert: int = 0
    arch: str = "llama"
    is_70b: bool | None = None  # None: infer like llama.cpp's per-arch model-type detection

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def type_70b(self) -> bool:
        if self.is_70b is not None:
            return self.is_70b
        if _70B_LAYERS.get(self.arch) != self.n_layer:
            return False
        return self.arch != "llama" or self.n_head != self.n_head_kv


def _layer_of(name: str) -> int:
    m = re.match(r"blk\.(-?\d+)\.", name)
    return int(m.group(1)) if m else -1


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _n_dims(shape: Sequence[int]) -> int:
    ne = list(reversed(shape))
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def allows_quantization(name: str, shape: Sequence[int], quantize_output_tensor: bool = True) -> bool:
    """tensor_allows_quantization: 2-D/3-D weights except norms, routers, small special tensors."""
    if _n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if not quantize_output_tensor and name == "output.weight":
        return False
    if name in _NEVER_QUANTIZE_EXACT:
        return False
    return not any(s in name for s in _NEVER_QUANTIZE)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or _cmod(i_layer - n_layers // 8, 3) == 2


def _cmod(a: int, b: int) -> int:
    """C's % (truncates toward zero)."""
    r = abs(a) % b
    return -r if a < 0 else r


class _State:
    def __init__(self, n_attention_wv: int, n_layer: int):
        self.n_attention_wv = n_attention_wv
        self.i_attention_wv = 0
        self.n_ffn = n_layer
        self.i_ffn = {"ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}


def _impl(st: _State, a: ArchInfo, ftype: str, new: T, name: str, ncols: int, cat: str, tied: bool,
          has_imatrix: bool, output_type: T | None) -> T:
    """llama_tensor_get_type_impl for the non-IQ file types."""
    def layer(counter: str) -> tuple[int, int]:
        if max(1, a.n_expert) > 1:
            il = _layer_of(name)
            if il < 0 or il >= a.n_layer:
                raise QuantkitError(f"tensor {name}: cannot determine its layer in [0, {a.n_layer})")
            return il, st.n_ffn
        return st.i_ffn[counter], st.n_ffn

    if cat == "output" or (tied and cat == "token_embd"):
        if output_type is not None:
            return output_type
        if a.arch == "falcon" or ncols % GGML_QUANT_SIZES[new][0] != 0:
            return T.Q8_0
        return new if new == T.Q8_0 else T.Q6_K
    if cat == "token_embd":
        return new
    if cat == "attn_v":
        if ftype == "q2_k":
            new = T.Q4_K if a.n_gqa >= 4 else T.Q3_K
        elif ftype == "q3_k_m":
            new = T.Q5_K if st.i_attention_wv < 2 else T.Q4_K
        elif ftype == "q3_k_l":
            new = T.Q5_K
        elif ftype in ("q4_k_m", "q5_k_m") and _use_more_bits(st.i_attention_wv, st.n_attention_wv):
            new = T.Q6_K
        elif ftype == "q4_k_s" and st.i_attention_wv < 4:
            new = T.Q5_K
        if a.type_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        if a.n_expert == 8:
            new = T.Q8_0
        st.i_attention_wv += 1
        return new
    if cat == "attn_k":
        return T.Q8_0 if a.n_expert == 8 else new
    if cat == "attn_q":
        return new
    if cat == "ffn_down":
        il, nl = layer("ffn_down")
        falcon = a.arch == "falcon"
        if ftype == "q2_k":
            new = T.Q3_K
        elif ftype == "q3_k_m":
            new = T.Q5_K if il < nl // 16 else (T.Q4_K if not falcon or _use_more_bits(il, nl) else T.Q3_K)
        elif ftype == "q3_k_l":
            new = T.Q4_K if falcon else T.Q5_K
        elif ftype == "q4_k_m":
            if falcon:
                new = T.Q6_K if il < nl // 16 else (T.Q5_K if _use_more_bits(il, nl) else T.Q4_K)
            elif _use_more_bits(il, nl):
                new = T.Q6_K
        elif ftype == "q5_k_m" and _use_more_bits(il, nl):
            new = T.Q6_K
        elif ftype == "q4_k_s" and not falcon and il < nl // 8:
            new = T.Q5_K
        elif ftype in ("q4_0", "q5_0") and has_imatrix and il < nl // 8:
            # guard against the first ffn_down layers going bad, only when an imatrix is given
            new = T.Q4_1 if ftype == "q4_0" else T.Q5_1
        st.i_ffn["ffn_down"] += 1
        return new
    if cat == "attn_output":
        if a.arch != "falcon":
            if a.n_expert == 8:
                if ftype in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m"):
                    new = T.Q5_K
            else:
                new = {"q2_k": T.Q3_K, "q3_k_m": T.Q4_K, "q3_k_l": T.Q5_K}.get(ftype, new)
        elif ftype == "q3_k_l":
            new = T.Q4_K
        return new
    if cat in ("ffn_gate", "ffn_up"):
        layer(cat)
        st.i_ffn[cat] += 1
    return new


def _fallback(new: T, ncols: int) -> T:
    blk = GGML_QUANT_SIZES[new][0]
    if ncols % blk == 0:
        return new
    ret = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}.get(new)
    if ret is None:
        if blk > 32:
            raise QuantkitError(f"no tensor type fallback is defined for type {new.name}")
        ret = new
    return T.F16 if ncols % GGML_QUANT_SIZES[ret][0] else ret


def _parse_type(v) -> T:
    if isinstance(v, T):
        return v
    try:
        return T[str(v).upper()]
    except KeyError:
        raise QuantkitError(f"--tensor-type: unknown ggml type {v!r}") from None


def _sort_key(name: str):
    return (_layer_of(name), name)


def plan_tensor_types(
    tensors: Iterable[tuple[str, Sequence[int]]],
    ftype: str,
    arch: ArchInfo,
    overrides: Sequence[tuple[str, T | str]] = (),
    pure: bool = False,
    source_types: dict[str, T] | None = None,
    has_imatrix: bool = False,
    output_tensor_type: T | None = None,
    token_embedding_type: T | None = None,
    quantize_output_tensor: bool = True,
    fallbacks: list | None = None,
) -> dict[str, T]:
    """{name: ggml type} exactly as `llama_model_quantize` would write for these tensors.

    tensors: (canonical GGUF name, torch shape). overrides: (regex, type) pairs like
    `--tensor-type REGEX=TYPE`, first match wins (std::regex_search semantics).
    Tensors that are not quantized keep their source type (default F32).
    `fallbacks` (a list) receives one (name, wanted, chosen, ncols) per shape fallback, as llama-quantize
    counts them."""
    key = ftype.lower()
    if key not in FTYPES:
        raise QuantkitError(f"ftype {ftype!r}: expected one of {', '.join(FTYPES)}")
    default = FTYPES[key][1]
    pats = []
    for pat, ty in overrides:
        try:
            pats.append((re.compile(pat), _parse_type(ty)))
        except re.error as e:
            raise QuantkitError(f"--tensor-type: bad regex {pat!r}: {e}") from None
    items = sorted(((n, tuple(s)) for n, s in tensors), key=lambda t: _sort_key(t[0]))
    cats = {n: _category(n) for n, _ in items}
    tied = not any(c == "output" for c in cats.values())
    st = _State(sum(c == "attn_v" for c in cats.values()), arch.n_layer)
    src = source_types or {}
    out: dict[str, T] = {}
    for name, shape in items:
        if not allows_quantization(name, shape, quantize_output_tensor):
            out[name] = src.get(name, T.F32)
            continue
        cat = cats[name]
        if token_embedding_type is not None and cat == "token_embd":
            # per_layer_token_embd follows it too unless an override regex names it
            if name != "per_layer_token_embd.weight" or not any(rx.search(name) for rx, _ in pats):
                out[name] = token_embedding_type
                continue
        if output_tensor_type is not None and cat == "output":
            out[name] = output_tensor_type
            continue
        new = default
        if default not in _UNQUANTIZED:
            manual = False
            for rx, ty in pats:
                if rx.search(name):
                    new, manual = ty, True
                    break
            if not manual and not pure:
                new = _impl(st, arch, key, new, name, shape[-1], cat, tied, has_imatrix, output_tensor_type)
            chosen = _fallback(new, shape[-1])
            if fallbacks is not None and chosen != new:
                fallbacks.append((name, new, chosen, shape[-1]))
            new = chosen
        out[name] = new
    return out
