"""Dequant-matmul kernels (Triton on CUDA) and torch reference fallbacks for packed quantized weights.

Public API: PackedWeight, qlinear, qlinear_experts (see quantkit.kernels.dispatch); layouts in docs/kernels.md.
Importing this package never imports triton; the kernels load on first CUDA/forced use.
"""

from quantkit.kernels.dispatch import PackedWeight, pick_backend, qlinear, qlinear_experts, triton_available
from quantkit.kernels.reference import dequantize

__all__ = ["PackedWeight", "qlinear", "qlinear_experts", "dequantize", "pick_backend", "triton_available"]
