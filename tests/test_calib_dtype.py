"""--calib-dtype: calibration forwards in bfloat16 (as llm-compressor / GPTQModel run them on GPUs).

Oracles: transformers' own bfloat16 hidden states for the captured activations; transformers running the
compressed-tensors checkpoints and llama.cpp running the GGUFs for the accuracy of bf16- vs float32-calibrated
outputs; gguf's reader for the imatrix sums. Plus the contracts: the CPU default follows the stored dtype and the
CPU (a float32 model: float32 byte for byte), bf16 runs are deterministic, the disk-spilled bf16 store equals the
in-RAM one, --resume refuses another dtype and resumes a bf16 run to the same bytes, bad values are one-line
errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantized_outputs import held_out_ids
from test_bad_input import assert_one_line_error, run_cli
from tiny_models import hf_logits, make_tiny

VOCAB = 49152
CALIB = ["--calib-samples", "8", "--calib-seqlen", "64"]


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm_tokenizer_dir):
    """Hidden 256: whole k-quant super-blocks, so --optimizer gptq rounds Q4_K/Q6_K for real."""
    d = make_tiny("llama_gqa_llama3", tmp_path_factory.mktemp("cdt") / "m", hidden=256, ffn=512, vocab=VOCAB)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def calib(tmp_path_factory, jargon_text):
    p = tmp_path_factory.mktemp("cdt_text") / "calib.txt"
    p.write_text(jargon_text[:20_000])
    return p


@pytest.fixture(scope="module")
def held_out(model, jargon_text):
    ids = held_out_ids(model, jargon_text)
    return ids, hf_logits(model, ids)


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "quantkit", *map(str, args), "--no-progress"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def tree_bytes(p: Path) -> dict:
    if p.is_file():
        return {p.name: p.read_bytes()}
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*"))
            if f.is_file() and f.name != "quantkit_report.json"}  # the report holds timings


def kld(base: torch.Tensor, q: torch.Tensor) -> float:
    lb, lq = torch.log_softmax(base.double(), -1), torch.log_softmax(q.double(), -1)
    return float((lb.exp() * (lb - lq)).sum(-1).mean())


def transformers_logits(out: Path, ids: torch.Tensor) -> torch.Tensor:
    """The compressed-tensors checkpoint decoded by compressed-tensors' own decompressor, run in transformers."""
    from test_frontier_methods import decoded, hf_logits_all_read
    from test_moe_methods import dequantized_dir
    return hf_logits_all_read(dequantized_dir(out, decoded(out), out.parent / f"{out.name}-deq"), ids)


def llamacpp_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    import numpy as np

    from oracles.llamacpp_model import LlamaModel
    with LlamaModel(path, n_ctx=64, exact=True) as m:
        return torch.stack([torch.from_numpy(np.asarray(m.logits(row.tolist()))) for row in ids])


# ---------------------------------------------------------------- the captured activations

def test_bf16_activations_are_transformers_bf16_hidden_states(model):
    """The layer inputs the stream captures in bfloat16 are transformers' bfloat16 hidden states (its default
    SDPA attention, norms in float32 as ours; on this CPU they are bit-equal), and not its float32 ones rounded."""
    import transformers

    from quantkit.calibration.stream import iter_layers
    from quantkit.families import load
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    hs = {}
    for dt in (torch.bfloat16, torch.float32):
        m = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dt, attn_implementation="sdpa").eval()
        with torch.no_grad():
            hs[dt] = m(ids, output_hidden_states=True).hidden_states
    got = []
    for slot in iter_layers(load(model), list(ids), dtype=torch.bfloat16, progress=False):
        assert slot.store.data.dtype == torch.bfloat16
        got.append(slot.store.data.clone())
    assert torch.equal(got[0], hs[torch.bfloat16][0])  # the embedding rows, as stored
    ref, f32 = hs[torch.bfloat16][1].float(), hs[torch.float32][1]
    d_bf, d_f32 = (got[1].float() - ref).abs(), (got[1].float() - f32).abs()
    torch.testing.assert_close(got[1].float(), ref, atol=2e-2, rtol=1.6e-2)  # a few bf16 ulps
    assert float(d_bf.mean()) < 0.1 * float(d_f32.mean()), (float(d_bf.mean()), float(d_f32.mean()))


