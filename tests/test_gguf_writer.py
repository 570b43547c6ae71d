"""Our GGUF files against llama.cpp (loads + logits) and the gguf package's reader."""

import shutil

import numpy as np
import pytest
import torch

from quantkit.export import convert_to_gguf
from quantkit.families import load
from quantkit.formats.gguf_reader import load_gguf
from quantkit.runtime import executor_for
from tiny_models import SPECS, hf_logits, make_tiny

VOCAB = 49152


def tiny_with_tokenizer(kind, tmp_path, tok_dir, **kw):
    d = make_tiny(kind, tmp_path / kind, vocab=VOCAB, **kw)
    for f in tok_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.mark.support("out_gguf", "llamacpp")
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_llamacpp_logits_match_transformers(kind, tmp_path, smollm_tokenizer_dir):
    from oracles.llamacpp_model import LlamaModel
    d = tiny_with_tokenizer(kind, tmp_path, smollm_tokenizer_dir)
    out = tmp_path / f"{kind}.gguf"
    convert_to_gguf(load(d), out, q="f32", progress=False)
    t = 8 if kind == "mistral" else 32  # llama.cpp's llama arch has no sliding window: stay inside it
    ids = torch.randint(0, VOCAB, (1, t), generator=torch.Generator().manual_seed(3))
    ref = hf_logits(d, ids)[0].numpy()
    with LlamaModel(out, n_ctx=64) as m:
        got = m.logits(ids[0].tolist())
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("q", ["f32", "f16", "bf16"])
def test_roundtrip_through_our_reader(q, tmp_path, smollm_tokenizer_dir):
    d = tiny_with_tokenizer("llama_gqa_llama3", tmp_path, smollm_tokenizer_dir)
    g = load(d)
    out = tmp_path / "m.gguf"
    convert_to_gguf(g, out, q=q, progress=False)
    g2 = load_gguf(out)
    assert g2.hparams.rope_scaling.kind == "freq_factors"  # llama3 scaling as llama.cpp stores it (rope_freqs)
    for name, t in g.tensors.items():
        a = t.load().float()
        b = g2[name].load().float()
        if q == "f32" or a.dim() == 1:
            assert torch.equal(a, b), name
        else:
            dt = torch.float16 if q == "f16" else torch.bfloat16
            assert torch.equal(a.to(dt).float(), b), name


def test_gguf_package_reads_our_metadata(tmp_path, smollm_tokenizer_dir):
    from gguf import GGUFReader
    d = tiny_with_tokenizer("qwen3", tmp_path, smollm_tokenizer_dir)
    out = tmp_path / "q.gguf"
    convert_to_gguf(load(d), out, q="f16", progress=False)
    r = GGUFReader(out)
    kv = {k: f.contents() for k, f in r.fields.items()}
    assert kv["general.architecture"] == "qwen3"
    assert kv["qwen3.attention.key_length"] == 32 and kv["qwen3.block_count"] == 2
    assert kv["general.file_type"] == 1
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == "F16"


@pytest.mark.llamacpp
def test_llamacpp_runs_our_q8_0(tmp_path, smollm_tokenizer_dir):
    from oracles.llamacpp_model import LlamaModel
    d = tiny_with_tokenizer("llama_tied", tmp_path, smollm_tokenizer_dir, hidden=128, ffn=256)
    out = tmp_path / "q8.gguf"
    convert_to_gguf(load(d), out, q="q8_0", progress=False)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    ours = executor_for(load_gguf(out))(ids)[0].numpy()  # our executor on the dequantized Q8_0 weights
    with LlamaModel(out, n_ctx=32) as m:
        got = m.logits(ids[0].tolist())
    # llama.cpp quantizes activations to Q8_0 for the dot products: close, not bit-equal
    assert np.corrcoef(got.ravel(), ours.ravel())[0, 1] > 0.999


@pytest.mark.support("out_gguf", "gguf_in")
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_gguf_input_executor_matches_transformers(kind, tmp_path, smollm_tokenizer_dir):
    """HF -> our GGUF (f32) -> our GGUF loader (un-permutes llama q/k) -> executor == transformers."""
    d = tiny_with_tokenizer(kind, tmp_path, smollm_tokenizer_dir)
    out = tmp_path / "m.gguf"
    convert_to_gguf(load(d), out, q="f32", progress=False)
    g = load(out)
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(5))
    if kind == "mistral":  # GGUF (llama arch) carries no sliding window
        ids = ids[:, :8]
    torch.testing.assert_close(executor_for(g)(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)


def test_hub_id_resolves_from_offline_cache(tmp_path, monkeypatch):
    d = make_tiny("qwen2", tmp_path / "src")
    snap = tmp_path / "hf" / "hub" / "models--someorg--tiny-qwen" / "snapshots" / "abc123"
    shutil.copytree(d, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import importlib

    import huggingface_hub.constants as c
    importlib.reload(c)
    try:
        g = load("someorg/tiny-qwen")
        assert g.hparams.arch == "qwen2" and g.source == str(snap)
    finally:
        monkeypatch.undo()
        importlib.reload(c)


def test_threaded_writer_is_byte_identical_and_fails_cleanly(tmp_path, smollm_tokenizer_dir, monkeypatch):
    """With 2 threads small tensors are produced ahead: the file must not change, and a failing producer
    must surface as the error (nothing written)."""
    d = tiny_with_tokenizer("llama_gqa_llama3", tmp_path, smollm_tokenizer_dir)
    g = load(d)
    n = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = tmp_path / f"t{threads}.gguf"
            convert_to_gguf(g, out, q="q5_k_m", progress=False)
            outs.append(out.read_bytes())
        assert outs[0] == outs[1]

        import quantkit.formats.gguf_writer as gw
        real = gw._as_bytes
        seen = []

        def boom(data, t):
            seen.append(t.name)
            if len(seen) == 5:
                raise RuntimeError("producer failed")
            return real(data, t)
        monkeypatch.setattr(gw, "_as_bytes", boom)
        before = set(tmp_path.iterdir())
        with pytest.raises(RuntimeError, match="producer failed"):
            convert_to_gguf(g, tmp_path / "bad.gguf", q="q5_k_m", progress=False)
        assert set(tmp_path.iterdir()) == before  # no output, no temporary left behind
    finally:
        torch.set_num_threads(n)
