"""What the quantized-output tests (test_frontier_methods, test_moe_outputs, test_hybrid_outputs) share: one tiny
model per kind as module fixtures, held-out token ids, calibration flags, and compressed-tensors' own decoding
of an MXFP4 checkpoint checked module by module against the source weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def model_fixtures(kinds, make):
    """`kind` (one per key of `kinds`) and `model` (`make(kind, out_dir, tokenizer_dir)`) module fixtures; a test
    module binds them as `kind, model = model_fixtures(...)`."""
    @pytest.fixture(scope="module", params=sorted(kinds))
    def kind(request) -> str:
        return request.param

    @pytest.fixture(scope="module")
    def model(kind, tmp_path_factory, smollm_tokenizer_dir) -> Path:
        return make(kind, tmp_path_factory.mktemp(kind) / "model", smollm_tokenizer_dir)
    return kind, model


def held_out_ids(model: Path, text: str, batch: int = 2, seqlen: int = 48, chars: int = 8_000) -> torch.Tensor:
    """[batch, seqlen] ids of the end of `text` (calibration reads its start) in `model`'s tokenizer."""
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(model)
    ids = tok(text[-chars:], add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:batch * seqlen]).reshape(batch, seqlen)


def calib_flags(folder: Path, text: str) -> tuple:
    """The CLI's calibration flags (8 samples of 64 tokens) on the start of `text`, written to folder/calib.txt."""
    calib = folder / "calib.txt"
    calib.write_text(text[:20_000])
    return ("--calib", calib, "--calib-samples", "8", "--calib-seqlen", "64")


def mxfp4_modules(st: dict, qc: dict, src: dict) -> dict[str, torch.Tensor]:
    """HF module -> the weight compressed-tensors decompresses from the mxfp4-pack-quantized checkpoint `st`
    (config `qc`), each checked equal to the MXFP4 rounding of the source weight of that name (`src`)."""
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from quantkit.quant.mxfp4 import dequantize_mxfp4, quantize_mxfp4
    scheme = QuantizationConfig.model_validate(qc)
    assert scheme.format == "mxfp4-pack-quantized"
    mods = {}
    for p in {k[: -len(".weight_packed")] for k in st if k.endswith(".weight_packed")}:
        t = {k: st[f"{p}.{k}"] for k in ("weight_packed", "weight_scale")}
        w = MXFP4PackedCompressor.decompress(t, scheme.config_groups["group_0"])["weight"].float()
        assert torch.equal(w, dequantize_mxfp4(*quantize_mxfp4(src[p], rule="best"))), p
        mods[p] = w
    return mods
