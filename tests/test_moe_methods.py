"""MoE models through every method: RTN, GPTQ, AWQ (safetensors), q4_k_m / q5_k_m with imatrix and with
`--optimizer gptq`, `--awq` GGUF, MXFP4, plain safetensors; and experts that see no calibration token.

Tiny random models made with transformers' own classes (GPT-OSS; Mixtral) carrying SmolLM2's vocabulary.
Oracles: transformers (the base logits, and the forward of independently decoded weights), llama.cpp (loads
our GGUF files), compressed-tensors' own decompressor, the GPTQ bit-stream decoder written in
test_gptq_e2e, and a textbook RTN. Every quantized output's KLD against the base model is computed and
printed (`pytest -s` shows the table).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantkit.cli import main
from quantkit.quant.gptq_driver import sha256_of

transformers = pytest.importorskip("transformers")

CALIB = ["--calib-samples", "8", "--calib-seqlen", "64"]
KLD: dict[str, float] = {}
ROUTER_SCALE = 8.0  # what each output measured, printed at the end of the module


def cli(*args):
    main([str(a) for a in args])


@pytest.fixture(scope="module", autouse=True)
def kld_table():
    yield
    if KLD:
        print("\nKLD against the base model (mean over eval positions):")
        for k, v in sorted(KLD.items()):
            print(f"  {k:44s} {v:.6f}")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe_methods")


@pytest.fixture(scope="module")
def texts(work, jargon_text):
    (work / "calib.txt").write_text(jargon_text[:40_000])
    (work / "eval.txt").write_text(jargon_text[-20_000:])
    return work / "calib.txt", work / "eval.txt"


@pytest.fixture(scope="module")
def gpt_oss(work, smollm_tokenizer_dir) -> Path:
    """test_mxfp4_e2e's tiny GptOssForCausalLM with its router scaled up, so that top-k choices are clear-cut
    (with near-ties, rounding flips routes and the KLDs measure those flips, not the quantizers)."""
    from safetensors.torch import save_file
    from test_mxfp4_e2e import make_tiny_gpt_oss
    d = make_tiny_gpt_oss(work / "gpt_oss", smollm_tokenizer_dir)
    sd = load_file(d / "model.safetensors")
    for k in sd:
        if ".mlp.router." in k:
            sd[k] = sd[k] * ROUTER_SCALE
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.fixture(scope="module")
def eval_ids(gpt_oss, texts) -> torch.Tensor:
    from quantkit.eval.tokens import encode
    from quantkit.families import load
    ids = encode(load(gpt_oss), texts[1].read_text())[0]
    return torch.tensor(ids[:2 * 48]).reshape(2, 48)


def hf_model(model_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def kld(base: torch.Tensor, q: torch.Tensor) -> float:
    p, lq = torch.log_softmax(base.double(), -1), torch.log_softmax(q.double(), -1)
    return float((p.exp() * (p - lq)).sum(-1).mean())


@pytest.fixture(scope="module")
def base_logits(gpt_oss, eval_ids) -> torch.Tensor:
    return logits_of(hf_model(gpt_oss), eval_ids)


CALIBRATED = (["--method", "gptq"], ["--method", "awq"], ["--optimizer", "gptq"])
CALIB_FLAGS = {"--calib-samples": 1, "--calib-seqlen": 1, "--min-expert-tokens": 1, "--moe-route-all": 0}


def convert(src, out, calib, *extra) -> Path:
    """The CLI with calibration options only where the run calibrates (quantkit refuses them elsewhere)."""
    args = [str(a) for a in extra]
    if "--awq" in args or any(args[k:k + 2] in CALIBRATED for k in range(len(args))):
        cli("convert", src, "-o", out, "--calib", calib, *CALIB, "--no-progress", *extra)
        return out
    kept, k = [], 0
    while k < len(args):
        n = CALIB_FLAGS.get(args[k])
        if n is None:
            kept.append(args[k])
            k += 1
        else:
            k += 1 + n
    cli("convert", src, "-o", out, "--no-progress", *kept)
    return out


def report(d: Path) -> dict:
    return json.loads((d / "quantkit_report.json").read_text())


# ---------------------------------------------------------------- independent decoders -> HF parameters

def gptq_modules(st: dict, bits: int, fmt: str) -> dict[str, torch.Tensor]:
    from test_gptq_e2e import decode_gptq_module
    pre = {k[: -len(".qweight")] for k in st if k.endswith(".qweight")}
    return {p: decode_gptq_module({k: st[f"{p}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}, bits, fmt)
            for p in pre}


def ct_modules(st: dict, qc: dict) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    pre = {k[: -len(".weight_packed")] for k in st if k.endswith(".weight_packed")}
    out = {}
    for p in pre:
        mod = {k[len(p) + 1:]: v for k, v in st.items() if k.startswith(p + ".weight_")}
        out[p] = PackedQuantizationCompressor.decompress(mod, scheme)["weight"].float()
    return out


def gpt_oss_state(st: dict, mods: dict[str, torch.Tensor], hf_sd: dict) -> dict[str, torch.Tensor]:
    """transformers GptOss parameters from a quantized checkpoint: plain tensors as stored, quantized
    modules decoded; experts from GPTQModel's (gate_up.E / down.E) or llm-compressor's (E.gate_proj ...)
    per-expert modules back into the fused gate_up_proj [E, d, 2f] (gate even, up odd) / down_proj."""
    sd = {k: v.float() for k, v in st.items() if k in hf_sd}
    for p, w in mods.items():
        head, _, rest = p.partition(".mlp.experts.")
        if not rest:
            sd[p + ".weight"] = w
            continue
        a, b = rest.split(".")
        gu, dn = f"{head}.mlp.experts.gate_up_proj", f"{head}.mlp.experts.down_proj"
        sd.setdefault(gu, hf_sd[gu].clone())
        sd.setdefault(dn, hf_sd[dn].clone())
        sd.setdefault(gu + "_bias", hf_sd[gu + "_bias"].clone())
        bias = st[p + ".bias"].float()
        if a in ("gate_up", "down"):  # GPTQModel: gate_up rows already interleaved as in gate_up_proj
            e = int(b)
            (sd[gu] if a == "gate_up" else sd[dn])[e] = w.T
            if a == "gate_up":
                sd[gu + "_bias"][e] = bias
            else:
                sd[dn + "_bias"] = sd.get(dn + "_bias", hf_sd[dn + "_bias"].clone())
                sd[dn + "_bias"][e] = bias
        else:  # llm-compressor: experts.E.gate_proj / up_proj / down_proj
            e = int(a)
            if b == "down_proj":
                sd[dn][e] = w.T
                sd[dn + "_bias"] = sd.get(dn + "_bias", hf_sd[dn + "_bias"].clone())
                sd[dn + "_bias"][e] = bias
            else:
                k = 0 if b == "gate_proj" else 1
                sd[gu][e][:, k::2] = w.T
                sd[gu + "_bias"][e][k::2] = bias
    return sd


def quantized_logits(model_dir: Path, out: Path, ids: torch.Tensor, mods: dict) -> torch.Tensor:
    m = hf_model(model_dir)
    hf_sd = m.state_dict()
    sd = gpt_oss_state(load_file(out / "model.safetensors"), mods, hf_sd)
    missing = [k for k in hf_sd if k not in sd]
    assert not missing, f"not in the quantized checkpoint: {missing[:5]}"
    m.load_state_dict(sd)
    return logits_of(m, ids)


def stacked_from_modules(mods: dict, layer: int, kind: str, n_exp: int) -> torch.Tensor:
    """Canonical stacked weight [E, out, in] of gate/up/down from either per-expert layout."""
    p = f"model.layers.{layer}.mlp.experts."
    if f"{p}gate_up.0" in mods:
        if kind == "down":
            return torch.stack([mods[f"{p}down.{e}"] for e in range(n_exp)])
        k = 0 if kind == "gate" else 1
        return torch.stack([mods[f"{p}gate_up.{e}"][k::2] for e in range(n_exp)])
    return torch.stack([mods[f"{p}{e}.{kind}_proj"] for e in range(n_exp)])


def check_report_matches(rep: dict, mods: dict, n_exp: int):
    """Every quantized expert tensor decodes to exactly what the driver evaluated (its report digest), and
    no expert is left in 16 bits."""
    n = 0
    for name, info in rep["tensors"].items():
        if "experts" not in info:
            continue
        i, kind = int(name.split(".")[1]), name.split(".")[2].split("_")[1]
        w = stacked_from_modules(mods, i, kind, n_exp)
        assert torch.isfinite(w).all()
        assert sha256_of(w) == info["sha256"], name
        n += 1
    assert n == 6


# ---------------------------------------------------------------- GPT-OSS: safetensors methods

@pytest.fixture(scope="module")
def go_rtn(gpt_oss, texts, work):
    return convert(gpt_oss, work / "go_rtn", texts[0], "--to", "safetensors", "--method", "rtn", "--group-size", "32")


@pytest.fixture(scope="module")
def go_gptq(gpt_oss, texts, work):
    return convert(gpt_oss, work / "go_gptq", texts[0], "--to", "safetensors", "--method", "gptq",
                   "--group-size", "32")


@pytest.mark.support("gptq", "out_gptq", family="gpt-oss")
def test_gpt_oss_gptq_layout_decodes_and_beats_rtn(gpt_oss, go_rtn, go_gptq, eval_ids, base_logits):
    E = 4
    klds = {}
    for name, out in (("rtn", go_rtn), ("gptq", go_gptq)):
        st = load_file(out / "model.safetensors")
        # GPTQModel's gpt-oss modules; no fused float expert tensor left
        assert "model.layers.0.mlp.experts.gate_up.3.qweight" in st and "model.layers.1.mlp.experts.down.0.qzeros" in st
        assert not any(k.endswith(("gate_up_proj", "down_proj")) for k in st)
        assert st["model.layers.0.mlp.experts.gate_up.0.qweight"].shape == (64 * 4 // 32, 2 * 64)
        mods = gptq_modules(st, 4, "gptq")
        rep = report(out)
        assert rep["fallbacks"] == []
        check_report_matches(rep, mods, E)
        q = quantized_logits(gpt_oss, out, eval_ids, mods)
        klds[name] = KLD[f"gpt-oss {name} w4g32 (gptq layout)"] = kld(base_logits, q)
    assert all(math.isfinite(v) and v > 0 for v in klds.values()), klds
    assert klds["gptq"] < klds["rtn"], klds


@pytest.mark.support("rtn", "out_gptq", family="gpt-oss")
def test_gpt_oss_rtn_experts_are_textbook_rtn(gpt_oss, go_rtn):
    from quantkit.families import load
    g = load(gpt_oss)
    mods = gptq_modules(load_file(go_rtn / "model.safetensors"), 4, "gptq")
    w = g["blk.1.ffn_up_exps.weight"].load().float()  # [E, f, d]
    x = w.reshape(4, 64, -1, 32)
    scale = (2 * x.abs().amax(-1, keepdim=True) / 15).half().float()
    want = ((torch.clamp(torch.round(x / scale) + 8, 0, 15) - 8) * scale).reshape(w.shape)
    assert torch.equal(stacked_from_modules(mods, 1, "up", 4), want)


@pytest.fixture(scope="module")
def go_ct(gpt_oss, texts, work):
    """GPTQ, AWQ and (the AWQ grid's baseline) RTN, asymmetric w4 g32, as compressed-tensors."""
    out = {}
    for m in ("rtn", "gptq", "awq"):
        out[m] = convert(gpt_oss, work / f"go_ct_{m}", texts[0], "--to", "safetensors", "--method", m,
                         "--group-size", "32", "--asym", "--format", "compressed-tensors")
    return out


@pytest.mark.support("gptq", "awq", "out_ct", family="gpt-oss")
def test_gpt_oss_compressed_tensors_decompress_and_kld(gpt_oss, go_ct, eval_ids, base_logits):
    klds = {}
    for m, out in go_ct.items():
        cfg = json.loads((out / "config.json").read_text())
        qc = cfg["quantization_config"]
        assert "model.layers.0.mlp.router" in qc["ignore"]
        st = load_file(out / "model.safetensors")
        assert "model.layers.1.mlp.experts.3.up_proj.weight_packed" in st  # llm-compressor's linearized experts
        mods = ct_modules(st, qc)
        rep = report(out)
        assert rep["fallbacks"] == []
        for name, info in rep["tensors"].items() if m != "awq" else ():  # fp16 decode: digests differ
            if "experts" in info:
                i, kind = int(name.split(".")[1]), name.split(".")[2].split("_")[1]
                assert torch.isfinite(stacked_from_modules(mods, i, kind, 4)).all()
        if m == "awq":
            assert len(rep["experts"]) == 6
            assert all(r["tokens"] >= 16 for rows in rep["experts"].values() for r in rows)
        q = quantized_logits(gpt_oss, out, eval_ids, mods)
        klds[m] = KLD[f"gpt-oss {m} w4g32 asym (compressed-tensors)"] = kld(base_logits, q)
    assert all(math.isfinite(v) and v > 0 for v in klds.values()), klds
    # GPTQ vs RTN on the same grid is a fair comparison; AWQ's salient-channel premise does not hold for random
    # weights (on this tiny model it lands on either side of RTN depending on the calibration text)
    assert klds["gptq"] < klds["rtn"] and klds["awq"] < 1.5 * klds["rtn"], klds


def test_gpt_oss_awq_gemm_is_refused(gpt_oss, texts, tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert(gpt_oss, tmp_path / "o", texts[0], "--to", "safetensors", "--method", "awq", "--group-size", "32")
    err = capsys.readouterr().err
    assert "AutoAWQ has no gpt-oss" in err and not (tmp_path / "o").exists()
    # one line, naming the layouts that do load (GPTQModel's / llm-compressor's gpt-oss experts)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "--format compressed-tensors" in err, err


@pytest.mark.support("out_safetensors", family="gpt-oss")
def test_gpt_oss_plain_safetensors_loads_in_transformers(gpt_oss, work, eval_ids, base_logits):
    from quantkit.export import convert_to_safetensors
    from quantkit.families import load
    out = work / "go_plain"
    convert_to_safetensors(load(gpt_oss), out, dtype="f32", progress=False)
    torch.testing.assert_close(logits_of(hf_model(out), eval_ids), base_logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- Mixtral: one HF linear per expert

VOCAB = 49152
MIXTRAL_PROJ = {"gate": "w1", "up": "w3", "down": "w2"}


@pytest.fixture(scope="module")
def mixtral(work, smollm_tokenizer_dir) -> Path:
    from moe_models import make_tiny_moe
    d = make_tiny_moe("mixtral", work / "mixtral", vocab=VOCAB)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy2(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def mixtral_base(mixtral, eval_ids) -> torch.Tensor:
    return logits_of(hf_model(mixtral), eval_ids)


def dequantized_dir(out: Path, mods: dict[str, torch.Tensor], dst: Path) -> Path:
    """An unquantized HF checkpoint of what `out` holds: plain tensors as stored, every quantized module's
    weight decoded (transformers then reads it with its own per-expert conversion)."""
    from safetensors.torch import save_file
    st = load_file(out / "model.safetensors")
    packed = ("qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale", "weight_shape",
              "weight_zero_point")
    sd = {k: v.float() for k, v in st.items() if k.rpartition(".")[2] not in packed}
    sd.update({p + ".weight": w.float().contiguous() for p, w in mods.items()})
    dst.mkdir()
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def mixtral_stacked(mods: dict, layer: int, kind: str) -> torch.Tensor:
    p = f"model.layers.{layer}.block_sparse_moe.experts."
    return torch.stack([mods[f"{p}{e}.{MIXTRAL_PROJ[kind]}"] for e in range(4)])


def awq_gemm_modules(st: dict, gs: int) -> dict[str, torch.Tensor]:
    from test_awq_layout import decode_gemm
    pre = {k[: -len(".qweight")] for k in st if k.endswith(".qweight")}
    return {p: decode_gemm(st[f"{p}.qweight"], st[f"{p}.qzeros"], st[f"{p}.scales"], gs) for p in pre}


@pytest.fixture(scope="module")
def mx_outs(mixtral, texts, work) -> dict[str, Path]:
    runs = {"rtn": ("--method", "rtn"), "gptq": ("--method", "gptq"),
            "gptq-ct": ("--method", "gptq", "--format", "compressed-tensors"),
            "rtn-asym-ct": ("--method", "rtn", "--asym", "--format", "compressed-tensors"),
            "awq": ("--method", "awq")}
    # 32 x 64 tokens: with 8 x 64 (~256 per expert, d = 64) GPTQ's experts fit the calibration text and, on
    # this model, generalize no better than RTN to the eval text; with 4x more they do
    return {k: convert(mixtral, work / f"mx_{k}", texts[0], "--to", "safetensors", "--group-size", "32",
                       "--calib-samples", "32", *a) for k, a in runs.items()}


@pytest.mark.support("gptq", "awq", "out_gptq", "out_awq", "out_ct", family="mixtral")
def test_mixtral_quantized_layouts_decode_and_kld(mixtral, mx_outs, eval_ids, mixtral_base, work):
    klds = {}
    for k, out in mx_outs.items():
        st = load_file(out / "model.safetensors")
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        if k in ("rtn", "gptq"):
            mods = gptq_modules(st, 4, "gptq")
        elif k == "awq":
            mods = awq_gemm_modules(st, 32)
        else:
            mods = ct_modules(st, qc)
            assert "model.layers.1.block_sparse_moe.gate" in qc["ignore"]  # the router stays float
        # every expert of every layer is a packed module of its own; no float expert weight is left
        for i in range(2):
            for e in range(4):
                for hf in MIXTRAL_PROJ.values():
                    assert f"model.layers.{i}.block_sparse_moe.experts.{e}.{hf}" in mods
        assert not any(".experts." in n and n.endswith(".weight") for n in st)
        rep = report(out)
        assert rep["fallbacks"] == []
        if k in ("rtn", "gptq"):  # exact float32 decode: the driver's own digests
            for name, info in rep["tensors"].items():
                if "experts" in info:
                    i, kind = int(name.split(".")[1]), name.split(".")[2].split("_")[1]
                    assert sha256_of(mixtral_stacked(mods, i, kind)) == info["sha256"], (k, name)
        q = logits_of(hf_model(dequantized_dir(out, mods, work / f"deq_{k}")), eval_ids)
        klds[k] = KLD[f"mixtral {k} w4g32"] = kld(mixtral_base, q)
    assert all(math.isfinite(v) and v > 0 for v in klds.values()), klds
    assert klds["gptq"] < klds["rtn"] and klds["gptq-ct"] < klds["rtn"], klds
    assert klds["awq"] < 1.5 * klds["rtn-asym-ct"], klds


@pytest.mark.support("awq", family="mixtral")
def test_mixtral_awq_folds_router_and_per_expert_scales(mixtral, texts):
    """The in-memory AWQ result: the fold keeps the float function (router columns and every expert's
    up/down take their scales), each expert's up -> down got its own scale."""
    from quantkit.calibration.data import load_calibration
    from quantkit.families import load
    from quantkit.quant.awq import AWQConfig, fold_graph, run_awq
    from quantkit.runtime.model import CausalLM
    g = load(mixtral)
    samples = load_calibration(g, texts[0], 4, 32, 0)
    res = run_awq(g, samples, AWQConfig(group_size=32), progress=False, quantize=False)
    per_expert = [(i, s) for i, grp, s in res.scales if grp.per_expert]
    assert len(per_expert) == 2 and all(s.shape == (4, 128) for _, s in per_expert)
    assert all(not torch.allclose(s[0], s[1]) for _, s in per_expert)
    norm = [grp for _, grp, _ in res.scales if grp.prev == "ffn_norm"]
    assert norm and norm[0].floats == ("ffn_gate_inp",)
    ids = torch.stack(samples[:2])
    ref = logits_of(hf_model(mixtral), ids)
    torch.testing.assert_close(CausalLM(fold_graph(g, res.fold_plan()))(ids), ref, atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------- GGUF: k-quants (imatrix, --optimizer gptq), --awq, MXFP4

GGUF_RUNS = {
    "f32": ("--q", "f32"),
    "q4_k_m": ("--q", "q4_k_m"),
    "q4_k_m imatrix": ("--q", "q4_k_m", "IMATRIX"),
    "q4_k_m optimizer": ("--q", "q4_k_m", "--optimizer", "gptq"),
    "q5_k_m": ("--q", "q5_k_m"),
    "q5_k_m imatrix": ("--q", "q5_k_m", "IMATRIX"),
    "q5_k_m optimizer+imatrix": ("--q", "q5_k_m", "--optimizer", "gptq", "IMATRIX"),
    "q4_k_m awq": ("--q", "q4_k_m", "--awq"),
    "mxfp4_moe": ("--q", "mxfp4_moe"),
}


@pytest.fixture(scope="module", params=["gpt_oss", "mixtral"])
def family_model(request):
    return request.param, request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def ggufs(family_model, texts, work) -> dict[str, Path]:
    from quantkit.calibration.imatrix import imatrix_from_calib, write_imatrix_gguf
    from quantkit.families import load
    fam, model = family_model
    im = work / f"{fam}.imatrix.gguf"
    write_imatrix_gguf(imatrix_from_calib(load(model), texts[0], n_ctx=64, n_chunks=8, progress=False), im)
    out = {}
    for k, args in GGUF_RUNS.items():
        args = [a for x in args for a in (("--imatrix", im) if x == "IMATRIX" else (x,))]
        out[k] = convert(model, work / f"{fam}-{k.replace(' ', '_').replace('+', '_')}.gguf", texts[0],
                         "--calib-samples", "32", *args)
    return out


def llamacpp_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from oracles.llamacpp_model import LlamaModel
    with LlamaModel(path) as m:
        return torch.stack([torch.from_numpy(m.logits(row.tolist())) for row in ids])


@pytest.mark.support("kquants", "mxfp4", "out_gguf", "llamacpp", param="family_model")
@pytest.mark.llamacpp
def test_gguf_methods_load_in_llamacpp_and_kld(family_model, ggufs, eval_ids):
    import gguf
    fam, model = family_model
    # the base is the f32 GGUF in llama.cpp (itself checked against transformers): the KLDs below are the
    # quantization's own, without the engines' float differences (f16 KV cache ...)
    base = llamacpp_logits(ggufs["f32"], eval_ids)
    KLD[f"{fam} gguf f32 vs transformers"] = kld(logits_of(hf_model(model), eval_ids), base)
    assert KLD[f"{fam} gguf f32 vs transformers"] < 2e-3
    klds = {}
    for k, path in ggufs.items():
        if k == "f32":
            continue
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
        exps = {n: t for n, t in types.items() if "_exps.weight" in n}
        assert len(exps) == 6 and not any(t.name in ("F32", "F16", "BF16") for t in exps.values()), (k, exps)
        if k == "mxfp4_moe":
            assert {t.name for t in exps.values()} == {"MXFP4"}
        got = llamacpp_logits(path, eval_ids)
        assert torch.isfinite(got).all(), k
        klds[k] = KLD[f"{fam} gguf {k}"] = kld(base, got)
    assert all(math.isfinite(v) and v > 0 for v in klds.values()), klds
    # each calibrated variant stays near its plain preset. At these widths (64/128 columns) llama.cpp's rules
    # give q4_k_m / q5_k_m their fallbacks Q5_0 / Q5_1 (and Q8_0), nearly equal, and the calibrated variants
    # land within noise of plain rounding, either side: no ordering is asserted.
    for k in ("q4_k_m imatrix", "q4_k_m optimizer", "q4_k_m awq"):
        assert klds[k] < 1.5 * klds["q4_k_m"], (k, klds)
    for k in ("q5_k_m imatrix", "q5_k_m optimizer+imatrix"):
        assert klds[k] < 1.5 * klds["q5_k_m"], (k, klds)
    assert klds["mxfp4_moe"] < 0.05, klds


# ---------------------------------------------------------------- an expert that no calibration token reaches

@pytest.fixture(scope="module")
def starved(gpt_oss, work) -> Path:
    """The gpt-oss model with expert 3's router bias at -1e4 in every layer: the router never picks it."""
    from safetensors.torch import save_file
    d = work / "starved"
    shutil.copytree(gpt_oss, d)
    sd = load_file(d / "model.safetensors")
    for i in range(2):
        sd[f"model.layers.{i}.mlp.router.bias"][3] = -1e4
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


def textbook_rtn(w: torch.Tensor, gs: int = 32) -> torch.Tensor:
    x = w.float().reshape(w.shape[0], -1, gs)
    scale = (2 * x.abs().amax(-1, keepdim=True) / 15).half().float()
    return ((torch.clamp(torch.round(x / scale) + 8, 0, 15) - 8) * scale).reshape(w.shape)


def test_expert_without_tokens_gptq_falls_back_to_rtn(starved, texts, work, caplog):
    from quantkit.families import load
    out = convert(starved, work / "starved_gptq", texts[0], "--to", "safetensors", "--method", "gptq",
                  "--group-size", "32")
    rep = report(out)
    want = {(f"blk.{i}.ffn_{k}_exps.weight", 3, 0) for i in range(2) for k in ("gate", "up", "down")}
    assert {(f["tensor"], f["expert"], f["tokens"]) for f in rep["fallbacks"]} == want
    for i in range(2):
        ex = rep["tensors"][f"blk.{i}.ffn_gate_exps.weight"]["experts"]
        assert [e["method"] for e in ex] == ["gptq"] * 3 + ["rtn"] and ex[3]["tokens"] == 0
        assert sum(e["tokens"] for e in ex) == 2 * 8 * 64  # top-2: every token counted twice
    # expert 3 is packed like the others (no 16-bit leftover) and is exactly RTN of its weights
    st = load_file(out / "model.safetensors")
    mods = gptq_modules(st, 4, "gptq")
    g = load(starved)
    for i in range(2):
        for kind in ("gate", "up", "down"):
            w = stacked_from_modules(mods, i, kind, 4)
            assert torch.isfinite(w).all()
            assert torch.equal(w[3], textbook_rtn(g[f"blk.{i}.ffn_{kind}_exps.weight"].load()[3]))
    check_report_matches(rep, mods, 4)


def test_expert_without_tokens_forced_routing(starved, texts, work):
    out = convert(starved, work / "starved_gptq_all", texts[0], "--to", "safetensors", "--method", "gptq",
                  "--group-size", "32", "--moe-route-all")
    rep = report(out)
    assert rep["fallbacks"] == [] and rep["options"]["route_all"] is True
    for i in range(2):
        ex = rep["tensors"][f"blk.{i}.ffn_down_exps.weight"]["experts"]
        assert [e["tokens"] for e in ex] == [8 * 64] * 4 and all(e["method"] == "gptq" for e in ex)
    mods = gptq_modules(load_file(out / "model.safetensors"), 4, "gptq")
    check_report_matches(rep, mods, 4)


def test_expert_without_tokens_awq_and_imatrix(starved, texts, work):
    from quantkit.calibration.imatrix import imatrix_from_calib
    from quantkit.families import load
    out = convert(starved, work / "starved_awq", texts[0], "--to", "safetensors", "--method", "awq",
                  "--group-size", "32", "--format", "compressed-tensors")
    rep = report(out)
    want = {(f"blk.{i}.ffn_{k}_exps.weight", 3, 0) for i in range(2) for k in ("gate", "up", "down")}
    assert {(f["tensor"], f["expert"], f["tokens"]) for f in rep["fallbacks"]} == want
    assert all(rows[3]["routed"] == 0 for rows in rep["experts"].values())
    st = load_file(out / "model.safetensors")
    mods = ct_modules(st, json.loads((out / "config.json").read_text())["quantization_config"])
    assert all(f"model.layers.{i}.mlp.experts.3.{p}_proj" in mods for i in range(2) for p in ("gate", "up", "down"))
    assert all(torch.isfinite(w).all() for w in mods.values())
    # the importance matrix: no count for expert 3 (as llama-imatrix), every token with forced routing
    g = load(starved)
    for route_all, want3 in ((False, 0), (True, 4 * 64)):
        im = imatrix_from_calib(g, texts[0], n_ctx=64, n_chunks=4, progress=False, route_all=route_all)
        c = im.counts["blk.1.ffn_down_exps.weight"]
        assert int(c[3]) == want3 and bool(torch.isfinite(im.sums["blk.1.ffn_down_exps.weight"]).all())


def test_expert_without_tokens_optimizer_gptq(starved, texts, work, caplog):
    import gguf
    import logging
    with caplog.at_level(logging.WARNING):
        out = convert(starved, work / "starved_opt.gguf", texts[0], "--q", "q4_k_m", "--optimizer", "gptq")
    msgs = [r.getMessage() for r in caplog.records]
    for i in range(2):
        for k in ("gate", "up", "down"):
            assert any(f"blk.{i}.ffn_{k}_exps.weight expert 3 (0 tokens)" in m for m in msgs), msgs
    for t in gguf.GGUFReader(str(out)).tensors:
        if "_exps.weight" in t.name:
            assert t.tensor_type.name not in ("F32", "F16", "BF16")
            assert np_finite(gguf.quants.dequantize(t.data, t.tensor_type))


def np_finite(a) -> bool:
    import numpy as np
    return bool(np.isfinite(a).all())


# ---------------------------------------------------------------- shared experts (Qwen2-MoE)

@pytest.fixture(scope="module")
def qwen2_moe(work) -> Path:
    from moe_models import make_tiny_moe
    return make_tiny_moe("qwen2_moe", work / "qwen2_moe")


@pytest.mark.support("awq", "gptq", "out_gptq", family="qwen2moe")
def test_shared_expert_awq_fold_and_gptq(qwen2_moe, work):
    """AWQ folds the norm's scale into the router's and the shared-expert gate's columns too (transformers'
    logits unchanged by the fold); GPTQ calibrates the shared expert on every token and writes it, the
    experts and the [1, d] shared gate where transformers' Qwen2-MoE reads them."""
    from quantkit.families import load
    from quantkit.quant.awq import AWQConfig, fold_graph, run_awq
    from quantkit.jobs.gptq import gptq_to_safetensors
    from quantkit.runtime.model import CausalLM
    g = load(qwen2_moe)
    samples = [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(k)) for k in range(8)]
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(99))
    ref = logits_of(hf_model(qwen2_moe), ids)
    res = run_awq(g, samples, AWQConfig(group_size=32), progress=False, quantize=False)
    groups = {(grp.prev, grp.linears, grp.floats, grp.per_expert) for _, grp, _ in res.scales}
    assert ("ffn_norm", ("ffn_gate_exps", "ffn_up_exps", "ffn_gate_shexp", "ffn_up_shexp"),
            ("ffn_gate_inp", "ffn_gate_inp_shexp"), False) in groups
    assert ("ffn_up_shexp", ("ffn_down_shexp",), (), False) in groups
    assert ("ffn_up_exps", ("ffn_down_exps",), (), True) in groups
    torch.testing.assert_close(CausalLM(fold_graph(g, res.fold_plan()))(ids), ref, atol=2e-4, rtol=1e-4)

    from quantkit.formats.quantized_writer import QuantizedPacker, quantization_config, write_quantized_checkpoint
    from quantkit.graph import LazyTensor
    from quantkit.quant.gptq_driver import GridOptions, quantize_graph
    packer = QuantizedPacker("gptq", True, g)
    r = quantize_graph(g, samples, GridOptions(group_size=32), progress=False, on_tensor=packer.add)
    sh = r.report["tensors"]["blk.0.ffn_up_shexp.weight"]
    assert sh["method"] == "gptq" and sh["tokens"] == 8 * 32
    out = work / "qwen2_moe_gptq"
    qc = quantization_config("gptq", 4, 32, True, False, False, 0.01, True, "gptq", g)
    write_quantized_checkpoint(g, out, packer.packed, qc, progress=False, experts=packer.experts)
    mods = gptq_modules(load_file(out / "model.safetensors"), 4, "gptq")
    assert "model.layers.1.mlp.shared_expert.down_proj" in mods and "model.layers.0.mlp.experts.3.up_proj" in mods
    deq = dequantized_dir(out, mods, work / "qwen2_moe_deq")
    t = dict(g.tensors)
    for n, ql in r.linears.items():
        t[n] = LazyTensor(g[n].shape, "F32", lambda ql=ql: ql.dequantize())
    for n, qls in r.experts.items():
        t[n] = LazyTensor(g[n].shape, "F32", lambda qls=qls: torch.stack([q.dequantize() for q in qls]))
    ours = CausalLM(g.with_tensors(t))(ids)
    # transformers reads our checkpoint's names (experts, shared expert, its [1, d] gate) as we evaluated it
    torch.testing.assert_close(logits_of(hf_model(deq), ids), ours, atol=2e-3, rtol=1e-3)
    rt = quantize_graph(g, samples, GridOptions(method="rtn", group_size=32), progress=False)
    t = dict(g.tensors)
    for n, ql in rt.linears.items():
        t[n] = LazyTensor(g[n].shape, "F32", lambda ql=ql: ql.dequantize())
    for n, qls in rt.experts.items():
        t[n] = LazyTensor(g[n].shape, "F32", lambda qls=qls: torch.stack([q.dequantize() for q in qls]))
    KLD["qwen2-moe gptq w4g32 (in-memory, held-out ids)"] = kld(ref, ours)
    KLD["qwen2-moe rtn w4g32 (in-memory, held-out ids)"] = k_rtn = kld(ref, CausalLM(g.with_tensors(t))(ids))
    assert KLD["qwen2-moe gptq w4g32 (in-memory, held-out ids)"] < k_rtn


# ---------------------------------------------------------------- k-quant block types on the experts

@pytest.mark.support("kquants", "llamacpp", family="mixtral")
@pytest.mark.llamacpp
def test_kquant_types_on_experts_in_llamacpp(work, texts, smollm_tokenizer_dir, eval_ids):
    """A Mixtral 256 wide, so that q4_k_m / q5_k_m give the experts real k-quant types (Q4_K, Q5_K, Q6_K;
    narrower matrices fall back to Q5_0/Q5_1/Q8_0 above): plain, imatrix and --optimizer gptq load in
    llama.cpp; KLD against the f32 GGUF in llama.cpp."""
    import gguf
    from moe_models import make_tiny_moe

    from quantkit.calibration.imatrix import imatrix_from_calib, write_imatrix_gguf
    from quantkit.families import load
    d = make_tiny_moe("mixtral", work / "mixtral_wide", vocab=VOCAB, hidden=256, ffn=256)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy2(f, d / f.name)
    im = work / "mixtral_wide.imatrix.gguf"
    write_imatrix_gguf(imatrix_from_calib(load(d), texts[0], n_ctx=64, n_chunks=8, progress=False), im)
    runs = {"f32": ("--q", "f32"), "q4_k_m": ("--q", "q4_k_m"), "q4_k_m imatrix": ("--q", "q4_k_m", "--imatrix", im),
            "q4_k_m optimizer": ("--q", "q4_k_m", "--optimizer", "gptq"),
            "q5_k_m optimizer+imatrix": ("--q", "q5_k_m", "--optimizer", "gptq", "--imatrix", im)}
    paths = {k: convert(d, work / f"wide-{k.replace(' ', '_').replace('+', '_')}.gguf", texts[0],
                        "--calib-samples", "16", *a) for k, a in runs.items()}
    base = llamacpp_logits(paths["f32"], eval_ids)
    klds = {}
    for k, p in paths.items():
        if k == "f32":
            continue
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(p)).tensors if "_exps.weight" in t.name}
        assert set(types.values()) <= {"Q4_K", "Q5_K", "Q6_K"} and len(types) == 6, (k, types)
        klds[k] = KLD[f"mixtral-256 gguf {k}"] = kld(base, llamacpp_logits(p, eval_ids))
    assert all(math.isfinite(v) and v > 0 for v in klds.values()), klds
    for k in ("q4_k_m imatrix", "q4_k_m optimizer"):
        assert klds[k] < 1.5 * klds["q4_k_m"], klds
    assert klds["q5_k_m optimizer+imatrix"] < klds["q4_k_m"], klds
