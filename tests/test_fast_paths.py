"""The CPU fast paths of calibration against the plain forms they replace: the compiled GPTQ column step
against the torch column loop (what CUDA runs), the half-triangle Hessian sums and quadratic forms against
plain products (and the bf16 products of bf16 inputs against float64 ones), and AWQ's Hessian form of a linear block's loss against the block's forward."""

import pytest
import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.quant import awq_search, gptq_columns, hessian
from quantkit.quant.gptq import GPTQ


def _case(out_f, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g) / n**0.5)
    w = torch.randn(out_f, n, generator=g) * 0.05
    return x, w


@pytest.mark.parametrize("group_size,sym,desc_act,static", [
    (64, False, False, False), (32, True, False, False), (-1, False, False, False),
    (64, False, True, False), (64, True, True, True), (48, False, False, False)])
def test_compiled_columns_equal_torch_loop(monkeypatch, group_size, sym, desc_act, static):
    x, w = _case(40, 192)
    gp = GPTQ(192)
    gp.add_batch(x)
    kw = dict(bits=4, group_size=group_size, sym=sym, desc_act=desc_act, static_groups=static, block_size=80)
    fast, info_fast = gp.quantize(w, **kw)
    monkeypatch.setattr(gptq_columns, "usable", lambda *t: False)
    slow, info_slow = gp.quantize(w, **kw)
    # the same arithmetic per element, in the same order: identical results
    assert torch.equal(fast.codes, slow.codes)
    assert torch.equal(fast.scales, slow.scales) and torch.equal(fast.zeros, slow.zeros)
    assert info_fast["loss"] == pytest.approx(info_slow["loss"], rel=1e-5)


def test_compiled_columns_split_over_threads_give_the_same_bytes(monkeypatch):
    """Rows go to threads in contiguous parts; each row's loss is kept apart and summed in row order, so codes,
    scales and the loss do not depend on the thread count."""
    x, w = _case(300, 192, seed=2)
    gp = GPTQ(192)
    gp.add_batch(x)
    monkeypatch.setattr(gptq_columns, "MIN_ROWS", 16)
    runs, n0 = [], torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(gp.quantize(w, bits=4, group_size=64, sym=False, block_size=80))
    finally:
        torch.set_num_threads(n0)
    for ql, info in runs[1:]:
        assert torch.equal(ql.codes, runs[0][0].codes) and torch.equal(ql.scales, runs[0][0].scales)
        assert info["loss"] == runs[0][1]["loss"]


def test_half_triangle_hessian_and_quad_equal_full_products():
    x, w = _case(30, 300, seed=1)
    acc = torch.zeros(300, 300)
    hessian.add_xtx(acc, x[:200])
    hessian.add_xtx(acc, x[200:])
    H = hessian.symmetric(acc)
    full = x.double().T @ x.double()
    assert torch.allclose(H.double(), full, rtol=1e-5, atol=1e-3)
    q = hessian.quad(w.double(), full)
    assert torch.allclose(q, ((w.double() @ full) * w.double()).sum(1), rtol=1e-12)


def test_bf16_hessian_products_within_one_bf16_rounding_per_call():
    """bf16 inputs on the CPU: bf16 GEMMs whose outputs are rounded once per call, added into float32 sums; the
    diagonal summed in float32. Oracle: float64 products of the same bf16 values."""
    x, _ = _case(1, 300, seed=3)
    xb = x.bfloat16()
    acc = torch.zeros(300, 300)
    chunks = (xb[:200], xb[200:])
    for c in chunks:
        hessian.add_xtx(acc, c)
    H = hessian.symmetric(acc).double()
    full = xb.double().T @ xb.double()
    d = full.diagonal()
    assert torch.allclose(H.diagonal(), d, rtol=1e-6)
    # per call, |rounding| <= 2^-9 |C_ij| <= 2^-9 sqrt(C_ii C_jj) (Cauchy-Schwarz), plus float32 sums
    bound = sum((c.double().square().sum(0)[:, None] * c.double().square().sum(0)[None, :]).sqrt()
                for c in chunks) * 2.0**-9 + 1e-5 * (d[:, None] * d[None, :]).sqrt()
    err = (H - full).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    # the bf16 path was taken: float32 GEMMs of these values err ~3e-7 of sqrt(C_ii C_jj), bf16 outputs ~6e-4
    assert float((err / (d[:, None] * d[None, :]).sqrt()).max()) > 1e-5


