"""FP8 sources dequantized on load: a block-FP8 checkpoint (weight_scale_inv, as DeepSeek V3 ships) converts to
the same GGUF bytes as its dequantized twin; compressed-tensors float-quantized weights read back as the
compressed-tensors package's own decompressor gives them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.export import convert_to_gguf
from quantkit.errors import QuantkitError
from quantkit.families import load
from tiny_models import make_tiny

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP8_MAX = 448.0


def _block_fp8(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax FP8 as DeepSeek's reference does it: scale_inv = amax / 448 per [bn, bk] block."""
    out_f, in_f = w.shape
    sr, sc = -(-out_f // bn), -(-in_f // bk)
    scale = torch.empty(sr, sc)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    for i in range(sr):
        for j in range(sc):
            blk = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].float()
            s = blk.abs().max().clamp_min(1e-12) / FP8_MAX
            scale[i, j] = s
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def _fp8_pair(tmp_path: Path, tokenizer_dir: Path) -> tuple[Path, Path]:
    """(FP8 checkpoint, its dequantized F32 twin), same config and tokenizer."""
    base = make_tiny("llama_gqa_llama3", tmp_path / "base", hidden=64, ffn=96, vocab=49152)
    sd = load_file(base / "model.safetensors")
    fp8, twin = {}, {}
    for name, t in sd.items():
        if any(f".{p}.weight" in name for p in LINEARS):
            q, s = _block_fp8(t, 32, 64)  # 96-row / 96-column tensors: partial last blocks
            fp8[name], fp8[name.replace(".weight", ".weight_scale_inv")] = q, s
            exp = s.repeat_interleave(32, 0)[:t.shape[0]].repeat_interleave(64, 1)[:, :t.shape[1]]
            twin[name] = q.float() * exp
        else:
            fp8[name] = t
            twin[name] = t.float()
    cfg = json.loads((base / "config.json").read_text())
    out = []
    for kind, tensors in (("fp8", fp8), ("twin", twin)):
        d = tmp_path / kind / "model"  # one directory name: general.name comes from it
        d.mkdir(parents=True)
        c = dict(cfg)
        if kind == "fp8":
            c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": [32, 64]}
        (d / "config.json").write_text(json.dumps(c))
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        for f in tokenizer_dir.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        out.append(d)
    return out[0], out[1]


@pytest.mark.parametrize("q", ["f32", "q8_0"])
def test_block_fp8_converts_like_its_dequantized_twin(tmp_path, smollm_tokenizer_dir, q):
    fp8, twin = _fp8_pair(tmp_path, smollm_tokenizer_dir)
    g = load(fp8)
    assert g["blk.0.attn_q.weight"].qtype == "FP8-E4M3" and g["blk.0.attn_q.weight"].load().dtype == torch.float32
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    convert_to_gguf(g, a, q=q, progress=False)
    convert_to_gguf(load(twin), b, q=q, progress=False)
    assert a.read_bytes() == b.read_bytes()


def test_fp8_bad_scale_shape_is_named(tmp_path, smollm_tokenizer_dir):
    fp8, _ = _fp8_pair(tmp_path, smollm_tokenizer_dir)
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [16, 16]
    (fp8 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantkitError, match="block scale .* does not fit"):
        load(fp8)["blk.0.attn_q.weight"].load()


@pytest.mark.parametrize("strategy", ["channel", "tensor", "block"])
def test_compressed_tensors_fp8_matches_its_decompressor(tmp_path, smollm_tokenizer_dir, strategy):
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import quantize
    base = make_tiny("llama_mha", tmp_path / "base", hidden=64, ffn=128, vocab=49152)
    sd = load_file(base / "model.safetensors")
    wargs = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False}
    if strategy == "block":
        wargs["block_structure"] = [32, 32]
    args = QuantizationArgs(**wargs)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    out, expected = {}, {}
    for name, t in sd.items():
        if not any(f".{p}.weight" in name for p in LINEARS):
            out[name] = t
            continue
        w = t.float()
        if strategy == "channel":
            scale = w.abs().amax(1, keepdim=True) / FP8_MAX
        elif strategy == "tensor":
            scale = (w.abs().max() / FP8_MAX).reshape(1)
        else:
            scale = w.reshape(w.shape[0] // 32, 32, w.shape[1] // 32, 32).abs().amax((1, 3)) / FP8_MAX
        q = quantize(x=w, scale=scale, zero_point=None, args=args, dtype=torch.float8_e4m3fn)
        out[name], out[name.replace(".weight", ".weight_scale")] = q, scale
        expected[name] = FloatQuantizationCompressor.decompress({"weight": q, "weight_scale": scale}, scheme)["weight"]
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": wargs, "format": "float-quantized"}},
        "ignore": ["lm_head"]}
    d = tmp_path / "ct"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(out, d / "model.safetensors", metadata={"format": "pt"})
    g = load(d)
    from quantkit.families import family_of
    canon = {h: c for h, c in family_of(g.hparams.arch).hf_name_map(g.hparams).items()}
    for name, ref in expected.items():
        torch.testing.assert_close(g[canon[name]].load(), ref.float(), rtol=0, atol=0)
