"""Float32 products on the CPU through oneDNN rather than MKL.

torch sends a CPU float32 matmul to MKL, whose kernels on an AMD CPU are its AVX2 ones: a Zen 5 core gets
~90 GFLOP/s from them where oneDNN's AVX-512 kernels (which torch already uses for bfloat16) get ~200 on the
same shapes. oneDNN's float32 products are IEEE float32 sums (error ~2x MKL's, ~1e-6 relative: far below a
quantizer's), and give the same bits at 1, 2 or 3 threads for 1..2048 rows (checked), which MKL does not for
few rows (threads.FEW_ROWS). QUANTKIT_GEMM=torch keeps torch's own path (for A/B measurements).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


def _op():
    if os.environ.get("QUANTKIT_GEMM", "onednn") == "torch" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_LINEAR = _op()


def onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether linear(x, w) runs on oneDNN."""
    return (_LINEAR is not None and x.dtype == torch.float32 and w.dtype == torch.float32
            and x.device.type == "cpu" and w.device.type == "cpu" and w.dim() == 2 and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            # a TorchFunctionMode (imatrix's expert tap) must see the product as F.linear
            and not torch._C._is_torch_function_mode_enabled())


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T (+ bias), as F.linear."""
    if onednn(x, w) and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu")):
        # oneDNN takes a row- or column-major weight as it is; any other strides (a block of a larger matrix)
        # send it down a path ~1000x slower, and a strided x runs ~3x slower: both cost less as copies
        if not (w.is_contiguous() or w.T.is_contiguous()):
            w = w.contiguous()
        return _LINEAR(x.contiguous(), w, bias, "none", [], "")
    return F.linear(x, w, bias)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D a and b."""
    return linear(a, b.T)


class Linear(nn.Linear):
    """nn.Linear whose product is linear() above (hooks and isinstance checks see an nn.Linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
