"""Quantized GGUF for the frontier MoE families (DeepSeek V2 / V3 / V3.2, GLM-4.5, MiniMax-M2, Llama 4, Qwen3-MoE,
OLMoE): `--q mxfp4_moe` (routed experts MXFP4, the rest Q8_0, F16 / F32 where blocks do not fit) and q4_k_m with
`--optimizer gptq`.

Oracles: llama.cpp's own llama_model_quantize (MOSTLY_MXFP4_MOE, MOSTLY_Q4_K_M) on our F32 GGUF writes the same
bytes; llama.cpp runs our files close to transformers' float model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from frontier_models import VOCAB, hf_logits, ids_for, kld, llamacpp_logits, make_tiny
from hybrid_models import make_deepseek_v32
from moe_models import MOE_SPECS, make_tiny_moe
from test_deepseek import make_tiny_deepseek

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

MXFP4_MOE_FTYPE = 38  # llama_ftype LLAMA_FTYPE_MOSTLY_MXFP4_MOE
KINDS = {"deepseek_v2": "deepseek2", "deepseek_v3": "deepseek3", "deepseek_v32": "deepseek32", "glm": "glm4moe", "minimax_m2": "minimax-m2",
         "llama4": "llama4", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}
# q4_k_m: GLM-4.5 and MiniMax-M2 have their own k-quant tests (imatrix, in llama.cpp)
KQ_KINDS = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "llama4", "olmoe", "qwen3_moe")


def assert_same_gguf_tensors(ours: Path, theirs: Path) -> None:
    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    assert set(a) == set(b)
    for n in a:
        assert a[n].tensor_type == b[n].tensor_type, (n, a[n].tensor_type.name, b[n].tensor_type.name)
        np.testing.assert_array_equal(np.asarray(a[n].data), np.asarray(b[n].data), err_msg=n)


def tiny(kind: str, out: Path, tok_dir: Path) -> Path:
    if kind == "deepseek_v32":  # index_topk 32 keeps every key of the 32-token eval rows (no index flips)
        return make_deepseek_v32(out, vocab=VOCAB, tok_dir=tok_dir, index_topk=32)
    if kind.startswith("deepseek"):
        return make_tiny_deepseek(kind.split("_")[1], out, vocab=VOCAB, tok_dir=tok_dir)
    if kind in MOE_SPECS:
        d = make_tiny_moe(kind, out, vocab=VOCAB)
        for f in tok_dir.iterdir():
            shutil.copy2(f, d / f.name)
        return d
    return make_tiny(kind, out, vocab=VOCAB, tok_dir=tok_dir)


@pytest.fixture(scope="module", params=sorted(KINDS))
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def built(kind, tmp_path_factory, smollm_tokenizer_dir) -> tuple[Path, Path, torch.Tensor, torch.Tensor]:
    """(checkpoint, its F32 GGUF, eval ids, transformers' float logits), once per kind."""
    from quantkit.cli import main
    root = tmp_path_factory.mktemp(kind)
    d = tiny(kind, root / "hf", smollm_tokenizer_dir)
    main(["-q", "convert", str(d), "--q", "f32", "-o", str(root / "f32.gguf")])
    ids = ids_for(VOCAB, 32, seed=7)
    return d, root / "f32.gguf", ids, hf_logits(d, ids)[0]


@pytest.mark.support("mxfp4", "llamacpp", family=KINDS.get)
@pytest.mark.llamacpp
def test_mxfp4_moe_gguf_is_llama_quantizes_and_runs_near_transformers(kind, built, tmp_path, one_thread):
    from oracles.llamacpp_model import quantize_file

    from quantkit.cli import main
    d, f32, ids, base = built
    ours, theirs = tmp_path / "mxfp4_moe.gguf", tmp_path / "theirs.gguf"
    main(["-q", "convert", str(d), "--q", "mxfp4_moe", "-o", str(ours)])
    quantize_file(f32, theirs, MXFP4_MOE_FTYPE)
    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    exps = {n for n in a if "_exps.weight" in n}
    assert exps and {a[n].tensor_type.name for n in exps} == {"MXFP4"}
    dense = {a[n].tensor_type.name for n in a if n.endswith(("shexp.weight", "attn_q.weight", "attn_q_a.weight"))}
    assert dense == {"Q8_0"}, dense
    assert_same_gguf_tensors(ours, theirs)
    k = kld(base, torch.from_numpy(llamacpp_logits(ours, ids)))
    print(f"\n{kind} mxfp4_moe in llama.cpp: KLD vs transformers {k:.5f}")
    assert 0 < k < 0.05, k


@pytest.mark.support("kquants", "llamacpp", family=KINDS.get)
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", KQ_KINDS, indirect=True)
def test_q4_k_m_with_gptq_optimizer_runs_in_llamacpp(kind, built, tmp_path, jargon_text, one_thread):
    """q4_k_m plain (llama_model_quantize's bytes) and with `--optimizer gptq` (Hessians from calibration text,
    experts on their routed tokens): every expert tensor quantized, llama.cpp stays near transformers. At these
    widths (32/64 columns) both land within noise of each other, so no ordering is asserted. (The DeepSeek tiny
    models, initialized at 0.1 throughout, carry the largest KLDs: 0.01-0.04.)"""
    from oracles.llamacpp_model import quantize_file

    from quantkit.cli import main
    from quantkit.export import FILE_TYPES
    d, f32, ids, base = built
    quantize_file(f32, tmp_path / "theirs.gguf", int(FILE_TYPES["q4_k_m"]))
    (tmp_path / "calib.txt").write_text(jargon_text[:40_000])
    klds = {}
    for name, extra in (("q4_k_m", []), ("optimizer", ["--optimizer", "gptq", "--calib", str(tmp_path / "calib.txt"),
                                                       "--calib-samples", "16", "--calib-seqlen", "64"])):
        path = tmp_path / f"{name}.gguf"
        main(["-q", "convert", str(d), "--q", "q4_k_m", "-o", str(path), *extra])
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if "_exps.weight" in t.name}
        assert types and not set(types.values()) & {"F32", "F16", "BF16"}, types
        if name == "q4_k_m":
            assert_same_gguf_tensors(path, tmp_path / "theirs.gguf")
        klds[name] = kld(base, torch.from_numpy(llamacpp_logits(path, ids)))
    print(f"\n{kind} q4_k_m in llama.cpp: KLD vs transformers {klds}")
    assert all(0 < v < 0.1 for v in klds.values()), klds
