"""gemm.linear (float32 products through oneDNN) and the tiled causal attention built on it, against float64
torch products; bits at 1/2/3 threads; the fallbacks a caller relies on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from quantkit import gemm
from quantkit.blocks import causal_cpu

needs_onednn = pytest.mark.skipif(gemm._LINEAR is None, reason="torch without oneDNN's linear")


def _close(y, ref, k):
    # float32 sums of k products of unit normals: error grows at most ~k * 2^-24 * |terms|
    assert (y.double() - ref).abs().max().item() < 1e-6 * k * 4


@needs_onednn
@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (7, 576, 192), (512, 576, 1536), (300, 1536, 576)])
def test_linear_matches_float64(m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    assert gemm.onednn(x, w)
    ref = x.double() @ w.double().T + b.double()
    _close(gemm.linear(x, w, b), ref, k)
    _close(gemm.mm(x, w.T), ref - b.double(), k)


@needs_onednn
def test_strided_operands_give_the_contiguous_result():
    g = torch.Generator().manual_seed(1)
    big, x = torch.randn(64, 300, generator=g), torch.randn(200, 300, generator=g)
    w = big[10:40, :]  # rows of a larger matrix: contiguous
    blk = torch.randn(96, 96, generator=g)[8:40, 16:80]  # a block: neither row- nor column-major
    assert torch.equal(gemm.linear(x, w), gemm.linear(x, w.contiguous()))
    assert torch.equal(gemm.linear(x[:, :64], blk), gemm.linear(x[:, :64].contiguous(), blk.contiguous()))
    assert torch.equal(gemm.linear(x.T.contiguous().T, w), gemm.linear(x, w))


@needs_onednn
def test_same_bits_at_any_thread_count():
    g = torch.Generator().manual_seed(2)
    shapes = [(3, 576, 1536), (11, 1536, 576), (128, 64, 512), (128, 512, 64), (512, 576, 576), (2048, 576, 192)]
    n0 = torch.get_num_threads()
    try:
        for m, k, n in shapes:
            x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
            outs = []
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                outs.append(gemm.linear(x, w))
            assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), (m, k, n)
    finally:
        torch.set_num_threads(n0)


def test_fallbacks_are_f_linear():
    x, w = torch.randn(5, 8), torch.randn(4, 8)
    for a, b in ((x.bfloat16(), w.bfloat16()), (x, w.requires_grad_())):
        assert not gemm.onednn(a, b)
        assert torch.equal(gemm.linear(a, b), F.linear(a, b))
    seen = []

    class Tap(TorchFunctionMode):  # what imatrix's expert tap does
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Tap(), torch.no_grad():
        gemm.linear(x, w.detach())
    assert F.linear in seen


@needs_onednn
@pytest.mark.parametrize("b,h,hkv,t,d", [(1, 9, 3, 512, 64), (2, 4, 4, 200, 32), (1, 2, 1, 1, 16), (1, 2, 2, 129, 8),
                                         (1, 4, 2, 300, 16)])
def test_causal_attention_matches_float64_sdpa(b, h, hkv, t, d):
    g = torch.Generator().manual_seed(t)
    q = torch.randn(b, t, h, d, generator=g).transpose(1, 2)
    k, v = (torch.randn(b, t, hkv, d, generator=g).transpose(1, 2) for _ in range(2))
    rep = h // hkv
    ref = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(rep, 1),
                                         v.double().repeat_interleave(rep, 1), is_causal=True, scale=0.3)
    assert causal_cpu.usable(q)
    y = causal_cpu.causal(q, k, v, 0.3)
    assert y.shape == (b, t, h, d)
    assert (y.double() - ref.transpose(1, 2)).abs().max().item() < 1e-5
