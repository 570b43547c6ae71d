"""Bad input: one clear line naming the file/tensor/option, a non-zero exit, no traceback, nothing written."""

import json
import signal
import subprocess
import sys
import time

import pytest

from cli_procs import start_convert
from tiny_models import make_tiny


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "quantkit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def assert_one_line_error(r, *needles):
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    for n in needles:
        assert n in last, (n, last)


@pytest.fixture
def tiny(tmp_path):
    return make_tiny("llama_gqa_llama3", tmp_path / "m")


def test_unknown_architecture(tiny, tmp_path):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["architectures"] = ["FooBarForCausalLM"]
    (tiny / "config.json").write_text(json.dumps(cfg))
    r = run_cli("inspect", tiny)
    assert_one_line_error(r, "FooBarForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM")


def test_missing_shard(tiny, tmp_path):
    (tiny / "model.safetensors").rename(tiny / "model-00001-of-00002.safetensors")
    (tiny / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    r = run_cli("inspect", tiny)
    assert_one_line_error(r, "model-00002-of-00002.safetensors", "missing")


def test_truncated_safetensors(tiny):
    p = tiny / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 1000])
    r = run_cli("convert", tiny, "-o", tiny.parent / "o.gguf")
    assert_one_line_error(r, "model.safetensors", "truncated")
    assert not (tiny.parent / "o.gguf").exists()


def test_corrupt_safetensors_header(tiny):
    p = tiny / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[8:20] = b"not json at!"
    p.write_bytes(bytes(data))
    assert_one_line_error(run_cli("inspect", tiny), "model.safetensors")


def test_truncated_and_non_gguf(tmp_path, smollm_gguf):
    bad = tmp_path / "trunc.gguf"
    with open(smollm_gguf, "rb") as f:
        bad.write_bytes(f.read(40_000_000))
    assert_one_line_error(run_cli("inspect", bad), "trunc.gguf", "truncated")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert_one_line_error(run_cli("inspect", junk), "junk.gguf", "GGUF")
    assert_one_line_error(run_cli("inspect", tmp_path / "nope.gguf"), "nope.gguf")


def test_missing_and_misshapen_tensor(tiny):
    from safetensors.torch import load_file, save_file
    p = tiny / "model.safetensors"
    sd = load_file(p)
    sd2 = dict(sd)
    del sd2["model.layers.1.mlp.down_proj.weight"]
    save_file(sd2, p, metadata={"format": "pt"})
    assert_one_line_error(run_cli("inspect", tiny), "model.layers.1.mlp.down_proj.weight", "missing")
    sd3 = dict(sd)
    sd3["model.layers.0.self_attn.k_proj.weight"] = sd3["model.layers.0.self_attn.k_proj.weight"][:-1]
    save_file(sd3, p, metadata={"format": "pt"})
    assert_one_line_error(run_cli("inspect", tiny), "blk.0.attn_k.weight", "shape")


def test_bad_options(tiny, tmp_path):
    assert_one_line_error(run_cli("convert", tiny, "-o", tmp_path / "x.gguf", "--q", "q9_z"), "q9_z")
    assert_one_line_error(run_cli("convert", tiny, "-o", tmp_path / "x.gguf", "--tensor-type", "nonsense"),
                          "--tensor-type")
    r = run_cli("perplexity", tiny, "--text", tmp_path / "missing.txt")
    assert_one_line_error(r, "missing.txt")
    assert not list(tmp_path.glob("x.gguf*"))


def test_output_exists_needs_force(tiny, tmp_path, smollm_tokenizer_dir):
    """A directory holding a foreign file is never replaced, even with --force; a previous quantkit
    output is replaced only with --force."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for extra in ((), ("--force",)):
        r = run_cli("convert", tiny, "--to", "safetensors", "-o", out, "--no-progress", *extra)
        assert_one_line_error(r, str(out), "quantkit did not write")
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    out2 = tmp_path / "o2"
    assert run_cli("convert", tiny, "--to", "safetensors", "-o", out2, "--no-progress").returncode == 0
    assert_one_line_error(run_cli("convert", tiny, "--to", "safetensors", "-o", out2), str(out2), "--force")
    r = run_cli("convert", tiny, "--to", "safetensors", "-o", out2, "--force", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (out2 / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupt_leaves_nothing(tmp_path, monkeypatch, smollm_gguf):
    """Ctrl-C in the middle of writing: exit 130, no output, no temporary file left."""
    out = tmp_path / "o.gguf"
    p = start_convert(smollm_gguf, out, "--q", "f32")
    deadline = time.time() + 300
    while time.time() < deadline and not any(x.name.startswith(".o.gguf.partial") for x in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_crash_in_producer_leaves_nothing(tmp_path, tiny, monkeypatch):
    from quantkit.export import convert_to_gguf
    from quantkit.families import load
    from quantkit.formats import gguf_writer
    calls = {"n": 0}
    orig = gguf_writer._as_bytes

    def boom(x, t):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return orig(x, t)
    monkeypatch.setattr(gguf_writer, "_as_bytes", boom)
    g = load(tiny)
    g.tokenizer.hf_dir = None
    g.tokenizer.gguf_kv = {"tokenizer.ggml.model": "gpt2"}
    with pytest.raises(RuntimeError):
        convert_to_gguf(g, tmp_path / "o.gguf", q="f16", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
