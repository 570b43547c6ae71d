"""Triton tile dequantizers for GPTQ and AWQ (float32 [BK, BN] tiles; N is the contiguous axis of both).

GPTQ: qweight int32 [K/PACK, N] with K packed LSB-first; qzeros int32 [G, N/PACK] packed along N;
scales [G, N]; group of row k = g_idx[k] (act-order) or k // GROUP. w = (q - (z + ZERO_OFF)) * s.
AWQ: qweight int32 [K, N/8], qzeros [G, N/8]; nibble p of a packed int32 holds column 8j + [0,2,4,6,1,3,5,7][p],
so column c sits in nibble (c%2)*4 + c//2 (within its 8-column group); w = (q - z) * s.
"""

import triton
import triton.language as tl


@triton.jit
def gptq_tile(qw, qz, sc, gidx, offs_k, offs_n, mask_k, mask_n, N,
              BITS: tl.constexpr, GROUP: tl.constexpr, ZERO_OFF: tl.constexpr, HAS_GIDX: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    mask = mask_k[:, None] & mask_n[None, :]
    word = tl.load(qw + (offs_k // PACK)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    q = (word >> ((offs_k % PACK) * BITS)[:, None]) & MAXQ
    if HAS_GIDX:
        g = tl.load(gidx + offs_k, mask=mask_k, other=0)
    else:
        g = offs_k // GROUP
    s = tl.load(sc + g[:, None] * N + offs_n[None, :], mask=mask, other=0).to(tl.float32)
    zw = tl.load(qz + g[:, None] * (N // PACK) + (offs_n // PACK)[None, :], mask=mask, other=0)
    z = ((zw >> ((offs_n % PACK) * BITS)[None, :]) & MAXQ) + ZERO_OFF
    return (q - z).to(tl.float32) * s


@triton.jit
def awq_tile(qw, qz, sc, offs_k, offs_n, mask_k, mask_n, N, GROUP: tl.constexpr):
    mask = mask_k[:, None] & mask_n[None, :]
    c = offs_n % 8
    shift = (((c % 2) * 4 + c // 2) * 4)[None, :]
    col = (offs_n // 8)[None, :]
    q = (tl.load(qw + offs_k[:, None] * (N // 8) + col, mask=mask, other=0) >> shift) & 0xF
    g = (offs_k // GROUP)[:, None]
    s = tl.load(sc + g * N + offs_n[None, :], mask=mask, other=0).to(tl.float32)
    z = (tl.load(qz + g * (N // 8) + col, mask=mask, other=0) >> shift) & 0xF
    return (q - z).to(tl.float32) * s
