"""API-only models asked for by name: one line saying they have no open weights, exit 2; open models with
similar names (gpt-oss, gpt2, Grok-1/2, Qwen3-*, Gemma, community repos) go on to the hub as before."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.cli import main

ROOT = Path(__file__).resolve().parents[1]

CLOSED = ["openai/gpt-4o", "gpt-4", "gpt-5", "openai/gpt-4.1-mini", "gpt-3.5-turbo", "chatgpt-4o-latest",
          "openai/o3", "anthropic/claude-3-opus", "claude-sonnet-4", "google/gemini-1.5-pro", "gemini-2.5-flash",
          "xai-org/grok-3", "grok-4", "xai-org/grok-4-fast", "doubao-seed-1.6", "ByteDance/Doubao-pro-32k",
          "Qwen/Qwen3-Max", "qwen3-max", "Qwen/Qwen2.5-Max"]
OPEN = ["openai/gpt-oss-20b", "openai-community/gpt2", "gpt2", "EleutherAI/gpt-j-6b", "EleutherAI/gpt-neox-20b",
        "xai-org/grok-1", "xai-org/grok-2", "Qwen/Qwen3-8B", "Qwen/Qwen3-Next-80B-A3B-Instruct",
        "google/gemma-3-4b-it", "someone/claude-3-distill", "ByteDance-Seed/Seed-OSS-36B-Instruct", "o3"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run_cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name", CLOSED)
def test_closed_model_refused_in_one_line(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "inspect", name)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}: ") and "no open weights" in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("name", OPEN)
def test_open_names_are_not_refused(name, capsys, tmp_path, monkeypatch):
    """Not refused as closed: they go on to the hub (offline and not cached here, so that is the error)."""
    from quantkit.families import resolve
    from quantkit.errors import BadInput
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput) as e:
        resolve(name)
    assert "no open weights" not in str(e.value)
    assert "hub" in str(e.value) or "no such file" in str(e.value), str(e.value)


def test_local_folder_with_a_closed_name_is_read(tmp_path, monkeypatch, capsys):
    """A path that exists is the user's own: never refused by name (here: a folder without config.json)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt-4o").mkdir()
    code, err = run_cli(capsys, "inspect", "gpt-4o")
    assert code == 2 and "no config.json" in err and "no open weights" not in err


def test_every_command_refuses_through_the_installed_entry_point(tmp_path):
    """The real process: convert, perplexity, imatrix on a closed hub id; exit 2, one stderr line, no output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    for args in (["convert", "anthropic/claude-3-opus", "--q", "q4_k_m", "-o", str(tmp_path / "o.gguf")],
                 ["perplexity", "google/gemini-2.0-flash", "--text", str(text)],
                 ["imatrix", "xai-org/grok-3", "--calib", str(text), "-o", str(tmp_path / "im.gguf")]):
        r = subprocess.run([sys.executable, "-m", "quantkit", *args], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=120)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "no open weights" in lines[0] and args[1] in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]
