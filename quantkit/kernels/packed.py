"""PackedWeight: a quantized linear weight kept in the exact bytes its format stores.

Layouts (N = out_features, K = in_features; an optional leading E dim stacks experts):
  gptq     qweight int32 [K*bits/32, N] (K packed LSB-first), qzeros int32 [G, N*bits/32],
           scales [G, N], g_idx int32 [K] (optional); v1 stores zero-1 (zero_offset=1), v2 stores zero.
  awq      qweight int32 [K, N/8], qzeros int32 [G, N/8] (nibble p holds column 8j+AWQ_ORDER[p]),
           scales [G, N].
  ggml     data uint8 [N, K/block*type_size], ggml block structs of `qtype`.
  mxfp4    gpt-oss HF: blocks uint8 [N, K/32, 16] (element 2i low nibble of byte i), scales uint8 [N, K/32].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from quantkit.errors import QuantkitError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

# ggml types with a Triton kernel (and a torch reference) here.
GGML_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.MXFP4)

# constexpr format codes shared with the Triton kernels
FMT_GPTQ, FMT_AWQ, FMT_MXFP4_HF = 1, 2, 3
FMT_GGML = {QT.Q4_0: 10, QT.Q4_1: 11, QT.Q5_0: 12, QT.Q5_1: 13, QT.Q8_0: 14,
            QT.Q4_K: 20, QT.Q5_K: 21, QT.Q6_K: 22, QT.MXFP4: 30}


def _err(name: str, what: str, t) -> QuantkitError:
    got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
    return QuantkitError(f"PackedWeight '{name}': {what}, got {got}")


def _check(t, name: str, dtypes, shape: tuple) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
        raise _err(name, f"expected {'/'.join(str(d) for d in dtypes)} {tuple(shape)}", t)
    return t.contiguous()


@dataclass
class PackedWeight:
    """A packed weight of logical shape [N, K] (or E stacked experts of it).

    Build with the classmethods `gptq`, `awq`, `ggml`, `mxfp4`; they validate shapes and dtypes.
    """

    format: str
    tensors: dict[str, torch.Tensor]
    shape: tuple[int, int]
    bits: int = 0
    group_size: int = 0
    qtype: QT | None = None
    zero_offset: int = 0
    num_experts: int | None = None
    meta: dict = field(default_factory=dict)

    @property
    def fmt_code(self) -> int:
        if self.format == "gptq":
            return FMT_GPTQ
        if self.format == "awq":
            return FMT_AWQ
        if self.format == "mxfp4":
            return FMT_MXFP4_HF
        return FMT_GGML[self.qtype]

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def expert(self, e: int) -> "PackedWeight":
        """The packed weight of one expert (views, no copy)."""
        if self.num_experts is None:
            raise QuantkitError(f"PackedWeight ({self.format}): not an expert stack")
        if not 0 <= e < self.num_experts:
            raise QuantkitError(f"PackedWeight ({self.format}): expert {e} out of range [0, {self.num_experts})")
        return PackedWeight(self.format, {k: v[e] for k, v in self.tensors.items()}, self.shape, self.bits,
                            self.group_size, self.qtype, self.zero_offset, None, dict(self.meta))

    def to(self, device) -> "PackedWeight":
        return PackedWeight(self.format, {k: v.to(device) for k, v in self.tensors.items()}, self.shape, self.bits,
                            self.group_size, self.qtype, self.zero_offset, self.num_experts, dict(self.meta))

    # ---- constructors ----
    @classmethod
    def gptq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             g_idx: torch.Tensor | None = None, *, bits: int = 4, group_size: int = 128,
             in_features: int | None = None, v2: bool = False) -> "PackedWeight":
        """GPTQ (AutoGPTQ/GPTQModel layout). `v2=False`: qzeros store zero-1 (checkpoint format v1).
        group_size <= 0 means one group over all of K. `in_features` defaults to qweight rows*32/bits."""
        if bits not in (4, 8):
            raise QuantkitError(f"PackedWeight gptq: bits must be 4 or 8, got {bits}")
        if not isinstance(qweight, torch.Tensor) or qweight.ndim not in (2, 3):
            raise _err("qweight", "expected int32 [K*bits/32, N] (or [E, ...])", qweight)
        lead = tuple(qweight.shape[:-2])
        pack = 32 // bits
        n = qweight.shape[-1]
        k = in_features if in_features is not None else qweight.shape[-2] * pack
        if k <= 0 or k % pack or k // pack != qweight.shape[-2] or n % pack:
            raise _err("qweight", f"expected int32 [K/{pack}, N] with N a multiple of {pack} (K={k})", qweight)
        gs = k if group_size <= 0 else group_size
        g = -(-k // gs)
        if g_idx is not None:
            g_idx = _check(g_idx, "g_idx", (torch.int32, torch.int64), lead + (k,)).to(torch.int32)
            if int(g_idx.min()) < 0 or int(g_idx.max()) >= g:
                raise _err("g_idx", f"expected group indices in [0, {g})", g_idx)
            trivial = torch.arange(k, device=g_idx.device, dtype=torch.int32) // gs
            if torch.equal(g_idx, trivial.expand_as(g_idx)):
                g_idx = None  # sequential groups: the kernel computes k // group_size itself
        t = {
            "qweight": _check(qweight, "qweight", (torch.int32,), lead + (k // pack, n)),
            "qzeros": _check(qzeros, "qzeros", (torch.int32,), lead + (g, n // pack)),
            "scales": _check(scales, "scales", (torch.float16, torch.bfloat16, torch.float32), lead + (g, n)),
        }
        if g_idx is not None:
            t["g_idx"] = g_idx
        return cls("gptq", t, (n, k), bits=bits, group_size=gs, zero_offset=0 if v2 else 1,
                   num_experts=lead[0] if lead else None)

    @classmethod
    def awq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *,
            group_size: int = 128) -> "PackedWeight":
        """AWQ GEMM layout (AutoAWQ), 4-bit, zeros stored as-is."""
        if not isinstance(qweight, torch.Tensor) or qweight.ndim not in (2, 3):
            raise _err("qweight", "expected int32 [K, N/8] (or [E, ...])", qweight)
        lead = tuple(qweight.shape[:-2])
        k, n = qweight.shape[-2], qweight.shape[-1] * 8
        gs = k if group_size <= 0 else group_size
        g = -(-k // gs)
        t = {
            "qweight": _check(qweight, "qweight", (torch.int32,), lead + (k, n // 8)),
            "qzeros": _check(qzeros, "qzeros", (torch.int32,), lead + (g, n // 8)),
            "scales": _check(scales, "scales", (torch.float16, torch.bfloat16, torch.float32), lead + (g, n)),
        }
        return cls("awq", t, (n, k), bits=4, group_size=gs, num_experts=lead[0] if lead else None)

    @classmethod
    def ggml(cls, data: torch.Tensor, qtype, n_per_row: int) -> "PackedWeight":
        """ggml block data uint8 [N, row_bytes] (or [E, N, row_bytes]) with K = n_per_row."""
        try:
            qtype = QT(qtype)
        except ValueError:
            raise QuantkitError(f"PackedWeight ggml: unknown ggml type {qtype!r}") from None
        if qtype not in GGML_TYPES:
            raise QuantkitError(f"PackedWeight ggml: no kernel for type {qtype.name}; "
                                f"supported: {', '.join(t.name for t in GGML_TYPES)}")
        bs, ts = GGML_QUANT_SIZES[qtype]
        if n_per_row <= 0 or n_per_row % bs:
            raise QuantkitError(f"PackedWeight ggml {qtype.name}: n_per_row must be a positive multiple of {bs}, "
                                f"got {n_per_row}")
        if not isinstance(data, torch.Tensor) or data.ndim not in (2, 3):
            raise _err("data", f"expected uint8 [N, {n_per_row // bs * ts}] (or [E, ...])", data)
        lead = tuple(data.shape[:-2])
        n = data.shape[-2]
        t = {"data": _check(data, "data", (torch.uint8,), lead + (n, n_per_row // bs * ts))}
        return cls("ggml", t, (n, n_per_row), qtype=qtype, group_size=bs,
                   num_experts=lead[0] if lead else None, meta={"row_bytes": n_per_row // bs * ts})

    @classmethod
    def mxfp4(cls, blocks: torch.Tensor, scales: torch.Tensor) -> "PackedWeight":
        """gpt-oss HF MXFP4: `*_blocks` uint8 [N, K/32, 16] and `*_scales` uint8 [N, K/32] (or with [E, ...])."""
        if not isinstance(blocks, torch.Tensor) or blocks.ndim not in (3, 4) or blocks.shape[-1] != 16:
            raise _err("blocks", "expected uint8 [N, K/32, 16] (or [E, ...])", blocks)
        lead = tuple(blocks.shape[:-3])
        n, nb = blocks.shape[-3], blocks.shape[-2]
        t = {"blocks": _check(blocks, "blocks", (torch.uint8,), lead + (n, nb, 16)),
             "scales": _check(scales, "scales", (torch.uint8,), lead + (n, nb))}
        return cls("mxfp4", t, (n, nb * 32), group_size=32, num_experts=lead[0] if lead else None)
