"""quantkit's ggml block quantizers vs llama.cpp's own ggml_quantize_chunk (ctypes oracle), byte for byte;
dequantization vs the gguf package's independent numpy dequantizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from quantkit.errors import QuantkitError
from quantkit.quant.ggml_types import dequantize, quantize, row_bytes, supported_types

LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
KQUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
QTYPES = LEGACY + KQUANTS


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the oracle is single-threaded C; one torch thread also avoids spin-waits on a shared CPU
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["numba", "torch"])
def backend(request, monkeypatch):
    """Both CPU implementations: the numba kernels (the default) and the pure-torch path (what CUDA runs)."""
    monkeypatch.setenv("QUANTKIT_KQUANT_BACKEND", request.param)
    return request.param


def _dists(rng: np.random.Generator, rows: int, n: int) -> dict[str, np.ndarray]:
    d = {
        "normal": rng.standard_normal((rows, n)),
        "outliers": rng.laplace(size=(rows, n)) * (1 + 80 * (rng.random((rows, n)) < 0.003)),
        "positive": rng.random((rows, n)) + 0.5,
        "heavy": rng.standard_t(2, size=(rows, n)) * 1e-3,
        "coarse": rng.integers(-4, 4, size=(rows, n)) * 0.125,  # exact grid points: tie-heavy
    }
    x = rng.standard_normal((rows, n)) * 0.02
    x[1] = 0.0
    x[2, : n // 2] = 0.0
    x[3] = 7.5
    x[4, ::3] = -1e-20
    d["edge_rows"] = x
    return {k: v.astype(np.float32) for k, v in d.items()}


def _imatrix(rng: np.random.Generator, n: int) -> np.ndarray:
    im = (rng.standard_normal(n) ** 2 * rng.lognormal(0, 1.5, n)).astype(np.float32)
    im[rng.random(n) < 0.05] = 0.0  # dead columns
    return im


def _assert_matches(ggml_lib, x: np.ndarray, qt: T, imatrix: np.ndarray | None, what: str) -> None:
    ref = ggml_lib.quantize(x, qt, imatrix)
    ours = quantize(torch.from_numpy(x), qt, None if imatrix is None else torch.from_numpy(imatrix)).numpy()
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    blk, bsz = GGML_QUANT_SIZES[qt]
    rb, ob = ref.reshape(-1, bsz), ours.reshape(-1, bsz)
    bad = np.nonzero((rb != ob).any(1))[0]
    if len(bad) == 0:
        return
    # tolerated only if rare (float summation order) and never worse in weighted error
    assert len(bad) <= max(1, len(rb) // 1000), f"{what}: {len(bad)}/{len(rb)} blocks differ from llama.cpp"
    xb = x.reshape(-1, blk)[bad]
    w = np.ones_like(xb) if imatrix is None else np.tile(imatrix, x.shape[0]).reshape(-1, blk)[bad]
    e_ref = (w * (xb - gguf_dequantize(rb[bad], qt).reshape(xb.shape)) ** 2).sum(1)
    e_our = (w * (xb - gguf_dequantize(ob[bad], qt).reshape(xb.shape)) ** 2).sum(1)
    assert np.all(e_our <= e_ref * (1 + 1e-6)), f"{what}: differing blocks have higher weighted error"


@pytest.mark.llamacpp
@pytest.mark.parametrize("qt", QTYPES, ids=lambda t: t.name)
def test_random_tensors_bit_exact(qt, backend):
    from oracles import ggml_lib

    rng = np.random.default_rng(int(qt))
    widths = [256, 1536] if qt in KQUANTS else [96, 1536]
    for n in widths:
        for name, x in _dists(rng, 16, n).items():
            _assert_matches(ggml_lib, x, qt, None, f"{qt.name} {name} n={n}")
            _assert_matches(ggml_lib, x, qt, _imatrix(rng, n), f"{qt.name} {name} n={n} imatrix")


@pytest.mark.llamacpp
@pytest.mark.parametrize("qt", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types_bit_exact(qt):
    from oracles import ggml_lib

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((8, 64)) * np.exp(rng.uniform(-30, 30, (8, 64)))).astype(np.float32)
    bits = x.view(np.uint32)
    bits[0, :8] = [0x7FC00000, 0x7F800001, 0xFF800000, 0x7F800000, 0x80000000, 0x00000001, 0x3F808000, 0x3F818000]
    ref = ggml_lib.quantize(x, qt)
    ours = quantize(torch.from_numpy(x), qt).numpy()
    np.testing.assert_array_equal(ours, ref)
    back = dequantize(torch.from_numpy(ours), qt, 64).numpy()
    np.testing.assert_array_equal(back, gguf_dequantize(ref, qt).reshape(back.shape))


@pytest.fixture(scope="module")
def smol_weights(smollm_gguf) -> dict[str, np.ndarray]:
    """A spread of 128 rows from a few real SmolLM2 tensors (Q4_1/Q8_0 in the file), as float32."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(smollm_gguf).tensors}
    out = {}
    for name in ["blk.0.ffn_down.weight", "blk.7.ffn_gate.weight", "blk.29.attn_v.weight", "token_embd.weight"]:
        t = tensors[name]
        rows = np.asarray(t.data)[:: max(1, t.data.shape[0] // 128)][:128]
        out[name] = gguf_dequantize(rows, t.tensor_type).astype(np.float32)
    return out


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("qt", QTYPES, ids=lambda t: t.name)
def test_smollm2_tensors_bit_exact(qt, smol_weights, backend):
    from oracles import ggml_lib

    rng = np.random.default_rng(0)
    for name, w in smol_weights.items():
        if w.shape[1] % GGML_QUANT_SIZES[qt][0]:
            continue
        # activation-like importance: mean squares of random inputs scaled per column
        im = (rng.standard_normal((64, w.shape[1])) * rng.lognormal(0, 1, w.shape[1])).astype(np.float32)
        im = (im * im).mean(0)
        _assert_matches(ggml_lib, w, qt, None, f"{qt.name} {name}")
        _assert_matches(ggml_lib, w, qt, im, f"{qt.name} {name} imatrix")


@pytest.mark.llamacpp
@pytest.mark.parametrize("qt", QTYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf(qt):
    from oracles import ggml_lib

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((16, 512)) * rng.lognormal(0, 2, (16, 1))).astype(np.float32)
    data = ggml_lib.quantize(x, qt)
    ours = dequantize(torch.from_numpy(data), qt, 512).numpy()
    ref = gguf_dequantize(data, qt).reshape(ours.shape)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7 * float(np.abs(ref).max()))
    assert ours.dtype == np.float32
    # a real quantizer: reconstruction error is small relative to the signal
    rel = np.linalg.norm(ours - x) / np.linalg.norm(x)
    assert rel < {T.Q8_0: 0.01, T.Q6_K: 0.03, T.Q5_K: 0.06, T.Q5_0: 0.08, T.Q5_1: 0.08, T.Q3_K: 0.25, T.Q2_K: 0.45}.get(qt, 0.15)


@pytest.mark.parametrize("n,width", [(16, 3), (32, 4099), (256, 1000)])
def test_sequential_sum_is_float32_in_order(n, width):
    """ggml's scales depend on in-order float32 sums; quantkit's seqsum must be exactly that
    (oracle: a plain numpy float32 loop). Large cancelling terms make any reordering visible."""
    from quantkit.quant.kquants import seqsum

    rng = np.random.default_rng(n)
    t = (rng.standard_normal((n, width)) * np.exp(rng.uniform(-12, 12, (n, width)))).astype(np.float32)
    acc = np.zeros(width, np.float32)
    for i in range(n):
        acc = (acc + t[i]).astype(np.float32)
    np.testing.assert_array_equal(seqsum(torch.from_numpy(t)).numpy(), acc)


def test_roundf_matches_libm():
    import ctypes
    import ctypes.util

    from quantkit.quant.ggml_legacy import _roundf

    libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    libm.roundf.restype = ctypes.c_float
    libm.roundf.argtypes = [ctypes.c_float]
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.uniform(-130, 130, 3000), np.arange(-130, 130.5, 0.5),
                        rng.standard_normal(500) * 1e7]).astype(np.float32)
    halfish = np.float32(0.5) + np.array([-2, -1, 0, 1, 2], np.float32) * np.float32(2**-25)
    v = np.concatenate([v, halfish, -halfish, np.float32(2**23) + np.array([0.5, 1, 1.5], np.float32)])
    ref = np.array([libm.roundf(float(a)) for a in v], np.float32)
    np.testing.assert_array_equal(_roundf(torch.from_numpy(v)).numpy(), ref)