# ---------------------------------------------------------------- accuracy against the float32 calibration

@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_safetensors_bf16_calibration_close_to_float32(method, model, calib, held_out, tmp_path, one_thread):
    ids, base = held_out
    k, bytes_ = {}, {}
    for dt in ("float32", "bfloat16"):
        out = tmp_path / dt
        cli("convert", model, "-o", out, "--to", "safetensors", "--method", method, "--format",
            "compressed-tensors", "--group-size", "32", "--calib", calib, *CALIB, "--calib-dtype", dt)
        assert json.loads((out / "quantkit_report.json").read_text())["calib_dtype"] == dt
        k[dt] = kld(base, transformers_logits(out, ids))
        bytes_[dt] = tree_bytes(out)
    print(f"\n{method} KLD vs float: {k}")
    assert bytes_["float32"] != bytes_["bfloat16"]  # the option reached the forwards
    assert 0 < k["bfloat16"] < 1.5 * k["float32"] + 1e-3, k


@pytest.mark.llamacpp
def test_gguf_optimizer_awq_and_imatrix_bf16_close_to_float32(model, calib, held_out, tmp_path, one_thread):
    from gguf import GGUFReader
    ids, base = held_out
    k, sums = {}, {}
    for dt in ("float32", "bfloat16"):
        out = tmp_path / f"opt-{dt}.gguf"
        r = cli("convert", model, "-o", out, "--q", "q4_k_m", "--optimizer", "gptq", "--calib", calib, *CALIB,
                "--calib-dtype", dt, "--json")
        assert json.loads(r.stdout)["calib_dtype"] == dt
        k["opt", dt] = kld(base, llamacpp_logits(out, ids))
        out = tmp_path / f"awq-{dt}.gguf"
        r = cli("convert", model, "-o", out, "--q", "q4_k_m", "--awq", "--calib", calib, *CALIB, "--calib-dtype", dt,
                "--json")
        assert json.loads(r.stdout)["calib_dtype"] == dt
        k["awq", dt] = kld(base, llamacpp_logits(out, ids))
        im = tmp_path / f"im-{dt}.gguf"
        r = cli("imatrix", model, "--calib", calib, "-o", im, "--ctx", "64", "--chunks", "8", "--calib-dtype", dt,
                "--json")
        assert json.loads(r.stdout)["calib_dtype"] == dt
        sums[dt] = {t.name: torch.from_numpy(t.data.copy()).double() for t in GGUFReader(im).tensors
                    if t.name.endswith(".in_sum2")}
        out = tmp_path / f"im-{dt}-q.gguf"
        cli("convert", model, "-o", out, "--q", "q4_k_m", "--imatrix", im)
        k["imatrix", dt] = kld(base, llamacpp_logits(out, ids))
    print(f"\nq4_k_m KLD vs float: {k}")
    for what in ("opt", "awq", "imatrix"):
        assert 0 < k[what, "bfloat16"] < 1.5 * k[what, "float32"] + 1e-3, k
    assert sums["float32"].keys() == sums["bfloat16"].keys() and len(sums["float32"]) == 14
    for n, s in sums["float32"].items():  # sums of squares of bf16 activations: within a few bf16 ulps
        rel = float((sums["bfloat16"][n] - s).abs().max() / s.abs().max())
        assert 0 < rel < 3e-2, (n, rel)


