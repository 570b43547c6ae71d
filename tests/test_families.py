import pytest
import torch

from quantkit.families import load
from quantkit.runtime.model import CausalLM
from tiny_models import SPECS, hf_logits, make_tiny


@pytest.mark.support("load", "run")
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_executor_matches_transformers(kind, tmp_path):
    d = make_tiny(kind, tmp_path / kind)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(d, ids)
    g = load(d)
    ours = CausalLM(g)(ids)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_hparams_read(tmp_path):
    g = load(make_tiny("llama_gqa_llama3", tmp_path / "m"))
    hp = g.hparams
    assert (hp.n_heads, hp.n_kv_heads, hp.head_dim) == (4, 2, 16)
    assert hp.rope_scaling.kind == "llama3" and hp.rope_scaling.factor == 8.0
    g = load(make_tiny("qwen3", tmp_path / "q"))
    assert g.hparams.qk_norm and g.hparams.head_dim == 32
    assert "blk.0.attn_q_norm.weight" in g


def test_lazy_nothing_read_until_asked(tmp_path, monkeypatch):
    from quantkit.formats import safetensors_io
    calls = []
    orig = safetensors_io.SafetensorsFile.tensor
    monkeypatch.setattr(safetensors_io.SafetensorsFile, "tensor", lambda self, n: calls.append(n) or orig(self, n))
    g = load(make_tiny("llama_mha", tmp_path / "m"))
    assert calls == []
    g["blk.1.ffn_up.weight"].load()
    assert calls == ["model.layers.1.mlp.up_proj.weight"]
