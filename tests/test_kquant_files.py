"""Whole GGUF files: `quantkit convert --q ...` vs llama.cpp's llama_model_quantize on the same F32 GGUF.

The source is the permuted SmolLM2 (its Q4_1 grid broken, so every block search does real work) cut to its
first 2 layers and written as F32. Both tools must pick the same type for every tensor and write the same
bytes; our files must load and run in llama.cpp. (The 30-layer type plan is checked in test_mixtures.)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from quantkit.export import FILE_TYPES, convert_to_gguf
from quantkit.families import load
from quantkit.pipeline import convert
from quantkit.transforms import permute_dense

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]
N_LAYERS = 2


@pytest.fixture(scope="module")
def f32_gguf(smollm_gguf, tmp_path_factory):
    g = permute_dense(load(smollm_gguf), seed=0)
    hp = dataclasses.replace(g.hparams, n_layers=N_LAYERS)
    keep = {n: t for n, t in g.tensors.items() if not n.startswith("blk.") or int(n.split(".")[1]) < N_LAYERS}
    out = tmp_path_factory.mktemp("kqf") / "f32.gguf"
    convert_to_gguf(g.with_tensors(keep, hparams=hp), out, q="f32", progress=False)
    return out


def tensors(path):
    return {t.name: t for t in GGUFReader(path).tensors}


@pytest.mark.support("kquants", "llamacpp", family="llama")
@pytest.mark.parametrize("q", ["q4_k_m", "q5_k_m", "q6_k", "q8_0"])
def test_file_bytes_match_llama_quantize(f32_gguf, tmp_path, q):
    from oracles.llamacpp_model import LlamaModel, quantize_file
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = tmp_path / "ours.gguf"
        convert(f32_gguf, ours, to="gguf", q=q, progress=False)
    finally:
        torch.set_num_threads(n)
    ref = tmp_path / "llama.gguf"
    quantize_file(f32_gguf, ref, int(FILE_TYPES[q]))
    a, b = tensors(ours), tensors(ref)
    assert sorted(a) == sorted(b)
    plan_a = {k: t.tensor_type.name for k, t in a.items()}
    plan_b = {k: t.tensor_type.name for k, t in b.items()}
    assert plan_a == plan_b
    assert len(set(plan_a.values())) >= 2 or q in ("q6_k", "q8_0")  # the mixture really mixes
    bad = [k for k in a if not np.array_equal(np.asarray(a[k].data), np.asarray(b[k].data))]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"
    # our file loads and runs in llama.cpp, and (same bytes) gives llama.cpp's own file's logits
    ids = [1] + [int(t) for t in torch.randint(2, 49152, (31,), generator=torch.Generator().manual_seed(0))]
    with LlamaModel(ours, n_ctx=32) as m:
        la = m.logits(ids)
    with LlamaModel(ref, n_ctx=32) as m:
        lb = m.logits(ids)
    assert np.isfinite(la).all() and np.array_equal(la, lb)
