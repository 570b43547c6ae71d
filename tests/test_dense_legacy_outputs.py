"""Gemma 1-3, OLMo 1-3, Seed-OSS, BLOOM and the remote-code families (Qwen v1, Baichuan, CodeGeeX): RTN, GPTQ,
AWQ and MXFP4 through the CLI into each checkpoint layout, and `--q mxfp4` GGUF for every dense family llama.cpp
runs.

Every checkpoint is read by an oracle that is not quantkit's reader: the GPTQ / AutoAWQ bit layouts decoded by
test_gptq_e2e / test_awq_layout's decoders, compressed-tensors' own decompressors (pack-quantized, MXFP4), a
textbook RTN, gguf-py's MXFP4 quantizer and llama.cpp's llama_model_quantize. The decoded weights are put back
into a float checkpoint under the source's HF names and run by transformers, or for the remote-code families by
the plain-torch reference forward of test_remote_families (their code is never run).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_dense_families import make as make_dense
from test_dense_quant_outputs import calib, kld, textbook_rtn  # noqa: F401 - calib: the same text fixture
from test_remote_families import KINDS as REMOTE

from quantkit.cli import main
from quantkit.families import load

VOCAB = 49152
CALIB = ["--calib-samples", "8", "--calib-seqlen", "64"]
TRANSFORMERS = ["gemma", "gemma2", "gemma3", "olmo", "olmo2", "olmo3", "seed_oss", "bloom"]
KINDS = TRANSFORMERS + ["qwen", "baichuan", "codegeex"]
TINY = ["llama_gqa_llama3", "mistral", "qwen2", "qwen3"]  # tests/tiny_models.py (the MXFP4 writer's other rows)
EMBEDDINGS = ("embed", "wte", "lm_head", "word_embeddings", "position_embeddings", "top_query_embeddings")


def build(kind, d, tok_dir, **over):
    """A tiny checkpoint of `kind` with SmolLM2's tokenizer (calibration text and llama.cpp need one)."""
    if kind in REMOTE:
        make, _, kw = REMOTE[kind]
        make(d, vocab=VOCAB, **{**kw, **over})
    elif kind in TINY:
        from tiny_models import make_tiny
        make_tiny(kind, d, vocab=VOCAB, **over)
    else:
        make_dense(kind, d, vocab=VOCAB, **over)
    for f in tok_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


def ref_logits(kind, d, ids):
    """[B, T, V]: transformers, or the test's reference forward for the remote-code families."""
    if kind in REMOTE and kind != "bloom":
        ref = REMOTE[kind][1]
        return torch.stack([ref(d, r) for r in ids])
    from test_dense_families import hf_logits
    return hf_logits(d, ids)


@pytest.fixture(scope="module")
def src(tmp_path_factory, smollm_tokenizer_dir):
    """kind -> (checkpoint, its tensors, calibration ids, reference logits on them), built once per kind."""
    cache = {}

    def get(kind, calib):
        if kind not in cache:
            from quantkit.calibration.data import load_calibration
            d = build(kind, tmp_path_factory.mktemp(kind) / "hf", smollm_tokenizer_dir)
            ids = torch.stack(load_calibration(load(d), calib, 8, 64, 0))[:4]
            cache[kind] = d, load_file(d / "model.safetensors"), ids, ref_logits(kind, d, ids)
        return cache[kind]
    return get


def convert(d, out, *args):
    main([str(a) for a in ("convert", d, "-o", out, "--no-progress", *args)])
    return out


def linears(tensors: dict) -> set[str]:
    """HF module names of the source's linear weights (what every layout quantizes: embeddings / head stay)."""
    return {k[:-len(".weight")] for k, v in tensors.items()
            if k.endswith(".weight") and v.dim() == 2 and not any(e in k for e in EMBEDDINGS)}


