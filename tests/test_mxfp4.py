"""MXFP4 quantizer and byte layouts against independent oracles.

Oracles: llama.cpp's libggml (ggml_quantize_chunk for GGML_TYPE_MXFP4, via ctypes), the `gguf`
package's numpy MXFP4 quantizer/dequantizer, transformers' gpt-oss MXFP4 dequantizer,
compressed-tensors' MXFP4PackedCompressor, and textbook brute-force rounding written here.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.mxfp4_layouts import (
    dequantize_gguf_mxfp4,
    from_compressed_tensors,
    from_gguf_mxfp4,
    from_gpt_oss,
    gguf_to_gpt_oss,
    gpt_oss_to_gguf,
    merge_gate_up,
    quantize_gguf_mxfp4,
    split_gate_up,
    to_compressed_tensors,
    to_gguf_mxfp4,
    to_gpt_oss,
)
from quantkit.quant.mxfp4 import DEFAULT_RULE, dequantize_mxfp4, quantize_mxfp4

gguf = pytest.importorskip("gguf")

SMOL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MXFP4 = gguf.GGMLQuantizationType.MXFP4
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float64)


def varied(rows: int, n: int, seed: int) -> torch.Tensor:
    """Gaussian rows whose 32-blocks have wildly different scales (2**-20 .. 2**6)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g)
    s = torch.exp2(torch.randint(-20, 7, (rows, n // 32, 1), generator=g).float())
    return (w.view(rows, n // 32, 32) * s).view(rows, n)


def edge_blocks() -> np.ndarray:
    """Blocks that stress ggml's exact behaviour: amax one ulp below a power of two (log2f rounds
    up), exact rounding midpoints (ties), zeros, negative zeros, all-zero blocks, values beyond 6*scale."""
    rng = np.random.default_rng(7)
    blocks = []
    for k in range(-30, 30):
        p = np.float32(2.0 ** k)
        for ulps in (1, 2, 3, 40):
            amax = np.float32(p - ulps * np.spacing(np.float32(p / 2)))
            b = (rng.standard_normal(32).astype(np.float32) * amax / np.float32(4)).clip(-amax, amax)
            b[3] = -amax if k % 2 else amax
            blocks.append(b)
    grid = np.array([0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8], np.float32)
    for i in range(300):
        e = np.float32(2.0 ** rng.integers(-12, 12))
        blocks.append(rng.choice(np.concatenate([grid, -grid]), 32).astype(np.float32) * e)
    z = np.zeros(32, np.float32)
    blocks.append(z)
    blocks.append(-z)
    mixed = rng.standard_normal(32).astype(np.float32)
    mixed[::4] = -0.0
    blocks.append(mixed)
    return np.stack(blocks)


def brute_force_dequant(x: np.ndarray, exps: np.ndarray) -> np.ndarray:
    """Textbook MXFP4 element rounding for given block exponents: nearest of ±E2M1 * 2**(e-127),
    ties to the smaller magnitude. x [R, n] float, exps [R, n/32] -> values [R, n] (float64)."""
    r, n = x.shape
    scale = np.ldexp(1.0, exps.astype(np.int64) - 127).repeat(32, axis=1)  # [R, n]
    cand = np.concatenate([E2M1, -E2M1[1:]])  # magnitudes first, so ties resolve to the smaller one
    order = np.argsort(np.abs(cand), kind="stable")
    cand = cand[order]
    err = np.abs(cand[None, None, :] * scale[..., None] - x.astype(np.float64)[..., None])
    return cand[err.argmin(-1)] * scale


# ---------------------------------------------------------------- llama.cpp oracle

def ggml_quantize_mxfp4(x: np.ndarray) -> np.ndarray:
    from oracles import ggml_lib  # skips when llama_cpp is not installed
    return ggml_lib.quantize(x, int(MXFP4))


@pytest.mark.llamacpp
def test_floor_bytes_match_llamacpp_random():
    x = varied(48, 2048, seed=1)
    codes, exps = quantize_mxfp4(x, rule="floor")
    np.testing.assert_array_equal(to_gguf_mxfp4(codes, exps).numpy(), ggml_quantize_mxfp4(x.numpy()))


@pytest.mark.llamacpp
def test_ggml_codec_adapters_match_llamacpp():
    x = varied(8, 512, seed=17)
    data = quantize_gguf_mxfp4(x, imatrix=torch.rand(512))  # llama.cpp ignores the imatrix for MXFP4
    np.testing.assert_array_equal(data.numpy(), ggml_quantize_mxfp4(x.numpy()))
    np.testing.assert_array_equal(dequantize_gguf_mxfp4(data).numpy(), gguf.quants.dequantize(data.numpy(), MXFP4))


@pytest.mark.llamacpp
def test_floor_bytes_match_llamacpp_edge_cases():
    blocks = edge_blocks()
    x = torch.from_numpy(blocks)
    ours = to_gguf_mxfp4(*quantize_mxfp4(x, rule="floor")).numpy()
    ref = ggml_quantize_mxfp4(blocks)
    np.testing.assert_array_equal(ours, ref)
    # the one-ulp-below-a-power-of-two blocks really exercise log2f's round-up in ggml
    exact_floor = np.floor(np.log2(np.abs(blocks[:240]).max(1).astype(np.float64))) + 125
    assert (ref[:240, 0] == exact_floor + 1).sum() > 50


@pytest.mark.llamacpp
@pytest.mark.slow
def test_floor_bytes_match_llamacpp_smollm2():
    if not SMOL.exists():
        pytest.skip(f"{SMOL} missing")
    reader = gguf.GGUFReader(str(SMOL))
    want = {"blk.0.attn_q.weight", "blk.7.ffn_down.weight", "blk.29.attn_v.weight", "output_norm.weight"}
    seen = 0
    for t in reader.tensors:
        if t.name not in want:
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1, int(t.shape[0]))
        w = w[:256]
        ours = to_gguf_mxfp4(*quantize_mxfp4(torch.from_numpy(w), rule="floor", name=t.name)).numpy()
        np.testing.assert_array_equal(ours, ggml_quantize_mxfp4(w), err_msg=t.name)
        np.testing.assert_array_equal(ours, gguf.quants.quantize(w, MXFP4), err_msg=t.name)
        seen += 1
    assert seen == len(want)


# ---------------------------------------------------------------- gguf package oracle

def test_floor_bytes_match_gguf_numpy_quantizer():
    x = varied(32, 1024, seed=2)
    ours = to_gguf_mxfp4(*quantize_mxfp4(x, rule="floor")).numpy()
    np.testing.assert_array_equal(ours, gguf.quants.quantize(x.numpy(), MXFP4))


@pytest.mark.parametrize("rule", ["floor", "ceil", "best"])
def test_gguf_bytes_dequantize_with_gguf_package(rule):
    x = varied(16, 512, seed=3)
    codes, exps = quantize_mxfp4(x, rule=rule)
    data = to_gguf_mxfp4(codes, exps)
    assert data.shape == (16, 512 // 32 * gguf.GGML_QUANT_SIZES[MXFP4][1])
    ref = gguf.quants.dequantize(data.numpy(), MXFP4)
    np.testing.assert_array_equal(dequantize_mxfp4(codes, exps).numpy(), ref)
    back_codes, back_exps = from_gguf_mxfp4(data, 512)
    assert torch.equal(back_codes, codes) and torch.equal(back_exps, exps)


def test_gguf_reader_roundtrip_of_foreign_bytes():
    # bytes made by the gguf package, read by us: every code/exponent, incl. -0 (code 8)
    rng = np.random.default_rng(4)
    codes = torch.from_numpy(rng.integers(0, 16, (8, 256), dtype=np.uint8))
    exps = torch.from_numpy(rng.integers(90, 160, (8, 8), dtype=np.uint8))
    data = to_gguf_mxfp4(codes, exps).numpy()
    ref = gguf.quants.dequantize(data, MXFP4)
    np.testing.assert_array_equal(dequantize_mxfp4(codes, exps).numpy(), ref)
    c2, e2 = from_gguf_mxfp4(torch.from_numpy(data.reshape(-1)), 256)  # flat buffer also accepted
    assert torch.equal(c2, codes) and torch.equal(e2, exps)


def test_dequantize_is_textbook():
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 16, (4, 64), dtype=np.uint8)
    exps = rng.integers(0, 255, (4, 2), dtype=np.uint8)
    table = [0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6]
    want = np.array([[math.ldexp(table[c], int(exps[r, j // 32]) - 127) for j, c in enumerate(row)]
                     for r, row in enumerate(codes)], dtype=np.float32)
    got = dequantize_mxfp4(torch.from_numpy(codes), torch.from_numpy(exps)).numpy()
    np.testing.assert_array_equal(got, want)
    nan = dequantize_mxfp4(torch.zeros(1, 32, dtype=torch.uint8), torch.full((1, 1), 255, dtype=torch.uint8))
    assert torch.isnan(nan).all()  # E8M0 0xFF is NaN (OCP MX v1.0)


# ---------------------------------------------------------------- rules

def test_ceil_never_clips_and_is_smallest():
    x = varied(32, 1024, seed=6)
    codes, exps = quantize_mxfp4(x, rule="ceil")
    amax = x.abs().view(32, -1, 32).amax(-1).double().numpy()
    e = exps.numpy().astype(np.int64)
    assert (amax <= 6 * np.ldexp(1.0, e - 127)).all()
    assert (amax > 6 * np.ldexp(1.0, e - 128)).all()  # one step smaller would clip
    deq = dequantize_mxfp4(codes, exps).double().numpy()
    # no clipping: every element is within half of the widest grid step (4 -> 6) of its value
    step = np.ldexp(1.0, e - 127).repeat(32, axis=1)
    assert (np.abs(deq - x.double().numpy()) <= step).all()
    np.testing.assert_array_equal(deq, brute_force_dequant(x.numpy(), exps.numpy()))
    # whereas floor does clip on the same data (so the check above can fail)
    fc, fe = quantize_mxfp4(x, rule="floor")
    fstep = np.ldexp(1.0, fe.numpy().astype(np.int64) - 127).repeat(32, axis=1)
    assert (np.abs(dequantize_mxfp4(fc, fe).double().numpy() - x.double().numpy()) > fstep).any()


@pytest.mark.parametrize("weighted", [False, True])
def test_best_error_not_above_floor_or_ceil(weighted):
    x = varied(32, 1024, seed=8)
    imp = torch.rand(1024, generator=torch.Generator().manual_seed(9)) ** 4 if weighted else None
    wv = (imp if weighted else torch.ones(1024)).double().numpy()
    xv = x.double().numpy()

    def block_sse(rule):
        c, e = quantize_mxfp4(x, rule=rule, weights=imp)
        d = brute_force_dequant(x.numpy(), e.numpy())  # textbook values for the chosen exponents
        np.testing.assert_array_equal(dequantize_mxfp4(c, e).double().numpy(), d)
        return (((xv - d) ** 2) * wv).reshape(32, -1, 32).sum(-1), e.numpy()

    best, e_best = block_sse("best")
    floor, e_floor = block_sse("floor")
    ceil, e_ceil = block_sse("ceil")
    assert ((e_best == e_floor) | (e_best == e_ceil)).all()
    assert (best <= floor * (1 + 1e-12)).all() and (best <= ceil * (1 + 1e-12)).all()
    assert best.sum() < min(floor.sum(), ceil.sum())  # it really mixes the two
    assert DEFAULT_RULE == "best"


def test_leading_dims_and_dtypes():
    x = varied(12, 128, seed=10).view(3, 4, 128)
    codes, exps = quantize_mxfp4(x)
    assert codes.shape == (3, 4, 128) and exps.shape == (3, 4, 4) and codes.dtype == torch.uint8
    flat_c, flat_e = quantize_mxfp4(x.reshape(12, 128))
    assert torch.equal(codes.reshape(12, 128), flat_c) and torch.equal(exps.reshape(12, 4), flat_e)
    xb = x.to(torch.bfloat16)
    assert torch.equal(quantize_mxfp4(xb)[0], quantize_mxfp4(xb.float())[0])
    assert dequantize_mxfp4(codes, exps, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("rule", ["floor", "ceil", "best"])
def test_cuda_matches_cpu(rule):
    x = varied(64, 2048, seed=11)
    c, e = quantize_mxfp4(x, rule=rule)
    cg, eg = quantize_mxfp4(x.cuda(), rule=rule)
    assert torch.equal(cg.cpu(), c) and torch.equal(eg.cpu(), e)
    assert torch.equal(dequantize_mxfp4(cg, eg).cpu(), dequantize_mxfp4(c, e))


def test_bad_inputs_raise_quantkit_error():
    with pytest.raises(QuantkitError, match=r"blk\.0\.ffn_up\.weight.*\(4, 48\)"):
        quantize_mxfp4(torch.zeros(4, 48), name="blk.0.ffn_up.weight")
    with pytest.raises(QuantkitError, match="rule"):
        quantize_mxfp4(torch.zeros(4, 32), rule="nearest")
    with pytest.raises(QuantkitError, match=r"\(64,\)"):
        quantize_mxfp4(torch.zeros(4, 64), weights=torch.ones(32))
    with pytest.raises(QuantkitError, match="inf/NaN"):
        quantize_mxfp4(torch.full((1, 32), float("inf")))
    with pytest.raises(QuantkitError, match="floating-point"):
        quantize_mxfp4(torch.zeros(1, 32, dtype=torch.int32))
    with pytest.raises(QuantkitError, match="exps"):
        dequantize_mxfp4(torch.zeros(2, 64, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(QuantkitError, match="multiple of 34"):
        from_gguf_mxfp4(torch.zeros(50, dtype=torch.uint8), 64)
    with pytest.raises(QuantkitError, match="down_proj_scales"):
        from_gpt_oss(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8), "down_proj")


# ---------------------------------------------------------------- gpt-oss (transformers oracle)

def _transformers_mxfp4():
    mod = pytest.importorskip("transformers.integrations.mxfp4")
    return mod.convert_moe_packed_tensors


def test_gpt_oss_layout_dequantizes_with_transformers():
    convert = _transformers_mxfp4()
    x = varied(3 * 64, 256, seed=12).view(3, 64, 256)  # [E, out, in] like down_proj / gate_up_proj rows
    codes, exps = quantize_mxfp4(x)
    blocks, scales = to_gpt_oss(codes, exps)
    assert blocks.shape == (3, 64, 8, 16) and scales.shape == (3, 64, 8)
    ref = convert(blocks, scales, dtype=torch.float32)  # transformers returns [E, in, out]
    assert torch.equal(ref, dequantize_mxfp4(codes, exps).transpose(1, 2))
    c2, e2 = from_gpt_oss(blocks, scales)
    assert torch.equal(c2, codes) and torch.equal(e2, exps)


def test_gpt_oss_gate_up_split_matches_transformers_gate_and_up():
    convert = _transformers_mxfp4()
    rng = np.random.default_rng(13)
    e_, ff, hidden = 2, 32, 64
    blocks = torch.from_numpy(rng.integers(0, 256, (e_, 2 * ff, hidden // 32, 16), dtype=np.uint8))
    scales = torch.from_numpy(rng.integers(110, 140, (e_, 2 * ff, hidden // 32), dtype=np.uint8))
    fused = convert(blocks, scales, dtype=torch.float32)  # [E, hidden, 2*ff], as GptOssExperts.gate_up_proj
    gate_ref, up_ref = fused[..., ::2], fused[..., 1::2]  # GptOssExperts._apply_gate's split
    (gc, ge), (uc, ue) = split_gate_up(*from_gpt_oss(blocks, scales))
    assert torch.equal(dequantize_mxfp4(gc, ge).transpose(1, 2), gate_ref)
    assert torch.equal(dequantize_mxfp4(uc, ue).transpose(1, 2), up_ref)
    mc, me = merge_gate_up((gc, ge), (uc, ue))
    b2, s2 = to_gpt_oss(mc, me)
    assert torch.equal(b2, blocks) and torch.equal(s2, scales)


def test_gpt_oss_to_gguf_repack_without_requantization():
    convert = _transformers_mxfp4()
    rng = np.random.default_rng(14)
    blocks = torch.from_numpy(rng.integers(0, 256, (2, 16, 4, 16), dtype=np.uint8))
    scales = torch.from_numpy(rng.integers(100, 150, (2, 16, 4), dtype=np.uint8))
    data = gpt_oss_to_gguf(blocks, scales)
    assert data.shape == (2, 16, 4 * 17)
    via_gguf = gguf.quants.dequantize(data.numpy().reshape(32, -1), MXFP4).reshape(2, 16, 128)
    via_hf = convert(blocks, scales, dtype=torch.float32).transpose(1, 2).numpy()
    np.testing.assert_array_equal(via_gguf, via_hf)
    b2, s2 = gguf_to_gpt_oss(data, 128)
    assert torch.equal(b2, blocks) and torch.equal(s2, scales)


# ---------------------------------------------------------------- compressed-tensors oracle

def _ct():
    base = pytest.importorskip("compressed_tensors.compressors.mxfp4.base")
    qs = pytest.importorskip("compressed_tensors.quantization.quant_scheme")
    from compressed_tensors.quantization import QuantizationScheme

    return base.MXFP4PackedCompressor, QuantizationScheme(targets=["Linear"], **qs.MXFP4A16)


def test_compressed_tensors_decompress_matches():
    comp, scheme = _ct()
    x = varied(64, 256, seed=15)
    codes, exps = quantize_mxfp4(x)
    sd = to_compressed_tensors(codes, exps)
    assert sd["weight_packed"].shape == (64, 128) and sd["weight_scale"].shape == (64, 8)
    out = comp.decompress(dict(sd), scheme)
    ours = dequantize_mxfp4(codes, exps)
    assert torch.equal(out["weight"].float(), ours)  # on-grid values are exact in bf16
    c2, e2 = from_compressed_tensors(sd["weight_packed"], sd["weight_scale"])
    assert torch.equal(c2, codes) and torch.equal(e2, exps)


def test_compressed_tensors_compress_gives_same_bytes():
    comp, scheme = _ct()
    x = varied(32, 128, seed=16)
    codes, exps = quantize_mxfp4(x)
    scale = torch.ldexp(torch.ones(exps.shape), exps.to(torch.int32) - 127)
    out = comp.compress({"weight": dequantize_mxfp4(codes, exps, dtype=torch.bfloat16),
                         "weight_scale": scale.to(torch.bfloat16)}, scheme)
    ours = to_compressed_tensors(codes, exps)
    assert torch.equal(out["weight_packed"], ours["weight_packed"])
    assert torch.equal(out["weight_scale"], ours["weight_scale"])