def test_layout_and_shapes():
    x = torch.randn(3, 4, 512)
    for qt in QTYPES:
        blk, bsz = GGML_QUANT_SIZES[qt]
        q = quantize(x, qt)
        assert q.shape == (3, 4, 512 // blk * bsz) == (3, 4, row_bytes(qt, 512))
        assert dequantize(q, qt, 512).shape == (3, 4, 512)
    assert set(QTYPES + [T.F32, T.F16, T.BF16]) <= set(supported_types())


def test_per_expert_imatrix_equals_separate_calls():
    x = torch.randn(2, 8, 256)
    im = torch.rand(2, 256)
    both = quantize(x, T.Q4_K, im)
    for e in range(2):
        assert torch.equal(both[e], quantize(x[e], T.Q4_K, im[e]))


def test_threaded_chunks_give_the_same_bytes(monkeypatch):
    """With more than one torch thread the CPU kernels quantize row chunks side by side: same bytes, any order."""
    import quantkit.quant.ggml_types as gt
    monkeypatch.setattr(gt, "CHUNK_ELEMS", 4096)  # many chunks
    g = torch.Generator().manual_seed(3)
    x = torch.randn(96, 512, generator=g) * torch.rand(96, 1, generator=g)
    im = torch.rand(512, generator=g)
    want = {(qt, i): quantize(x, qt, im if i else None) for qt in QTYPES for i in (0, 1)}
    torch.set_num_threads(2)
    try:
        assert gt._pool() is not None
        for (qt, i), b in want.items():
            assert torch.equal(quantize(x, qt, im if i else None), b), qt.name
    finally:
        torch.set_num_threads(1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qt", QTYPES, ids=lambda t: t.name)
def test_cuda_matches_cpu_bytes(qt):
    # the CPU path is the one checked against llama.cpp above; the device must give the same bytes
    g = torch.Generator().manual_seed(int(qt))
    x = torch.randn(64, 512, generator=g) * torch.rand(64, 1, generator=g) * 3
    im = torch.rand(512, generator=g) ** 2
    for imx in (None, im):
        cpu = quantize(x, qt, imx)
        dev = quantize(x.cuda(), qt, None if imx is None else imx.cuda())
        assert dev.device.type == "cuda"
        assert torch.equal(dev.cpu(), cpu)
        assert torch.equal(dequantize(dev, qt, 512).cpu(), dequantize(cpu, qt, 512))


def test_bad_input_raises():
    with pytest.raises(QuantkitError, match="multiple of the block size 256"):
        quantize(torch.randn(4, 96), T.Q4_K)
    with pytest.raises(QuantkitError, match="imatrix"):
        quantize(torch.randn(4, 256), T.Q4_K, torch.ones(128))
    with pytest.raises(QuantkitError, match="not supported"):
        quantize(torch.randn(4, 256), T.IQ2_XXS)
    with pytest.raises(QuantkitError, match="uint8"):
        dequantize(torch.zeros(4, 10, dtype=torch.uint8), T.Q8_0, 32)
    with pytest.raises(QuantkitError, match="floating-point"):
        quantize(torch.ones(4, 32, dtype=torch.int32), T.Q8_0)
    with pytest.raises(QuantkitError, match="NaN/Inf"):
        quantize(torch.full((2, 256), float("nan")), T.Q6_K)


def test_cpu_kernel_fp16_rounding_matches_numpy():
    """The CPU kernels round d/dmin to fp16 themselves: every regime (normal, subnormal, ties, overflow, -0)."""
    from numba import njit

    from quantkit.quant.ggml_cpu.blocks import _fp16

    @njit
    def run(v, bits, vals):
        for i in range(v.shape[0]):
            bits[i], vals[i] = _fp16(v[i])

    rng = np.random.default_rng(0)
    special = [0.0, -0.0, 65504, 65519.99, 65520, 1e6, -1e6, 2**-24, 2**-25, 3 * 2**-26, 2**-14, 6.1e-5, 1 + 2**-11]
    v = np.concatenate([rng.standard_normal(20000) * 10.0 ** rng.uniform(-9, 6, 20000), special]).astype(np.float32)
    bits, vals = np.empty(v.shape, np.int64), np.empty(v.shape, np.float32)
    run(v, bits, vals)
    with np.errstate(over="ignore"):
        ref = v.astype(np.float16)
    np.testing.assert_array_equal(bits.astype(np.uint16), ref.view(np.uint16))
    np.testing.assert_array_equal(vals, ref.astype(np.float32))


def test_all_finite():
    from quantkit.quant.ggml_types import all_finite
    assert all_finite(torch.randn(100)) and all_finite(torch.full((4,), 3e38))  # overflowing sum, finite values
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(100)
        x[17] = bad
        assert not all_finite(x) and not all_finite(x.half())
