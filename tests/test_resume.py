"""--resume: a calibrated run killed (SIGKILL) after some layers continues from the last finished layer and
gives the same bytes as a run that was never interrupted; changed inputs or options are refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_bad_input import assert_one_line_error, run_cli
from tiny_models import make_tiny

LAYERS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm_tokenizer_dir):
    d = tmp_path_factory.mktemp("resume")
    m = make_tiny("llama_gqa_llama3", d / "m", layers=LAYERS, hidden=128, ffn=256, vocab=49152)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy(f, m / f.name)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jumbo pies".split()
    calib = d / "calib.txt"
    calib.write_text(" ".join(words[(i * 7) % len(words)] for i in range(40000)))
    return m, calib


def tree_bytes(p: Path) -> dict:
    if p.is_file():
        return {p.name: p.read_bytes()}
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def killed_after_layers(args: list, state: Path, n: int) -> int:
    """Starts `quantkit convert *args`, SIGKILLs it once the resume state holds n finished layers."""
    p = subprocess.Popen([sys.executable, "-m", "quantkit", "convert", *map(str, args), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        try:
            done = json.loads((state / "manifest.json").read_text())["done"]
        except (OSError, ValueError, KeyError):
            done = -1
        if done >= n - 1:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            return done + 1
        time.sleep(0.02)
    out, err = p.communicate()
    raise AssertionError(f"the run ended (rc {p.returncode}) before {n} layers were kept: {err[-2000:]}")


CASES = {
    "gptq": (["--to", "safetensors", "--method", "gptq", "--group-size", "32"], "q"),
    "optimizer": (["--to", "gguf", "--q", "q4_k_m", "--optimizer", "gptq"], "q.gguf"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_after_sigkill_gives_the_same_bytes(case, model, tmp_path):
    m, calib = model
    flags, name = CASES[case]
    common = [m, *flags, "--calib", calib, "--calib-samples", "24", "--calib-seqlen", "128"]
    ref = tmp_path / "ref" / name
    ref.parent.mkdir()
    r = subprocess.run([sys.executable, "-m", "quantkit", "convert", *map(str, common), "-o", str(ref),
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "o" / name
    out.parent.mkdir()
    state = out.parent / f"{name}.quantkit-resume"
    kept = killed_after_layers([*common, "-o", out, "--resume"], state, 2)
    assert 2 <= kept < LAYERS and not out.exists()
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "quantkit", "convert", *map(str, common), "-o", str(out), "--resume",
                        "--no-progress", "-v"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert tree_bytes(out) == tree_bytes(ref) if case == "optimizer" else \
        {k: v for k, v in tree_bytes(out).items() if k != "quantkit_report.json"} == \
        {k: v for k, v in tree_bytes(ref).items() if k != "quantkit_report.json"}
    assert not state.exists()  # removed once the output is whole
    assert sorted(x.name for x in out.parent.iterdir()) == [name]


def test_resume_refuses_changed_options(model, tmp_path):
    m, calib = model
    out = tmp_path / "q"
    common = [m, "--to", "safetensors", "--method", "gptq", "--calib", calib, "--calib-samples", "24",
              "--calib-seqlen", "128", "-o", out, "--resume"]
    killed_after_layers([*common, "--group-size", "32"], tmp_path / "q.quantkit-resume", 1)
    r = run_cli("convert", *map(str, common), "--group-size", "64")
    assert_one_line_error(r, "--resume")
    assert "group_size" in r.stderr and "quantkit-resume" in r.stderr
    assert (tmp_path / "q.quantkit-resume" / "manifest.json").exists()  # not ours to drop: the user decides


def test_resume_applies_to_calibrated_runs_only(model, tmp_path):
    m, _ = model
    r = run_cli("convert", str(m), "--to", "gguf", "--q", "q8_0", "-o", str(tmp_path / "x.gguf"), "--resume")
    assert_one_line_error(r, "--resume does not apply")
