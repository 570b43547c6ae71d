"""The README support table: tests/support.py's marker and family mapping, conftest's recorder (run on a
synthetic test file in a child pytest), and scripts/support_table.py (table cells, merging, README rewrite)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import FEATURES, family_of_kind, registered_families

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "support_table.py"
sys.path.insert(0, str(SCRIPT.parent))
import support_table  # noqa: E402


def test_family_of_kind_longest_registered_prefix():
    fams = registered_families()
    assert {"llama", "qwen2", "qwen2moe", "olmo", "olmoe", "gemma", "gemma3"} <= set(fams)
    for kind, fam in (("llama_gqa_llama3", "llama"), ("olmo_clip", "olmo"), ("olmoe_clip", "olmoe"),
                      ("olmo3", "olmo3"), ("qwen2_moe_dense", "qwen2moe"), ("qwen2", "qwen2"), ("gemma3", "gemma3"),
                      ("seed_oss", "seed_oss"), ("gpt_oss", "gpt-oss"), ("mixtral_swa", "mixtral")):
        assert family_of_kind(kind) == fam, kind
    with pytest.raises(ValueError, match="'dense' names no registered family"):
        family_of_kind("dense")


def write(path: Path, features, families, results) -> Path:
    path.write_text(json.dumps({"version": 1, "features": [{"key": k, "label": k.upper(), "doc": f"{k} doc"}
                                                           for k in features],
                                "families": {a: {"name": a.title()} for a in families}, "results": results}))
    return path


def rows(tbl: str) -> dict[str, list[str]]:
    lines = [l for l in tbl.splitlines() if l.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {"": head}
    for l in lines[1:]:
        cells = [c.strip() for c in l.strip("|").split("|")]
        out[cells[1].strip("`")] = cells
    return out


def test_cells_follow_passes_and_failures(tmp_path):
    res = {"aa": {"x": {"passed": ["t1", "t2"], "failed": []}, "y": {"passed": ["t3"], "failed": ["t4"]}},
           "bb": {"y": {"passed": [], "failed": ["t5"]}, "z": {"passed": [], "failed": []}},
           "zz": {"x": {"passed": ["t6"], "failed": []}}}  # a family no file lists: still a row
    tbl = support_table.table(support_table.read_results([write(tmp_path / "r.json", ["x", "y", "z"], ["aa", "bb", "cc"],
                                                                res)]))
    r = rows(tbl)
    assert r[""] == ["family", "arch", "X", "Y", "Z"]  # the features' order, their labels
    assert r["aa"][2:] == ["✓", "✗", "—"]
    assert r["bb"][2:] == ["—", "✗", "—"]  # no test ran: untested, not supported
    assert r["cc"][2:] == ["—", "—", "—"]  # registered, untested: a row of dashes
    assert r["zz"][2:] == ["✓", "—", "—"]
    assert "from 4 passing and 2 failing tagged tests" in tbl and "- **X**: x doc" in tbl


def test_files_merge(tmp_path):
    a = write(tmp_path / "a.json", ["x", "y"], ["aa"], {"aa": {"x": {"passed": ["t1"], "failed": []}}})
    b = write(tmp_path / "b.json", ["x", "y", "w"], ["aa", "bb"],
              {"aa": {"y": {"passed": ["t2"], "failed": []}}, "bb": {"x": {"passed": ["t3"], "failed": []}}})
    c = write(tmp_path / "c.json", ["x"], ["aa"], {"aa": {"y": {"passed": [], "failed": ["t9"]}}})
    r = rows(support_table.table(support_table.read_results([a, b])))
    assert r[""][2:] == ["X", "Y", "W"] and r["aa"][2:] == ["✓", "✓", "—"] and r["bb"][2:] == ["✓", "—", "—"]
    r = rows(support_table.table(support_table.read_results([a, b, c])))
    assert r["aa"][2:] == ["✓", "✗", "—"]  # a failure in any file wins


README = """# title

text before, with a table of its own:

| a | b |
|---|---|

