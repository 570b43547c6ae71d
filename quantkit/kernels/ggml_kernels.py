"""Triton tile dequantizers for ggml block formats, read straight from the GGUF bytes.

Each function returns a float32 [BN, BK] tile of W for rows `rows` (byte offset of each row's
first block, int64 [BN]) and in-row element indices `offs_k` (int32 [BK]). Bytes are loaded one by
one and fp16 fields are assembled from two bytes, so no field needs any alignment (Q5_0's qh sits at
byte 2, MXFP4 blocks are 17 bytes). Neighbouring lanes read neighbouring bytes of the same block, so a
warp's loads hit the same few cache lines and each block's bytes cross HBM once.
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
def _blk(rows, offs_k, QK: tl.constexpr, TS: tl.constexpr):
    """Byte offset of the block holding (row, k), and k's index inside its block."""
    return rows[:, None] + ((offs_k // QK) * TS).to(tl.int64)[None, :], (offs_k % QK)[None, :]


@triton.jit
def q8_0_tile(w, rows, offs_k, mask):
    b, j = _blk(rows, offs_k, 32, 34)
    d = f16_at(w, b, mask)
    q = tl.load(w + b + 2 + j, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return d * q


@triton.jit
def _nib32(w, qs_off, j, mask):
    """Element j of a 32-block whose 16 qs bytes start at qs_off: low nibble j<16, high nibble j>=16."""
    byte = u8_at(w, qs_off + (j % 16), mask)
    return (byte >> ((j // 16) * 4)) & 0xF


@triton.jit
def q4_0_tile(w, rows, offs_k, mask):
    b, j = _blk(rows, offs_k, 32, 18)
    q = _nib32(w, b + 2, j, mask)
    return f16_at(w, b, mask) * (q - 8).to(tl.float32)


@triton.jit
def q4_1_tile(w, rows, offs_k, mask):
    b, j = _blk(rows, offs_k, 32, 20)
    q = _nib32(w, b + 4, j, mask)
    return f16_at(w, b, mask) * q.to(tl.float32) + f16_at(w, b + 2, mask)


@triton.jit
def q5_0_tile(w, rows, offs_k, mask):
    b, j = _blk(rows, offs_k, 32, 22)
    # qh is a little-endian uint32: bit j lives in byte j//8
    h = (u8_at(w, b + 2 + j // 8, mask) >> (j % 8)) & 1
    q = _nib32(w, b + 6, j, mask) | (h << 4)
    return f16_at(w, b, mask) * (q - 16).to(tl.float32)


@triton.jit
def q5_1_tile(w, rows, offs_k, mask):
    b, j = _blk(rows, offs_k, 32, 24)
    h = (u8_at(w, b + 4 + j // 8, mask) >> (j % 8)) & 1
    q = _nib32(w, b + 8, j, mask) | (h << 4)
    return f16_at(w, b, mask) * q.to(tl.float32) + f16_at(w, b + 2, mask)


@triton.jit
def _k_scale_min(w, b, j, mask):
    """6-bit scale and min of sub-block j (0..7) from the 12 packed bytes at b+4 (ggml get_scale_min_k4)."""
    jj = j % 4
    a0 = u8_at(w, b + 4 + jj, mask)
    a1 = u8_at(w, b + 8 + jj, mask)
    a2 = u8_at(w, b + 12 + jj, mask)
    lo = j < 4
    sc = tl.where(lo, a0 & 63, (a2 & 0xF) | ((a0 >> 6) << 4))
    mn = tl.where(lo, a1 & 63, (a2 >> 4) | ((a1 >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def q4_k_tile(w, rows, offs_k, mask):
    b, e = _blk(rows, offs_k, 256, 144)
    sc, mn = _k_scale_min(w, b, e // 32, mask)
    # qs: 4 chunks of 32 bytes; chunk c holds elements 64c+l (low nibble) and 64c+32+l (high)
    byte = u8_at(w, b + 16 + (e // 64) * 32 + (e % 32), mask)
    q = (byte >> (((e // 32) % 2) * 4)) & 0xF
    return f16_at(w, b, mask) * sc * q.to(tl.float32) - f16_at(w, b + 2, mask) * mn


@triton.jit
def q5_k_tile(w, rows, offs_k, mask):
    b, e = _blk(rows, offs_k, 256, 176)
    sc, mn = _k_scale_min(w, b, e // 32, mask)
    byte = u8_at(w, b + 48 + (e // 64) * 32 + (e % 32), mask)
    h = (u8_at(w, b + 16 + (e % 32), mask) >> (e // 32)) & 1
    q = ((byte >> (((e // 32) % 2) * 4)) & 0xF) | (h << 4)
    return f16_at(w, b, mask) * sc * q.to(tl.float32) - f16_at(w, b + 2, mask) * mn


@triton.jit
def q6_k_tile(w, rows, offs_k, mask):
    b, e = _blk(rows, offs_k, 256, 210)
    # two halves of 128; in half h, ql[64h + r%64] nibble r//64, qh[32h + r%32] bits 2*(r//32)
    h = e // 128
    r = e % 128
    lo = (u8_at(w, b + 64 * h + (r % 64), mask) >> ((r // 64) * 4)) & 0xF
    hi = (u8_at(w, b + 128 + 32 * h + (r % 32), mask) >> ((r // 32) * 2)) & 3
    sc = tl.load(w + b + 192 + e // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return f16_at(w, b + 208, mask) * sc * ((lo | (hi << 4)) - 32).to(tl.float32)
