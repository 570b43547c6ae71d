"""Mistral (sliding window), Qwen2 (q/k/v biases, tied embeddings), Qwen3 (q/k norms): RTN, GPTQ and AWQ through
the CLI into each checkpoint layout, every one read by an oracle that is not quantkit's reader: a textbook RTN,
the GPTQ and AutoAWQ bit layouts decoded by the decoders written in test_gptq_e2e / test_awq_layout,
compressed-tensors' own decompressor, and transformers loading the compressed-tensors checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_gptq_e2e import HF_PROJ, decode_gptq_module
from tiny_models import SPECS, make_tiny

from quantkit.cli import main
from quantkit.families import load
from quantkit.quant.gptq_driver import sha256_of
from quantkit.runtime import executor_for

KINDS = ["mistral", "qwen2", "qwen3"]
VOCAB = 49152
CALIB = ["--calib-samples", "8", "--calib-seqlen", "64"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm_tokenizer_dir):
    root = tmp_path_factory.mktemp("dense_q")
    out = {}
    for k in KINDS:
        d = make_tiny(k, root / k, vocab=VOCAB)
        for f in smollm_tokenizer_dir.iterdir():
            shutil.copy(f, d / f.name)
        out[k] = d
    return out


@pytest.fixture(scope="module")
def calib(tmp_path_factory, jargon_text):
    p = tmp_path_factory.mktemp("dense_q_text") / "calib.txt"
    p.write_text(jargon_text[:20_000])
    return p


def convert(src, out, *args):
    main([str(a) for a in ("convert", src, "-o", out, "--to", "safetensors", "--no-progress", *args)])
    return out


def report(out) -> dict:
    return json.loads((out / "quantkit_report.json").read_text())


def modules(out, name):
    """HF module prefix of a canonical projection name, and its stored tensors."""
    i, suffix = name.split(".")[1], name.split(".")[2]
    p = f"model.layers.{i}.{HF_PROJ[suffix]}."
    return p, {k[len(p):]: v for k, v in load_file(out / "model.safetensors").items() if k.startswith(p)}


def textbook_rtn(w: torch.Tensor, gs: int = 32) -> torch.Tensor:
    """Symmetric 4-bit RTN per group: scale 2 max|w| / 15 (fp16), codes round(w / scale) + 8 in [0, 15]."""
    g = w.float().reshape(w.shape[0], -1, gs)
    scale = (2 * g.abs().amax(-1, keepdim=True) / 15).half().float()
    return ((torch.clamp(torch.round(g / scale) + 8, 0, 15) - 8) * scale).reshape(w.shape)


def kld(base: torch.Tensor, q: torch.Tensor) -> float:
    lb, lq = torch.log_softmax(base.double(), -1), torch.log_softmax(q.double(), -1)
    return float((lb.exp() * (lb - lq)).sum(-1).mean())


@pytest.mark.support("rtn")
@pytest.mark.parametrize("kind", KINDS)
def test_rtn_matches_textbook(kind, models, tmp_path):
    out = convert(models[kind], tmp_path / "rtn", "--method", "rtn", "--group-size", "32")
    names = report(out)["tensors"]
    assert len(names) == 14
    orig, back = load(models[kind]), load(out)
    for name in names:
        assert torch.equal(back[name].load(), textbook_rtn(orig[name].load())), name


@pytest.mark.support("gptq", "out_gptq")
@pytest.mark.parametrize("kind", KINDS)
def test_gptq_checkpoint_decodes_and_beats_rtn(kind, models, calib, tmp_path, one_thread):
    """Each GPTQ module decoded from its bits equals what quantkit reads and what the driver evaluated (report
    digest); on the calibration text the decoded model is closer to the float one than textbook RTN."""
    from quantkit.calibration.data import load_calibration
    out = convert(models[kind], tmp_path / "gptq", "--method", "gptq", "--group-size", "32", "--calib", calib,
                  *CALIB)
    orig, back = load(models[kind]), load(out)
    rep = report(out)["tensors"]
    assert len(rep) == 14
    decoded = {}
    for name, info in rep.items():
        _, t = modules(out, name)
        decoded[name] = decode_gptq_module(t, 4, "gptq")
        assert torch.equal(decoded[name], back[name].load()) and sha256_of(decoded[name]) == info["sha256"], name
    ids = torch.stack(load_calibration(orig, calib, 8, 64, 0))
    base = executor_for(orig)(ids)
    from quantkit.graph import LazyTensor

    def run(ws):
        return executor_for(orig.with_tensors({**orig.tensors, **{n: LazyTensor(w.shape, "F32", lambda w=w: w)
                                                                  for n, w in ws.items()}}))(ids)
    k = {"gptq": kld(base, run(decoded)), "rtn": kld(base, run({n: textbook_rtn(orig[n].load()) for n in rep}))}
    print(f"\n{kind} 4-bit g32 KLD vs float on the calibration text: {k}")
    assert 0 < k["gptq"] < k["rtn"], k


@pytest.mark.support("awq", "out_awq")
@pytest.mark.parametrize("kind", KINDS)
def test_awq_gemm_checkpoint_decodes_close_to_float(kind, models, calib, tmp_path, one_thread):
    """The AutoAWQ GEMM modules decoded nibble by nibble equal what quantkit reads; the checkpoint (folded norms,
    scaled v -> o / up -> down) stays close to the float model."""
    from test_awq_layout import decode_gemm
    out = convert(models[kind], tmp_path / "awq", "--method", "awq", "--group-size", "32", "--calib", calib, *CALIB)
    back = load(out)
    assert len(report(out)["tensors"]) == 14
    for name in report(out)["tensors"]:
        _, t = modules(out, name)
        assert torch.equal(decode_gemm(t["qweight"], t["qzeros"], t["scales"], 32), back[name].load().float()), name
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    k = kld(executor_for(load(models[kind]))(ids), executor_for(back)(ids))
    print(f"\n{kind} AWQ GEMM 4-bit g32 KLD vs float: {k:.5f}")
    assert 0 < k < 0.05, k


@pytest.mark.support("out_ct")
@pytest.mark.parametrize("kind", KINDS)
def test_compressed_tensors_checkpoint_decompresses_and_runs_in_transformers(kind, models, calib, tmp_path,
                                                                            one_thread):
    import transformers
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    out = convert(models[kind], tmp_path / "ct", "--method", "gptq", "--format", "compressed-tensors",
                  "--group-size", "32", "--calib", calib, *CALIB)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (scheme,) = QuantizationConfig.model_validate(qc).config_groups.values()
    back = load(out)
    assert len(report(out)["tensors"]) == 14
    for name in report(out)["tensors"]:
        _, t = modules(out, name)
        dec = PackedQuantizationCompressor.decompress({k: v for k, v in t.items() if k.startswith("weight_")},
                                                      scheme)["weight"]
        assert torch.equal(dec, back[name].load().to(dec.dtype)), name
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    m = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = m(ids).logits.float()
    torch.testing.assert_close(got, executor_for(back)(ids), atol=2e-2, rtol=2e-2)
    assert (got - executor_for(load(models[kind]))(ids)).abs().max() > 1e-3  # quantized for real


@pytest.mark.support("kquants", "llamacpp")
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", KINDS)
def test_q4_k_m_equals_llama_quantize_and_runs(kind, tmp_path, smollm_tokenizer_dir, one_thread):
    """Hidden 256 (real k-quant super-blocks): our q4_k_m has llama.cpp's llama_model_quantize types and bytes
    for every tensor of our f32 GGUF, and llama.cpp runs it close to transformers' float logits (8 tokens:
    llama.cpp runs Mistral as llama, without its sliding window)."""
    import numpy as np
    from gguf import GGUFReader

    from oracles.llamacpp_model import LlamaModel, quantize_file
    from quantkit.export import FILE_TYPES, convert_to_gguf
    from tiny_models import hf_logits
    d = make_tiny(kind, tmp_path / kind, hidden=256, ffn=512, vocab=VOCAB)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    g = load(d)
    for q in ("f32", "q4_k_m"):
        convert_to_gguf(g, tmp_path / f"{q}.gguf", q=q, progress=False)
    quantize_file(tmp_path / "f32.gguf", tmp_path / "ref.gguf", int(FILE_TYPES["q4_k_m"]))
    a, b = ({t.name: t for t in GGUFReader(tmp_path / p).tensors} for p in ("q4_k_m.gguf", "ref.gguf"))
    types = {k: t.tensor_type.name for k, t in a.items()}
    assert types == {k: t.tensor_type.name for k, t in b.items()} and "Q4_K" in types.values()
    assert [k for k in a if not np.array_equal(np.asarray(a[k].data), np.asarray(b[k].data))] == []
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(6))
    with LlamaModel(tmp_path / "q4_k_m.gguf", n_ctx=32) as m:
        got = torch.from_numpy(np.asarray(m.logits(ids[0].tolist())))
    k = kld(hf_logits(d, ids)[0], got)
    print(f"\n{kind} q4_k_m in llama.cpp: KLD vs transformers {k:.5f}")
    assert 0 < k < 0.05, k


@pytest.mark.support("out_safetensors")
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_safetensors_export_runs_in_transformers_as_the_source(kind, tmp_path, one_thread):
    """Plain f32 safetensors with a config.json rebuilt from our hyperparameters (llama3 rope scaling, the
    sliding window, tied embeddings, q/k norms): transformers gives the source checkpoint's logits exactly."""
    from quantkit.export import convert_to_safetensors
    from tiny_models import hf_logits
    d = make_tiny(kind, tmp_path / kind)
    convert_to_safetensors(load(d), tmp_path / "out", dtype="f32", progress=False)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(hf_logits(tmp_path / "out", ids), hf_logits(d, ids), atol=0, rtol=0)
