"""GPTQ against a direct implementation of the paper's column-by-column update (no lazy
blocks, no Cholesky: full inverse Hessian with Gaussian-elimination removal), plus RTN,
dead columns, Hessian accumulation and damping increase."""

import itertools

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.quant.gptq import GPTQ
from quantkit.quant.rtn import rtn_quantize


def oracle_params(x, bits, sym, scale_dtype):
    """Min/max grid of the GPTQ paper's quantizer over rows of x (float64)."""
    maxq = 2**bits - 1
    lo = torch.clamp(x.min(dim=1).values, max=0.0)
    hi = torch.clamp(x.max(dim=1).values, min=0.0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    both0 = (lo == 0) & (hi == 0)
    lo[both0], hi[both0] = -1.0, 1.0
    scale = ((hi - lo) / maxq).to(scale_dtype).double()  # stored precision
    zero = torch.full_like(scale, 2 ** (bits - 1)) if sym else torch.round(-lo / scale)
    return scale, zero


def oracle_gptq(W, H, bits, group_size, sym, desc_act, static_groups, damp_percent, scale_dtype):
    """Textbook GPTQ/OBQ in float64. Returns codes, per-column scale/zero, g_idx, loss."""
    W = W.double().clone()
    H = H.double().clone()
    out_f, n = W.shape
    maxq = 2**bits - 1
    for i in range(n):
        if H[i, i] == 0:
            H[i, i] = 1.0
            W[:, i] = 0.0
    gs = n if group_size == -1 else group_size
    # column -> group id, and params per group for static/per-channel grids
    order = list(range(n))
    if desc_act:
        diag = [float(H[i, i]) for i in range(n)]
        order = sorted(range(n), key=lambda i: (-diag[i], i))
    static = {}
    if static_groups or group_size == -1:
        for g0 in range(0, n, gs):
            static[g0 // gs] = oracle_params(W[:, g0 : g0 + gs], bits, sym, scale_dtype)
    Wp = W[:, order].clone()
    Hp = H[order][:, order]
    Hp = Hp + damp_percent * torch.diagonal(Hp).mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(Hp)
    codes = torch.zeros(out_f, n, dtype=torch.long)
    col_scale = torch.zeros(out_f, n, dtype=torch.float64)
    col_zero = torch.zeros(out_f, n, dtype=torch.float64)
    g_idx = torch.zeros(n, dtype=torch.long)
    loss = 0.0
    cur = None
    for q in range(n):
        orig = order[q]
        if static:
            g = orig // gs
            cur = static[g]
        elif q % gs == 0:
            cur = oracle_params(Wp[:, q : q + gs], bits, sym, scale_dtype)
        g_idx[orig] = orig // gs if static else q // gs
        scale, zero = cur
        w = Wp[:, q]
        c = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
        qw = scale * (c - zero)
        codes[:, orig] = c.long()
        col_scale[:, orig], col_zero[:, orig] = scale, zero
        d = Hinv[q, q]
        err = (w - qw) / d
        loss += float(((w - qw) ** 2).sum() / d) / 2
        Wp[:, q + 1 :] -= torch.outer(err, Hinv[q, q + 1 :])
        Hinv = Hinv - torch.outer(Hinv[:, q], Hinv[q, :]) / d
    return codes, col_scale, col_zero, g_idx, loss


def correlated_x(n_tokens, n, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n)
    col_scale = torch.exp(torch.randn(n, generator=g))  # uneven diag(H) so act-order reorders
    return (torch.randn(n_tokens, n, generator=g) @ mix) * col_scale


def make_case(out_f=16, n=64, n_tokens=256, seed=0):
    X = correlated_x(n_tokens, n, seed)
    W = torch.randn(out_f, n, generator=torch.Generator().manual_seed(seed + 1))
    gp = GPTQ(n)
    gp.add_batch(X.reshape(4, n_tokens // 4, n))
    return W, X, gp


def expanded(ql):
    gi = ql.g_idx.long()
    return ql.scales.double()[:, gi], ql.zeros.double()[:, gi]


CASES = list(
    itertools.product(
        [4, 8],  # bits
        [16, 32, -1],  # group_size
        [True, False],  # sym
        ["none", "dynamic", "static"],  # act-order
        [24, 128],  # block_size (24: groups straddle lazy blocks)
    )
)


@pytest.mark.parametrize("bits,group_size,sym,order,block_size", CASES)
def test_gptq_matches_textbook_float64(bits, group_size, sym, order, block_size):
    W, X, gp = make_case(seed=bits * 7 + (group_size % 97))
    desc_act, static = order != "none", order == "static"
    ql, info = gp.quantize(
        W, bits, group_size, sym, desc_act, static, block_size=block_size, compute_dtype=torch.float64
    )
    codes, cs, cz, g_idx, loss = oracle_gptq(W, gp.H, bits, group_size, sym, desc_act, static, 0.01, torch.float16)
    assert torch.equal(ql.codes.long(), codes)
    assert torch.equal(ql.g_idx.long(), g_idx)
    s, z = expanded(ql)
    assert torch.equal(s, cs) and torch.equal(z, cz)
    assert torch.allclose(ql.dequantize(torch.float64), cs * (codes - cz), rtol=0, atol=1e-6)
    assert info["loss"] == pytest.approx(loss, rel=1e-9)
    assert info["damp_percent"] == 0.01 and info["damp_failed"] == []


@pytest.mark.parametrize(
    "bits,group_size,sym,order", [(2, 16, False, "dynamic"), (3, 32, True, "static"), (3, -1, False, "none"), (2, 32, True, "none")]
)
def test_gptq_low_bits_and_fp32_scales_match_textbook(bits, group_size, sym, order):
    W, X, gp = make_case(out_f=8, n=96, seed=3)
    desc_act, static = order != "none", order == "static"
    ql, _ = gp.quantize(W, bits, group_size, sym, desc_act, static, block_size=40, scale_dtype=torch.float32,
                        compute_dtype=torch.float64)
    codes, cs, cz, g_idx, _ = oracle_gptq(W, gp.H, bits, group_size, sym, desc_act, static, 0.01, torch.float32)
    assert ql.scales.dtype == torch.float32
    assert torch.equal(ql.codes.long(), codes) and torch.equal(ql.g_idx.long(), g_idx)
    assert torch.allclose(ql.dequantize(torch.float64), cs * (codes - cz), rtol=0, atol=1e-6)


@pytest.mark.parametrize("group_size,order", [(32, "none"), (16, "dynamic"), (32, "static"), (-1, "dynamic")])
def test_gptq_float32_close_to_textbook(group_size, order):
    """The default float32 path: codes agree except rare near-ties (and their row-wise cascade)."""
    W, X, gp = make_case(out_f=32, n=128, n_tokens=512, seed=11)
    desc_act, static = order != "none", order == "static"
    ql, info = gp.quantize(W, 4, group_size, False, desc_act, static, block_size=32)
    codes, cs, cz, _, loss = oracle_gptq(W, gp.H, 4, group_size, False, desc_act, static, 0.01, torch.float16)
    mismatch = (ql.codes.long() != codes).float().mean().item()
    assert mismatch <= 0.01
    assert info["loss"] == pytest.approx(loss, rel=1e-4)


def test_partial_last_group():
    """in % group_size != 0 (like 576 % 128): last group is smaller, textbook agrees."""
    W, X, gp = make_case(out_f=8, n=72, seed=5)
    for order in ["none", "dynamic", "static"]:
        desc_act, static = order != "none", order == "static"
        ql, _ = gp.quantize(W, 4, 32, False, desc_act, static, block_size=32, compute_dtype=torch.float64)
        codes, cs, cz, g_idx, _ = oracle_gptq(W, gp.H, 4, 32, False, desc_act, static, 0.01, torch.float16)
        assert ql.n_groups == 3 and int((ql.g_idx == 2).sum()) == 8
        assert torch.equal(ql.codes.long(), codes) and torch.equal(ql.g_idx.long(), g_idx)


@pytest.mark.parametrize(
    "bits,group_size,sym", [(4, 32, True), (4, 32, False), (3, 16, False), (8, -1, True), (2, 64, False)]
)
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size, sym):
    W, X, gp = make_case(out_f=48, n=128, n_tokens=1024, seed=21)
    ql, _ = gp.quantize(W, bits, group_size, sym, desc_act=True)
    rq = rtn_quantize(W, bits, group_size, sym)
    ref = W @ X.T
    err_gptq = (ql.dequantize() @ X.T - ref).norm()
    err_rtn = (rq.dequantize() @ X.T - ref).norm()
    assert err_gptq < 0.9 * err_rtn


def test_rtn_matches_direct_rounding():
    W = torch.randn(12, 80, generator=torch.Generator().manual_seed(2))
    for sym in (True, False):
        rq = rtn_quantize(W, 4, 32, sym)
        for g0 in range(0, 80, 32):
            s, z = oracle_params(W[:, g0 : g0 + 32].double(), 4, sym, torch.float16)
            c = torch.clamp(torch.round(W[:, g0 : g0 + 32].double() / s[:, None]) + z[:, None], 0, 15)
            assert torch.equal(rq.codes[:, g0 : g0 + 32].long(), c.long())
            want = s[:, None] * (c - z[:, None])
            assert torch.allclose(rq.dequantize(torch.float64)[:, g0 : g0 + 32], want, atol=1e-6)


def test_dead_columns():
    W, X, _ = make_case(out_f=16, n=64, seed=8)
    dead = [3, 17, 40, 41]
    X[:, dead] = 0
    gp = GPTQ(64)
    gp.add_batch(X)
    for order in ["none", "dynamic", "static"]:
        desc_act, static = order != "none", order == "static"
        ql, info = gp.quantize(W, 4, 16, False, desc_act, static, compute_dtype=torch.float64)
        codes, cs, cz, g_idx, _ = oracle_gptq(W, gp.H, 4, 16, False, desc_act, static, 0.01, torch.float16)
        assert info["dead_columns"] == 4
        assert torch.equal(ql.dequantize()[:, dead], torch.zeros(16, 4))
        assert torch.equal(ql.codes.long(), codes)


def test_add_batch_running_average_and_mask():
    n = 24
    X = correlated_x(300, n, 4)
    gp = GPTQ(n)
    gp.add_batch(X[:100].reshape(4, 25, n))
    gp.add_batch(X[100:101])
    mask = torch.zeros(2, 150, dtype=torch.bool)
    mask[0, :120] = True
    mask[1, :79] = True
    pad = torch.full((2, 150, n), 1e6)
    pad[0, :120] = X[101:221]
    pad[1, :79] = X[221:300]
    gp.add_batch(pad, mask=mask)
    assert gp.nsamples == 300
    Xd = X.double()
    assert torch.allclose(gp.H.double(), 2 / 300 * Xd.T @ Xd, rtol=1e-5, atol=1e-5)
    with pytest.raises(QuantkitError):
        gp.add_batch(torch.zeros(3, n + 1))


def test_singular_hessian_is_handled_by_damping():
    """Fewer tokens than features and duplicated inputs -> singular H; 1% damping suffices."""
    n = 48
    X = correlated_x(20, n, 9)
    X[:, 30:] = X[:, :18]
    gp = GPTQ(n)
    gp.add_batch(X)
    assert torch.linalg.matrix_rank(gp.H.double()) < n
    W = torch.randn(8, n)
    ql, info = gp.quantize(W, 4, 16, False, compute_dtype=torch.float64)
    codes, *_ = oracle_gptq(W, gp.H, 4, 16, False, False, False, 0.01, torch.float16)
    assert info["damp_failed"] == [] and torch.equal(ql.codes.long(), codes)


def test_cholesky_failure_increases_damping():
    """An indefinite H (min eigenvalue -3% of mean diag) needs damp_percent > 0.03."""
    n = 32
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(1.0, 3.0, n, dtype=torch.float64)
    H = Q @ torch.diag(lam) @ Q.T
    lam[0] = -0.03 * torch.diagonal(H).mean()
    H = Q @ torch.diag(lam) @ Q.T
    gp = GPTQ(n)
    gp.H = H.float()
    gp.nsamples = 1
    W = torch.randn(4, n, generator=g)
    ql, info = gp.quantize(W, 4, -1, True)
    Hf = gp.H.double()
    mean = torch.diagonal(Hf).mean()
    eye = torch.eye(n, dtype=torch.float64)
    dp = info["damp_percent"]
    assert info["damp_failed"] and info["damp_failed"][0] == 0.01 and dp not in info["damp_failed"]
    assert torch.linalg.eigvalsh(Hf + max(info["damp_failed"]) * mean * eye).min() < 0
    assert torch.linalg.eigvalsh(Hf + dp * mean * eye).min() > 0
    # GPTQModel's rule: the first damp_percent + k * 0.0025 that factors (the step below it does not)
    k = round((dp - 0.01) / 0.0025)
    assert dp == pytest.approx(0.01 + 0.0025 * k) and k >= 1
    assert torch.linalg.eigvalsh(Hf + (dp - 0.0025) * mean * eye).min() < 0
    with pytest.raises(QuantkitError, match="not positive definite"):
        gp.quantize(W, 4, -1, True, damp_auto_increment=0)


def test_bad_arguments():
    W, X, gp = make_case(out_f=4, n=32)
    with pytest.raises(QuantkitError):
        gp.quantize(W, bits=5)
    with pytest.raises(QuantkitError):
        gp.quantize(W[:, :16])
    with pytest.raises(QuantkitError):
        GPTQ(32).quantize(W)
    with pytest.raises(QuantkitError):
        gp.quantize(W, damp_percent=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gptq_cuda_matches_cpu():
    W, X, gp = make_case(out_f=16, n=64, seed=4)
    gc = GPTQ(64)
    gc.add_batch(X.cuda())
    assert gc.H.is_cuda
    for order in ["none", "dynamic"]:
        ql_c, _ = gc.quantize(W.cuda(), 4, 16, False, order != "none", compute_dtype=torch.float64)
        codes, *_ = oracle_gptq(W, gc.H.cpu(), 4, 16, False, order != "none", False, 0.01, torch.float16)
        assert ql_c.codes.is_cuda and torch.equal(ql_c.codes.cpu().long(), codes)


SHARED = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared"
SMOL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(not SMOL.exists(), reason="SmolLM2 GGUF not in ../shared")
def test_gptq_on_smollm2_attn_q_real_activations():
    """blk.0.attn_q of SmolLM2 (576 x 576; group 128 leaves a partial last group of 64)
    with its true layer-0 inputs attn_norm(token_embd[id]); GPTQ beats RTN on held-out tokens."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(SMOL))
    t = {x.name: x for x in reader.tensors}

    def load(name, rows=None):
        data = t[name].data if rows is None else t[name].data[rows]  # quantized rows decode independently
        return torch.from_numpy(dequantize(data, t[name].tensor_type).copy()).float()

    ids = torch.randint(0, 20000, (3072,), generator=torch.Generator().manual_seed(0))
    e = load("token_embd.weight", ids.numpy())
    norm_w, wq = load("blk.0.attn_norm.weight"), load("blk.0.attn_q.weight")
    x = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w
    calib, held = x[:2048], x[2048:]
    gp = GPTQ(576, name="blk.0.attn_q")
    gp.add_batch(calib.reshape(8, 256, 576))
    for sym in (True, False):
        ql, info = gp.quantize(wq, 4, 128, sym, desc_act=True)
        assert ql.n_groups == 5 and int((ql.g_idx == 4).sum()) == 64  # 576 % 128 = 64
        rq = rtn_quantize(wq, 4, 128, sym)
        ref = held @ wq.T
        err_gptq = (held @ ql.dequantize().T - ref).norm()
        err_rtn = (held @ rq.dequantize().T - ref).norm()
        assert err_gptq < 0.85 * err_rtn, (float(err_gptq), float(err_rtn))
