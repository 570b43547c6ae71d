"""The Python API: README examples run as written; options are checked; calibration from memory; outputs
checked by transformers and gguf's reader."""

import re
import shutil
from pathlib import Path

import pytest
import torch

from tiny_models import make_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm_tokenizer_dir):
    d = make_tiny("llama_gqa_llama3", tmp_path_factory.mktemp("api") / "m", vocab=49152)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_python_api_examples_run(tiny, tmp_path, jargon_text, monkeypatch):
    import gguf
    blocks = readme_python_blocks()
    assert blocks, "README has no Python API example"
    monkeypatch.chdir(tmp_path)
    env = {"MODEL": str(tiny), "OUT": tmp_path, "TEXT": jargon_text[:30000]}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), env)
    # what the examples wrote, read by independent readers
    r = gguf.GGUFReader(tmp_path / "model-Q4_K_M.gguf")
    assert int(r.fields["general.file_type"].parts[-1][0]) == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert env["res"]["tokenizer"].startswith("model's own")
    assert (tmp_path / "model-gptq" / "quantkit_report.json").exists()
    imat = gguf.GGUFReader(tmp_path / "imat-Q4_K_M.gguf")
    assert "quantize.imatrix.entries_count" in imat.fields
    assert env["plan"]["type_counts"] and not (tmp_path / "m-Q4_K_M.gguf").exists()  # dry run wrote nothing


def test_unknown_and_inapplicable_options(tiny, tmp_path):
    import quantkit
    with pytest.raises(TypeError, match="did you mean 'imatrix'"):
        quantkit.convert(tiny, tmp_path / "x.gguf", imatrx="a.gguf")
    with pytest.raises(TypeError, match="did you mean 'group_size'"):
        quantkit.quantize(tiny, tmp_path / "x", method="gptq", group_sise=32)
    with pytest.raises(TypeError):
        quantkit.ConvertOptions(imatrx="a")
    with pytest.raises(quantkit.BadInput, match="--bits does not apply"):
        quantkit.convert(tiny, tmp_path / "x.gguf", q="q4_k_m", bits=3)
    with pytest.raises(quantkit.BadInput, match="did you mean 'q4_k_m'"):
        quantkit.convert(tiny, tmp_path / "x.gguf", q="q4km")
    assert list(tmp_path.iterdir()) == []


def test_calibration_kinds_give_the_same_tokens(tiny):
    """Texts, their token ids and a file of the same texts calibrate on the same token stream."""
    from quantkit.calibration.data import as_calib, token_stream
    from quantkit.families import load
    g = load(tiny)
    texts = ["The quick brown fox.", "jumps over the lazy dog"]
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))  # the oracle: the HF tokenizer itself
    ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    a, _ = token_stream(g, as_calib(texts))
    b, _ = token_stream(g, as_calib(ids))
    assert a == b
    # documents joined by one separator (EOS), no BOS for this vocabulary
    assert a[:len(ids[0])] == ids[0] and a[-len(ids[1]):] == ids[1] and len(a) == len(ids[0]) + len(ids[1]) + 1
    from quantkit.errors import BadInput
    with pytest.raises(BadInput, match="outside the vocabulary"):
        token_stream(g, as_calib([[1, 2, 10**7]]))


def test_model_logits_match_transformers(tiny):
    import quantkit
    from tiny_models import hf_logits
    m = quantkit.load(tiny)
    ids = torch.tensor([1, 50, 300, 7000, 12, 5])
    ours = m.logits(ids)
    ref = hf_logits(tiny, ids[None])[0]
    assert torch.allclose(ours, ref, atol=2e-4, rtol=1e-4), (ours - ref).abs().max()


def test_compressed_tensors_output_matches_own_executor(tiny, tmp_path):
    """transformers (with compressed-tensors) decodes our checkpoint to the logits quantkit computes from it."""
    import quantkit
    import transformers
    out = tmp_path / "ct"
    quantkit.quantize(tiny, out, method="rtn", group_size=32, format="compressed-tensors")
    ids = torch.tensor([[1, 50, 300, 7000, 12, 5, 9, 44]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits[0].float()
    ours = quantkit.load(out).logits(ids[0])
    base = quantkit.load(tiny).logits(ids[0])
    assert (ours - base).abs().max() > 1e-3  # quantized for real
    assert torch.allclose(ours, ref, atol=2e-3, rtol=1e-3), (ours - ref).abs().max()
    assert (out / "quantize_config.json").exists() and "## Quantization" in (out / "README.md").read_text()


def test_options_dataclass_and_asym_reach_the_checkpoint(tiny, tmp_path):
    import json

    import quantkit
    opts = quantkit.ConvertOptions(to="safetensors", method="rtn", group_size=32, sym=False)
    quantkit.convert(tiny, tmp_path / "a", opts)
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc["sym"] is False and qc["group_size"] == 32 and qc["checkpoint_format"] == "gptq_v2"
