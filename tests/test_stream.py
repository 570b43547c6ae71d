"""Layer streaming: with no changes it reproduces the whole-model executor (itself checked against
transformers in test_families), in RAM and through the disk-backed activation store; a replaced layer feeds
the next layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantkit.calibration.stream import ActivationStore, stream_layers
from quantkit.families import load
from quantkit.runtime.model import CausalLM
from tiny_models import hf_logits, make_tiny


class _Capture(nn.Module):
    """Wraps the last layer and keeps its outputs (the final hidden states)."""

    def __init__(self, layer, out: list):
        super().__init__()
        self.layer, self.out = layer, out

    def forward(self, x, cos, sin):
        y = self.layer(x, cos, sin)
        self.out.append(y.clone())
        return y


def _stream_logits(g, samples, budget=4 * 2**30, replace=None, seen=None):
    ex = CausalLM(g, keep=False)
    finals: list = []
    n = g.hparams.n_layers

    def on_layer(i, layer, inputs, rope):
        if seen is not None:
            seen.append((i, inputs.on_disk, inputs.data.shape))
        if replace is not None and i in replace:
            layer = replace[i](layer)
        return _Capture(layer, finals) if i == n - 1 else layer
    stream_layers(g, samples, on_layer, budget_bytes=budget, progress=False, executor=ex)
    return ex.head(torch.cat(finals)).float()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load(make_tiny("llama_gqa_llama3", tmp_path_factory.mktemp("s") / "m", layers=3))


@pytest.fixture(scope="module")
def samples():
    return list(torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0)))


def test_stream_reproduces_executor(tiny, samples):
    ref = CausalLM(tiny)(torch.stack(samples))
    got = _stream_logits(tiny, samples).view_as(ref)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    hf = hf_logits(tiny.source, torch.stack(samples))
    torch.testing.assert_close(got, hf, atol=2e-5, rtol=1e-4)


def test_disk_offload_same_result(tiny, samples):
    seen = []
    got = _stream_logits(tiny, samples, budget=1024, seen=seen)
    assert [s[0] for s in seen] == [0, 1, 2] and all(s[1] for s in seen)
    assert all(tuple(s[2]) == (3, 20, 64) for s in seen)
    ref = _stream_logits(tiny, samples)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_activation_store_roundtrip():
    x = torch.randn(4, 5, 6)
    for budget in (1, 2**30):
        st = ActivationStore(4, 5, 6, budget_bytes=budget)
        assert st.on_disk == (budget == 1)
        for i in range(4):
            st[i] = x[i]
        torch.testing.assert_close(torch.cat(list(st.batches("cpu", torch.float32, batch=3))), x, atol=0, rtol=0)


def test_replaced_layer_feeds_next(tiny, samples):
    """on_layer's replacement is what the following layers see (GPTQ's sequential mode)."""
    class Scaled(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x, cos, sin):
            return self.layer(x, cos, sin) * 0.5

    got = _stream_logits(tiny, samples, replace={1: Scaled})
    ex = CausalLM(tiny)
    ex.set_layer(1, Scaled(ex.layer(1)))
    ref = ex(torch.stack(samples))
    torch.testing.assert_close(got.view_as(ref), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref, CausalLM(tiny)(torch.stack(samples)), atol=1e-3)
