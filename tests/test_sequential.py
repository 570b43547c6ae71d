"""Branch-by-branch calibration (calibration.stream.run_sequential) computes what whole-layer passes compute:
GPTQ through both gives the same bytes (dense and MoE), also when a block's declared output linear is not
really its last operation (the first-sample check must catch it), while each branch norm runs once per sample
(its outputs are kept for the later passes)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from moe_models import make_tiny_moe
from quantkit.families import load
from quantkit.quant import gptq_driver
from quantkit.quant.gptq_driver import GridOptions, quantize_layers
from tiny_models import make_tiny


def digest(graph, samples) -> str:
    h = hashlib.sha256()
    for _, part in quantize_layers(graph, samples, GridOptions(group_size=32, sym=False), progress=False):
        for name in sorted(part):
            for q in part[name] if isinstance(part[name], list) else [part[name]]:
                h.update(name.encode())
                for t in (q.codes, q.scales, q.zeros):
                    h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def whole_layer_passes(monkeypatch):
    """The driver's whole-layer path: every pass runs the layer from its input; the quantized layer is run
    again for the next layer's inputs."""
    def on_slot(self, slot, budget_bytes):
        slot.replacement = self.on_layer(slot.i, slot.layer, slot.store, slot.rope)
    monkeypatch.setattr(gptq_driver._Run, "on_slot", on_slot)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_branch_passes_equal_whole_layer_passes(kind, tmp_path, monkeypatch, one_thread):
    d = make_tiny("qwen2", tmp_path / "m", layers=3) if kind == "dense" else \
        make_tiny_moe("qwen2_moe", tmp_path / "m")
    g = load(d)
    samples = [torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(s)) for s in range(6)]
    from quantkit.blocks.norms import RMSNorm
    calls = [0]
    fwd = RMSNorm.forward

    def counted(self, x):
        calls[0] += 1
        return fwd(self, x)
    with monkeypatch.context() as m:
        m.setattr(RMSNorm, "forward", counted)
        staged = digest(g, samples)
    if kind == "dense":  # per layer and branch: one call per sample, one more for the first sample's check
        assert calls[0] == g.hparams.n_layers * 2 * (len(samples) + 1)
    with monkeypatch.context() as m:
        whole_layer_passes(m)
        assert digest(g, samples) == staged


def test_wrong_output_linear_declaration_is_caught(tmp_path, monkeypatch, one_thread):
    from quantkit.blocks.attention import AttentionModule
    g = load(make_tiny("llama_mha", tmp_path / "m", layers=2))
    samples = [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(s)) for s in range(5)]
    fwd = AttentionModule.forward
    monkeypatch.setattr(AttentionModule, "forward", lambda self, x, cos, sin: fwd(self, x, cos, sin) * 1.5)
    staged = digest(g, samples)  # attention still declares o as its output: the check must fall back
    whole_layer_passes(monkeypatch)
    assert digest(g, samples) == staged