<!-- support-table:start -->
stale content
| old | table |
<!-- support-table:end -->
text after \u00e9\u2713
"""


def run_script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_readme_rewrite_keeps_everything_outside_the_markers(tmp_path):
    r = write(tmp_path / "r.json", ["x"], ["aa"], {"aa": {"x": {"passed": ["t1"], "failed": []}}})
    readme = tmp_path / "README.md"
    readme.write_text(README, encoding="utf-8")
    assert run_script(r, "--readme", readme, "--check").returncode == 1  # stale
    p = run_script(r, "--readme", readme)
    assert p.returncode == 0, p.stderr
    new = readme.read_text(encoding="utf-8")
    start, end = new.index(support_table.START), new.index(support_table.END)
    assert new[:start] == README[:README.index(support_table.START)]
    assert new[end:] == README[README.index(support_table.END):]
    inside = new[start + len(support_table.START):end]
    assert "stale" not in inside and rows(inside)["aa"][2:] == ["✓"]
    assert run_script(r, "--readme", readme, "--check").returncode == 0
    assert run_script(r, "--readme", readme).returncode == 0 and readme.read_text(encoding="utf-8") == new


@pytest.mark.parametrize("readme,results,match", [
    ("no markers here\n", "ok", "needs exactly one '<!-- support-table:start -->'"),
    ("<!-- support-table:end -->\n<!-- support-table:start -->\n", "ok", "needs exactly one"),
    (README, "missing", "no such file"),
    (README, "garbage", "not a support-results JSON file"),
    (README, "wrong", "not a support-results JSON file"),
])
def test_bad_input_is_one_line(tmp_path, readme, results, match):
    path = tmp_path / "README.md"
    path.write_text(readme)
    r = tmp_path / "r.json"
    if results == "ok":
        write(r, ["x"], ["aa"], {})
    elif results == "garbage":
        r.write_text("{not json")
    elif results == "wrong":
        r.write_text(json.dumps({"version": 1, "features": [{"label": "no key"}], "families": {}, "results": {}}))
    p = run_script(r, "--readme", path)
    assert p.returncode == 2 and match in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert path.read_text() == readme


SYNTHETIC = '''
import pytest

@pytest.mark.support("load", "run")
@pytest.mark.parametrize("kind", ["olmo_clip", "qwen2_moe_dense"])
def test_param_family(kind):
    pass

@pytest.mark.support("gptq", family="llama")
def test_fails():
    assert False

@pytest.mark.support("gptq", "awq", family="llama")
def test_passes():
    pass

@pytest.fixture(params=["gemma3", "mixtral_swa"])
def fam(request):
    if request.param == "mixtral_swa":
        raise RuntimeError("setup breaks")
    return request.param

@pytest.mark.support("out_gguf", param="fam")
def test_fixture_param(fam):
    pass

@pytest.mark.support("awq", family=lambda kind: None if kind == "olmo" else kind)
@pytest.mark.parametrize("kind", ["olmo", "olmo2"])
def test_refusal_case_claims_nothing(kind):
    pass

@pytest.mark.support("rtn", family="llama")
def test_skipped():
    pytest.skip("no oracle here")

def test_untagged():
    assert False
'''


def child_pytest(tmp_path: Path, body: str, *args) -> subprocess.CompletedProcess:
    d = tmp_path / "suite"
    d.mkdir(exist_ok=True)
    for f in ("conftest.py", "support.py"):
        shutil.copy(ROOT / "tests" / f, d / f)
    (d / "test_synthetic.py").write_text(body)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(d), *map(str, args)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one_process", "xdist"])
def test_recorder_writes_what_each_tagged_test_proved(tmp_path, workers):
    """The same record from one process and from pytest-xdist's workers (scripts/test.sh runs those)."""
    out = tmp_path / "res" / "support.json"
    p = child_pytest(tmp_path, SYNTHETIC, "--support-json", out, *workers)
    assert p.returncode == 1, p.stdout[-2000:]  # test_fails, the broken fixture, test_untagged
    data = json.loads(out.read_text())
    assert [f["key"] for f in data["features"]] == list(FEATURES)
    assert set(data["families"]) == set(registered_families())
    res = data["results"]

    def ids(fam, feat, k):
        return sorted(n.split("::")[1] for n in res.get(fam, {}).get(feat, {}).get(k, []))
    assert ids("olmo", "load", "passed") == ids("olmo", "run", "passed") == ["test_param_family[olmo_clip]"]
    assert ids("qwen2moe", "run", "passed") == ["test_param_family[qwen2_moe_dense]"]
    assert ids("llama", "gptq", "passed") == ["test_passes"] and ids("llama", "gptq", "failed") == ["test_fails"]
    assert ids("llama", "awq", "passed") == ["test_passes"]
    assert ids("gemma3", "out_gguf", "passed") == ["test_fixture_param[gemma3]"]
    assert ids("mixtral", "out_gguf", "failed") == ["test_fixture_param[mixtral_swa]"]  # a setup error fails
    assert "olmo" not in res or "awq" not in res["olmo"]  # family=None: no claim
    assert ids("olmo2", "awq", "passed") == ["test_refusal_case_claims_nothing[olmo2]"]
    assert "rtn" not in res.get("llama", {})  # skipped: proves nothing either way
    r = rows(support_table.table(support_table.read_results([out])))
    col = r[""].index(FEATURES["gptq"][0])
    assert r["llama"][col] == "✗" and r["olmo2"][r[""].index(FEATURES["awq"][0])] == "✓"


def test_unknown_feature_or_family_stops_collection(tmp_path):
    for body, match in (('import pytest\n@pytest.mark.support("gtpq", family="llama")\ndef test_a():\n    pass\n',
                         "unknown feature(s) ['gtpq']"),
                        ('import pytest\n@pytest.mark.support("gptq", family="lama")\ndef test_a():\n    pass\n',
                         "family 'lama' is not registered"),
                        ('import pytest\n@pytest.mark.support("gptq")\n@pytest.mark.parametrize("kind", ["bert"])\n'
                         'def test_a(kind):\n    pass\n', "'bert' names no registered family")):
        p = child_pytest(tmp_path, body)
        assert p.returncode == 4 and match in p.stdout + p.stderr and "test_a" in p.stdout + p.stderr, p.stdout
