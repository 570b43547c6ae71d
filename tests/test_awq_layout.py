"""AutoAWQ GEMM, compressed-tensors and keep-fp16 layouts written by AWQ.

Oracles: a bit-by-bit decoder and an AutoAWQ-style packer written here from the documented layout
(AutoAWQ itself is not importable here: its package imports `datasets` and pre-5 transformers classes),
compressed-tensors' own decompressor, and transformers for the logits of an AutoAWQ checkpoint.
"""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import make_tiny

from quantkit.errors import QuantkitError
from quantkit.families import load
from quantkit.formats.awq_layout import pack_awq_gemm, unpack_awq_gemm
from quantkit.graph import blk
from quantkit.jobs.awq import awq_to_safetensors
from quantkit.quant.awq import AWQConfig, quantize_linear, quantized_graph, run_awq
from quantkit.runtime import executor_for

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's order_map: nibble i holds element ORDER[i] of each 8


pytestmark = pytest.mark.usefixtures("one_thread")


def nibble(word: int, k: int) -> int:
    """Element k (0..7) of an AWQ-packed word: it sits in nibble ORDER.index(k)."""
    return (word >> (4 * ORDER.index(k))) & 0xF


def decode_gemm(qweight, qzeros, scales, group_size):
    """W [out, in] float32 from AutoAWQ GEMM tensors, one value at a time (partial last group allowed)."""
    qw = qweight.numpy().view(np.uint32)
    qz = qzeros.numpy().view(np.uint32)
    sc = scales.float().numpy()
    in_f, out_f = qw.shape[0], qw.shape[1] * 8
    gs = in_f if group_size == -1 else group_size
    W = np.zeros((out_f, in_f), dtype=np.float32)
    for i in range(in_f):
        g = i // gs
        for o in range(out_f):
            q = nibble(int(qw[i, o // 8]), o % 8)
            z = nibble(int(qz[g, o // 8]), o % 8)
            W[o, i] = np.float32(q - z) * np.float32(sc[g, o])
    return torch.from_numpy(W)


def pack_like_autoawq(intw: torch.Tensor) -> torch.Tensor:
    """[rows, cols] ints 0..15 -> int32 [rows, cols/8], AutoAWQ's loop: word |= v[col*8 + ORDER[i]] << 4i."""
    rows, cols = intw.shape
    out = np.zeros((rows, cols // 8), dtype=np.uint32)
    v = intw.numpy().astype(np.uint32)
    for c in range(cols // 8):
        for i in range(8):
            out[:, c] |= v[:, c * 8 + ORDER[i]] << np.uint32(4 * i)
    return torch.from_numpy(out.view(np.int32).copy())


@pytest.mark.parametrize("out_f,in_f,gs,sym", [(16, 64, 32, False), (24, 96, 32, True), (8, 40, -1, False),
                                               (32, 128, 64, False)])
def test_gemm_pack_decodes_exactly(out_f, in_f, gs, sym):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(in_f))
    ql = quantize_linear(w, 4, gs, sym)
    t = pack_awq_gemm(ql)
    assert t["qweight"].shape == (in_f, out_f // 8) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (ql.n_groups, out_f // 8) and t["scales"].dtype == torch.float16
    assert torch.equal(decode_gemm(t["qweight"], t["qzeros"], t["scales"], gs), ql.dequantize())
    # our packing of the codes is word-for-word AutoAWQ's
    assert torch.equal(t["qweight"], pack_like_autoawq(ql.codes.T.contiguous()))
    assert torch.equal(t["qzeros"], pack_like_autoawq(ql.zeros.T.contiguous()))
    back = unpack_awq_gemm(t, gs)
    assert torch.equal(back.codes, ql.codes) and torch.equal(back.zeros, ql.zeros)
    assert torch.equal(back.scales, ql.scales)


def test_gemm_layout_errors():
    with pytest.raises(QuantkitError, match="4-bit"):
        pack_awq_gemm(quantize_linear(torch.randn(16, 64), 8, 32, False))
    with pytest.raises(QuantkitError, match="whole groups"):
        pack_awq_gemm(quantize_linear(torch.randn(16, 72), 4, 32, False))
    with pytest.raises(QuantkitError, match="multiple of 8"):
        pack_awq_gemm(quantize_linear(torch.randn(12, 64), 4, 32, False))


# ---------------------------------------------------------------- reading AutoAWQ checkpoints

def autoawq_quantize(w, gs):
    """AutoAWQ's pseudo_quantize_tensor (zero point): per group of gs inputs of each row."""
    out_f, in_f = w.shape
    g = w.reshape(-1, gs)
    mx, mn = g.amax(1, keepdim=True), g.amin(1, keepdim=True)
    scales = ((mx - mn).clamp(min=1e-5) / 15).half().float()
    zeros = (-torch.round(mn / scales)).clamp(0, 15)
    q = torch.clamp(torch.round(g / scales) + zeros, 0, 15)
    deq = ((q - zeros) * scales).reshape(out_f, in_f)
    q, zeros = q.reshape(out_f, in_f).to(torch.int64), zeros.reshape(out_f, -1).to(torch.int64)
    return q, scales.reshape(out_f, -1), zeros, deq


@pytest.mark.parametrize("legacy_keys", [False, True])
def test_read_autoawq_checkpoint(tmp_path, legacy_keys):
    """A checkpoint laid out as AutoAWQ writes it loads; weights = the AWQ dequantization, logits =
    transformers' with those weights."""
    import transformers
    d = make_tiny("llama_gqa_llama3", tmp_path / "src", hidden=64, ffn=128)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    gs = 32
    tensors, deq = {}, {}
    for k, v in model.state_dict().items():
        if k.endswith("_proj.weight"):
            q, s, z, dq = autoawq_quantize(v, gs)
            p = k[: -len(".weight")]
            tensors[p + ".qweight"] = pack_like_autoawq(q.T.contiguous())
            tensors[p + ".qzeros"] = pack_like_autoawq(z.T.contiguous())
            tensors[p + ".scales"] = s.T.contiguous().half()
            deq[k] = dq
        else:
            tensors[k] = v.half()
    out = tmp_path / "awq"
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = ({"quant_method": "awq", "w_bit": 4, "q_group_size": gs, "zero_point": True,
                                   "version": "GEMM"} if legacy_keys else
                                  {"quant_method": "awq", "bits": 4, "group_size": gs, "zero_point": True,
                                   "version": "gemm"})
    (out / "config.json").write_text(json.dumps(cfg))
    g = load(out)
    assert torch.equal(g[blk(1, "ffn_down")].load(), deq["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(g[blk(0, "attn_k")].load(), deq["model.layers.0.self_attn.k_proj.weight"])
    sd = {k: (deq[k] if k in deq else v.half().float()) for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(executor_for(g)(ids), want, atol=2e-5, rtol=1e-4)


def test_reader_errors(tmp_path):
    w = torch.randn(16, 64)
    t = pack_awq_gemm(quantize_linear(w, 4, 32, False))
    save_file({"m.qweight": t["qweight"], "m.scales": t["scales"]}, tmp_path / "model.safetensors")
    from quantkit.formats.hf_quantized import read
    from quantkit.formats.safetensors_io import open_checkpoint
    files = open_checkpoint(tmp_path)
    with pytest.raises(QuantkitError, match="no 'm.qzeros'"):
        read(files, {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"}, "ckpt")
    with pytest.raises(QuantkitError, match="version 'gemv'"):
        read(files, {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "ckpt")


# ---------------------------------------------------------------- written by AWQ

@pytest.fixture(scope="module")
def mha(tmp_path_factory):
    return make_tiny("llama_mha", tmp_path_factory.mktemp("awq_layout") / "mha")


def cal(n=4, t=32):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (t,), generator=g) for _ in range(n)]


@pytest.mark.support("out_ct", family="llama")
@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_output_decompresses(mha, tmp_path, bits):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    g = load(mha)
    out = tmp_path / "ct"
    awq_to_safetensors(g, out, st_format="compressed-tensors", bits=bits, group_size=32, samples=cal(),
                       progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    st = load_file(out / "model.safetensors")
    res = run_awq(g, cal(), AWQConfig(bits=bits, group_size=32), progress=False)
    mem = quantized_graph(g, res)
    back = load(out)
    for layer, proj, name in ((0, "self_attn.q_proj", "attn_q"), (1, "mlp.down_proj", "ffn_down")):
        p = f"model.layers.{layer}.{proj}."
        t = {k[len(p):]: v for k, v in st.items() if k.startswith(p)}
        dec = PackedQuantizationCompressor.decompress(t, scheme)["weight"]
        want = mem[blk(layer, name)].load()
        assert torch.equal(dec, want.to(dec.dtype))
        assert torch.equal(back[blk(layer, name)].load().float(), want)


def test_keep_fp16_layout_round_trip(mha, tmp_path):
    """The keep-fp16 checkpoint: decoded independently (GEMM part with its partial last group, then the
    float16 columns put back at their indices) equals what quantkit's reader gives; the executor runs it."""
    g = load(mha)
    out = tmp_path / "k"
    awq_to_safetensors(g, out, group_size=32, keep_fp16=3.0, samples=cal(), progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "quantkit-awq-keep-fp16" and qc["keep_fp16_percent"] == 3.0
    st = load_file(out / "model.safetensors")
    back = load(out)
    for layer, proj, name, in_f in ((0, "self_attn.v_proj", "attn_v", 64), (1, "mlp.down_proj", "ffn_down", 128)):
        p = f"model.layers.{layer}.{proj}."
        idx = st[p + "weight_fp16_idx"]
        k = round(in_f * 0.03)
        assert idx.dtype == torch.int32 and idx.shape == (k,) and st[p + "weight_fp16_cols"].shape[1] == k
        assert st[p + "qweight"].shape[0] == in_f - k  # 62 or 124 columns: a last partial group of 30 / 28
        part = decode_gemm(st[p + "qweight"], st[p + "qzeros"], st[p + "scales"], 32)
        dense = torch.empty(part.shape[0], in_f)
        rest = [j for j in range(in_f) if j not in set(idx.tolist())]
        dense[:, rest] = part
        dense[:, idx.long()] = st[p + "weight_fp16_cols"].float()
        assert torch.equal(back[blk(layer, name)].load(), dense)
    ids = torch.stack(cal(2, 24))
    ref = executor_for(g)(ids)
    got = executor_for(back)(ids)
    assert float((got - ref).pow(2).mean()) < 0.05 * float(ref.var())
