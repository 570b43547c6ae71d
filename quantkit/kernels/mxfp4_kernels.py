"""Triton tile dequantizers for MXFP4 in both stored layouts (float32 [BN, BK] tiles).

Value = E2M1(code) * 2^(e-127) = kvalues_mxfp4(code) * 2^(e-128) with kvalues the doubled E2M1
table {0,1,2,3,4,6,8,12} (sign in bit 3), as ggml computes it; 2^(e-128) is built from its float32
bits (subnormal for e < 2) so every E8M0 value is exact.
"""

import triton
import triton.language as tl

from quantkit.kernels.ggml_kernels import u8_at


@triton.jit
def e2m1x2(code):
    """Doubled E2M1 value of 4-bit codes (int32) as float32: exp=0 -> mant, else (2+mant) << (exp-1)."""
    m = code & 7
    ex = m >> 1
    mag = tl.where(ex == 0, m & 1, (2 + (m & 1)) << tl.maximum(ex - 1, 0))
    return tl.where((code & 8) != 0, -mag, mag).to(tl.float32)


@triton.jit
def e8m0_half(e):
    """2^(e-128) for E8M0 bytes (int32), exact including the float32 subnormals."""
    bits = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def mxfp4_gguf_tile(base, rn, k0, mb, NSUB: tl.constexpr):
    """ggml block_mxfp4 (17 bytes): e, qs[16]; element j low nibble of qs[j], j+16 high nibble.
    Same tile contract as ggml_kernels: [BN, NSUB, 32]."""
    b = rn + (k0 // 32 + tl.arange(0, NSUB)[None, :, None]) * 17
    j = tl.arange(0, 32)[None, None, :]
    code = (u8_at(base, b + 1 + (j % 16), mb) >> ((j // 16) * 4)) & 0xF
    return e2m1x2(code) * e8m0_half(u8_at(base, b, mb))


@triton.jit
def mxfp4_hf_tile(blocks, scales, n0, offs_n, k0, mb, NB, NSUB: tl.constexpr):
    """gpt-oss: blocks [N, NB, 16] (element 2i low nibble, 2i+1 high nibble of byte i), scales [N, NB].
    Tile [BN, NSUB, 32]; offsets are int32 from row n0."""
    rows = (offs_n - n0)[:, None, None] * NB
    kb = k0 // 32 + tl.arange(0, NSUB)[None, :, None]
    j = tl.arange(0, 32)[None, None, :]
    off = n0.to(tl.int64) * NB
    byte = u8_at(blocks + off * 16, (rows + kb) * 16 + j // 2, mb)
    code = (byte >> ((j % 2) * 4)) & 0xF
    return e2m1x2(code) * e8m0_half(u8_at(scales + off, rows + kb, mb))
