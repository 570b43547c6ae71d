"""GPTQ and compressed-tensors safetensors layouts.

GPTQ: decoded by an independent bit-by-bit decoder written here from the documented layout
(auto-gptq / gptqmodel are not installed, so they cannot serve as oracle).
compressed-tensors: decompressed by the installed `compressed-tensors` package itself.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.errors import QuantkitError
from quantkit.formats.compressed_tensors import (
    ct_quantization_config,
    pack_compressed_tensors,
    unpack_compressed_tensors,
)
from quantkit.formats.gptq_layout import gptq_quantization_config, pack_gptq, unpack_gptq
from quantkit.quant.gptq import GPTQ
from quantkit.quant.rtn import rtn_quantize

# ---------------------------------------------------------------- independent GPTQ decoder


def stream_value(words, k, bits):
    """Value k of a little-endian bitstream held in uint32 `words` (python ints)."""
    pos = k * bits
    val = 0
    for b in range(bits):
        p = pos + b
        val |= ((words[p // 32] >> (p % 32)) & 1) << b
    return val


def decode_gptq(tensors, bits, fmt):
    qweight = tensors["qweight"].numpy().view(np.uint32)
    qzeros = tensors["qzeros"].numpy().view(np.uint32)
    scales = tensors["scales"].float().numpy()
    g_idx = tensors["g_idx"].numpy()
    in_f, out_f = qweight.shape[0] * 32 // bits, qweight.shape[1]
    W = np.zeros((out_f, in_f), dtype=np.float32)
    zero_of = {}
    for g in range(qzeros.shape[0]):
        row = [int(x) for x in qzeros[g]]
        for o in range(out_f):
            z = stream_value(row, o, bits)
            zero_of[g, o] = z + 1 if fmt == "gptq" else z
    for o in range(out_f):
        col = [int(x) for x in qweight[:, o]]
        for i in range(in_f):
            g = int(g_idx[i])
            q = stream_value(col, i, bits)
            W[o, i] = np.float32(q - zero_of[g, o]) * np.float32(scales[g, o])
    return torch.from_numpy(W)


def gptq_layer(out_f, in_f, bits, group_size, sym, desc_act=False, static=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(128, in_f, generator=g) * torch.exp(torch.randn(in_f, generator=g))
    gp = GPTQ(in_f)
    gp.add_batch(X)
    W = torch.randn(out_f, in_f, generator=g)
    return gp.quantize(W, bits, group_size, sym, desc_act, static, bias=torch.randn(out_f, generator=g))[0]


GPTQ_CASES = [
    # bits, group, sym, desc_act, static, fmt, out, in
    (4, 32, True, False, False, "gptq", 16, 64),
    (4, 32, False, True, False, "gptq_v2", 16, 64),
    (4, 16, False, True, False, "gptq", 8, 64),
    (4, 32, True, True, True, "gptq", 16, 96),
    (4, -1, False, False, False, "gptq_v2", 8, 64),
    (8, 16, False, True, False, "gptq_v2", 8, 48),
    (8, 32, True, False, False, "gptq", 4, 64),
    (2, 16, False, False, False, "gptq_v2", 16, 64),
    (2, 32, True, True, False, "gptq", 16, 64),
    (3, 32, False, True, False, "gptq_v2", 32, 64),
    (3, 32, True, False, False, "gptq", 32, 96),
    (4, 32, False, False, False, "gptq_v2", 8, 72),  # partial last group
]


@pytest.mark.parametrize("bits,group_size,sym,desc_act,static,fmt,out_f,in_f", GPTQ_CASES)
def test_gptq_pack_decodes_exactly(bits, group_size, sym, desc_act, static, fmt, out_f, in_f):
    ql = gptq_layer(out_f, in_f, bits, group_size, sym, desc_act, static, seed=bits + out_f)
    if fmt == "gptq" and bool((ql.zeros == 0).any()):
        pytest.skip("zero-point 0 not storable in v1")
    t = pack_gptq(ql, fmt)
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (in_f * bits // 32, out_f)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (ql.n_groups, out_f * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (ql.n_groups, out_f)
    assert t["g_idx"].dtype == torch.int32 and t["g_idx"].shape == (in_f,)
    assert torch.equal(decode_gptq(t, bits, fmt), ql.dequantize())
    # a safetensors round trip and our unpacker give the same layer back
    back = unpack_gptq(t, bits, group_size, sym, fmt)
    assert torch.equal(back.codes, ql.codes) and torch.equal(back.zeros, ql.zeros)
    assert torch.equal(back.scales, ql.scales) and torch.equal(back.g_idx, ql.g_idx)
    assert torch.equal(back.bias, ql.bias) and back.desc_act == (desc_act and not static)


def test_gptq_v1_v2_zero_convention(tmp_path):
    ql = rtn_quantize(torch.randn(8, 64), 4, 32, sym=True)
    v1, v2 = pack_gptq(ql, "gptq"), pack_gptq(ql, "gptq_v2")
    assert torch.equal(v1["qweight"], v2["qweight"])
    # sym 4-bit: zero 8 -> v1 nibbles 7 (0x77777777), v2 nibbles 8 (0x88888888 as int32)
    assert (v1["qzeros"] == 0x77777777).all()
    assert (v2["qzeros"] == 0x88888888 - 2**32).all()
    save_file(v1, tmp_path / "l.safetensors")
    back = unpack_gptq(load_file(tmp_path / "l.safetensors"), 4, 32, True, "gptq")
    assert torch.equal(back.dequantize(), ql.dequantize())


def test_gptq_layout_errors():
    w = torch.randn(8, 64)
    w[0, :32] = w[0, :32].abs()  # a group with min >= 0 -> asym zero-point 0
    ql = rtn_quantize(w, 4, 32, sym=False)
    assert int(ql.zeros[0, 0]) == 0
    with pytest.raises(QuantkitError, match="gptq_v2"):
        pack_gptq(ql, "gptq")
    pack_gptq(ql, "gptq_v2")
    with pytest.raises(QuantkitError, match="whole int32 words"):
        pack_gptq(rtn_quantize(torch.randn(8, 36), 4, 32), "gptq")
    with pytest.raises(QuantkitError, match="float16"):
        pack_gptq(_fp32_scales(rtn_quantize(torch.randn(8, 64), 4, 32, scale_dtype=torch.float32)))
    with pytest.raises(QuantkitError):
        pack_gptq(ql, "gptq_v3")
    with pytest.raises(QuantkitError):
        unpack_gptq({"qweight": torch.zeros(8, 8, dtype=torch.int32)}, 4, 32, True)


def _fp32_scales(ql):
    ql.scales = ql.scales * (1 + 2**-20)  # float32 values that fp16/bf16 cannot hold
    return ql


def test_gptq_quantization_config():
    cfg = gptq_quantization_config(4, 128, True, True, "gptq_v2", static_groups=True, damp_percent=0.05)
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq_v2"
    assert cfg["meta"]["damp_percent"] == 0.05 and cfg["meta"]["static_groups"] is True
    json.dumps(cfg)
    transformers = pytest.importorskip("transformers")
    parsed = transformers.GPTQConfig.from_dict(cfg)
    assert (parsed.bits, parsed.group_size, parsed.desc_act, parsed.sym) == (4, 128, True, True)
    assert parsed.format == "gptq_v2" and parsed.damp_percent == 0.05


# ---------------------------------------------------------------- compressed-tensors

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

CT_CASES = [
    # bits, group, sym, scale dtype, out, in
    (4, 32, True, torch.float16, 16, 64),
    (4, 32, False, torch.float16, 16, 64),
    (4, 16, False, torch.bfloat16, 24, 48),
    (4, -1, False, torch.bfloat16, 8, 40),  # channel; 40*4 bits is not a whole number of words per row
    (8, 32, False, torch.float16, 12, 64),
    (8, -1, True, torch.bfloat16, 8, 64),
    (2, 16, False, torch.float16, 32, 64),
    (3, 32, True, torch.float16, 32, 64),
]


def ct_scheme(cfg):
    parsed = QuantizationConfig.model_validate(cfg)
    return parsed, parsed.config_groups["group_0"]


@pytest.mark.parametrize("bits,group_size,sym,sdt,out_f,in_f", CT_CASES)
def test_compressed_tensors_decompress_matches(bits, group_size, sym, sdt, out_f, in_f):
    g = torch.Generator().manual_seed(bits * 100 + in_f)
    w = torch.randn(out_f, in_f, generator=g)
    ql = rtn_quantize(w, bits, group_size, sym, scale_dtype=sdt)
    t = pack_compressed_tensors(ql)
    _, scheme = ct_scheme(ct_quantization_config(bits, group_size, sym))
    assert set(t) == set(PackedQuantizationCompressor.compression_param_names(scheme))
    dec = PackedQuantizationCompressor.decompress(dict(t), scheme)["weight"]
    ours = ql.dequantize(sdt)
    assert dec.dtype == sdt and torch.equal(dec, ours)
    # compressing our dequantized weight (float32: a bf16 product can't hold 8-bit levels exactly)
    # with compressed-tensors gives our packed words back
    state = {"weight": ql.dequantize(torch.float32), "weight_scale": t["weight_scale"]}
    if not sym:
        state["weight_zero_point"] = (ql.zeros - 2 ** (bits - 1)).to(torch.int8)
    comp = PackedQuantizationCompressor.compress(state, scheme)
    assert torch.equal(comp["weight_packed"], t["weight_packed"])
    assert torch.equal(comp["weight_shape"], t["weight_shape"])
    if not sym:
        assert torch.equal(comp["weight_zero_point"], t["weight_zero_point"])
    back = unpack_compressed_tensors(t, bits, group_size, sym)
    assert torch.equal(back.codes, ql.codes) and torch.equal(back.zeros, ql.zeros)
    assert torch.equal(back.scales, ql.scales)


def test_compressed_tensors_gptq_static_actorder():
    ql = gptq_layer(16, 64, 4, 32, False, desc_act=True, static=True, seed=3)
    t = pack_compressed_tensors(ql)
    cfg = ct_quantization_config(4, 32, False, desc_act=True)
    parsed, scheme = ct_scheme(cfg)
    assert scheme.weights.actorder == "weight"
    dec = PackedQuantizationCompressor.decompress(dict(t), scheme)["weight"]
    assert torch.equal(dec, ql.dequantize(torch.float16))


def test_compressed_tensors_config_matches_package_dump():
    for bits, gs, sym, da in [(4, 128, True, False), (8, -1, False, False), (4, 32, False, True)]:
        cfg = ct_quantization_config(bits, gs, sym, desc_act=da)
        parsed, _ = ct_scheme(cfg)
        dumped = parsed.model_dump()
        dumped["config_groups"]["group_0"].pop("format")  # per-scheme format left unset on purpose
        ours = {k: v for k, v in cfg.items() if k not in ("version", "sparsity_config", "transform_config")}
        assert dumped == ours
        assert parsed.format == "pack-quantized" and parsed.ignore == ["lm_head"]
        json.dumps(cfg)


def test_compressed_tensors_layout_errors():
    with pytest.raises(QuantkitError, match="multiple of group_size"):
        pack_compressed_tensors(rtn_quantize(torch.randn(8, 72), 4, 32))
    ql = gptq_layer(8, 64, 4, 16, False, desc_act=True, static=False, seed=1)
    assert not ql.has_trivial_g_idx()
    with pytest.raises(QuantkitError, match="g_idx"):
        pack_compressed_tensors(ql)
    with pytest.raises(QuantkitError, match="bfloat16"):
        fp32 = _fp32_scales(rtn_quantize(torch.randn(8, 64), 4, 32, scale_dtype=torch.float32))
        pack_compressed_tensors(fp32, scale_dtype=torch.bfloat16)


@pytest.mark.support("out_ct", family="llama")
def test_transformers_loads_our_pack_quantized_checkpoint(tmp_path):
    """A tiny Llama written with our tensors + config loads through transformers'
    compressed-tensors quantizer; its decompressed weights equal ours bit for bit.
    (Symmetric only: with compressed-tensors 0.20.1 transformers pre-compresses the
    skeleton on meta without packing the zero-point, so asym checkpoints written by
    compressed-tensors itself hit a shape mismatch there too.)"""
    tr = pytest.importorskip("transformers")
    cfg = tr.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tr.LlamaForCausalLM(cfg).eval()
    tensors, expected = {}, {}
    for key, value in model.state_dict().items():
        if key.endswith("_proj.weight"):
            ql = rtn_quantize(value, 4, 32, sym=True)
            for local, t in pack_compressed_tensors(ql).items():
                tensors[key[: -len("weight")] + local] = t
            expected[key] = ql.dequantize(torch.float16)
        else:
            tensors[key] = value.to(torch.float16)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = cfg.to_dict()
    config.update(dtype="float16", quantization_config=ct_quantization_config(4, 32, True))
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = tr.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        loaded(torch.tensor([[1, 2, 3]]))  # first forward decompresses
    state = loaded.state_dict()
    assert len(expected) == 7
    for key, want in expected.items():
        assert torch.equal(state[key], want), key