def modules(out, part: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """({module: {tensor: value}} of the modules holding `part` (qweight, weight_packed), {the other tensors}):
    a module's bias is one of the others."""
    sd = {}
    for f in sorted(out.glob("*.safetensors")):
        sd.update(load_file(f))
    mods = {k[:-len(part) - 1] for k in sd if k.endswith("." + part)}
    owner = {k: k.rsplit(".", 1)[0] for k in sd if not k.endswith(".bias")}
    packed = {m: {k[len(m) + 1:]: v for k, v in sd.items() if owner.get(k) == m} for m in mods}
    return packed, {k: v for k, v in sd.items() if owner.get(k) not in mods}


def float_dir(d_src, out, floats: dict, decoded: dict[str, torch.Tensor]):
    """A float checkpoint: the source's config.json, `floats` (the checkpoint's 16-bit tensors) and each decoded
    module's weight under `<module>.weight`; its tensors must be exactly the source's names."""
    t = {k: v.float() for k, v in floats.items()}
    t.update({m + ".weight": w.float() for m, w in decoded.items()})
    want = set(load_file(d_src / "model.safetensors"))
    assert set(t) == want, (sorted(set(t) - want)[:3], sorted(want - set(t))[:3])
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d_src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.support("rtn")
@pytest.mark.parametrize("kind", KINDS)
def test_rtn_checkpoint_is_textbook_rtn(kind, src, calib, tmp_path):
    """RTN into the GPTQ layout: every linear of the source (fused W_pack / query_key_value / c_attn as
    published) decoded bit by bit is exactly textbook symmetric RTN of the source weight."""
    from test_gptq_e2e import decode_gptq_module
    d, tensors, _, _ = src(kind, calib)
    out = convert(d, tmp_path / "rtn", "--to", "safetensors", "--method", "rtn", "--group-size", "32")
    mods, _ = modules(out, "qweight")
    assert set(mods) == linears(tensors)
    for m, t in mods.items():
        assert torch.equal(decode_gptq_module(t, 4, "gptq"), textbook_rtn(tensors[m + ".weight"])), m


@pytest.mark.support("out_gptq")
@pytest.mark.parametrize("kind", KINDS)
def test_gptq_checkpoint_decodes_and_beats_rtn(kind, src, calib, tmp_path, one_thread):
    """Decoded from its bits, the GPTQ checkpoint is the weights the driver evaluated (report digests) and
    what quantkit reads; run as a float model it is closer to the source than textbook RTN on the calibration
    text it was fitted on."""
    from test_gptq_e2e import decode_gptq_module

    from quantkit.quant.gptq_driver import sha256_of
    d, tensors, ids, base = src(kind, calib)
    out = convert(d, tmp_path / "gptq", "--to", "safetensors", "--method", "gptq", "--group-size", "32",
                  "--calib", calib, *CALIB)
    mods, floats = modules(out, "qweight")
    assert set(mods) == linears(tensors)
    dec = float_dir(d, tmp_path / "dec", floats, {m: decode_gptq_module(t, 4, "gptq") for m, t in mods.items()})
    rep = json.loads((out / "quantkit_report.json").read_text())["tensors"]
    g_dec, g_out = load(dec), load(out)
    for name, info in rep.items():
        w = g_dec[name].load()
        assert sha256_of(w) == info["sha256"] and torch.equal(g_out[name].load().float(), w), name
    rtn = float_dir(d, tmp_path / "rtn", floats, {m: textbook_rtn(tensors[m + ".weight"]) for m in mods})
    k = {"gptq": kld(base, ref_logits(kind, dec, ids)), "rtn": kld(base, ref_logits(kind, rtn, ids))}
    print(f"\n{kind} GPTQ 4-bit g32 KLD vs float on the calibration text: {k}")
    assert 0 < k["gptq"] < k["rtn"] < 0.1, k


@pytest.mark.support("out_awq")
@pytest.mark.parametrize("kind", KINDS)
def test_awq_gemm_checkpoint_decodes_close_to_float(kind, src, calib, tmp_path, one_thread):
    """AutoAWQ GEMM modules decoded nibble by nibble, with the checkpoint's own (scaled) norms and biases, run
    as a float model: close to the source model; quantkit reads the same weights."""
    from test_awq_layout import decode_gemm
    d, tensors, ids, base = src(kind, calib)
    out = convert(d, tmp_path / "awq", "--to", "safetensors", "--method", "awq", "--group-size", "32",
                  "--calib", calib, *CALIB)
    mods, floats = modules(out, "qweight")
    assert set(mods) == linears(tensors)
    decoded = {m: decode_gemm(t["qweight"], t["qzeros"], t["scales"], 32) for m, t in mods.items()}
    dec = float_dir(d, tmp_path / "dec", floats, decoded)
    g_dec, g_out = load(dec), load(out)
    for name in json.loads((out / "quantkit_report.json").read_text())["tensors"]:
        assert torch.equal(g_out[name].load().float(), g_dec[name].load()), name
    k = kld(base, ref_logits(kind, dec, ids))
    print(f"\n{kind} AWQ GEMM 4-bit g32 KLD vs float: {k:.5f}")
    assert 0 < k < 0.05, k


def _ct_model_logits(out, ids, **kw):
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                                          **kw).eval()
    with torch.no_grad():
        return m(ids).logits.float()