@pytest.mark.llamacpp
def test_moe_bf16_calibration_close_to_float32(tmp_path, smollm_tokenizer_dir, jargon_text, one_thread):
    """Qwen2-MoE (routed experts and a gated shared expert): GPTQ and AWQ compressed-tensors decoded by
    compressed-tensors and run in transformers, --optimizer gptq run in llama.cpp; bf16 calibration of the
    experts' Hessians, AWQ's per-expert searches and the optimizer's expert rounding stay close to float32's."""
    from quantized_outputs import calib_flags
    from test_frontier_methods import _make, hf_logits_all_read
    model = _make("qwen2_moe", tmp_path / "model", smollm_tokenizer_dir)
    flags = calib_flags(tmp_path, jargon_text)
    ids = held_out_ids(model, jargon_text)
    base = hf_logits_all_read(model, ids)
    k = {}
    for dt in ("float32", "bfloat16"):
        for method in ("gptq", "awq"):
            out = tmp_path / f"{method}-{dt}"
            cli("convert", model, "-o", out, "--to", "safetensors", "--method", method, "--format",
                "compressed-tensors", "--group-size", "32", *flags, "--calib-dtype", dt)
            k[method, dt] = kld(base, transformers_logits(out, ids))
        out = tmp_path / f"opt-{dt}.gguf"
        cli("convert", model, "-o", out, "--q", "q4_k_m", "--optimizer", "gptq", *flags, "--calib-dtype", dt)
        k["opt", dt] = kld(base, llamacpp_logits(out, ids))
    print(f"\nqwen2-moe KLD vs float: {k}")
    for what in ("gptq", "awq", "opt"):
        assert 0 < k[what, "bfloat16"] < 1.5 * k[what, "float32"] + 1e-3, k


# ---------------------------------------------------------------- contracts

def test_cpu_default_is_float32_byte_for_byte(model, calib, tmp_path, one_thread):
    outs = {}
    for name, extra in (("default", []), ("f32", ["--calib-dtype", "float32"])):
        out = tmp_path / name
        r = cli("convert", model, "-o", out, "--to", "safetensors", "--method", "gptq", "--group-size", "32",
                "--calib", calib, *CALIB, *extra, "--json")
        assert json.loads(r.stdout)["calib_dtype"] == "float32"
        outs[name] = tree_bytes(out)
        im = tmp_path / f"{name}.imatrix"
        cli("imatrix", model, "--calib", calib, "-o", im, "--ctx", "64", "--chunks", "4", *extra)
        outs[name]["imatrix"] = im.read_bytes()
    assert outs["default"] == outs["f32"]


def test_auto_follows_the_stored_dtype_and_the_cpu(model, calib, tmp_path, monkeypatch):
    """--calib-dtype auto on the CPU: bfloat16 for a model stored in bfloat16 when the CPU has bf16 dot products
    (torch's probes, patched both ways here), float32 for a float32 model or without them; the commands resolve
    it from the checkpoint they read, and auto gives the bytes of the dtype it names."""
    from safetensors.torch import load_file, save_file

    from quantkit.calibration.stream import calib_dtype_name
    from quantkit.families import load
    bf = tmp_path / "bf16"
    shutil.copytree(model, bf)
    for f in bf.glob("*.safetensors"):
        t = load_file(f)
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in t.items()}, f,
                  metadata={"format": "pt"})
    g16, g32 = load(bf), load(model)
    for avx, amx in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda avx=avx: avx)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert calib_dtype_name("auto", "cpu", g16) == ("bfloat16" if avx or amx else "float32")
        assert calib_dtype_name("auto", "cpu", g32) == "float32"
        assert calib_dtype_name(None, "cuda:0", g32) == "bfloat16"
        assert calib_dtype_name("float32", "cpu", g16) == "float32"
    monkeypatch.undo()
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    want = "bfloat16" if native else "float32"
    outs = {}
    for name, extra in (("auto", []), ("named", ["--calib-dtype", want])):
        out = tmp_path / f"{name}.gguf"
        r = cli("convert", bf, "-o", out, "--q", "q4_k_m", "--optimizer", "gptq", "--calib", calib, *CALIB, *extra,
                "--json")
        assert json.loads(r.stdout)["calib_dtype"] == want
        im = tmp_path / f"{name}.imatrix"
        r = cli("imatrix", bf, "--calib", calib, "-o", im, "--ctx", "64", "--chunks", "4", *extra, "--json")
        assert json.loads(r.stdout)["calib_dtype"] == want
        outs[name] = (out.read_bytes(), im.read_bytes())
    assert outs["auto"] == outs["named"]


