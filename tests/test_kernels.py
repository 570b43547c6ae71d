"""Dequant-matmul kernels (quantkit.kernels) against independent oracles.

ggml types: blocks from gguf.quants.quantize (or random valid blocks for the k-quants, which gguf
cannot quantize), dequantized by gguf.quants.dequantize (the gguf package's numpy code).
GPTQ/AWQ/gpt-oss MXFP4: codes, scales and zeros drawn at random, packed here with plain bit
arithmetic from the format descriptions, dequantized here from the unpacked codes.
On CPU the Triton kernels run under TRITON_INTERPRET=1 (set before triton is imported); with
QUANTKIT_TEST_CUDA=1 on a CUDA machine they run compiled on the GPU (benchmarks/gpu_check.sh).
"""

import os
import zlib

import numpy as np
import pytest
import torch

ON_CUDA = os.environ.get("QUANTKIT_TEST_CUDA") == "1" and torch.cuda.is_available()
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import gguf  # noqa: E402
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT  # noqa: E402

from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.kernels import PackedWeight, qlinear, qlinear_experts  # noqa: E402

DEV = "cuda" if ON_CUDA else "cpu"
MS = (1, 3, 16, 33)
GGML_GGUF_QUANTIZABLE = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.MXFP4)
GGML_ALL = GGML_GGUF_QUANTIZABLE + (QT.Q4_K, QT.Q5_K, QT.Q6_K)
# byte offsets of the fp16 scale fields inside each block struct (ggml-common.h)
F16_FIELDS = {QT.Q4_0: (0,), QT.Q5_0: (0,), QT.Q8_0: (0,), QT.Q4_1: (0, 2), QT.Q5_1: (0, 2),
              QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _check(y: torch.Tensor, ref: np.ndarray, dtype=torch.float32):
    assert y.dtype == dtype and tuple(y.shape) == ref.shape
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}[dtype]
    err = np.abs(y.double().cpu().numpy() - ref).max()
    scale = np.abs(ref).max()
    assert err <= tol * scale + 1e-6, f"max err {err:.3g} vs max |ref| {scale:.3g}"


# ---------------------------------------------------------------- ggml

