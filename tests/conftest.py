import os
import sys
from pathlib import Path

# Triton kernels run on the CPU through the interpreter, which must be chosen before anything (transformers,
# torch) imports triton. QUANTKIT_TEST_CUDA=1 runs them compiled on a GPU instead.
if os.environ.get("QUANTKIT_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.fail(f"test material missing: {SHARED} (the repo's ../shared)")
    return SHARED


@pytest.fixture(scope="session")
def smollm_gguf(shared_dir) -> Path:
    return shared_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def jargon_text(shared_dir) -> str:
    return (shared_dir / "data" / "jargon-4.4.7.txt").read_text(encoding="utf-8", errors="replace")


@pytest.fixture(scope="session")
def llamacpp_src() -> Path:
    """llama.cpp's source tree from the llama-cpp-python sdist (its convert_hf_to_gguf.py is an oracle).
    .ci/run extracts it and sets QK_LLAMACPP_SRC."""
    import os
    import subprocess
    env = os.environ.get("QK_LLAMACPP_SRC")
    if env:
        p = Path(env)
    else:  # fetch (or reuse) the sdist's sources, as .ci/run does
        r = subprocess.run(["bash", str(ROOT / "scripts" / "fetch_llamacpp_src.sh")], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"could not fetch llama.cpp sources: {r.stderr[-500:]}")
        p = Path(r.stdout.strip())
    if not (p / "convert_hf_to_gguf.py").exists():
        pytest.fail(f"llama.cpp sources not found at {p} (set QK_LLAMACPP_SRC or run scripts/fetch_llamacpp_src.sh)")
    return p


@pytest.fixture(scope="session")
def smollm_hf(tmp_path_factory, smollm_gguf) -> Path:
    """The permuted (function-preserving, grid-breaking) SmolLM2 as an F32 HF checkpoint, written by quantkit."""
    from quantkit.export import convert_to_safetensors
    from quantkit.families import load
    from quantkit.transforms import permute_dense
    out = tmp_path_factory.mktemp("smollm") / "hf"
    convert_to_safetensors(permute_dense(load(smollm_gguf), seed=0), out, dtype="f32", progress=False)
    return out


@pytest.fixture(scope="session")
def smollm_tokenizer_dir(tmp_path_factory, smollm_gguf) -> Path:
    """SmolLM2's tokenizer as HF files (vocab 49152), to give tiny test checkpoints a real vocabulary."""
    from quantkit.formats.hf_tokenizer import read_gguf_kv, write_hf_tokenizer
    out = tmp_path_factory.mktemp("smollm_tok")
    write_hf_tokenizer(read_gguf_kv(smollm_gguf), out)
    return out


@pytest.fixture
def one_thread():
    """torch on one thread: for tiny matmuls the thread handoff costs more than the work on a shared 2-core box."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



# ---------------------------------------------------------------- the support table (tests/support.py)

_SUPPORT: dict = {"claims": {}, "status": {}}  # nodeid -> [(family, feature)], nodeid -> "passed" / "failed"


def pytest_addoption(parser):
    parser.addoption("--support-json", default=os.environ.get("QUANTKIT_SUPPORT_JSON") or None, metavar="FILE",
                     help="write which tagged tests passed / failed per (family, feature) to FILE "
                          "(scripts/support_table.py makes the README table from it)")


def pytest_configure(config):
    config.addinivalue_line("markers", "support(*features, family=None, param='kind'): what the test proves for "
                                       "which family (tests/support.py); feeds the README support table")


def pytest_collection_modifyitems(config, items):
    """Every support marker is checked at collection (unknown feature or family: a usage error naming the test).
    The claims ride on the item's user_properties, so that under pytest-xdist they reach the controller, which
    collects nothing itself, inside each test report."""
    import support
    for item in items:
        try:
            c = support.claims(item)
        except ValueError as e:
            raise pytest.UsageError(f"{item.nodeid}: {e}") from None
        if c:
            item.user_properties.append(("support", c))


def pytest_runtest_logreport(report):
    """A tagged test passed when its call passed and no phase (setup, call, teardown) failed."""
    c = dict(report.user_properties).get("support")
    if not c:
        return
    _SUPPORT["claims"][report.nodeid] = c
    if report.failed:
        _SUPPORT["status"][report.nodeid] = "failed"
    elif report.when == "call" and report.passed and _SUPPORT["status"].get(report.nodeid) != "failed":
        _SUPPORT["status"][report.nodeid] = "passed"


def pytest_sessionfinish(session):
    path = session.config.getoption("--support-json")
    if not path or hasattr(session.config, "workerinput"):  # an xdist worker: the controller writes the file
        return
    import json

    import support
    results: dict = {}
    for nodeid, status in sorted(_SUPPORT["status"].items()):
        for fam, feat in _SUPPORT["claims"][nodeid]:
            results.setdefault(fam, {}).setdefault(feat, {"passed": [], "failed": []})[status].append(nodeid)
    data = {"version": 1,  # features as a list: their order is the table's column order
            "features": [{"key": k, "label": lab, "doc": doc} for k, (lab, doc) in support.FEATURES.items()],
            "families": support.registered_families(), "results": results}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
