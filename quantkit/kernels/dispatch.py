"""Single entry point for quantized linears: Triton on CUDA, torch reference elsewhere.

backend="auto" picks Triton when x is on CUDA and triton imports, else the torch reference
(dequantize to float32 + F.linear). backend="triton" forces the kernels (on CPU only under
TRITON_INTERPRET=1); backend="torch" forces the reference. QUANTKIT_KERNELS=torch|triton overrides
"auto". The Triton modules are imported lazily, so CPU users never compile or import kernels.
"""

from __future__ import annotations

import functools
import os

import torch

from quantkit.errors import QuantkitError
from quantkit.kernels.packed import PackedWeight
from quantkit.kernels.reference import linear_reference

__all__ = ["PackedWeight", "qlinear", "qlinear_experts", "triton_available", "pick_backend"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pick_backend(x: torch.Tensor, backend: str = "auto") -> str:
    """'triton' or 'torch' for input x (see module doc)."""
    if backend == "auto":
        backend = os.environ.get("QUANTKIT_KERNELS", "auto")
        if backend == "auto":
            return "triton" if x.is_cuda and triton_available() else "torch"
    if backend == "torch":
        return "torch"
    if backend != "triton":
        raise QuantkitError(f"qlinear: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if not triton_available():
        raise QuantkitError("qlinear: backend 'triton' requested but triton is not importable")
    if not x.is_cuda and not _interpret():
        raise QuantkitError("qlinear: backend 'triton' needs a CUDA input (or TRITON_INTERPRET=1 on CPU)")
    return "triton"


def _check_x(x: torch.Tensor, pw: PackedWeight, what: str) -> None:
    if not isinstance(pw, PackedWeight):
        raise QuantkitError(f"{what}: expected a PackedWeight, got {type(pw).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[-1] != pw.shape[1]:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise QuantkitError(f"{what}: input must be [..., {pw.shape[1]}] for a {pw.format} weight "
                            f"of shape {pw.shape}, got {got}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise QuantkitError(f"{what}: input dtype must be float16/bfloat16/float32, got {x.dtype}")
    dev = next(iter(pw.tensors.values())).device
    if dev != x.device:
        raise QuantkitError(f"{what}: input on {x.device} but the packed weight is on {dev}")


def _check_bias(bias, n: int, what: str) -> None:
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise QuantkitError(f"{what}: bias must be [{n}], got {got}")


def qlinear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None, *,
            backend: str = "auto") -> torch.Tensor:
    """y[..., N] = x[..., K] @ dequant(W)^T (+ bias), in x's dtype."""
    _check_x(x, packed, "qlinear")
    if packed.num_experts is not None:
        raise QuantkitError("qlinear: packed weight is an expert stack; use qlinear_experts")
    _check_bias(bias, packed.shape[0], "qlinear")
    if pick_backend(x, backend) == "torch":
        return linear_reference(x, packed, bias)
    from quantkit.kernels.matmul import triton_linear

    y = triton_linear(x.contiguous() if x.stride(-1) != 1 else x, packed)
    return y if bias is None else y.add_(bias.to(y.dtype))


def qlinear_experts(x: torch.Tensor, packed: PackedWeight, expert_ids: torch.Tensor,
                    bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Per-token expert matmul over a stacked PackedWeight [E, N, K].

    x [T, K]; expert_ids [T] (-> y [T, N]) or [T, top_k] (-> y [T, top_k, N]), y[t, j] = x[t] @ W[ids[t, j]]^T.
    bias, if given, is [E, N].
    """
    what = "qlinear_experts"
    _check_x(x, packed, what)
    if packed.num_experts is None:
        raise QuantkitError(f"{what}: packed weight has no expert dimension")
    if x.ndim != 2:
        raise QuantkitError(f"{what}: input must be [T, {packed.shape[1]}], got {tuple(x.shape)}")
    squeeze = isinstance(expert_ids, torch.Tensor) and expert_ids.ndim == 1
    ids = expert_ids.unsqueeze(1) if squeeze else expert_ids
    if (not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] != x.shape[0]
            or ids.dtype not in (torch.int32, torch.int64)):
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise QuantkitError(f"{what}: expert_ids must be int [{x.shape[0]}] or [{x.shape[0]}, top_k], got {got}")
    e_count, n = packed.num_experts, packed.shape[0]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= e_count):
        raise QuantkitError(f"{what}: expert_ids must lie in [0, {e_count}), got range "
                            f"[{int(ids.min())}, {int(ids.max())}]")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (e_count, n)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise QuantkitError(f"{what}: bias must be [{e_count}, {n}], got {got}")
    ids = ids.to(x.device)
    top_k = ids.shape[1]
    if ids.numel() == 0:
        y = x.new_zeros(x.shape[0] * top_k, n)
    elif pick_backend(x, backend) == "torch":
        flat = ids.reshape(-1)
        y = x.new_empty(flat.numel(), n)
        for e in torch.unique(flat).tolist():  # loop over experts, not tokens
            sel = (flat == e).nonzero().squeeze(1)
            y[sel] = linear_reference(x[sel // top_k], packed.expert(e))
    else:
        from quantkit.kernels.matmul import triton_linear_experts

        y = triton_linear_experts(x.contiguous() if x.stride(-1) != 1 else x, packed, ids)
    if bias is not None:
        y = y + bias.to(y.dtype)[ids.reshape(-1)]
    y = y.reshape(x.shape[0], top_k, n)
    return y.squeeze(1) if squeeze else y
