"""Triton tile dequantizers for GPTQ and AWQ (float32 [BK, BN] tiles; N is the contiguous axis of both).

GPTQ: qweight int32 [K/PACK, N] with K packed LSB-first; qzeros int32 [G, N/PACK] packed along N;
scales [G, N]; group of row k = g_idx[k] (act-order) or k // GROUP. w = (q - (z + ZERO_OFF)) * s.
AWQ: qweight int32 [K, N/8], qzeros [G, N/8]; nibble p of a packed int32 holds column 8j + [0,2,4,6,1,3,5,7][p],
so column c sits in nibble (c%2)*4 + c//2 (within its 8-column group); w = (q - z) * s.
"""

import triton
import triton.language as tl


@triton.jit
def gptq_tile(qw, qz, sc, gidx, k0, k_hi, offs_n, mask_n, N, BLOCK_K: tl.constexpr,
              BITS: tl.constexpr, GROUP: tl.constexpr, ZERO_OFF: tl.constexpr, HAS_GIDX: tl.constexpr):
    """float32 [BK/PACK, PACK, BN] (K order) for rows k0..k0+BK of K."""
    PACK: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    kw = k0 // PACK + tl.arange(0, BLOCK_K // PACK)[:, None, None]  # packed row
    i = tl.arange(0, PACK)[None, :, None]
    n = offs_n[None, None, :]
    mask = (kw * PACK < k_hi) & mask_n[None, None, :]
    q = (tl.load(qw + kw * N + n, mask=mask, other=0) >> (i * BITS)) & MAXQ  # one word feeds PACK rows
    if HAS_GIDX:
        g = tl.load(gidx + kw * PACK + i, mask=kw * PACK < k_hi, other=0)
        gmask = mask
    elif GROUP % BLOCK_K == 0:
        g = k0 // GROUP  # the whole tile is one group: scales/zeros are one [BN] row
        gmask = mask_n[None, None, :]
    else:
        g = (kw * PACK + i) // GROUP
        gmask = mask
    s = tl.load(sc + g * N + n, mask=gmask, other=0).to(tl.float32)
    zw = tl.load(qz + g * (N // PACK) + n // PACK, mask=gmask, other=0)
    z = ((zw >> ((n % PACK) * BITS)) & MAXQ) + ZERO_OFF
    return (q - z).to(tl.float32) * s


@triton.jit
def awq_tile(qw, qz, sc, k0, k_hi, n0, N, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """float32 [BK, BN/8, 8] (N order) for rows k0..k0+BK; n0 is a multiple of 8."""
    k = k0 + tl.arange(0, BLOCK_K)[:, None, None]
    cw = n0 // 8 + tl.arange(0, BLOCK_N // 8)[None, :, None]  # packed column
    c = tl.arange(0, 8)[None, None, :]
    shift = ((c % 2) * 4 + c // 2) * 4
    mask = (k < k_hi) & (cw * 8 < N)
    q = (tl.load(qw + k * (N // 8) + cw, mask=mask, other=0) >> shift) & 0xF
    if GROUP % BLOCK_K == 0:
        g = k0 // GROUP
        gmask = cw * 8 < N
    else:
        g = k // GROUP
        gmask = mask
    z = (tl.load(qz + g * (N // 8) + cw, mask=gmask, other=0) >> shift) & 0xF
    s = tl.load(sc + g * N + cw * 8 + c, mask=gmask, other=0).to(tl.float32)
    return (q - z).to(tl.float32) * s
