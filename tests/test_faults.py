"""Faults around writing: signals at several points, SIGKILL and the next run, a full disk, a file-size
limit, a read-only directory, two runs on one target, outputs that would overwrite the input."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_procs import start_convert
from test_bad_input import assert_one_line_error, run_cli
from tiny_models import make_tiny


def wait_for_partial(d: Path, name: str, p: subprocess.Popen, min_bytes: int = 1) -> None:
    """Until the run has started writing `name` (its partial file holds min_bytes)."""
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        parts = [x for x in d.iterdir() if x.name.startswith(f".{name}.partial-")]
        if parts and any((x.stat().st_size if x.is_file() else 1) >= min_bytes for x in parts):
            return
        time.sleep(0.05)
    raise AssertionError(f"no partial output appeared (rc {p.poll()}): {p.stderr.read() if p.poll() is not None else ''}")


@pytest.fixture
def tiny(tmp_path):
    return make_tiny("llama_mha", tmp_path / "m")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_signal_while_writing_keeps_existing_target(tmp_path, smollm_gguf, sig, code):
    d = tmp_path / "out"
    d.mkdir()
    out = d / "o.gguf"
    out.write_bytes(b"previous output")
    p = start_convert(smollm_gguf, out, "--q", "f32", "--force")
    wait_for_partial(d, "o.gguf", p, min_bytes=1 << 20)
    p.send_signal(sig)
    _, err = p.communicate(timeout=300)
    assert p.returncode == code, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and lines[-1].startswith("interrupted (" + signal.Signals(sig).name), err
    assert sorted(x.name for x in d.iterdir()) == ["o.gguf"] and out.read_bytes() == b"previous output"


def test_sigkill_leftovers_removed_by_next_run(tmp_path, smollm_gguf, tiny, smollm_tokenizer_dir):
    d = tmp_path / "out"
    d.mkdir()
    out = d / "o"
    p = start_convert(smollm_gguf, out, "--to", "safetensors", "--q", "f32")
    wait_for_partial(d, "o", p)
    time.sleep(0.5)
    p.kill()
    p.communicate(timeout=60)
    left = sorted(x.name for x in d.iterdir())
    assert any(".partial-" in n for n in left), left  # what SIGKILL leaves: nothing can clean up in-process
    r = run_cli("convert", tiny, "--to", "safetensors", "-o", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert sorted(x.name for x in d.iterdir()) == ["o"]
    assert (out / "model.safetensors").is_file() and (out / ".quantkit-output").is_file()


def test_concurrent_runs_on_one_target(tmp_path, smollm_gguf, tiny):
    d = tmp_path / "out"
    d.mkdir()
    out = d / "o.gguf"
    first = start_convert(smollm_gguf, out, "--q", "f32")
    wait_for_partial(d, "o.gguf", first)
    first.send_signal(signal.SIGSTOP)  # held mid-write, however fast this machine is
    try:
        second = run_cli("convert", smollm_gguf, "-o", out, "--q", "f32", "--no-progress")
    finally:
        first.send_signal(signal.SIGCONT)
    assert_one_line_error(second, str(out), "another quantkit run")
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert sorted(x.name for x in d.iterdir()) == ["o.gguf"]
    # a run after the first finished: the ordinary "exists" refusal, nothing replaced
    size = out.stat().st_size
    assert_one_line_error(run_cli("convert", smollm_gguf, "-o", out, "--q", "f32"), "--force")
    assert out.stat().st_size == size


def _mounted_tmpfs(path: Path, opts: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


@contextlib.contextmanager
def small_fs(path: Path, opts: str):
    mounted = _mounted_tmpfs(path, opts)
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def test_disk_full_is_refused_before_writing(tmp_path, tiny, smollm_gguf):
    with small_fs(tmp_path / "small", "size=1m") as mounted:
        if not mounted:  # without root: the free-space check against a file system that is really this small
            pytest.skip("mounting a small tmpfs needs root")
        out = tmp_path / "small" / "o.gguf"
        r = run_cli("convert", smollm_gguf, "-o", out, "--q", "f32", "--no-progress")
        assert_one_line_error(r, "ENOSPC", "small")
        assert list((tmp_path / "small").iterdir()) == []


def test_file_size_limit_mid_write(tmp_path, smollm_gguf):
    """An OS error while writing (here EFBIG from `ulimit -f`): one line naming the output and the cause."""
    out = tmp_path / "o.gguf"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))
    r = subprocess.run([sys.executable, "-m", "quantkit", "convert", str(smollm_gguf), "-o", str(out), "--q", "f16",
                        "--no-progress"], capture_output=True, text=True, preexec_fn=limit, timeout=600)
    assert r.returncode == 2, r.stderr
    assert_one_line_error(r, str(out), "EFBIG")
    assert list(tmp_path.iterdir()) == []


def test_read_only_directory(tmp_path, tiny):
    with small_fs(tmp_path / "ro", "size=1m,ro") as mounted:
        if not mounted:
            pytest.skip("mounting a read-only tmpfs needs root")
        r = run_cli("convert", tiny, "--to", "safetensors", "-o", tmp_path / "ro" / "o")
        assert_one_line_error(r, str(tmp_path / "ro"), "EROFS")


def test_output_inside_or_equal_to_input_refused(tmp_path, tiny, smollm_gguf):
    before = sorted(x.name for x in tiny.iterdir())
    for out, extra in ((tiny, ("--to", "safetensors", "--force")), (tiny / "sub", ("--to", "safetensors")),
                       (tiny / "x.gguf", ())):
        assert_one_line_error(run_cli("convert", tiny, "-o", out, *extra), "overlaps")
    assert sorted(x.name for x in tiny.iterdir()) == before
    g = tmp_path / "copy.gguf"
    g.symlink_to(smollm_gguf)
    size = smollm_gguf.stat().st_size
    assert_one_line_error(run_cli("convert", g, "-o", smollm_gguf, "--force", "--q", "f16"), "overlaps")
    assert smollm_gguf.stat().st_size == size


def test_output_in_current_directory_refused(tmp_path, tiny):
    (tmp_path / "mine.txt").write_text("x")
    for extra in (("--to", "safetensors"), ("--to", "safetensors", "--force"), ()):
        r = run_cli("convert", tiny, "-o", ".", *extra, cwd=tmp_path)
        assert_one_line_error(r)
    assert (tmp_path / "mine.txt").read_text() == "x"


def test_force_replaces_only_quantkit_output(tmp_path, tiny):
    out = tmp_path / "o"
    assert run_cli("convert", tiny, "--to", "safetensors", "-o", out, "--no-progress").returncode == 0
    (out / "notes.txt").write_text("mine")  # a user file inside a quantkit output is still a quantkit output:
    (out / "sub").mkdir()                    # --force replaces the directory as a whole ...
    os.remove(out / ".quantkit-output")      # ... but only while quantkit's marker is there
    r = run_cli("convert", tiny, "--to", "safetensors", "-o", out, "--force", "--no-progress")
    assert_one_line_error(r, "quantkit did not write")
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub").is_dir()


def test_weights_refused_naming_tensor_and_index(tmp_path, smollm_tokenizer_dir):
    """Independent facts: the value written into the file, at the place it was written."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    m = make_tiny("llama_mha", tmp_path / "m", vocab=49152, layers=2)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy(f, m / f.name)
    sd = load_file(m / "model.safetensors")
    k = "model.layers.1.mlp.down_proj.weight"
    cases = ((float("nan"), ("--q", "q8_0"), ("non-finite", "nan")),
             (float("-inf"), ("--to", "safetensors", "--q", "bf16"), ("non-finite", "-inf")),
             (1e6, ("--q", "f16"), ("overflows float16",)),
             (1e6, ("--to", "safetensors", "--q", "f16"), ("overflows float16",)))
    for i, (val, opts, words) in enumerate(cases):
        w = sd[k].clone()
        w[5, 7] = val
        save_file({**sd, k: w}, m / "model.safetensors", metadata={"format": "pt"})
        out = tmp_path / f"o{i}"
        assert_one_line_error(run_cli("convert", m, "-o", out, *opts), k, "[5, 7]", *words)
        assert not out.exists()
    save_file({**sd, k: sd[k].to(torch.int32)}, m / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(run_cli("convert", m, "--to", "safetensors", "--q", "bf16", "-o", tmp_path / "i"),
                          k, "int32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
