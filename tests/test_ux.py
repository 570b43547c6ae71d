"""What a user of llama.cpp's tools, GPTQModel or llm-compressor expects from the CLI: default names, options that
do not apply refused with a reason, llama-quantize's summary and plan, provenance, model cards, consistent
perplexity, saved base log-probs, plots, verbosity. Outputs are read back with gguf's reader, transformers,
llama.cpp, hashlib and PIL rather than with quantkit."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from test_bad_input import assert_one_line_error, run_cli
from tiny_models import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm_tokenizer_dir):
    d = make_tiny("llama_gqa_llama3", tmp_path_factory.mktemp("ux") / "tiny", vocab=49152)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def text(tmp_path_factory, jargon_text):
    p = tmp_path_factory.mktemp("text") / "eval.txt"
    p.write_text(jargon_text[:30000])
    return p


@pytest.fixture(scope="module")
def q4(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("q4") / "tiny-Q4_K_M.gguf"
    r = run_cli("convert", tiny, "--q", "q4_k_m", "-o", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def gguf_types(path):
    import gguf
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


# ---------------------------------------------------------------- output names

def test_default_output_names(tiny, tmp_path):
    r = run_cli("convert", tiny, "--q", "q8_0", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tiny-Q8_0.gguf").is_file() and str(tmp_path / "tiny-Q8_0.gguf") in r.stdout
    r = run_cli("convert", tiny, "--to", "safetensors", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "tiny-bf16" / "config.json").is_file(), r.stderr
    r = run_cli("convert", tiny, "--to", "safetensors", "--method", "rtn", "--group-size", "32", "--no-progress",
                cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "tiny-rtn-w4g32" / "config.json").is_file(), r.stderr
    # -o a folder: the default file name inside it
    d = tmp_path / "ggufs"
    d.mkdir()
    r = run_cli("convert", tiny, "--q", "q4_0", "-o", d, "--no-progress")
    assert r.returncode == 0 and gguf_types(d / "tiny-Q4_0.gguf")["blk.0.attn_q.weight"] == "Q4_0", r.stderr
    assert_one_line_error(run_cli("convert", tiny, "--to", "safetensors", "-o", tmp_path / "x.gguf"),
                          "x.gguf", "--to gguf")
    assert not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------- options that do not apply

@pytest.mark.parametrize("extra,needles", [
    (["--q", "q4_k_m", "--calib", "CALIB"], ["--calib does not apply", "plain GGUF"]),
    (["--q", "q4_k_m", "--bits", "3"], ["--bits does not apply", "GGUF types come from --q"]),
    (["--q", "q4_k_m", "--group-size", "64"], ["--group-size does not apply"]),
    (["--to", "safetensors", "--q", "bf16", "--bits", "3"], ["--bits does not apply", "plain safetensors"]),
    (["--to", "safetensors", "--method", "rtn", "--calib", "CALIB"], ["--calib does not apply", "rtn"]),
    (["--to", "safetensors", "--method", "awq", "--damp", "0.1", "--calib", "CALIB"], ["--damp does not apply"]),
    (["--to", "safetensors", "--method", "gptq", "--awq-full-search", "--calib", "CALIB"],
     ["--awq-full-search does not apply", "--method gptq"]),
    (["--q", "q4km"], ["did you mean 'q4_k_m'"]),
    (["--to", "safetensors", "--q", "q4_k_m"], ["GGUF types need --to gguf"]),
])
def test_inapplicable_options_are_errors(tiny, tmp_path, text, extra, needles):
    extra = [str(text) if a == "CALIB" else a for a in extra]
    r = run_cli("convert", tiny, "-o", tmp_path / "o", *extra)
    assert_one_line_error(r, *needles)
    assert list(tmp_path.iterdir()) == []


def test_q_lists_agree_between_help_and_error(tiny, tmp_path):
    helptext = " ".join(run_cli("convert", "--help").stdout.split())
    in_help = re.search(r"GGUF: (.*?); safetensors", helptext).group(1).split()
    err = run_cli("convert", tiny, "--q", "zz", "-o", tmp_path / "x.gguf").stderr
    in_error = re.search(r"expected one of: (.*)\)", err).group(1).split(", ")
    assert in_help == in_error and "q2_k" in in_help and "mxfp4" in in_help


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_in_every_command(tiny, text, tmp_path):
    for args in (["convert", tiny, "-o", tmp_path / "x.gguf"], ["perplexity", tiny, "--text", text],
                 ["imatrix", tiny, "--calib", text, "-o", tmp_path / "i.gguf"]):
        assert_one_line_error(run_cli(*args, "--device", "cuda"), "--device cuda", "CUDA is not available")
    assert list(tmp_path.iterdir()) == []


def test_chunks(q4, text):
    from quantkit.pipeline import perplexity
    assert_one_line_error(run_cli("perplexity", q4[0], "--text", text, "--chunks", "-1"), "--chunks -1")
    a = perplexity(q4[0], text, ctx=128, chunks=0, progress=False)
    b = perplexity(q4[0], text, ctx=128, chunks=None, progress=False)
    assert a["n_chunks"] == b["n_chunks"] > 1 and a["ppl"] == b["ppl"]


# ---------------------------------------------------------------- verbosity

def test_quiet_and_verbose_anywhere(tiny, tmp_path):
    for i, args in enumerate((["-q", "convert"], ["convert", "-q"])):
        out = tmp_path / f"q{i}.gguf"
        r = run_cli(*args, tiny, "--q", "q8_0", "-o", out)
        assert r.returncode == 0 and r.stdout.strip() == str(out), r.stdout
        assert "INFO" not in r.stderr and "%|" not in r.stderr, r.stderr  # no logging, no progress bar
    for i, args in enumerate((["-v", "convert"], ["convert", "-v"])):
        r = run_cli(*args, tiny, "--q", "q8_0", "-o", tmp_path / f"v{i}.gguf", "--no-progress")
        assert r.returncode == 0 and "DEBUG:" in r.stderr, r.stderr


def test_gptq_prints_a_summary_not_a_table(tiny, text, tmp_path):
    args = ["convert", tiny, "--to", "safetensors", "--method", "gptq", "--group-size", "32", "--calib", text,
            "--calib-samples", "4", "--calib-seqlen", "64", "--no-progress"]
    r = run_cli(*args, "-o", tmp_path / "g")
    assert r.returncode == 0, r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2, r.stderr
    assert "GPTQ: 14 tensors, relative output error" in r.stdout and "quantkit_report.json" in r.stdout
    rep = json.loads((tmp_path / "g" / "quantkit_report.json").read_text())
    assert all("output_rel_err" in t and "time_s" in t for t in rep["tensors"].values())
    r = run_cli(*args, "-o", tmp_path / "g2", "-v")
    assert "blk.1.ffn_down.weight" in r.stderr  # the full table with -v


# ---------------------------------------------------------------- summary, plan, provenance

def test_summary_counts_fallbacks_like_the_file(q4):
    out, stdout = q4
    types = gguf_types(out)
    # 64-wide rows cannot hold 256-element super-blocks: Q4_K -> Q5_0, Q6_K -> Q8_0 (llama.cpp's fallbacks)
    m = re.findall(r"(\d+) tensors? fell back (\w+)->(\w+) because", stdout)
    assert m and sum(int(n) for n, a, b in m if b == "Q5_0") == sum(t == "Q5_0" for t in types.values())
    assert "is not a multiple of 256" in stdout
    import gguf
    data = sum(int(t.n_bytes) for t in gguf.GGUFReader(out).tensors)
    mib = float(re.search(r"-> ([\d.]+) MiB", stdout).group(1))
    assert abs(mib - data / 2**20) < 0.06 and re.search(r"[\d.]+ bits per weight, [\d.]+ s", stdout)


def test_dry_run_plan_is_what_gets_written(tiny, q4, tmp_path):
    r = run_cli("convert", tiny, "--q", "q4_k_m", "-o", tmp_path / "plan.gguf", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert not (tmp_path / "plan.gguf").exists() and plan["dry_run"]
    import gguf
    written = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in gguf.GGUFReader(q4[0]).tensors}
    assert {x["name"]: (x["type"], x["bytes"]) for x in plan["rows"]} == written


def test_imatrix_provenance_keys(tiny, text, tmp_path):
    import gguf
    im = tmp_path / "imatrix.gguf"
    assert run_cli("imatrix", tiny, "--calib", text, "-o", im, "--ctx", "64", "--chunks", "3",
                   "--no-progress").returncode == 0
    out = tmp_path / "o.gguf"
    r = run_cli("convert", tiny, "--q", "q4_k_m", "--imatrix", im, "-o", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    src = gguf.GGUFReader(im)
    entries = sum(t.name.endswith(".in_sum2") for t in src.tensors)
    f = gguf.GGUFReader(out).fields
    VT = gguf.GGUFValueType

    def val(k):
        fld = f[k]
        return bytes(fld.parts[-1]).decode() if fld.types[0] == VT.STRING else int(fld.parts[-1][0])
    assert [f[k].types[0] for k in ("quantize.imatrix.file", "quantize.imatrix.dataset",
                                    "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count")] == \
        [VT.STRING, VT.STRING, VT.UINT32, VT.UINT32]
    ds = src.fields["imatrix.datasets"]
    assert val("quantize.imatrix.file") == str(im)
    assert val("quantize.imatrix.dataset") == bytes(ds.parts[ds.data[0]]).decode()
    assert val("quantize.imatrix.entries_count") == entries == 14
    assert val("quantize.imatrix.chunks_count") == int(src.fields["imatrix.chunk_count"].parts[-1][0]) == 3


# ---------------------------------------------------------------- inspect

def test_inspect_every_gguf_kind(q4, tiny, text, tmp_path):
    r = run_cli("inspect", q4[0])
    assert r.returncode == 0, r.stderr
    assert "file type Q4_K_M" in r.stdout
    types = gguf_types(q4[0])
    counts = dict((k, int(v)) for k, v in re.findall(r"(\w+) (\d+)", r.stdout.split("types: ")[1].splitlines()[0]))
    from collections import Counter
    assert counts == dict(Counter(t for n, t in types.items() if n != "rope_freqs.weight"))
    table = [ln for ln in r.stdout.splitlines() if re.match(r"^(name|token_embd|blk\.|output)", ln)]
    cols = {ln.index(" Q") if " Q" in ln else ln.index(" F") for ln in table[1:]}
    assert len({len(ln) for ln in table[1:]}) == 1 and len(cols) >= 1  # aligned: equal widths
    im = tmp_path / "i.gguf"
    assert run_cli("imatrix", tiny, "--calib", text, "-o", im, "--ctx", "64", "--chunks", "2",
                   "--no-progress").returncode == 0
    r = run_cli("inspect", im)
    assert r.returncode == 0 and "imatrix" in r.stdout and "blk.0.attn_q.weight.in_sum2" in r.stdout, r.stderr


# ---------------------------------------------------------------- perplexity

@pytest.mark.llamacpp
def test_same_ppl_with_and_without_base_and_llamacpp_tokens(q4, tiny, tmp_path):
    """Whitespace runs split differently in the HF tokenizer and the GGUF vocab: the model keeps its own."""
    from oracles.llamacpp_tok import load_vocab

    from quantkit.pipeline import perplexity
    t = tmp_path / "ws.txt"
    body = "".join(f"word{i}   and    spaces\n\n\n  indented {i}\t\ttabs  " for i in range(120))
    t.write_text(body)
    base = tmp_path / "base"  # the same weights, a tokenizer that splits whitespace runs another way
    shutil.copytree(tiny, base)
    tj = json.loads((base / "tokenizer.json").read_text())
    split = tj["pre_tokenizer"]["pretokenizers"][1]["pattern"]
    split["Regex"] = split["Regex"].replace("\\s+(?!\\S)", "\\s+")
    (base / "tokenizer.json").write_text(json.dumps(tj))
    alone = perplexity(q4[0], t, ctx=64, chunks=4, progress=False)
    based = perplexity(q4[0], t, ctx=64, chunks=4, base=str(base), progress=False)
    assert alone["ppl"] == based["ppl"] and alone["tokenizer"] == based["tokenizer"]
    from quantkit import load
    with load_vocab(q4[0]) as v:  # llama-perplexity: common_tokenize(text, add_special=true, parse_special=false)
        assert load(q4[0]).tokenize(body) == v.tokenize(body, True, False)
    from tokenizers import Tokenizer
    theirs = Tokenizer.from_file(str(base / "tokenizer.json")).encode(body, add_special_tokens=False).ids
    assert theirs != load(q4[0]).tokenize(body)  # scoring with the base's tokenizer would change the PPL
    other = perplexity(q4[0], t, ctx=64, chunks=4, base=str(tiny), tokenizer="base", progress=False)
    assert other["tokenizer"].startswith("base")


def test_saved_base_gives_the_same_numbers(q4, tiny, text, tmp_path):
    from quantkit.pipeline import perplexity
    qk = tmp_path / "base.qkld"
    live = perplexity(q4[0], text, ctx=128, chunks=3, base=str(tiny), save_base=qk, progress=False)
    assert qk.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    saved = perplexity(q4[0], text, ctx=128, chunks=3, base=qk, progress=False)
    assert saved["base_ppl"] == live["base_ppl"] and saved["ppl"] == live["ppl"]
    assert saved["kld_mean"] == pytest.approx(live["kld_mean"], rel=2e-2, abs=2e-5)
    assert saved["top1_agreement"] == pytest.approx(live["top1_agreement"], abs=0.02)
    # the base alone saved, then a different --ctx is refused
    qk2 = tmp_path / "alone.qkld"
    perplexity(str(tiny), text, ctx=128, chunks=3, save_base=qk2, progress=False)
    again = perplexity(q4[0], text, ctx=128, chunks=3, base=qk2, progress=False)
    assert again["base_ppl"] == live["base_ppl"]
    assert_one_line_error(run_cli("perplexity", q4[0], "--text", text, "--ctx", "64", "--base", qk), "--ctx 128")


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_are_pngs(q4, tiny, text, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image
    k, b = tmp_path / "kld.png", tmp_path / "bpw.png"
    r = run_cli("perplexity", q4[0], "--text", text, "--ctx", "128", "--chunks", "3", "--base", tiny, "--plot", k,
                "--no-progress")
    assert r.returncode == 0, r.stderr
    assert run_cli("inspect", q4[0], "--plot", b).returncode == 0
    for p in (k, b):
        w, h = _png_size(p)
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (w, h) and w > 500 and h > 300
            assert len(im.convert("L").getcolors(256)) > 20  # something was drawn
    for p in ("docs/kld_smollm2_q4_k_m.png", "docs/bpw_smollm2_q4_k_m.png"):  # the README shows them
        assert p in (__import__("pathlib").Path(__file__).parents[1] / "README.md").read_text()


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    from quantkit.errors import BadInput
    from quantkit.eval import plots
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(BadInput, match=r"pip install 'quantkit\[plot\]'"):
        plots.plot_bpw({"tensors": [], "path": "x", "bits_per_weight": 0}, tmp_path / "x.png")


# ---------------------------------------------------------------- safetensors outputs: dtype, cards, configs

def test_bf16_output_loads_as_bfloat16(tiny, tmp_path):
    import torch
    import transformers
    assert json.loads((tiny / "config.json").read_text()).get("dtype", "float32") == "float32"
    out = tmp_path / "bf16"
    assert run_cli("convert", tiny, "--to", "safetensors", "--q", "bf16", "-o", out, "--no-progress").returncode == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    m = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert m.dtype == torch.bfloat16
    assert "## Conversion" in (out / "README.md").read_text() and not (out / "quantize_config.json").exists()


def test_model_card_and_engine_config(tiny, text, tmp_path):
    out = tmp_path / "g"
    r = run_cli("convert", tiny, "--to", "safetensors", "--method", "gptq", "--group-size", "32", "--calib", text,
                "--calib-samples", "4", "--calib-seqlen", "64", "-o", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert json.loads((out / "quantize_config.json").read_text()) == cfg["quantization_config"]
    assert cfg["dtype"] == cfg["torch_dtype"] == "float16"
    card = (out / "README.md").read_text()
    assert hashlib.sha256(text.read_bytes()).hexdigest() in card and "| method | `gptq` |" in card
    assert "| group_size | `32` |" in card and "4 samples of 64 tokens" in card
    r = run_cli("perplexity", out, "--text", text, "--ctx", "128", "--chunks", "2", "--base", tiny, "--json",
                "--no-progress")
    p = json.loads(r.stdout)
    card = (out / "README.md").read_text()
    assert f"| perplexity | {p['ppl']:.4f}" in card and f"| mean KLD | {p['kld_mean']:.6f} |" in card


def test_awq_report_has_per_tensor_numbers(tiny, text, tmp_path):
    out = tmp_path / "a"
    r = run_cli("convert", tiny, "--to", "safetensors", "--method", "awq", "--group-size", "32", "--calib", text,
                "--calib-samples", "4", "--calib-seqlen", "64", "-o", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "quantkit_report.json").read_text())
    assert len(rep["tensors"]) == 14
    for name, t in rep["tensors"].items():
        assert 0 < t["weight_rel_err"] < 0.1 and 0 < t["output_rel_err"] < 0.1 and t["time_s"] > 0, name
    assert "AWQ: 14 tensors" in r.stdout
    assert rep["scale_search"] == {"grid": 20, "first_share": 0.25, "min_samples": 8, "top_on_all": 3}
    full = tmp_path / "f"
    r = run_cli("convert", tiny, "--to", "safetensors", "--method", "awq", "--group-size", "32", "--calib", text,
                "--calib-samples", "4", "--calib-seqlen", "64", "-o", full, "--no-progress", "--awq-full-search")
    assert r.returncode == 0, r.stderr
    assert json.loads((full / "quantkit_report.json").read_text())["scale_search"]["first_share"] == 1.0


# ---------------------------------------------------------------- hub, calibration feedback

def test_hub_offline_says_what_to_do(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "quantkit", "inspect", "nobody/nothing-here"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert_one_line_error(r, "nobody/nothing-here", "HF_HUB_OFFLINE", "huggingface-cli download")


def test_hub_download_fetches_templates_and_tokenizers(monkeypatch, tmp_path):
    import huggingface_hub

    from quantkit.families import resolve
    seen = {}

    def fake(repo, allow_patterns=None, **kw):
        seen["patterns"] = allow_patterns
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    resolve("org/model")
    import fnmatch
    for f in ("chat_template.jinja", "tokenizer.model", "tokenizer.json", "merges.txt", "vocab.json",
              "model-00001-of-00002.safetensors", "tokenizer_config.json"):
        assert any(fnmatch.fnmatch(f, p) for p in seen["patterns"]), f


def test_calibration_progress_moves_inside_a_layer(tiny, capsys):
    import torch

    from quantkit.calibration.stream import stream_layers
    from quantkit.families import load
    samples = [torch.arange(16) + k for k in range(3)]
    stream_layers(load(tiny), samples, lambda i, layer, store, rope: store.phase(f"step of {i}"), progress=True)
    err = capsys.readouterr().err
    assert "layer 0: pass 1, sample 1/3" in err and "layer 1: step of 1" in err, err


def test_gguf_report_errors_match_the_file(tiny, tmp_path):
    """--report's per-tensor error, recomputed from the written bytes with gguf's own dequantizer."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    out, rep = tmp_path / "o.gguf", tmp_path / "o.json"
    r = run_cli("convert", tiny, "--q", "q4_k_m", "-o", out, "--report", rep, "--no-progress")
    assert r.returncode == 0 and f"report: {rep}" in r.stdout, r.stderr
    report = json.loads(rep.read_text())
    st = load_file(tiny / "model.safetensors")
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for name, hf in (("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                     ("blk.1.attn_v.weight", "model.layers.1.self_attn.v_proj.weight")):
        t = tensors[name]
        deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(st[hf].shape)
        w = st[hf].astype(np.float64)
        ref = ((w - deq) ** 2).sum() / (w ** 2).sum()
        info = report["tensors"][name]
        assert info["type"] == t.tensor_type.name and info["time_s"] > 0
        assert info["weight_rel_err"] == pytest.approx(ref, rel=1e-4), name
    assert report["n_tensors"] == len(tensors) and report["fallbacks"]
    assert_one_line_error(run_cli("convert", tiny, "--to", "safetensors", "-o", tmp_path / "s", "--report", rep),
                          "--report does not apply")


def test_tokenizer_path_is_stated(q4, tiny, text):
    from quantkit.pipeline import perplexity
    own = perplexity(q4[0], text, ctx=128, chunks=2, progress=False)
    hf = perplexity(q4[0], text, ctx=128, chunks=2, tokenizer=str(tiny), progress=False)
    assert hf["tokenizer"] == str(tiny) and own["tokenizer"].startswith("model's own")
    assert hf["ppl"] == own["ppl"]  # the same vocabulary, the same tokens for this text
    assert_one_line_error(run_cli("perplexity", q4[0], "--text", text, "--tokenizer", "nope"), "--tokenizer nope")
