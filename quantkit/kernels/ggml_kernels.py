"""Triton tile dequantizers for ggml block formats, read straight from the GGUF bytes.

Tiles are 3-D, [BN, NSUB, SUB]: BN rows, NSUB scale groups (a whole 32-block for the legacy
types and MXFP4, a 32- or 16-element sub-block of one 256-superblock for the k-quants) of SUB
elements each, in K order, so the caller's reshape to [BN, BK] is order-preserving. Per-block
fields (d, dmin, 6-bit scales) are loaded once per [BN, NSUB, 1] group and broadcast; only the
quant bytes are loaded per element (a 4-bit byte is read by both of its elements; the second read
hits L1). Offsets are int32 relative to the tile's first row `base`; fp16 fields are assembled
from two bytes, so nothing needs alignment (Q5_0's qh sits at byte 2, MXFP4 blocks are 17 bytes).

Arguments: base (pointer to row n0's bytes), rn [BN, 1, 1] int32 byte offset of each row from
base, k0 (tile start, a multiple of BK; BK divides 256 for the k-quants so a tile never straddles
a superblock), mb [BN, NSUB, 1] mask of live rows/blocks.
"""

import triton
import triton.language as tl


@triton.jit
def f16_at(ptr, offs, mask):
    """Little-endian fp16 at byte offsets `offs`, as float32."""
    lo = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + offs + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def u8_at(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)


@triton.jit
def _blocks32(rn, k0, NSUB: tl.constexpr, TS: tl.constexpr):
    """Byte offset [BN, NSUB, 1] of each 32-block of the tile, and element index j [1, 1, 32]."""
    kb = k0 // 32 + tl.arange(0, NSUB)[None, :, None]
    return rn + kb * TS, tl.arange(0, 32)[None, None, :]


@triton.jit
def _nib32(base, qs_off, j, mb):
    """Element j of 32-blocks whose 16 qs bytes start at qs_off: low nibble j<16, high nibble j>=16."""
    return (u8_at(base, qs_off + (j % 16), mb) >> ((j // 16) * 4)) & 0xF


@triton.jit
def q8_0_tile(base, rn, k0, mb, NSUB: tl.constexpr):
    b, j = _blocks32(rn, k0, NSUB, 34)
    q = tl.load(base + b + 2 + j, mask=mb, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return f16_at(base, b, mb) * q


@triton.jit
def q4_0_tile(base, rn, k0, mb, NSUB: tl.constexpr):
    b, j = _blocks32(rn, k0, NSUB, 18)
    return f16_at(base, b, mb) * (_nib32(base, b + 2, j, mb) - 8).to(tl.float32)


@triton.jit
def q4_1_tile(base, rn, k0, mb, NSUB: tl.constexpr):
    b, j = _blocks32(rn, k0, NSUB, 20)
    return f16_at(base, b, mb) * _nib32(base, b + 4, j, mb).to(tl.float32) + f16_at(base, b + 2, mb)


@triton.jit
def _qh32(base, off, mb):
    """The 4 qh bytes at `off` as one little-endian int32 (bit j = high bit of element j)."""
    v = u8_at(base, off, mb) | (u8_at(base, off + 1, mb) << 8)
    return v | (u8_at(base, off + 2, mb) << 16) | (u8_at(base, off + 3, mb) << 24)


@triton.jit
def q5_0_tile(base, rn, k0, mb, NSUB: tl.constexpr):
    b, j = _blocks32(rn, k0, NSUB, 22)
    h = (_qh32(base, b + 2, mb) >> j) & 1
    q = _nib32(base, b + 6, j, mb) | (h << 4)
    return f16_at(base, b, mb) * (q - 16).to(tl.float32)


@triton.jit
def q5_1_tile(base, rn, k0, mb, NSUB: tl.constexpr):
    b, j = _blocks32(rn, k0, NSUB, 24)
    h = (_qh32(base, b + 4, mb) >> j) & 1
    q = _nib32(base, b + 8, j, mb) | (h << 4)
    return f16_at(base, b, mb) * q.to(tl.float32) + f16_at(base, b + 2, mb)


@triton.jit
def _k_scale_min(base, b, jsub, mb):
    """6-bit scale and min of sub-blocks jsub (0..7) from the 12 packed bytes at b+4 (get_scale_min_k4)."""
    jj = jsub % 4
    a0 = u8_at(base, b + 4 + jj, mb)
    a1 = u8_at(base, b + 8 + jj, mb)
    a2 = u8_at(base, b + 12 + jj, mb)
    lo = jsub < 4
    sc = tl.where(lo, a0 & 63, (a2 & 0xF) | ((a0 >> 6) << 4))
    mn = tl.where(lo, a1 & 63, (a2 >> 4) | ((a1 >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _superblock(rn, k0, NSUB: tl.constexpr, SUB: tl.constexpr, TS: tl.constexpr):
    """Superblock byte offset [BN, 1, 1], sub-block index [1, NSUB, 1], element-in-superblock [1, NSUB, SUB]."""
    b = rn + (k0 // 256) * TS
    jsub = (k0 % 256) // SUB + tl.arange(0, NSUB)[None, :, None]
    return b, jsub, jsub * SUB + tl.arange(0, SUB)[None, None, :]


@triton.jit
def q4_k_tile(base, rn, k0, mb, NSUB: tl.constexpr):
    b, jsub, e = _superblock(rn, k0, NSUB, 32, 144)
    sc, mn = _k_scale_min(base, b, jsub, mb)
    # qs: 4 chunks of 32 bytes; chunk c holds elements 64c+l (low nibble) and 64c+32+l (high)
    q = (u8_at(base, b + 16 + (e // 64) * 32 + (e % 32), mb) >> ((jsub % 2) * 4)) & 0xF
    return (f16_at(base, b, mb) * sc) * q.to(tl.float32) - f16_at(base, b + 2, mb) * mn


@triton.jit
def q5_k_tile(base, rn, k0, mb, NSUB: tl.constexpr):
    b, jsub, e = _superblock(rn, k0, NSUB, 32, 176)
    sc, mn = _k_scale_min(base, b, jsub, mb)
    lo = (u8_at(base, b + 48 + (e // 64) * 32 + (e % 32), mb) >> ((jsub % 2) * 4)) & 0xF
    h = (u8_at(base, b + 16 + (e % 32), mb) >> jsub) & 1
    return (f16_at(base, b, mb) * sc) * (lo | (h << 4)).to(tl.float32) - f16_at(base, b + 2, mb) * mn


@triton.jit
def q6_k_tile(base, rn, k0, mb, NSUB: tl.constexpr):
    b, jsub, e = _superblock(rn, k0, NSUB, 16, 210)
    # halves of 128: in half h, element r sits in ql[64h + r%64] nibble r//64, qh[32h + r%32] bits 2*(r//32)
    h = e // 128
    r = e % 128
    lo = (u8_at(base, b + 64 * h + (r % 64), mb) >> ((r // 64) * 4)) & 0xF
    hi = (u8_at(base, b + 128 + 32 * h + (r % 32), mb) >> ((r // 32) * 2)) & 3
    sc = tl.load(base + b + 192 + jsub, mask=mb, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return (f16_at(base, b + 208, mb) * sc) * ((lo | (hi << 4)) - 32).to(tl.float32)
