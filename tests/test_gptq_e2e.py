"""GPTQ / RTN end to end: CLI convert -> GPTQ-layout or compressed-tensors checkpoints -> read back.

Oracles: a numpy bit-stream decoder written here from the documented GPTQ layout, compressed-tensors' own
decompressor, transformers (loads the compressed-tensors output; runs the forward whose activations give the
expected Hessians), a textbook RTN, and the `gguf` package's dequantizer for the GPTQ -> GGUF path.
"""

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from quantkit.calibration.data import load_calibration
from quantkit.cli import main
from quantkit.families import load
from quantkit.graph import Graph, HParams, LazyTensor
from quantkit.quant.gptq import GPTQ
from quantkit.quant.gptq_driver import GridOptions, quantize_graph, sha256_of
from tiny_models import make_tiny

PROJ = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
HF_PROJ = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}
CALIB = ["--calib-samples", "8", "--calib-seqlen", "64"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm_gguf):
    """A random 2-layer Llama (transformers' own class) with SmolLM2's real tokenizer (vocab 49152)."""
    from quantkit.formats.hf_tokenizer import write_hf_tokenizer
    g = load(smollm_gguf)
    d = make_tiny("llama_gqa_llama3", tmp_path_factory.mktemp("tiny") / "m", vocab=g.hparams.vocab_size)
    write_hf_tokenizer(g.tokenizer.gguf_kv, d)
    return d


@pytest.fixture(scope="module")
def texts(tmp_path_factory, jargon_text):
    d = tmp_path_factory.mktemp("text")
    (d / "calib.txt").write_text(jargon_text[:60_000])
    (d / "eval.txt").write_text(jargon_text[-60_000:])
    return d / "calib.txt", d / "eval.txt"


def cli(*args):
    main([str(a) for a in args])


def convert(tiny, out, calib, *extra):
    cli("convert", tiny, "-o", out, "--to", "safetensors", "--calib", calib, *CALIB, "--no-progress", *extra)
    return out


@pytest.fixture(scope="module")
def gptq_v1(tiny, texts, tmp_path_factory):
    """sym w4 g32, no act-order -> checkpoint_format gptq (v1)."""
    return convert(tiny, tmp_path_factory.mktemp("o") / "gptq_v1", texts[0], "--method", "gptq",
                   "--group-size", "32")


@pytest.fixture(scope="module")
def gptq_v2_act(tiny, texts, tmp_path_factory):
    """asym w4 g16 with act-order -> checkpoint_format gptq_v2 with a non-trivial g_idx."""
    return convert(tiny, tmp_path_factory.mktemp("o") / "gptq_v2", texts[0], "--method", "gptq",
                   "--group-size", "16", "--asym", "--desc-act", "--damp", "0.05")


@pytest.fixture(scope="module")
def ct_sym(tiny, texts, tmp_path_factory):
    return convert(tiny, tmp_path_factory.mktemp("o") / "ct", texts[0], "--method", "gptq", "--group-size", "32",
                   "--format", "compressed-tensors")


def report(d):
    return json.loads((d / "quantkit_report.json").read_text())


def config(d):
    return json.loads((d / "config.json").read_text())


# ---------------------------------------------------------------- independent GPTQ-layout decoder


