import sys
from pathlib import Path

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
