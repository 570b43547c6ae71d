"""The canonical tensor graph: hyperparameters + lazily loaded tensors under canonical (GGUF-style) names.

Every loader maps its family's layout onto this; every quantizer and writer reads only this.
Weights are in HF orientation [out_features, in_features]; q/k rows use the HF "rotate-half" RoPE layout.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import BadInput

# Per-layer canonical tensor suffixes (prefix "blk.{i}.").
ATTN_NORM = "attn_norm"
ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT = "attn_q", "attn_k", "attn_v", "attn_output"
ATTN_QKV = "attn_qkv"  # fused [q; k; v] rows (BLOOM, Qwen v1: llama.cpp loads it fused)
ATTN_Q_NORM, ATTN_K_NORM = "attn_q_norm", "attn_k_norm"
FFN_NORM = "ffn_norm"
FFN_GATE, FFN_UP, FFN_DOWN = "ffn_gate", "ffn_up", "ffn_down"
# MoE: router and stacked experts [E, out, in]; shared experts use the *_shexp suffixes.
FFN_ROUTER = "ffn_gate_inp"
FFN_GATE_EXPS, FFN_UP_EXPS, FFN_DOWN_EXPS = "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"
FFN_GATE_SHEXP, FFN_UP_SHEXP, FFN_DOWN_SHEXP = "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"
FFN_GATE_INP_SHEXP = "ffn_gate_inp_shexp"  # the shared expert's sigmoid gate [d] (Qwen2-MoE)

TOKEN_EMBD = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"

LINEAR_SUFFIXES = (ATTN_Q, ATTN_K, ATTN_V, ATTN_QKV, ATTN_OUT, FFN_GATE, FFN_UP, FFN_DOWN,
                   FFN_GATE_EXPS, FFN_UP_EXPS, FFN_DOWN_EXPS, FFN_GATE_SHEXP, FFN_UP_SHEXP, FFN_DOWN_SHEXP)

_BLK = re.compile(r"^blk\.(\d+)\.(.+?)\.(weight|bias)$")


def blk(i: int, suffix: str, kind: str = "weight") -> str:
    return f"blk.{i}.{suffix}.{kind}"


def parse_name(name: str) -> tuple[int | None, str, str]:
    """'blk.3.attn_q.weight' -> (3, 'attn_q', 'weight'); 'output.weight' -> (None, 'output', 'weight')."""
    m = _BLK.match(name)
    if m:
        return int(m.group(1)), m.group(2), m.group(3)
    base, _, kind = name.rpartition(".")
    return None, base, kind


@dataclass
class RopeScaling:
    kind: str = "none"  # none | linear | llama3 | yarn | freq_factors (per-frequency divisors, GGUF rope_freqs)
    factor: float = 1.0
    original_context: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    attention_factor: float | None = None  # yarn (mscale)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    freq_factors: list[float] | None = None


@dataclass
class HParams:
    arch: str  # canonical architecture key, e.g. "llama", "qwen2", "qwen3"
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    norm: str = "rms"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_dim: int | None = None  # rotary dims per head; None = head_dim
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    context_length: int = 4096
    tie_embeddings: bool = False
    attn_bias: bool = False  # q/k/v biases
    attn_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer "full" | "sliding"; None = all full
    act: str = "silu"
    # MoE (0 experts = dense)
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn_size: int | None = None
    n_shared_experts: int = 0
    norm_topk_prob: bool = True
    moe_layers: list[int] | None = None  # None = every layer when n_experts > 0
    extra: dict = field(default_factory=dict)
    name: str = ""

    @property
    def rotary_dim(self) -> int:
        return self.rope_dim or self.head_dim

    def is_sliding(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        if self.layer_types is None:
            return True
        return self.layer_types[layer] == "sliding"

    def is_moe(self, layer: int) -> bool:
        return self.n_experts > 0 and (self.moe_layers is None or layer in self.moe_layers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class LazyTensor:
    """A tensor that is read only when `load()` is called.

    `qtype` is the ggml type name when the source stores it block-quantized (a GGUF input), else None.
    `raw()` (when given) returns the stored bytes/tensors for pass-through without re-quantization.
    """

    def __init__(self, shape, dtype: str, loader: Callable[[], torch.Tensor], qtype: str | None = None,
                 source: str = "", raw: Callable[[], object] | None = None, nbytes: int | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.nbytes = nbytes  # stored size, when known
        self.packed: Callable[[], object] | None = None  # -> quantkit.kernels.PackedWeight (stored bytes)
        self.dtype = dtype
        self._loader = loader
        self.qtype = qtype
        self.source = source
        self._raw = raw
        # stacked experts [E, ...] read from per-expert sources: one loader per expert, so writers can
        # stream a stacked tensor expert by expert instead of holding all of it
        self.parts: list[Callable[[], torch.Tensor]] | None = None

    def load(self) -> torch.Tensor:
        t = self._loader()
        if tuple(t.shape) != self.shape:
            raise BadInput(f"{self.source}: tensor has shape {tuple(t.shape)}, expected {self.shape}")
        return t

    def raw(self):
        return self._raw() if self._raw is not None else None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], shape=None) -> "LazyTensor":
        """A lazy transform of this tensor (e.g. a permutation); nothing is read now.
        The result has no raw/packed form: the stored bytes no longer describe it."""
        return LazyTensor(shape if shape is not None else self.shape, self.dtype,
                          lambda: fn(self._loader()), qtype=self.qtype, source=self.source, nbytes=self.nbytes)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def __repr__(self):
        return f"LazyTensor({self.shape}, {self.qtype or self.dtype}, {self.source})"


@dataclass
class Tokenizer:
    """Where the tokenizer lives: an HF directory (tokenizer.json ...) or GGUF key/values."""
    hf_dir: Path | None = None
    gguf_kv: dict | None = None


@dataclass
class Graph:
    hparams: HParams
    tensors: dict[str, LazyTensor]
    tokenizer: Tokenizer = field(default_factory=Tokenizer)
    source: str = ""
    source_format: str = ""  # "hf" | "gguf"
    hf_config: dict | None = None  # the original config.json, when the source had one
    quantization: dict | None = None  # the source's quantization (e.g. gguf file type), informational
    metadata: dict = field(default_factory=dict)  # source-format extras (e.g. "gguf_kv", "gguf_kv_types")

    def __getitem__(self, name: str) -> LazyTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise BadInput(f"{self.source}: tensor '{name}' is missing") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> Iterator[str]:
        return iter(self.tensors)

    def layer_tensors(self, i: int) -> dict[str, LazyTensor]:
        p = f"blk.{i}."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    def validate(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every expected tensor exists with the right shape (errors name the tensor). The expected shapes
        come from the family's blocks (families.expected_shapes)."""
        for name, shape in expected.items():
            if name not in self.tensors:
                raise BadInput(f"{self.source}: tensor '{name}' is missing (expected shape {shape})")
            got = self.tensors[name].shape
            if tuple(got) != tuple(shape):
                raise BadInput(f"{self.source}: tensor '{name}' has shape {tuple(got)}, expected {tuple(shape)}")

    def with_tensors(self, tensors: dict[str, LazyTensor], **changes) -> "Graph":
        return dataclasses.replace(self, tensors=tensors, **changes)