def test_shares_computed_apart_add_up_to_the_sums():
    """GPTQ.product / add_product (a sample's share computed on its forward's thread, added in order): float32
    within float32 error of float64 products; bf16 the same bits as add_batch of the same inputs (without
    gathering); token counts and the order with gathered batches kept."""
    x, _ = _case(1, 300, seed=5)
    full = x.double().T @ x.double()
    gp = GPTQ(300)
    for c in (x[:120], x[120:], x[:0]):
        gp.add_product(gp.product(c))
    n = x.shape[0]
    assert gp.nsamples == n
    assert torch.allclose(gp.H.double() * n / 2, full, rtol=1e-5, atol=1e-3)
    xb = x.bfloat16()
    a, b = GPTQ(300), GPTQ(300)
    for c in (xb[:120], xb[120:]):
        a.add_batch(c)
        b.add_product(b.product(c))
    assert torch.equal(a.H, b.H) and a.nsamples == b.nsamples == n
    g1, g2 = GPTQ(300, gather=True), GPTQ(300, gather=True)  # a gathered batch goes in first
    g1.add_batch(xb[:50])
    g1.add_product(g1.product(xb[50:]))
    g2.add_batch(xb[:50])
    g2._flush()
    g2.add_batch(xb[50:])
    assert torch.equal(g1.H, g2.H)
    with pytest.raises(QuantkitError, match="features"):
        gp.product(x[:, :10])


def test_gathered_bf16_batches_are_one_product_and_flushed_when_read(monkeypatch):
    """GPTQ(gather=True) keeps bf16 batches until GATHER_TOKENS rows, then adds them as one product: the same
    sums as one add_batch of their concatenation; reading H or nsamples flushes what waits."""
    from quantkit.quant import gptq
    monkeypatch.setattr(gptq, "GATHER_TOKENS", 250)
    x, _ = _case(1, 96, seed=4)
    xb = x.bfloat16()
    g, ref = GPTQ(96, gather=True), GPTQ(96)
    for a, b in ((0, 100), (100, 200)):  # 200 rows wait
        g.add_batch(xb[a:b][None])
    assert g.nsamples == 200  # read: flushed
    ref.add_batch(xb[:200])
    assert torch.equal(g.H, ref.H)
    for a, b in ((200, 300), (300, 400), (400, 512)):  # 100 + 100 wait; 112 more would pass 250: flush first
        g.add_batch(xb[a:b])
    ref.add_batch(xb[200:400])
    ref.add_batch(xb[400:512])
    assert g.nsamples == ref.nsamples == 512
    assert torch.equal(g.H, ref.H)
    full = 2 / 512 * xb.double().T @ xb.double()
    assert torch.allclose(g.H.double(), full, rtol=1e-2, atol=1e-3 * float(full.diagonal().mean()))
    big = GPTQ(96, gather=True)  # a batch of more rows than the buffer goes straight in
    big.add_batch(xb)
    one = GPTQ(96)
    one.add_batch(xb)
    assert torch.equal(big.H, one.H)