def test_bf16_runs_are_deterministic(model, calib, tmp_path, one_thread):
    outs = []
    for k in range(2):
        out = tmp_path / f"r{k}.gguf"
        cli("convert", model, "-o", out, "--q", "q4_k_m", "--optimizer", "gptq", "--calib", calib, *CALIB,
            "--calib-dtype", "bfloat16")
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_disk_spilled_bf16_store_gives_the_same_result(model, calib, one_thread):
    """GPTQ (true-sequential, the branch caches too) and imatrix with every activation store on disk."""
    from quantkit.calibration.data import load_calibration
    from quantkit.calibration.imatrix import compute_imatrix
    from quantkit.calibration.stream import ActivationStore
    from quantkit.families import load
    from quantkit.quant.gptq_driver import GridOptions, quantize_graph
    x = torch.randn(3, 5, 7).to(torch.bfloat16)
    st = ActivationStore(3, 5, 7, torch.bfloat16, budget_bytes=1)
    for i in range(3):
        st[i] = x[i]
    assert st.on_disk and torch.equal(torch.cat(list(st.batches("cpu", torch.bfloat16))), x)
    g = load(model)
    samples = load_calibration(g, calib, 4, 64, 0)
    opts = dict(group_size=32, calib_dtype=torch.bfloat16)
    ram = quantize_graph(g, samples, GridOptions(**opts), progress=False)
    disk = quantize_graph(g, samples, GridOptions(**opts), progress=False, budget_bytes=1)
    assert ram.linears.keys() == disk.linears.keys() and len(ram.linears) == 14
    for n, q in ram.linears.items():
        assert torch.equal(q.codes, disk.linears[n].codes) and torch.equal(q.scales, disk.linears[n].scales), n
    f32 = quantize_graph(g, samples, GridOptions(group_size=32), progress=False)
    assert any(not torch.equal(q.codes, f32.linears[n].codes) for n, q in ram.linears.items())
    a = compute_imatrix(g, samples, dtype=torch.bfloat16, progress=False)
    b = compute_imatrix(g, samples, dtype=torch.bfloat16, progress=False, budget_bytes=1)
    assert all(torch.equal(a.sums[n], b.sums[n]) for n in a.sums) and a.sums.keys() == b.sums.keys()


def test_resume_bf16_refuses_another_dtype_and_gives_the_same_bytes(tmp_path, smollm_tokenizer_dir):
    from test_resume import killed_after_layers
    m = make_tiny("llama_gqa_llama3", tmp_path / "m", layers=6, hidden=128, ffn=256, vocab=VOCAB)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy(f, m / f.name)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jumbo pies".split()
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(words[(i * 7) % len(words)] for i in range(40000)))
    common = [m, "--q", "q4_k_m", "--optimizer", "gptq", "--calib", calib, "--calib-samples", "24",
              "--calib-seqlen", "128", "--calib-dtype", "bfloat16"]
    ref = tmp_path / "ref.gguf"
    cli("convert", *common, "-o", ref)
    out = tmp_path / "o" / "q.gguf"
    out.parent.mkdir()
    state = out.parent / "q.gguf.quantkit-resume"
    kept = killed_after_layers([*common, "-o", out, "--resume"], state, 2)
    assert 2 <= kept < 6 and not out.exists()
    r = run_cli("convert", *common[:-2], "--calib-dtype", "float32", "-o", out, "--resume")
    assert_one_line_error(r, "--resume", "calib_dtype")
    cli("convert", *common, "-o", out, "--resume")
    assert out.read_bytes() == ref.read_bytes() and not state.exists()


def test_bad_values_are_one_line_errors(model, calib, tmp_path):
    r = run_cli("convert", model, "-o", tmp_path / "x", "--to", "safetensors", "--method", "gptq", "--calib", calib,
                "--calib-dtype", "fp8")
    assert_one_line_error(r, "--calib-dtype fp8", "bfloat16")
    r = run_cli("imatrix", model, "--calib", calib, "-o", tmp_path / "x.gguf", "--calib-dtype", "half")
    assert_one_line_error(r, "--calib-dtype half")
    r = run_cli("convert", model, "-o", tmp_path / "y", "--to", "safetensors", "--method", "rtn",
                "--calib-dtype", "bfloat16")
    assert_one_line_error(r, "--calib-dtype does not apply")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
