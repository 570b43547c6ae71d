"""A family: one registered class per model family, declaring everything quantkit needs to know about it.

- HF side: the architectures it reads, hyperparameters from config.json, the tensor mapping (HF name <->
  canonical name; families whose layout is not a rename override `hf_tensors` / `hf_export`), and the
  config.json written back.
- GGUF side: llama.cpp's architecture name, hyperparameters to and from GGUF metadata, tensor renames and
  whether q/k rows are permuted for llama.cpp's interleaved RoPE.
- Structure: each layer as a composition of blocks (`layer`), from which tensor shapes, the executor and
  the quantization groups follow.
Register with `@register` (families/registry.py); nothing else lists families.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..blocks import Attention, Branch, GatedMLP, LayerSpec, MoE, Norm
from ..errors import BadInput
from ..graph import ATTN_NORM, FFN_NORM, OUTPUT, OUTPUT_NORM, TOKEN_EMBD, HParams, LazyTensor, RopeScaling
from .hf_decoder import decoder_config, decoder_hparams, decoder_name_map


@dataclass(frozen=True)
class ExpertModule:
    """One expert's linear in a quantized HF checkpoint: its module prefix, the stacked canonical weights
    whose rows of expert `expert` form it (several: rows interleaved, as in gpt-oss's gate_up_proj) and the
    matching stacked biases (written as `<prefix>.bias`, interleaved the same way; () for none)."""
    prefix: str
    weights: tuple[str, ...]
    expert: int
    biases: tuple[str, ...] = ()


def _vt():
    from gguf import GGUFValueType
    return GGUFValueType


class Family:
    arch: str = ""  # canonical architecture key (HParams.arch)
    hf_architectures: tuple[str, ...] = ()
    hf_model_type: str = ""
    gguf_arch: str | None = None  # llama.cpp's architecture name; None: GGUF cannot hold this family
    gguf_renames: dict[str, str] = {}  # canonical layer suffix -> the suffix llama.cpp loads it under
    gguf_permute_qk: bool = False  # llama.cpp's "llama" arch applies RoPE to interleaved q/k rows
    gguf_reader: bool = True  # reads GGUF files of `gguf_arch` (False when another family of that arch does)

    # ------------------------------------------------------------------ structure
    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        """Pre-norm decoder: RMSNorm -> attention, RMSNorm -> SwiGLU MLP (or MoE)."""
        attn = Attention(bias=hp.attn_bias, out_bias=hp.attn_out_bias, qk_norm="head" if hp.qk_norm else None)
        ffn = MoE() if hp.is_moe(i) else GatedMLP(hp.act, bias=hp.mlp_bias)
        return LayerSpec([Branch(attn, Norm(ATTN_NORM, hp.norm)), Branch(ffn, Norm(FFN_NORM, hp.norm))])

    @classmethod
    def embed_scale(cls, hp: HParams) -> float | None:
        """Multiplier on the token embeddings (Gemma: sqrt(hidden)); None: none."""
        return None

    @classmethod
    def logit_softcap(cls, hp: HParams) -> float | None:
        """Final logits -> cap * tanh(logits / cap) (Gemma 2); None: none."""
        return None

    @classmethod
    def rope_kind(cls, hp: HParams, i: int) -> str:
        """Layers of one kind share cos/sin. "swa": a sliding layer whose RoPE has its own base and no
        scaling (hp.extra["rope_swa_theta"]: Gemma 3's local base, OLMo 3's unscaled sliding layers)."""
        return "swa" if "rope_swa_theta" in hp.extra and hp.is_sliding(i) else "full"

    @classmethod
    def rope_params(cls, hp: HParams, kind: str) -> tuple[float, RopeScaling]:
        if kind == "swa":
            return float(hp.extra["rope_swa_theta"]), RopeScaling()
        return hp.rope_theta, hp.rope_scaling

    @classmethod
    def global_tensors(cls, hp: HParams) -> dict[str, tuple[int, ...]]:
        s = {TOKEN_EMBD: (hp.vocab_size, hp.hidden_size), OUTPUT_NORM: (hp.hidden_size,)}
        if not hp.tie_embeddings:
            s[OUTPUT] = (hp.vocab_size, hp.hidden_size)
        return s

    @classmethod
    def expected_shapes(cls, hp: HParams) -> dict[str, tuple[int, ...]]:
        s = cls.global_tensors(hp)
        for i in range(hp.n_layers):
            for k, shape in cls.layer(hp, i).tensors(hp, i).items():
                s[f"blk.{i}.{k}"] = shape
        return s

    # ------------------------------------------------------------------ HF
    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        return decoder_hparams(cfg, cls.arch)

    @classmethod
    def hf_name_map(cls, hp: HParams) -> dict[str, str]:
        """HF tensor name -> canonical name, for tensors that map one to one."""
        return decoder_name_map(hp)

    @classmethod
    def hf_tensors(cls, hp: HParams, src: dict[str, LazyTensor], source: str) -> dict[str, LazyTensor]:
        out = {}
        for hf, canon in cls.hf_name_map(hp).items():
            out[canon] = need(src, hf, source)
        return out

    @classmethod
    def hf_export(cls, hp: HParams) -> list[tuple[str, tuple[str, ...], Callable | None]]:
        """[(HF name, canonical sources, fn(*source tensors) -> HF tensor, or None for the one source as is)]
        for writing plain HF checkpoints: a stacked canonical tensor may become several HF tensors and
        several canonical tensors one (a fused gate/up)."""
        return [(h, (c,), None) for h, c in cls.hf_name_map(hp).items()]

    @classmethod
    def hf_experts(cls, hp: HParams) -> dict[str, list[str]]:
        """Stacked canonical expert weight -> the HF weight name of each expert, for families whose HF
        checkpoints keep one linear per expert (Mixtral, Qwen-MoE, OLMoE ...): quantized writers pack each
        expert under its own module. {} when HF stores experts fused (gpt-oss) or there are none."""
        return {}

    @classmethod
    def hf_quantized_experts(cls, hp: HParams, fmt: str) -> list[ExpertModule]:
        """Where each expert's quantized linear goes in a `fmt` checkpoint ("gptq", "awq",
        "compressed-tensors"): by default one module per expert, named after `hf_experts`. Families whose
        engines use another layout override this; one with no loadable layout for `fmt` raises
        UnsupportedArchitecture saying why."""
        return [ExpertModule(name[:-len(".weight")], (canon,), e)
                for canon, names in cls.hf_experts(hp).items() for e, name in enumerate(names)]

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        return decoder_config(hp, cls.hf_architectures[0], cls.hf_model_type or cls.arch)

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def gguf_kv(cls, hp: HParams) -> list[tuple[str, object, object]]:
        """GGUF metadata for these hyperparameters, general.architecture first."""
        VT = _vt()
        a = cls.gguf_arch
        kv = core_gguf_kv(a, hp) + [
            (f"{a}.rope.dimension_count", hp.rotary_dim, VT.UINT32),
            # llama.cpp's converter always writes them
            (f"{a}.attention.key_length", hp.head_dim, VT.UINT32),
            (f"{a}.attention.value_length", hp.head_dim, VT.UINT32),
        ]
        kv += rope_scaling_kv(a, hp.rope_scaling)
        if hp.n_experts:
            kv += [(f"{a}.expert_count", hp.n_experts, VT.UINT32),
                   (f"{a}.expert_used_count", hp.n_experts_used, VT.UINT32)]
            if hp.expert_ffn_size:
                kv.append((f"{a}.expert_feed_forward_length", hp.expert_ffn_size, VT.UINT32))
        return kv

    @classmethod
    def hparams_from_gguf(cls, kv: dict, path: str, names: set[str]) -> HParams:
        a = kv["general.architecture"]
        n_heads = int(gguf_get(kv, f"{a}.attention.head_count", path))
        hidden = int(gguf_get(kv, f"{a}.embedding_length", path))
        head_dim = int(kv.get(f"{a}.attention.key_length", hidden // max(n_heads, 1)))
        vocab = kv.get(f"{a}.vocab_size") or len(kv.get("tokenizer.ggml.tokens", []))
        if not vocab:
            raise BadInput(f"{path}: GGUF has neither '{a}.vocab_size' nor tokenizer.ggml.tokens")
        rot = kv.get(f"{a}.rope.dimension_count")
        hp = HParams(
            arch=cls.arch, vocab_size=int(vocab), hidden_size=hidden,
            n_layers=int(gguf_get(kv, f"{a}.block_count", path)), n_heads=n_heads,
            n_kv_heads=int(kv.get(f"{a}.attention.head_count_kv", n_heads)), head_dim=head_dim,
            ffn_size=int(gguf_get(kv, f"{a}.feed_forward_length", path)),
            norm_eps=float(gguf_get(kv, f"{a}.attention.layer_norm_rms_epsilon", path)),
            rope_theta=float(kv.get(f"{a}.rope.freq_base", 10000.0)),
            rope_dim=int(rot) if rot is not None and int(rot) != head_dim else None,
            rope_scaling=rope_scaling_from_kv(kv, a), context_length=int(kv.get(f"{a}.context_length", 4096)),
            tie_embeddings=OUTPUT not in names, name=str(kv.get("general.name", "")),
        )
        if f"{a}.expert_count" in kv:
            hp.n_experts = int(kv[f"{a}.expert_count"])
            hp.n_experts_used = int(gguf_get(kv, f"{a}.expert_used_count", path))
            hp.expert_ffn_size = int(kv.get(f"{a}.expert_feed_forward_length", hp.ffn_size))
        # biases are implied by which tensors a GGUF holds (llama.cpp reads them when present)
        hp.attn_bias = "blk.0.attn_q.bias" in names
        hp.attn_out_bias = "blk.0.attn_output.bias" in names
        hp.mlp_bias = "blk.0.ffn_up.bias" in names
        return hp

    @classmethod
    def gguf_transform(cls, name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Canonical tensor -> the values llama.cpp's graph expects (Gemma norms: 1 + w); None: as is."""
        return None

    @classmethod
    def gguf_untransform(cls, name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The inverse of `gguf_transform`, applied when reading GGUF."""
        return None

    @classmethod
    def gguf_tensor_name(cls, name: str) -> str:
        return _rename(name, cls.gguf_renames)

    @classmethod
    def gguf_tensors(cls, hp: HParams, name: str) -> list[tuple[str, tuple[int, ...], Callable, bool]] | None:
        """For a canonical tensor GGUF stores in another form: [(GGUF name, shape, fn(canonical tensor) ->
        that tensor, whether it reads the canonical tensor's input columns (so its imatrix applies))] written
        in its place (llama.cpp's deepseek2 splits kv_b in two). None: written as is."""
        return None

    @classmethod
    def from_gguf_tensors(cls, hp: HParams, tensors: dict[str, LazyTensor], path: str) -> dict[str, LazyTensor]:
        """The reverse of `gguf_tensors` on read: canonical tensors from what the GGUF holds."""
        return tensors

    @classmethod
    def canonical_tensor_name(cls, name: str) -> str:
        return _rename(name, {g: c for c, g in cls.gguf_renames.items()})


# ---------------------------------------------------------------------- helpers families share

def need(src: dict[str, LazyTensor], name: str, source: str) -> LazyTensor:
    if name not in src:
        raise BadInput(f"{source}: tensor '{name}' is missing from the checkpoint")
    return src[name]


def lazy(src: LazyTensor, fn: Callable[[torch.Tensor], torch.Tensor], shape) -> LazyTensor:
    """A canonical tensor computed from one source tensor (a slice, a transpose ...)."""
    return LazyTensor(shape, src.dtype, lambda: fn(src.load()), source=src.source)


def stack_experts(parts: list[LazyTensor], shape, source: str) -> LazyTensor:
    """Per-expert HF tensors [out, in] -> one canonical [E, out, in], read when loaded."""
    lt = LazyTensor(shape, parts[0].dtype, lambda: torch.stack([p.load() for p in parts]),
                    source=f"{parts[0].source} (+{len(parts) - 1} experts)",
                    nbytes=sum(p.nbytes or 0 for p in parts) or None)
    lt.parts = [p.load for p in parts]
    return lt


def unstack(e: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: w[e]


def by_layer(m: dict[str, str]) -> dict[str, str]:
    """An HF -> canonical map ordered by layer (globals first), each layer's tensors in their given order."""
    from ..graph import parse_name
    return dict(sorted(m.items(), key=lambda kv: -1 if parse_name(kv[1])[0] is None else parse_name(kv[1])[0]))


def gguf_get(kv: dict, key: str, path: str, default=None):
    if key in kv:
        return kv[key]
    if default is None:
        raise BadInput(f"{path}: GGUF metadata key '{key}' is missing")
    return default


def _rename(name: str, ren: dict[str, str]) -> str:
    if ren and name.startswith("blk."):
        i, rest = name[4:].split(".", 1)
        suffix, _, kind = rest.rpartition(".")
        if suffix in ren:
            return f"blk.{i}.{ren[suffix]}.{kind}"
    return name


def core_gguf_kv(a: str, hp: HParams, n_kv_heads: int | None = None) -> list:
    """The keys every decoder arch of llama.cpp reads, general.architecture first."""
    VT = _vt()
    return [
        ("general.architecture", a, VT.STRING),
        (f"{a}.vocab_size", hp.vocab_size, VT.UINT32),
        (f"{a}.context_length", hp.context_length, VT.UINT32),
        (f"{a}.embedding_length", hp.hidden_size, VT.UINT32),
        (f"{a}.block_count", hp.n_layers, VT.UINT32),
        (f"{a}.feed_forward_length", hp.ffn_size, VT.UINT32),
        (f"{a}.attention.head_count", hp.n_heads, VT.UINT32),
        (f"{a}.attention.head_count_kv", hp.n_kv_heads if n_kv_heads is None else n_kv_heads, VT.UINT32),
        (f"{a}.rope.freq_base", float(hp.rope_theta), VT.FLOAT32),
        (f"{a}.attention.layer_norm_rms_epsilon", float(hp.norm_eps), VT.FLOAT32),
    ]


def rope_scaling_kv(a: str, rs: RopeScaling) -> list:
    VT = _vt()
    if rs.kind == "linear":
        return [(f"{a}.rope.scaling.type", "linear", VT.STRING), (f"{a}.rope.scaling.factor", rs.factor, VT.FLOAT32)]
    if rs.kind == "yarn":
        kv = [(f"{a}.rope.scaling.type", "yarn", VT.STRING), (f"{a}.rope.scaling.factor", rs.factor, VT.FLOAT32),
              (f"{a}.rope.scaling.original_context_length", rs.original_context, VT.UINT32)]
        for key, v in (("yarn_attn_factor", rs.attention_factor), ("yarn_beta_fast", rs.beta_fast),
                       ("yarn_beta_slow", rs.beta_slow)):
            if v is not None:  # what the converter copies from the config when present
                kv.append((f"{a}.rope.scaling.{key}", float(v), VT.FLOAT32))
        return kv
    return []


def rope_scaling_from_kv(kv: dict, a: str) -> RopeScaling:
    st = kv.get(f"{a}.rope.scaling.type", "none")
    if st == "linear":
        return RopeScaling("linear", float(kv[f"{a}.rope.scaling.factor"]))
    if st == "yarn":
        # llama.cpp: beta defaults 32/1, corr dims always floored/ceiled (truncate), attention
        # factor 0.1*ln(factor)+1 (the yarn_attn_factor key is overridden by its context setup)
        return RopeScaling("yarn", float(kv[f"{a}.rope.scaling.factor"]),
                           int(kv.get(f"{a}.rope.scaling.original_context_length", 0)) or None,
                           beta_fast=float(kv.get(f"{a}.rope.scaling.yarn_beta_fast", 32.0)),
                           beta_slow=float(kv.get(f"{a}.rope.scaling.yarn_beta_slow", 1.0)), truncate=True)
    return RopeScaling()


def sliding_window_kv(a: str, hp: HParams) -> list:
    """attention.sliding_window and the per-layer pattern as a bool array (llama.cpp's load_swa_pattern
    reads an array before its per-architecture default period)."""
    VT = _vt()
    if not hp.sliding_window:
        return []
    flags = [hp.is_sliding(i) for i in range(hp.n_layers)]
    return [(f"{a}.attention.sliding_window", int(hp.sliding_window), VT.UINT32),
            (f"{a}.attention.sliding_window_pattern", flags, [VT.ARRAY, VT.BOOL])]


def sliding_from_kv(kv: dict, a: str, hp: HParams, period: int, path: str) -> None:
    """hp.sliding_window / layer_types from GGUF; `period`: the architecture's default pattern
    (llama_hparams::set_swa_pattern: layer i is sliding when i % period < period - 1)."""
    hp.sliding_window = int(kv[f"{a}.attention.sliding_window"])
    pat = kv.get(f"{a}.attention.sliding_window_pattern", period)
    if isinstance(pat, (list, tuple)):
        if len(pat) != hp.n_layers:
            raise BadInput(f"{path}: {a}.attention.sliding_window_pattern has {len(pat)} entries for "
                           f"{hp.n_layers} layers")
        hp.layer_types = ["sliding" if bool(f) else "full" for f in pat]
    else:
        n = int(pat)
        hp.layer_types = ["sliding" if n == 0 or i % n < n - 1 else "full" for i in range(hp.n_layers)]