def ggml_weight(qt: QT, n: int, k: int, rng: np.random.Generator, experts: int | None = None):
    """(raw uint8 [.., n, row_bytes], oracle float [.., n, k])."""
    lead = (experts,) if experts else ()
    bs, ts = GGML_QUANT_SIZES[qt]
    if qt in GGML_GGUF_QUANTIZABLE:
        w = rng.standard_normal(lead + (n, k)).astype(np.float32)
        w *= rng.uniform(0.2, 3.0, size=lead + (n, 1)).astype(np.float32)
        raw = gguf.quants.quantize(w, qt)
    else:
        raw = rng.integers(0, 256, size=lead + (n, k // bs, ts), dtype=np.uint8)
        for off in F16_FIELDS[qt]:
            d = rng.uniform(-0.02, 0.02, size=raw.shape[:-1]).astype(np.float16)
            raw[..., off:off + 2] = d[..., None].view(np.uint8)
        raw = raw.reshape(lead + (n, k // bs * ts))
    return raw, gguf.quants.dequantize(raw, qt).astype(np.float64)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("qt", GGML_ALL, ids=lambda q: q.name)
def test_ggml_triton(qt, m):
    n, k = 72, 512  # N not a multiple of the 32/64-wide tiles
    raw, w = ggml_weight(qt, n, k, _rng(qt, m))
    pw = PackedWeight.ggml(torch.from_numpy(raw).to(DEV), qt, k)
    x = torch.from_numpy(_rng("x", qt, m).standard_normal((m, k)).astype(np.float32))
    y = qlinear(x.to(DEV), pw, backend="triton")
    _check(y, x.double().numpy() @ w.T)


@pytest.mark.parametrize("qt", GGML_ALL, ids=lambda q: q.name)
def test_ggml_torch_fallback(qt):
    n, k = 40, 256
    raw, w = ggml_weight(qt, n, k, _rng("fb", qt))
    pw = PackedWeight.ggml(torch.from_numpy(raw), qt, k)
    x = torch.from_numpy(_rng("xfb", qt).standard_normal((2, 3, k)).astype(np.float32))
    y = qlinear(x, pw, backend="torch")
    _check(y, x.double().numpy() @ w.T)


def test_ggml_single_split_wide_n():
    # many N tiles -> the decode path runs with one K split and writes y directly
    qt, n, k = QT.Q6_K, 300, 256
    raw, w = ggml_weight(qt, n, k, _rng("wide"))
    pw = PackedWeight.ggml(torch.from_numpy(raw).to(DEV), qt, k)
    x = torch.from_numpy(_rng("xw").standard_normal((1, k)).astype(np.float32))
    _check(qlinear(x.to(DEV), pw, backend="triton"), x.double().numpy() @ w.T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", (1, 33))
def test_half_inputs(dtype, m):
    qt, n, k = QT.Q4_K, 64, 256
    raw, w = ggml_weight(qt, n, k, _rng("half", dtype, m))
    pw = PackedWeight.ggml(torch.from_numpy(raw).to(DEV), qt, k)
    x = torch.from_numpy(_rng("xh", m).standard_normal((m, k)).astype(np.float32)).to(dtype)
    bias = torch.linspace(-1, 1, n).to(dtype)
    ref = x.double().numpy() @ w.T + bias.double().numpy()
    _check(qlinear(x.to(DEV), pw, bias.to(DEV), backend="triton"), ref, dtype)
    _check(qlinear(x, PackedWeight.ggml(torch.from_numpy(raw), qt, k), bias, backend="torch"), ref, dtype)


# ---------------------------------------------------------------- GPTQ / AWQ

def pack_along(codes: np.ndarray, bits: int, axis: int, order=None) -> np.ndarray:
    """Pack unsigned codes into int32 words along `axis`, field i at bits [i*bits, (i+1)*bits).
    With `order`, field p of word j holds element j*len(order) + order[p] (AWQ)."""
    per = 32 // bits
    c = np.moveaxis(codes.astype(np.int64), axis, -1)
    c = c.reshape(*c.shape[:-1], -1, per)
    if order is not None:
        c = c[..., list(order)]
    word = np.zeros(c.shape[:-1], dtype=np.int64)
    for i in range(per):
        word |= c[..., i] << (bits * i)
    word = word.astype(np.uint32).view(np.int32)
    return np.ascontiguousarray(np.moveaxis(word, -1, axis))


def gptq_weight(n, k, bits, group, act_order, v2, rng, experts=None):
    lead = (experts,) if experts else ()
    g = -(-k // group)
    maxq = 2**bits - 1
    q = rng.integers(0, maxq + 1, size=lead + (k, n))
    z = rng.integers(1 if not v2 else 0, maxq + 1, size=lead + (g, n))  # v1 cannot store zero 0
    s = rng.uniform(0.002, 0.05, size=lead + (g, n)).astype(np.float16)
    gidx = np.arange(k) // group
    if act_order:
        gidx = np.stack([rng.permutation(gidx) for _ in range(experts or 1)])
        gidx = gidx if experts else gidx[0]
    else:
        gidx = np.broadcast_to(gidx, lead + (k,))
    stored_z = z if v2 else z - 1
    t = dict(qweight=torch.from_numpy(pack_along(q, bits, axis=-2)),
             qzeros=torch.from_numpy(pack_along(stored_z, bits, axis=-1)),
             scales=torch.from_numpy(s), g_idx=torch.from_numpy(np.ascontiguousarray(gidx).astype(np.int32)))
    # oracle: W[n, k] = s[g(k), n] * (q[k, n] - z[g(k), n])
    sg = np.take_along_axis(s.astype(np.float64), gidx[..., None].repeat(n, -1), axis=-2)
    zg = np.take_along_axis(z, gidx[..., None].repeat(n, -1), axis=-2)
    w = np.swapaxes(sg * (q - zg), -1, -2)
    return t, w


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("act_order", [False, True], ids=["seq", "act"])
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_triton(bits, act_order, m):
    n, k, group = 72, 320, 128  # last group holds 64 of 128 rows
    t, w = gptq_weight(n, k, bits, group, act_order, False, _rng("gptq", bits, act_order, m))
    pw = PackedWeight.gptq(**{a: b.to(DEV) for a, b in t.items()}, bits=bits, group_size=group)
    assert ("g_idx" in pw.tensors) == act_order
    x = torch.from_numpy(_rng("xg", m).standard_normal((m, k)).astype(np.float32))
    _check(qlinear(x.to(DEV), pw, backend="triton"), x.double().numpy() @ w.T)
    _check(qlinear(x, PackedWeight.gptq(**t, bits=bits, group_size=group), backend="torch"), x.double().numpy() @ w.T)


@pytest.mark.parametrize("m", (3, 33))
def test_gptq_v2_zeros(m):
    n, k, group = 64, 256, 64
    t, w = gptq_weight(n, k, 4, group, False, True, _rng("v2", m))
    pw = PackedWeight.gptq(**{a: b.to(DEV) for a, b in t.items()}, bits=4, group_size=group, v2=True)
    x = torch.from_numpy(_rng("xv2", m).standard_normal((m, k)).astype(np.float32))
    _check(qlinear(x.to(DEV), pw, backend="triton"), x.double().numpy() @ w.T)
    _check(qlinear(x, pw.to("cpu"), backend="torch"), x.double().numpy() @ w.T)


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble p of a word holds column 8j + AWQ_ORDER[p]


def awq_weight(n, k, group, rng, experts=None):
    lead = (experts,) if experts else ()
    g = -(-k // group)
    q = rng.integers(0, 16, size=lead + (k, n))
    z = rng.integers(0, 16, size=lead + (g, n))
    s = rng.uniform(0.002, 0.05, size=lead + (g, n)).astype(np.float16)
    t = dict(qweight=torch.from_numpy(pack_along(q, 4, axis=-1, order=AWQ_ORDER)),
             qzeros=torch.from_numpy(pack_along(z, 4, axis=-1, order=AWQ_ORDER)),
             scales=torch.from_numpy(s))
    gi = np.arange(k) // group
    w = np.swapaxes(s.astype(np.float64)[..., gi, :] * (q - z[..., gi, :]), -1, -2)
    return t, w


@pytest.mark.parametrize("m", MS)
def test_awq_triton(m):
    n, k, group = 72, 320, 128
    t, w = awq_weight(n, k, group, _rng("awq", m))
    pw = PackedWeight.awq(**{a: b.to(DEV) for a, b in t.items()}, group_size=group)
    x = torch.from_numpy(_rng("xa", m).standard_normal((m, k)).astype(np.float32))
    _check(qlinear(x.to(DEV), pw, backend="triton"), x.double().numpy() @ w.T)
    _check(qlinear(x, pw.to("cpu"), backend="torch"), x.double().numpy() @ w.T)


# ---------------------------------------------------------------- gpt-oss MXFP4

FP4_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])  # OCP MX spec


def mxfp4_hf_weight(n, k, rng, experts=None):
    lead = (experts,) if experts else ()
    blocks = rng.integers(0, 256, size=lead + (n, k // 32, 16), dtype=np.uint8)
    scales = rng.integers(118, 134, size=lead + (n, k // 32), dtype=np.uint8)
    codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)  # 2i low, 2i+1 high
    w = FP4_E2M1[codes] * np.exp2(scales.astype(np.float64) - 127)[..., None]
    return dict(blocks=torch.from_numpy(blocks), scales=torch.from_numpy(scales)), w.reshape(*lead, n, k)


@pytest.mark.parametrize("m", MS)
def test_mxfp4_hf_triton(m):
    n, k = 40, 256
    t, w = mxfp4_hf_weight(n, k, _rng("mx", m))
    pw = PackedWeight.mxfp4(**{a: b.to(DEV) for a, b in t.items()})
    x = torch.from_numpy(_rng("xm", m).standard_normal((m, k)).astype(np.float32))
    _check(qlinear(x.to(DEV), pw, backend="triton"), x.double().numpy() @ w.T)
    _check(qlinear(x, pw.to("cpu"), backend="torch"), x.double().numpy() @ w.T)


# ---------------------------------------------------------------- K not a multiple of the K tile

@pytest.mark.parametrize("m", (1, 20))
@pytest.mark.parametrize("fmt", ["q4_0", "q8_0", "mxfp4", "mxfp4_hf", "gptq4", "awq"])
def test_k_tail(fmt, m):
    # K = 288 (9 blocks of 32) / 200 (25 GPTQ words, groups of 128 + 72): the last K tile is partial
    rng = _rng("tail", fmt, m)
    n = 24
    if fmt in ("q4_0", "q8_0", "mxfp4"):
        k = 288
        qt = {"q4_0": QT.Q4_0, "q8_0": QT.Q8_0, "mxfp4": QT.MXFP4}[fmt]
        raw, w = ggml_weight(qt, n, k, rng)
        pw = PackedWeight.ggml(torch.from_numpy(raw), qt, k)
    elif fmt == "mxfp4_hf":
        k = 288
        t, w = mxfp4_hf_weight(n, k, rng)
        pw = PackedWeight.mxfp4(**t)
    elif fmt == "gptq4":
        k = 200
        t, w = gptq_weight(n, k, 4, 128, False, False, rng)
        pw = PackedWeight.gptq(**t, bits=4, group_size=128)
    else:
        k = 200
        t, w = awq_weight(n, k, 128, rng)
        pw = PackedWeight.awq(**t, group_size=128)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    ref = x.double().numpy() @ w.T
    _check(qlinear(x.to(DEV), pw.to(DEV), backend="triton"), ref)
    _check(qlinear(x, pw, backend="torch"), ref)
    # a 1-D input gives a 1-D output
    _check(qlinear(x[0].to(DEV), pw.to(DEV), backend="triton"), ref[0])


# ---------------------------------------------------------------- experts

def _expert_case(fmt, e, n, k, rng):
    if fmt == "q4_k":
        raw, w = ggml_weight(QT.Q4_K, n, k, rng, experts=e)
        return PackedWeight.ggml(torch.from_numpy(raw), QT.Q4_K, k), w
    if fmt == "q8_0":
        raw, w = ggml_weight(QT.Q8_0, n, k, rng, experts=e)
        return PackedWeight.ggml(torch.from_numpy(raw), QT.Q8_0, k), w
    if fmt == "gptq_act":
        t, w = gptq_weight(n, k, 4, 64, True, False, rng, experts=e)
        return PackedWeight.gptq(**t, bits=4, group_size=64), w
    if fmt == "awq":
        t, w = awq_weight(n, k, 64, rng, experts=e)
        return PackedWeight.awq(**t, group_size=64), w
    t, w = mxfp4_hf_weight(n, k, rng, experts=e)
    return PackedWeight.mxfp4(**t), w


@pytest.mark.parametrize("fmt", ["q4_k", "q8_0", "gptq_act", "awq", "mxfp4"])
def test_experts(fmt):
    e, n, k, tokens, top_k = 4, 48, 256, 21, 2
    rng = _rng("moe", fmt)
    pw, w = _expert_case(fmt, e, n, k, rng)
    assert pw.num_experts == e
    ids = torch.from_numpy(rng.integers(0, e - 1, size=(tokens, top_k)))  # expert e-1 gets no tokens
    ids[0, 0] = 0
    x = torch.from_numpy(rng.standard_normal((tokens, k)).astype(np.float32))
    bias = torch.from_numpy(rng.standard_normal((e, n)).astype(np.float32))
    idn = ids.numpy()
    ref = np.einsum("tk,tjnk->tjn", x.double().numpy(), w[idn]) + bias.double().numpy()[idn]
    _check(qlinear_experts(x.to(DEV), pw.to(DEV), ids.to(DEV), bias.to(DEV), backend="triton"), ref)
    _check(qlinear_experts(x, pw, ids, bias, backend="torch"), ref)
    # one expert per token: [T] ids -> [T, N]
    y1 = qlinear_experts(x.to(DEV), pw.to(DEV), ids[:, 0].to(DEV), backend="triton")
    _check(y1, np.einsum("tk,tnk->tn", x.double().numpy(), w[idn[:, 0]]))


# ---------------------------------------------------------------- compiled for Hopper (no GPU needed)

_AOT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from quantkit.kernels import matmul as mm

T = GPUTarget("cuda", 90, 32)
FMTS = {"gptq4_act": (1, "*i32", "*fp16", 4, 128, 1, True), "gptq8": (1, "*i32", "*fp16", 8, 128, 1, False),
        "awq": (2, "*i32", "*fp16", 4, 128, 0, False), "mxfp4_hf": (3, "*u8", "*u8", 4, 32, 0, False)}
FMTS.update({f"ggml{c}": (c, "*u8", "*u8", 4, 1, 0, False) for c in (10, 11, 12, 13, 14, 20, 21, 22, 30)})


def build(kernel, fmt, xdt, sig_mid, **cx):
    code, wt, st, bits, group, zo, hg = FMTS[fmt]
    ptrs = dict(w=wt, a1="*i32" if code == 1 else wt, a2=st, a3="*i32" if code == 1 else wt)
    sig = dict(x="*" + xdt, **{k: v for k, v in sig_mid.items() if k in ("out", "y")}, **ptrs,
               **{k: v for k, v in sig_mid.items() if k not in ("out", "y")})
    c = dict(FMT=code, BITS=bits, GROUP=group, ZERO_OFF=zo, HAS_GIDX=hg, **cx)
    sig.update({k: "constexpr" for k in c})
    triton.compile(ASTSource(kernel, sig, c), target=T, options=dict(num_warps=cx.pop("W", 4), num_stages=3))


gemm_sig = dict(y="*fp16", M="i32", N="i32", K="i32", sxm="i32", sxk="i32", row_bytes="i32", nb="i32",
                M_BUCKET="i32")
split_sig = dict(out="*fp32", M="i32", N="i32", K="i32", sxm="i32", sxk="i32", k_per_split="i32",
                 row_bytes="i32", nb="i32")
moe_sig = dict(y="*bf16", x_rows="*i32", y_rows="*i32", blk_expert="*i32", blk_start="*i32", blk_end="*i32",
               N="i32", K="i32", sxm="i32", sxk="i32", es0="i64", es1="i64", es2="i64", es3="i64",
               row_bytes="i32", nb="i32")
for fmt in FMTS:  # every tile dequantizer through tl.dot
    build(mm._gemm_kernel, fmt, "fp16", gemm_sig, IEEE=False, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
for fmt in ("gptq4_act", "ggml20"):  # the GEMV paths (broadcast and 16-row dot) and the MoE kernel
    build(mm._splitk_kernel, fmt, "bf16", split_sig, BLOCK_M=1, BLOCK_N=32, BLOCK_K=128, IEEE=False)
    build(mm._splitk_kernel, fmt, "bf16", split_sig, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, IEEE=False)
    build(mm._moe_kernel, fmt, "bf16", moe_sig, IEEE=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.skipif(ON_CUDA, reason="the CUDA run compiles every kernel for real")
def test_kernels_compile_for_hopper(tmp_path):
    # CI has no GPU: the interpreter misses compile-only errors (types, layouts), so compile every
    # format's tile into the GEMM and GEMV kernels for sm_90 down to a cubin with triton's ptxas.
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia").is_dir():
        pytest.skip("this triton build has no NVIDIA backend")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(root), TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# ---------------------------------------------------------------- bad input

def test_bad_inputs():
    raw, _ = ggml_weight(QT.Q8_0, 8, 64, _rng("bad"))
    pw = PackedWeight.ggml(torch.from_numpy(raw), QT.Q8_0, 64)
    with pytest.raises(QuantkitError, match="input must be"):
        qlinear(torch.zeros(2, 32), pw)
    with pytest.raises(QuantkitError, match="dtype"):
        qlinear(torch.zeros(2, 64, dtype=torch.float64), pw)
    with pytest.raises(QuantkitError, match="bias"):
        qlinear(torch.zeros(2, 64), pw, torch.zeros(3))
    with pytest.raises(QuantkitError, match="backend"):
        qlinear(torch.zeros(2, 64), pw, backend="cuda")
    with pytest.raises(QuantkitError, match="n_per_row"):
        PackedWeight.ggml(torch.from_numpy(raw), QT.Q8_0, 48)
    with pytest.raises(QuantkitError, match="data"):
        PackedWeight.ggml(torch.from_numpy(raw)[:, :10], QT.Q8_0, 64)
    with pytest.raises(QuantkitError, match="no kernel"):
        PackedWeight.ggml(torch.from_numpy(raw), QT.Q2_K, 256)
    t, _ = gptq_weight(16, 64, 4, 32, True, False, _rng("badg"))
    with pytest.raises(QuantkitError, match="bits"):
        PackedWeight.gptq(**t, bits=3, group_size=32)
    with pytest.raises(QuantkitError, match="g_idx"):
        PackedWeight.gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"] + 5, bits=4, group_size=32)
    with pytest.raises(QuantkitError, match="scales"):
        PackedWeight.gptq(t["qweight"], t["qzeros"], t["scales"][:1], bits=4, group_size=32)
    pe, _ = _expert_case("q8_0", 2, 8, 64, _rng("bade"))
    with pytest.raises(QuantkitError, match="expert_ids"):
        qlinear_experts(torch.zeros(3, 64), pe, torch.tensor([0, 1, 2]))
    with pytest.raises(QuantkitError, match="expert stack"):
        qlinear(torch.zeros(3, 64), pe)