@pytest.mark.support("out_ct")
@pytest.mark.parametrize("kind", KINDS)
def test_compressed_tensors_checkpoint_decompresses(kind, src, calib, tmp_path, one_thread):
    """compressed-tensors' PackedQuantizationCompressor decompresses every module to what quantkit reads; the
    decompressed model is close to the source, and transformers (where it has the class) runs the checkpoint
    itself as that decompressed model."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    d, tensors, ids, base = src(kind, calib)
    out = convert(d, tmp_path / "ct", "--to", "safetensors", "--method", "gptq", "--format", "compressed-tensors",
                  "--group-size", "32", "--calib", calib, *CALIB)
    (scheme,) = QuantizationConfig.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"]).config_groups.values()
    mods, floats = modules(out, "weight_packed")
    assert set(mods) == linears(tensors)
    decoded = {m: PackedQuantizationCompressor.decompress(t, scheme)["weight"] for m, t in mods.items()}
    dec = float_dir(d, tmp_path / "dec", floats, decoded)
    g_dec, g_out = load(dec), load(out)
    dt = next(iter(decoded.values())).dtype  # the decompressor's (the scales') dtype
    for name in json.loads((out / "quantkit_report.json").read_text())["tensors"]:
        assert torch.equal(g_out[name].load().to(dt).float(), g_dec[name].load()), name
    want = ref_logits(kind, dec, ids[:1])
    k = kld(base[:1], want)
    print(f"\n{kind} compressed-tensors GPTQ 4-bit g32 KLD vs float: {k:.5f}")
    assert 0 < k < 0.05, k
    if kind in TRANSFORMERS:
        torch.testing.assert_close(_ct_model_logits(out, ids[:1]), want, atol=1e-2, rtol=1e-2)


@pytest.mark.support("out_mxfp4")
@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # transformers: dequantize=True is ours
@pytest.mark.parametrize("kind", KINDS + TINY)
def test_mxfp4_checkpoint_decompresses(kind, src, calib, tmp_path, one_thread):
    """`--to safetensors --q mxfp4` (compressed-tensors mxfp4-pack-quantized): its own MXFP4PackedCompressor
    decompresses every linear; per 32-block the values are gguf-py's (llama.cpp's) MXFP4 of the source block
    or a block with less squared error (rule "best" picks the next scale up); the decompressed model is close
    to the source, and transformers dequantizes the checkpoint itself to it."""
    import gguf
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import CompressedTensorsConfig
    d, tensors, ids, base = src(kind, calib)
    out = convert(d, tmp_path / "mx", "--to", "safetensors", "--q", "mxfp4")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (scheme,) = QuantizationConfig.model_validate(qc).config_groups.values()
    assert qc["format"] == "mxfp4-pack-quantized"
    mods, floats = modules(out, "weight_packed")
    assert set(mods) == linears(tensors)
    decoded, same = {}, []
    for m, t in mods.items():
        got = MXFP4PackedCompressor.decompress(t, scheme)["weight"].float()
        w = tensors[m + ".weight"].float()
        mx = gguf.GGMLQuantizationType.MXFP4
        floor = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), mx), mx)).reshape(w.shape)
        err = lambda q: (q - w).reshape(-1, 32).double().square().sum(-1)  # noqa: E731
        assert bool((err(got) <= err(floor)).all()), m
        same.append((got.reshape(-1, 32) == floor.reshape(-1, 32)).all(-1).float().mean())
        decoded[m] = got
    assert 0.5 < float(torch.stack(same).mean()) < 1  # both scales in use
    dec = float_dir(d, tmp_path / "dec", floats, decoded)
    rtn = float_dir(d, tmp_path / "rtn", floats, {m: textbook_rtn(tensors[m + ".weight"]) for m in mods})
    want = ref_logits(kind, dec, ids[:1])
    k = {"mxfp4": kld(base[:1], want), "rtn": kld(base[:1], ref_logits(kind, rtn, ids[:1]))}
    print(f"\n{kind} MXFP4 (compressed-tensors) KLD vs float, and 4-bit g32 RTN's: {k}")
    assert 0 < k["mxfp4"] < min(0.1, 3 * k["rtn"]), k  # 4.25 bits, power-of-two scales: near int4 g32 (as the MoE test)
    if kind in TRANSFORMERS + TINY:
        got = _ct_model_logits(out, ids[:1], quantization_config=CompressedTensorsConfig(dequantize=True))
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


# every dense family llama.cpp runs; Baichuan at 32 layers (llama.cpp applies its RoPE only there)
GGUF_KINDS = ["llama_gqa_llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "olmo", "olmo2", "olmo3",
              "seed_oss", "bloom", "qwen", "baichuan"]


@pytest.mark.support("mxfp4", "llamacpp")
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_mxfp4_gguf_is_llama_quantize_pure_and_runs(kind, tmp_path, smollm_tokenizer_dir, one_thread):
    """`--q mxfp4` on a dense model: every quantizable weight MXFP4 (token_embd and output too), as llama.cpp's
    `llama-quantize --pure ... MXFP4_MOE` writes it (its MXFP4_MOE without --pure has no MXFP4 tensor in a dense
    model, only Q8_0): the same types and bytes from our F32 GGUF; llama.cpp runs our file close to the float
    model (transformers, or the reference forward)."""
    from oracles.llamacpp_model import LlamaModel, quantize_file
    from quantkit.formats.gguf_reader import open_gguf, tensor_bytes
    from test_dense_families import ids_of
    d = tmp_path / "hf"
    if kind in ("llama_gqa_llama3", "mistral", "qwen2", "qwen3"):
        from tiny_models import make_tiny
        make_tiny(kind, d, vocab=VOCAB)
        for f in smollm_tokenizer_dir.iterdir():
            shutil.copy(f, d / f.name)
    else:
        # transformers' init scale for the HF families (llama.cpp keeps K/V in f16)
        build(kind, d, smollm_tokenizer_dir, **({"layers": 32} if kind == "baichuan" else
                                                {} if kind in REMOTE else {"gain": 1.0}))
    f32, ours, theirs = tmp_path / "f32.gguf", tmp_path / "mxfp4.gguf", tmp_path / "theirs.gguf"
    main(["-q", "convert", str(d), "--q", "f32", "-o", str(f32)])
    main(["-q", "convert", str(d), "--q", "mxfp4", "-o", str(ours)])
    quantize_file(f32, theirs, 38, pure=True)  # LLAMA_FTYPE_MOSTLY_MXFP4_MOE
    fa, fb = open_gguf(ours), open_gguf(theirs)  # gguf-py's reader: 8 s per file on a 49k-token vocabulary
    a, b = {t.name: t for t in fa.tensors}, {t.name: t for t in fb.tensors}
    assert set(a) == set(b)
    types = {n: t.tensor_type.name for n, t in a.items()}
    assert types == {n: t.tensor_type.name for n, t in b.items()}
    assert {types[n] for n in a if n.endswith(".weight") and len(a[n].shape) == 2} == {"MXFP4"}
    assert types["token_embd.weight"] == "MXFP4"
    bad = [n for n in a if not np.array_equal(tensor_bytes(a[n], ours), tensor_bytes(b[n], theirs))]
    assert not bad, bad
    ids = ids_of(VOCAB, 20, 3)
    with LlamaModel(ours, n_ctx=32) as m:
        got = torch.from_numpy(m.logits(ids[0].tolist()))
    k = kld(ref_logits(kind, d, ids)[0], got)
    print(f"\n{kind} mxfp4 GGUF in llama.cpp: KLD vs float {k:.5f}")
    assert 0 < k < 0.05, k


@pytest.mark.support("out_safetensors")
@pytest.mark.parametrize("kind", ["bloom", "codegeex"])
def test_f32_safetensors_runs_as_the_source(kind, src, calib, tmp_path):
    """`--to safetensors --q f32`: BLOOM's query_key_value interleaved back per head, CodeGeeX's top query layer;
    transformers (BLOOM) or the reference forward (CodeGeeX has no transformers class) gives the source's
    logits exactly."""
    d, tensors, ids, base = src(kind, calib)
    out = convert(d, tmp_path / "st", "--to", "safetensors", "--q", "f32")
    got = load_file(out / "model.safetensors")
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)
    torch.testing.assert_close(ref_logits(kind, out, ids[:2]), base[:2], atol=0, rtol=0)


def test_fused_module_refusals(tmp_path, monkeypatch):
    """AWQ's float16 side columns are not defined for a fused module; a fused HF linear whose function mixes
    values (not only rows) cannot take its parts' grids: one line naming the module, before any work, no
    output."""
    from quantkit.errors import BadInput, QuantkitError
    from quantkit.families.baichuan import Baichuan
    from quantkit.jobs.gptq import gptq_to_safetensors
    from quantkit.jobs.awq import awq_to_safetensors
    g = load(REMOTE["baichuan"][0](tmp_path / "b"))
    with pytest.raises(QuantkitError, match="--keep-fp16: model.layers.0.self_attn.W_pack is a fused module"):
        awq_to_safetensors(g, tmp_path / "a", group_size=32, keep_fp16=1.0, progress=False)
    plain = Baichuan.hf_export.__func__

    def mixed(cls, hp):
        return [(h, s, (lambda q, k, v: torch.cat([q, k, v]) * 2) if "W_pack" in h else fn)
                for h, s, fn in plain(cls, hp)]
    monkeypatch.setattr(Baichuan, "hf_export", classmethod(mixed))
    with pytest.raises(BadInput, match="W_pack.weight: not a row rearrangement") as e:
        gptq_to_safetensors(g, tmp_path / "q", method="rtn", group_size=32, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "q").exists()


@pytest.mark.support("mxfp4", family="olmo2")
@pytest.mark.llamacpp
def test_mxfp4_moe_on_a_dense_model_is_q8_0_as_llama_quantize(tmp_path, smollm_tokenizer_dir, caplog):
    """`--q mxfp4_moe` on a dense model: llama.cpp's MXFP4_MOE makes only stacked experts MXFP4, so the file is
    Q8_0 where it quantizes (llama_model_quantize's types and bytes), and quantkit says so."""
    import logging

    from oracles.llamacpp_model import quantize_file
    from quantkit.formats.gguf_reader import open_gguf, tensor_bytes
    d = build("olmo2", tmp_path / "hf", smollm_tokenizer_dir, gain=1.0)
    f32, ours, theirs = tmp_path / "f32.gguf", tmp_path / "moe.gguf", tmp_path / "theirs.gguf"
    main(["-q", "convert", str(d), "--q", "f32", "-o", str(f32)])
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        main(["convert", str(d), "--q", "mxfp4_moe", "-o", str(ours)])
    assert "no stacked experts, so no tensor is MXFP4" in caplog.text
    quantize_file(f32, theirs, 38)
    a, b = ({t.name: t for t in open_gguf(p).tensors} for p in (ours, theirs))
    assert {n: t.tensor_type.name for n, t in a.items()} == {n: t.tensor_type.name for n, t in b.items()}
    assert {t.tensor_type.name for t in a.values()} == {"Q8_0", "F32"}
    assert [n for n in a if not np.array_equal(tensor_bytes(a[n], ours), tensor_bytes(b[n], theirs))] == []
