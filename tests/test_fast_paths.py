"""The CPU fast paths of calibration against the plain forms they replace: the compiled GPTQ column step
against the torch column loop (what CUDA runs), the half-triangle Hessian sums and quadratic forms against
plain products, and AWQ's Hessian form of a linear block's loss against the block's forward."""

import pytest
import torch
from torch import nn

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