def test_awq_linear_block_loss_through_hessian_equals_forward():
    torch.manual_seed(0)
    lin = nn.Linear(256, 96)
    x = torch.randn(6, 64, 256) * torch.rand(256) * 4
    cfg = awq_search.AWQConfig(bits=4, group_size=64)
    grids = {"o": (4, 64, False)}
    s_h, hist_h = awq_search.search_scale(x, {"o": lin}, lin, cfg, grids, "cpu")  # the linear itself: Hessian
    s_f, hist_f = awq_search.search_scale(x, {"o": lin}, lambda t: lin(t), cfg, grids, "cpu")  # forwards
    assert hist_h == pytest.approx(hist_f, rel=1e-5)
    assert torch.equal(s_h, s_f)
    w0 = lin.weight.detach().clone()
    awq_search.search_scale(x, {"o": lin}, lin, cfg, grids, "cpu")
    assert torch.equal(lin.weight, w0)  # the weight is left as it was
    p = w0.clone()  # a bare (expert) weight as its own block
    s_p, hist_p = awq_search.search_scale(x, {"o": p}, awq_search.WeightBlock(p), cfg, grids, "cpu")
    assert hist_p == pytest.approx(hist_f, rel=1e-5) and torch.equal(s_p, s_f) and torch.equal(p, w0)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q5_1", "Q8_0"])
def test_compiled_kquant_rounding_equals_torch_loop(monkeypatch, qtype):
    from gguf import GGMLQuantizationType as QT

    from quantkit.quant.kquant_gptq import gptq_quantize
    x, w = _case(24, 512, seed=2)
    H = x.T @ x
    fast, info_fast = gptq_quantize(w, QT[qtype], H)
    monkeypatch.setattr(gptq_columns, "usable", lambda *t: False)
    slow, info_slow = gptq_quantize(w, QT[qtype], H)
    assert torch.equal(fast, slow)
    assert info_fast["loss_h"] == pytest.approx(info_slow["loss_h"], rel=1e-6)


def test_awq_two_stage_search_picks_the_best_of_the_subsets_top_on_all_samples():
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(128, 256), nn.SiLU(), nn.Linear(256, 128))
    gate = mlp[0]
    x = torch.randn(40, 16, 128) * (torch.rand(128) * 3 + 0.1)
    grids = {"g": (3, 32, False)}
    full_cfg = awq_search.AWQConfig(bits=3, group_size=32, search_fraction=1.0)
    cfg = awq_search.AWQConfig(bits=3, group_size=32, search_fraction=0.25, search_min_samples=4, search_top=3)
    s_full, hist_full = awq_search.search_scale(x, {"g": gate}, mlp, full_cfg, grids, "cpu")
    s_two, hist_sub = awq_search.search_scale(x, {"g": gate}, mlp, cfg, grids, "cpu")
    first, rest = awq_search.search_subset(40, cfg)
    assert len(first) == 10 and len(rest) == 30 and sorted(first + rest) == list(range(40))
    # the oracle: every grid point on the subset by plain forwards, the 3 best of them on all 40 samples
    w0 = gate.weight.detach().clone()
    ref = mlp(x).detach()
    x_mean = x.reshape(-1, 128).abs().mean(0)
    wg = w0.abs().reshape(256, 4, 32)
    w_mean = (wg / (wg.amax(-1, keepdim=True) + 1e-6)).reshape(256, 128).mean(0)
    scales = {}

    def loss(r, idx):  # AWQ's duo scaling at ratio r/20; Q(w s)/s as the search stores it
        sc = (x_mean.pow(r / 20) / (w_mean.pow(1 - r / 20) + 1e-4)).clamp(min=1e-4)
        scales[r] = sc = sc / (sc.max() * sc.min()).sqrt()
        with torch.no_grad():
            gate.weight.data = awq_search._fake_quant_cols(w0, sc, (3, 32, False), torch.float16)
            e = (mlp(x[idx]) - ref[idx]).pow(2).mean().item()
            gate.weight.data = w0.clone()
        return e
    sub = [loss(r, first) for r in range(20)]
    assert sub == pytest.approx(hist_sub, rel=1e-4)
    top = sorted(range(20), key=lambda r: sub[r])[:3]
    pick = min(top, key=lambda r: loss(r, list(range(40))))
    assert torch.allclose(s_two, scales[pick])
    assert hist_full[pick] <= min(hist_full) * 1.05  # and it is (near) the full search's best