def stream_values(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Values of a dense LSB-first bitstream along axis 0 of little-endian uint32 words: [count, ...]."""
    w = np.ascontiguousarray(np.moveaxis(words.astype("<u4"), 0, -1))  # [..., n_words]
    bitstream = np.unpackbits(w.view(np.uint8), axis=-1, bitorder="little")  # [..., n_words*32]
    v = bitstream[..., : count * bits].reshape(*w.shape[:-1], count, bits).astype(np.int64)
    return np.moveaxis((v << np.arange(bits)).sum(-1), -1, 0)


def decode_gptq_module(t: dict, bits: int, fmt: str) -> torch.Tensor:
    qweight, qzeros = t["qweight"].numpy().view(np.uint32), t["qzeros"].numpy().view(np.uint32)
    in_f, out_f = qweight.shape[0] * 32 // bits, qweight.shape[1]
    codes = stream_values(qweight, bits, in_f)  # [in, out]
    zeros = stream_values(qzeros.T, bits, out_f).T  # [groups, out]
    if fmt == "gptq":
        zeros = zeros + 1
    g = t["g_idx"].numpy().astype(np.int64)
    scales = t["scales"].float().numpy()
    w = (codes - zeros[g]).astype(np.float32) * scales[g]
    return torch.from_numpy(np.ascontiguousarray(w.T))


# ---------------------------------------------------------------- GPTQ layout


@pytest.mark.parametrize("which,fmt,desc_act,sym", [("gptq_v1", "gptq", False, True),
                                                    ("gptq_v2_act", "gptq_v2", True, False)])
@pytest.mark.support("gptq", "out_gptq", family="llama")
def test_gptq_checkpoint_decodes_to_evaluated_weights(request, tiny, which, fmt, desc_act, sym):
    out = request.getfixturevalue(which)
    qc = config(out)["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"], qc["desc_act"], qc["sym"]) == ("gptq", fmt, desc_act, sym)
    rep = report(out)
    st = load_file(out / "model.safetensors")
    orig = load(tiny)
    back = load(out)  # our reader
    assert len(rep["tensors"]) == 14 and rep["fallbacks"] == []
    any_perm = False
    for name, info in rep["tensors"].items():
        i, suffix = name.split(".")[1], name.split(".")[2]
        assert info["method"] == "gptq" and info["tokens"] == 8 * 64
        w = back[name].load()
        # (a) the reader gives exactly the weights the driver evaluated (its report digest)
        assert sha256_of(w) == info["sha256"], name
        # (b) the independent decoder gives the same
        p = f"model.layers.{i}.{HF_PROJ[suffix]}"
        mod = {k: st[f"{p}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert torch.equal(decode_gptq_module(mod, 4, fmt), w), name
        gs = 32 if fmt == "gptq" else 16
        any_perm |= not torch.equal(mod["g_idx"], torch.arange(w.shape[1], dtype=torch.int32) // gs)
        rel = (w - orig[name].load()).square().sum() / orig[name].load().square().sum()
        assert rel < 0.05, name
    assert any_perm == desc_act
    # unquantized tensors are the source's, as fp16
    for hf, canon in (("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"),
                      ("model.layers.1.input_layernorm.weight", "blk.1.attn_norm.weight")):
        assert st[hf].dtype == torch.float16 and torch.equal(st[hf], orig[canon].load().half())
    assert (out / "tokenizer.json").exists()


def test_loader_matches_in_process_driver(tiny, texts, gptq_v1):
    """The CLI output equals a direct run of the driver on the same calibration windows (determinism)."""
    g = load(tiny)
    samples = load_calibration(g, texts[0], 8, 64, 0)
    res = quantize_graph(g, samples, GridOptions(group_size=32), progress=False)
    back = load(gptq_v1)
    for name, ql in res.linears.items():
        assert torch.equal(back[name].load(), ql.dequantize()), name


@pytest.mark.support("rtn", family="llama")
def test_rtn_matches_textbook(tiny, texts, tmp_path):
    out = tmp_path / "rtn"  # RTN takes no calibration options
    cli("convert", tiny, "-o", out, "--to", "safetensors", "--no-progress", "--method", "rtn", "--group-size", "32")
    rep = report(out)
    assert rep["method"] == "rtn" and rep["calib_samples"] == 0
    assert config(out)["quantization_config"]["meta"]["method"] == "rtn"
    orig, back = load(tiny), load(out)
    for name in rep["tensors"]:
        w = orig[name].load().float().reshape(orig[name].shape[0], -1, 32)
        scale = (2 * w.abs().amax(-1, keepdim=True) / 15).half().float()  # symmetric: range [-amax, amax]
        q = torch.clamp(torch.round(w / scale) + 8, 0, 15)
        want = ((q - 8) * scale).reshape(orig[name].shape)
        assert torch.equal(back[name].load(), want), name


# ---------------------------------------------------------------- compressed-tensors


@pytest.mark.support("out_ct", family="llama")
def test_compressed_tensors_output(tiny, ct_sym):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    qc = config(ct_sym)["quantization_config"]
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    st = load_file(ct_sym / "model.safetensors")
    rep = report(ct_sym)
    back = load(ct_sym)
    for name, info in rep["tensors"].items():
        i, suffix = name.split(".")[1], name.split(".")[2]
        p = f"model.layers.{i}.{HF_PROJ[suffix]}"
        w = back[name].load()
        assert sha256_of(w) == info["sha256"], name  # (a)
        mod = {k[len(p) + 1:]: v for k, v in st.items() if k.startswith(p + ".weight_")}
        dec = PackedQuantizationCompressor.decompress(mod, scheme)["weight"]  # (c)
        assert dec.dtype == torch.float16 and torch.equal(dec, w.half()), name


@pytest.mark.support("out_ct", family="llama")
def test_transformers_loads_compressed_tensors_output(tiny, ct_sym):
    import transformers
    from quantkit.runtime.model import CausalLM
    m = transformers.AutoModelForCausalLM.from_pretrained(ct_sym).eval()
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = m(ids).logits.float()  # the first forward decompresses
    state = m.state_dict()
    back = load(ct_sym)
    for name in report(ct_sym)["tensors"]:
        i, suffix = name.split(".")[1], name.split(".")[2]
        assert torch.equal(state[f"model.layers.{i}.{HF_PROJ[suffix]}.weight"].float(),
                           back[name].load().half().float()), name
    ours = CausalLM(back)(ids)
    torch.testing.assert_close(logits, ours, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- algorithm-level checks


def _with_weights(g: Graph, weights: dict) -> Graph:
    t = dict(g.tensors)
    for n, w in weights.items():
        t[n] = LazyTensor(w.shape, "F32", lambda w=w: w)
    return g.with_tensors(t)


@pytest.mark.support("gptq", family="llama")
def test_gptq_beats_rtn_on_output(tiny, texts):
    from quantkit.eval.tokens import encode
    from quantkit.runtime.model import CausalLM
    g = load(tiny)
    samples = load_calibration(g, texts[0], 16, 64, 0)
    ids = torch.tensor(encode(g, texts[1].read_text())[0][:4 * 64]).reshape(4, 64)
    base = CausalLM(g)(ids)
    errs = {}
    for method in ("rtn", "gptq"):
        res = quantize_graph(g, samples, GridOptions(method=method, bits=4, group_size=-1), progress=False)
        q = CausalLM(_with_weights(g, {n: ql.dequantize() for n, ql in res.linears.items()}))(ids)
        errs[method] = float((q - base).square().mean())
    assert errs["gptq"] < 0.8 * errs["rtn"], errs


def _hessian_via_transformers(model_dir, samples, weights: dict, module: str) -> GPTQ:
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    sd = m.state_dict()
    for k, w in weights.items():
        sd[k].copy_(w)
    target = m.get_submodule(module)
    gp = GPTQ(target.in_features)
    h = target.register_forward_pre_hook(lambda mod, args: gp.add_batch(args[0]))
    with torch.no_grad():
        for s in samples:
            m(s[None])
    h.remove()
    return gp


def _agree(a, b) -> float:
    return float((a.codes == b.codes).float().mean())


def test_true_sequential_differs_only_as_expected(tiny, texts):
    g = load(tiny)
    samples = load_calibration(g, texts[0], 8, 64, 0)
    seq = quantize_graph(g, samples, GridOptions(group_size=32, true_sequential=True), progress=False).linears
    par = quantize_graph(g, samples, GridOptions(group_size=32, true_sequential=False), progress=False).linears
    # q/k/v of layer 0 see the embeddings either way: identical
    for s in ("attn_q", "attn_k", "attn_v"):
        assert torch.equal(seq[f"blk.0.{s}.weight"].codes, par[f"blk.0.{s}.weight"].codes)
    # o_proj: sequential calibrates on activations of the quantized q/k/v, non-sequential on the original ones
    w_o = g["blk.0.attn_output.weight"].load()
    qkv = {f"model.layers.0.{HF_PROJ[s]}.weight": seq[f"blk.0.{s}.weight"].dequantize()
           for s in ("attn_q", "attn_k", "attn_v")}
    exp = {}
    for key, weights in (("seq", qkv), ("par", {})):
        gp = _hessian_via_transformers(tiny, samples, weights, "model.layers.0.self_attn.o_proj")
        exp[key] = gp.quantize(w_o, 4, 32, True, block_size=32)[0]
    o_seq, o_par = seq["blk.0.attn_output.weight"], par["blk.0.attn_output.weight"]
    assert _agree(o_seq, exp["seq"]) > 0.99 and _agree(o_par, exp["par"]) > 0.99
    assert _agree(o_seq, exp["seq"]) > _agree(o_seq, exp["par"])
    assert _agree(o_par, exp["par"]) > _agree(o_par, exp["seq"])
    assert not torch.equal(o_seq.codes, o_par.codes)
    # RTN ignores calibration: both modes identical everywhere
    a = quantize_graph(g, None, GridOptions(method="rtn", true_sequential=True), progress=False).linears
    b = quantize_graph(g, None, GridOptions(method="rtn", true_sequential=False), progress=False).linears
    assert all(torch.equal(a[n].codes, b[n].codes) for n in a)


def tiny_moe_graph(seed=0) -> Graph:
    """One MoE layer, 4 experts, top-1; the router bias keeps expert 3 from ever being chosen."""
    hp = HParams(arch="llama", vocab_size=64, hidden_size=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
                 ffn_size=64, n_experts=4, n_experts_used=1, expert_ffn_size=64)
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=0.2):
        return torch.randn(*s, generator=gen) * scale
    t = {"token_embd.weight": r(64, 32, scale=1.0), "output_norm.weight": 1 + r(32, scale=0.1),
         "output.weight": r(64, 32), "blk.0.attn_norm.weight": 1 + r(32, scale=0.1),
         "blk.0.ffn_norm.weight": 1 + r(32, scale=0.1),
         "blk.0.attn_q.weight": r(32, 32), "blk.0.attn_k.weight": r(16, 32), "blk.0.attn_v.weight": r(16, 32),
         "blk.0.attn_output.weight": r(32, 32), "blk.0.ffn_gate_inp.weight": r(4, 32, scale=1.0),
         "blk.0.ffn_gate_inp.bias": torch.tensor([0.0, 0.0, 0.0, -1e4]),
         "blk.0.ffn_gate_exps.weight": r(4, 64, 32), "blk.0.ffn_up_exps.weight": r(4, 64, 32),
         "blk.0.ffn_down_exps.weight": r(4, 32, 64)}
    return Graph(hp, {n: LazyTensor(w.shape, "F32", lambda w=w: w, source=n) for n, w in t.items()},
                 source="tiny-moe")


def test_moe_per_expert_hessians_and_fallback():
    from quantkit.quant.gptq_driver import format_report
    from quantkit.runtime.model import CausalLM
    g = tiny_moe_graph()
    samples = [torch.randint(0, 64, (48,), generator=torch.Generator().manual_seed(k)) for k in range(6)]
    res = quantize_graph(g, samples, GridOptions(group_size=16, min_expert_tokens=8), progress=False)
    rep = res.report
    # expert 3 saw no tokens: RTN, named in the report for each of its three matrices
    assert {(f["tensor"], f["expert"]) for f in rep["fallbacks"]} == \
        {(f"blk.0.{s}.weight", 3) for s in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
    assert "fallback: blk.0.ffn_gate_exps.weight expert 3" in format_report(rep)
    # top-1 routing: every calibration token is counted by exactly one expert
    gate = rep["tensors"]["blk.0.ffn_gate_exps.weight"]["experts"]
    assert sum(e["tokens"] for e in gate) == 6 * 48 and gate[3]["tokens"] == 0
    assert [e["method"] for e in gate] == ["gptq"] * 3 + ["rtn"]
    # the fallback expert is exactly RTN of its weight
    from quantkit.quant.rtn import rtn_quantize
    w3 = g["blk.0.ffn_gate_exps.weight"].load()[3]
    assert torch.equal(res.experts["blk.0.ffn_gate_exps.weight"][3].codes, rtn_quantize(w3, 4, 16, True).codes)
    # the routing, recomputed here (router logits + top-1) on the layer's input with the quantized attention
    deq = {n: ql.dequantize() for n, ql in res.linears.items()}
    m = CausalLM(_with_weights(g, deq))
    h = m.layer(0)
    cos, sin = m.rope(48)
    with torch.no_grad():
        x = m.embed(torch.stack(samples))
        xn = h.ffn_norm(x + h.attn(h.attn_norm(x), cos, sin)).reshape(-1, 32)
    logits = xn @ g["blk.0.ffn_gate_inp.weight"].load().T + g["blk.0.ffn_gate_inp.bias"].load()
    assert torch.bincount(logits.argmax(-1), minlength=4).tolist() == [e["tokens"] for e in gate]
    # the quantized MoE still runs and stays near the original (top-1 routing flips a few tokens)
    deq.update({n: torch.stack([q.dequantize() for q in qls]) for n, qls in res.experts.items()})
    ids = torch.stack(samples[:2])
    ref, out = CausalLM(g)(ids), CausalLM(_with_weights(g, deq))(ids)
    assert float((out - ref).square().mean() / ref.square().mean()) < 0.2


# ---------------------------------------------------------------- GPTQ -> GGUF


def test_gptq_checkpoint_converts_to_gguf(gptq_v1, tmp_path, caplog):
    import gguf
    out = tmp_path / "m.gguf"
    with caplog.at_level(logging.WARNING):
        cli("convert", gptq_v1, "-o", out, "--to", "gguf", "--q", "q4_k_m", "--no-progress")
    assert any("re-quantizing" in r.getMessage() for r in caplog.records)
    back = load(gptq_v1)
    reader = gguf.GGUFReader(out)
    seen = 0
    for t in reader.tensors:
        if t.name.endswith(("ffn_down.weight", "attn_v.weight", "ffn_up.weight")):
            want = back[t.name].load()
            got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(want.shape)
            assert t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            assert float((got - want).square().sum() / want.square().sum()) < 0.02, t.name
            seen += 1
    assert seen == 6


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra,match", [
    (["--method", "gptq", "--bits", "5"], "bits"),
    (["--method", "gptq", "--format", "compressed-tensors", "--group-size", "48"], "multiple of --group-size 48"),
    (["--method", "gptq", "--format", "compressed-tensors", "--desc-act"], "static-groups"),
    (["--method", "gptq", "--calib", "MISSING.txt"], "MISSING.txt"),
    (["--method", "gptq", "--format", "awq"], "--format awq"),
])
def test_bad_input_one_line_no_output(tiny, texts, tmp_path, capsys, extra, match):
    out = tmp_path / "o"
    args = ["convert", tiny, "-o", out, "--to", "safetensors", *CALIB, "--no-progress"]
    if "--calib" not in extra:
        args += ["--calib", texts[0]]
    with pytest.raises(SystemExit) as e:
        cli(*args, *extra)
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_reader_zero_conventions(gptq_v1, tmp_path):
    """The same model as v2 (GPTQModel's conversion: every stored 4-bit zero +1, i.e. words + 0x11111111) and as
    an AutoGPTQ-era config without checkpoint_format (v1 implied) reads back to the same weights."""
    import shutil

    from safetensors.torch import save_file
    st = load_file(gptq_v1 / "model.safetensors")
    cfg = config(gptq_v1)
    ref = load(gptq_v1)
    v2 = {k: torch.from_numpy((v.numpy().view(np.uint32) + np.uint32(0x11111111)).view(np.int32))
          if k.endswith(".qzeros") else v for k, v in st.items()}
    for name, tensors, qc in (("v2", v2, {"checkpoint_format": "gptq_v2", "format": "gptq_v2"}),
                              ("old", st, {"checkpoint_format": None, "format": None})):
        d = tmp_path / name
        shutil.copytree(gptq_v1, d)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        c = json.loads(json.dumps(cfg))
        for k, v in qc.items():
            if v is None:
                c["quantization_config"].pop(k)
            else:
                c["quantization_config"][k] = v
        (d / "config.json").write_text(json.dumps(c))
        back = load(d)
        for n in report(gptq_v1)["tensors"]:
            assert torch.equal(back[n].load(), ref[n].load()), (name, n)


def test_perplexity_reads_quantized_checkpoints(gptq_v2_act, ct_sym, texts, capsys):
    """`quantkit perplexity` accepts both outputs through the readers (KLD against the other one)."""
    cli("perplexity", gptq_v2_act, "--text", texts[1], "--ctx", "64", "--chunks", "2", "--base", ct_sym,
        "--json", "--no-progress")
    r = json.loads(capsys.readouterr().out)
    assert r["n_chunks"] == 2 and 1 < r["ppl"] < 1e6 and 1 < r["base_ppl"] < 1e6
    assert 0 < r["kld_mean"] < 1.0  # two different 4-bit quantizations of one model: close, not equal
