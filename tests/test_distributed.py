"""torchrun (gloo, 2 processes on the CPU, one thread each): GPTQ, AWQ, the k-quant optimizer and imatrix give
the same bytes as one process on two threads; a killed rank leaves no output."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tiny_models import make_tiny
from moe_models import make_tiny_moe

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ENV_ONE_PROCESS = {**ENV, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}  # as a plain run on all cores
CALIB = ["--calib-samples", "14", "--calib-seqlen", "64"]  # 4 shards of 4 (the last one short), 2 ranks


def with_tokenizer(d: Path, tok: Path) -> Path:
    for f in tok.iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm_tokenizer_dir):
    d = tmp_path_factory.mktemp("dist")
    dense = with_tokenizer(make_tiny("llama_gqa_llama3", d / "dense", layers=3, hidden=64, vocab=49152),
                           smollm_tokenizer_dir)
    moe = with_tokenizer(make_tiny_moe("qwen3_moe", d / "moe", vocab=49152), smollm_tokenizer_dir)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jumbo pies".split()
    calib = d / "calib.txt"
    calib.write_text(" ".join(words[(i * 7) % len(words)] for i in range(20000)))
    return {"dense": dense, "moe": moe}, calib


def quantkit(args, procs: int, **kw) -> subprocess.CompletedProcess:
    pre = [sys.executable, "-m", "quantkit"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "quantkit"]
    return subprocess.run([*pre, *map(str, args)], capture_output=True, text=True,
                          env=ENV_ONE_PROCESS if procs == 1 else ENV, timeout=900, **kw)


def tree_bytes(p: Path) -> dict:
    if p.is_file():
        return {p.name: p.read_bytes()}
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*"))
            if f.is_file() and f.name != "quantkit_report.json"}  # the report holds timings


CASES = {
    "gptq": ("dense", ["--to", "safetensors", "--method", "gptq", "--group-size", "32"], "q"),
    "gptq_moe": ("moe", ["--to", "safetensors", "--method", "gptq", "--group-size", "32"], "q"),
    "awq": ("dense", ["--to", "safetensors", "--method", "awq", "--group-size", "32"], "q"),
    "optimizer": ("dense", ["--to", "gguf", "--q", "q4_k_m", "--optimizer", "gptq"], "q.gguf"),
    # bfloat16 forwards (--calib-dtype): the activations each rank keeps and gathers are bf16 too
    "gptq_moe_bf16": ("moe", ["--to", "safetensors", "--method", "gptq", "--group-size", "32", "--calib-dtype",
                              "bfloat16"], "q"),
    "awq_bf16": ("dense", ["--to", "safetensors", "--method", "awq", "--group-size", "32", "--calib-dtype",
                           "bfloat16"], "q"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_give_the_same_bytes(case, models, tmp_path):
    kind, flags, name = CASES[case]
    m, calib = models
    outs = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}" / name
        out.parent.mkdir()
        r = quantkit(["convert", m[kind], *flags, "--calib", calib, *CALIB, "-o", out, "--no-progress"], procs)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[procs] = tree_bytes(out)
        assert sorted(x.name for x in out.parent.iterdir()) == [name]
    assert outs[1] == outs[2]


def test_imatrix_two_processes_same_bytes(models, tmp_path):
    m, calib = models
    got = {}
    for procs in (1, 2):
        out = tmp_path / f"im{procs}.gguf"
        r = quantkit(["imatrix", m["moe"], "--calib", calib, "--ctx", "64", "--chunks", "10", "-o", out,
                      "--no-progress"], procs)
        assert r.returncode == 0, r.stderr[-3000:]
        got[procs] = out.read_bytes()
    assert got[1] == got[2]


def test_plain_conversion_refused_under_torchrun(models, tmp_path):
    m, _ = models
    r = quantkit(["convert", m["dense"], "--to", "gguf", "--q", "q8_0", "-o", tmp_path / "x.gguf"], 2)
    assert r.returncode != 0 and "only calibrated conversions" in r.stderr
    assert list(tmp_path.iterdir()) == []


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids]


def test_killed_rank_leaves_no_output(models, tmp_path):
    m, calib = models
    d = tmp_path / "o"
    d.mkdir()
    out = d / "q"
    # progress on: the "layers" bar says calibration is under way (a fixed wait raced a run that took 4 s in all)
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "quantkit", "convert", str(m["dense"]), "--to", "safetensors", "--method", "gptq",
                          "--calib", str(calib), "--calib-samples", "512", "--calib-seqlen", "32", "-o", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    err = bytearray()
    started = threading.Event()

    def pump():
        while chunk := os.read(p.stderr.fileno(), 4096):
            err.extend(chunk)
            if b"layers" in err:
                started.set()
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    assert started.wait(300), err[-2000:].decode(errors="replace")
    ranks = _children(p.pid)
    assert len(ranks) == 2 and p.poll() is None, err[-2000:].decode(errors="replace")
    os.kill(ranks[1], signal.SIGKILL)
    p.wait(timeout=300)
    reader.join(timeout=60)
    assert p.returncode != 0
    assert list(d.iterdir()) == [], (list(d.iterdir()), err[-2000:].decode(errors="replace"))


def test_resume_under_torchrun_after_sigkill(models, tmp_path):
    """Both ranks killed after the first finished layer; the rerun continues and equals one process."""
    import json
    m, calib = models
    args = ["convert", m["dense"], "--to", "safetensors", "--method", "gptq", "--group-size", "32", "--calib", calib,
            "--calib-samples", "64", "--calib-seqlen", "64", "--no-progress"]
    ref = tmp_path / "ref"
    r = quantkit([*args, "-o", ref], 1)
    assert r.returncode == 0, r.stderr[-2000:]
    d = tmp_path / "o"
    d.mkdir()
    out, state = d / "q", d / "q.quantkit-resume"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "quantkit", *map(str, args), "-o", str(out), "--resume"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        try:
            if json.loads((state / "manifest.json").read_text())["done"] >= 0:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    assert p.poll() is None, p.communicate()[1][-2000:]
    ranks = _children(p.pid)  # torchrun starts its workers in their own sessions
    for pid in [p.pid, *ranks]:
        os.kill(pid, signal.SIGKILL)
    p.wait()
    for pid in ranks:  # gone before the rerun looks at the output
        while Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text():
            time.sleep(0.02)
    assert not out.exists() and state.exists()
    r = quantkit([*args, "-o", out, "--resume"], 2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert tree_bytes(out) == tree_bytes(ref)
    assert sorted(x.name for x in d.iterdir()) == ["q"]

