"""Qwen3-Next (Gated DeltaNet + gated attention + MoE with a gated shared expert): tiny random models from
transformers' own Qwen3NextForCausalLM are the oracle (its torch fallback of the chunked delta rule, float32);
our GGUF (llama.cpp's qwen3next layout) is run by llama.cpp and read back by quantkit; GPTQ and q4_k_m with an
importance matrix end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hybrid_models import hf_logits, ids_for, make_qwen3_next

from quantkit.errors import UnsupportedArchitecture
from quantkit.export import convert_to_gguf, convert_to_safetensors
from quantkit.families import load
from quantkit.runtime import executor_for

transformers = pytest.importorskip("transformers")

VOCAB = 49152  # SmolLM2's tokenizer (conftest's smollm_tokenizer_dir) gives GGUF files a vocabulary


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_qwen3_next(tmp_path_factory.mktemp("q3n") / "hf")


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory, smollm_tokenizer_dir):
    return make_qwen3_next(tmp_path_factory.mktemp("q3n_tok") / "hf", vocab=VOCAB, tok_dir=smollm_tokenizer_dir)


@pytest.fixture(scope="module")
def f32_gguf(tiny_tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("q3n_gguf") / "f32.gguf"
    convert_to_gguf(load(tiny_tok), out, q="f32", progress=False)
    return out


@pytest.mark.support("load", "run", family="qwen3next")
@pytest.mark.parametrize("t", [24, 80])  # 80: past transformers' 64-token chunk
def test_executor_matches_transformers(tiny, t, one_thread):
    ids = ids_for(256, t)
    g = load(tiny)
    assert g.hparams.extra["linear_layers"] == [0, 2] and g.hparams.rotary_dim == 8
    torch.testing.assert_close(executor_for(g)(ids), hf_logits(tiny, ids), atol=2e-5, rtol=1e-4)


def test_delta_rule_parameters_matter(tiny, one_thread):
    """The comparison above only checks A_log / dt_bias / conv / the output gate if they change the output."""
    g = load(tiny)
    ids = ids_for(256)
    base = executor_for(g)(ids)
    for name in ("blk.0.ssm_a_log.weight", "blk.0.ssm_dt.bias", "blk.0.ssm_conv1d.weight", "blk.1.attn_q.weight"):
        w = g[name].load().clone()
        if name.endswith("attn_q.weight"):  # the output-gate half of each head's rows
            w.view(4, 2, 32, -1)[:, 1] *= -1
        else:
            w = w * 0.5
        from quantkit.graph import LazyTensor
        g2 = g.with_tensors({**g.tensors, name: LazyTensor(w.shape, "F32", lambda w=w: w)})
        assert (executor_for(g2)(ids) - base).abs().max() > 1e-4, name


@pytest.mark.support("out_safetensors", family="qwen3next")
def test_safetensors_export_loads_in_transformers(tiny, tmp_path, one_thread):
    convert_to_safetensors(load(tiny), tmp_path / "out", dtype="f32", progress=False)
    ids = ids_for(256)
    torch.testing.assert_close(hf_logits(tmp_path / "out", ids), hf_logits(tiny, ids), atol=0, rtol=0)


@pytest.mark.support("out_gguf", family="qwen3next")
def test_gguf_metadata_and_tensor_names(f32_gguf):
    """llama.cpp's qwen3next names (src/llama-arch.cpp) and keys (qwen3next.cpp's load_arch_hparams)."""
    from gguf import GGUFReader
    r = GGUFReader(f32_gguf)
    kv = {f.name: f.contents() for f in r.fields.values()}
    t = {x.name: (tuple(int(s) for s in x.shape), x.tensor_type.name) for x in r.tensors}
    a = "qwen3next"
    assert kv["general.architecture"] == a
    assert kv[f"{a}.ssm.conv_kernel"] == 4 and kv[f"{a}.ssm.state_size"] == 16 and kv[f"{a}.ssm.group_count"] == 2
    assert kv[f"{a}.ssm.time_step_rank"] == 4 and kv[f"{a}.ssm.inner_size"] == 64
    assert kv[f"{a}.attention.recurrent_layers"] == [True, False, True, False]
    assert kv[f"{a}.rope.dimension_count"] == 8 and kv[f"{a}.attention.key_length"] == 32
    assert kv[f"{a}.expert_shared_feed_forward_length"] == 48
    # ne order: attn_qkv {d, 2*16*2 + 64}, attn_gate {d, 64}; ssm_a has no .weight suffix
    assert t["blk.0.attn_qkv.weight"][0] == (64, 128) and t["blk.0.attn_gate.weight"][0] == (64, 64)
    assert t["blk.0.ssm_a"][0] == (4,) and t["blk.0.ssm_dt.bias"][0] == (4,) and t["blk.0.ssm_ba.weight"][0] == (64, 8)
    assert t["blk.0.ssm_conv1d.weight"] == ((4, 128), "F32") and t["blk.0.ssm_norm.weight"][0] == (16,)
    assert t["blk.1.attn_q.weight"][0] == (64, 256) and "blk.1.post_attention_norm.weight" in t
    assert "blk.0.ssm_in.weight" not in t and "blk.0.attn_q.weight" not in t
    assert t["blk.0.ffn_gate_inp_shexp.weight"][0] == (64,)


@pytest.mark.support("out_gguf", "llamacpp", family="qwen3next")
@pytest.mark.llamacpp
def test_llamacpp_logits_match_transformers(tiny_tok, f32_gguf):
    from oracles.llamacpp_model import LlamaModel
    ids = ids_for(VOCAB, 40)
    ref = hf_logits(tiny_tok, ids)[0].numpy()
    with LlamaModel(f32_gguf, n_ctx=64, exact=True) as m:
        got = m.logits(ids[0].tolist())
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.support("out_gguf", "gguf_in", "out_safetensors", family="qwen3next")
def test_gguf_read_back_matches_transformers(tiny_tok, f32_gguf, tmp_path, one_thread):
    g = load(f32_gguf)
    assert g.hparams.arch == "qwen3next" and "blk.0.ssm_in.weight" in g and "blk.0.ssm_a_log.weight" in g
    ids = ids_for(VOCAB)
    ref = hf_logits(tiny_tok, ids)
    torch.testing.assert_close(executor_for(g)(ids), ref, atol=2e-5, rtol=1e-4)
    convert_to_safetensors(g, tmp_path / "hf", dtype="f32", progress=False)  # config rebuilt from metadata
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["layer_types"][:2] == \
        ["linear_attention", "full_attention"]
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), ref, atol=2e-5, rtol=1e-4)



@pytest.mark.support("out_gguf", "gguf_in", "llamacpp", family="qwen3next")
@pytest.mark.llamacpp
def test_f32_gguf_equals_llamacpp_converter(tiny_tok, f32_gguf, tmp_path, llamacpp_src, one_thread):
    """llama.cpp's convert_hf_to_gguf.py (--no-mtp) on the same checkpoint: the same tensors byte for byte
    (in_proj_qkvz reordered and split, -exp(A_log), 1 + w norms, squeezed conv) and the same qwen3next
    metadata but vocab_size (which we always write); its ffn_gate_inp_shexp is stored {d, 1}, ours {d} (what
    llama.cpp loads). Its file, read by quantkit, reproduces transformers."""
    import subprocess
    import sys

    from gguf import GGUFReader
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([sys.executable, str(llamacpp_src / "convert_hf_to_gguf.py"), str(tiny_tok), "--outtype", "f32",
                    "--outfile", str(theirs), "--no-mtp"], check=True, capture_output=True)
    a, b = GGUFReader(f32_gguf), GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for n in ta:
        shape_b = [int(x) for x in tb[n].shape]
        if n.endswith("ffn_gate_inp_shexp.weight"):
            shape_b = shape_b[:1]
        assert ta[n].tensor_type == tb[n].tensor_type and [int(x) for x in ta[n].shape] == shape_b, n
        assert np.array_equal(np.asarray(ta[n].data).ravel(), np.asarray(tb[n].data).ravel()), n
    fa = {k: f.contents() for k, f in a.fields.items() if k.startswith("qwen3next.")}
    fb = {k: f.contents() for k, f in b.fields.items() if k.startswith("qwen3next.")}
    assert set(fa) - set(fb) == {"qwen3next.vocab_size"} and {k: fa[k] for k in fb} == fb
    ids = ids_for(VOCAB)
    torch.testing.assert_close(executor_for(load(theirs))(ids), hf_logits(tiny_tok, ids), atol=2e-5, rtol=1e-4)

REFUSED = {"norm_topk_prob": (dict(norm_topk_prob=False), "norm_topk_prob=False"),
           "dk_ne_dv": (dict(linear_value_head_dim=8), "linear_key_head_dim 16 != linear_value_head_dim 8"),
           "dense": (dict(mlp_only_layers=[1]), "dense layers")}


# the refused configs still load and run as transformers does (asserted before the refusal)
@pytest.mark.support("load", "run", family="qwen3next")
@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_gguf_refuses_what_llamacpp_cannot_compute(kind, tmp_path, smollm_tokenizer_dir, one_thread):
    over, reason = REFUSED[kind]
    d = make_qwen3_next(tmp_path / "hf", vocab=VOCAB, tok_dir=smollm_tokenizer_dir, **over)
    g = load(d)
    ids = ids_for(VOCAB)
    torch.testing.assert_close(executor_for(g)(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)  # HF side works
    with pytest.raises(UnsupportedArchitecture, match=reason):
        convert_to_gguf(g, tmp_path / "x.gguf", q="f32", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def _kld(base: torch.Tensor, q: torch.Tensor) -> float:
    p, lq = torch.log_softmax(base.double(), -1), torch.log_softmax(q.double(), -1)
    return float((p.exp() * (p - lq)).sum(-1).mean())


@pytest.mark.support("gptq", family="qwen3next")
def test_gptq_end_to_end(tiny, one_thread):
    """GPTQ reaches the DeltaNet projections (in_proj_qkvz, in_proj_ba, out_proj), attention, the shared
    expert and every routed expert; conv / A_log / dt_bias stay float; the dequantized model is closer to
    the float one than round-to-nearest."""
    from quantkit.graph import LazyTensor
    from quantkit.quant.gptq_driver import GridOptions, quantize_graph
    g = load(tiny)
    samples = [ids_for(256, 32, seed=s)[0] for s in range(16)]
    ids = ids_for(256, 32, seed=99)
    base = executor_for(g)(ids)
    kld = {}
    for method in ("rtn", "gptq"):
        res = quantize_graph(g, samples if method == "gptq" else None,
                             GridOptions(method=method, bits=4, group_size=16, min_expert_tokens=4), progress=False)
        assert {"blk.0.ssm_in.weight", "blk.0.ssm_ba.weight", "blk.0.ssm_out.weight", "blk.1.attn_q.weight",
                "blk.2.ffn_down_shexp.weight"} <= set(res.linears)
        assert not any("ssm_conv1d" in n or "ssm_a_log" in n for n in res.linears)
        assert len(res.experts["blk.3.ffn_gate_exps.weight"]) == 4
        new = dict(g.tensors)
        for n, ql in res.linears.items():
            w = ql.dequantize().float()
            new[n] = LazyTensor(w.shape, "F32", lambda w=w: w)
        for n, qls in res.experts.items():
            w = torch.stack([q.dequantize().float() for q in qls])
            new[n] = LazyTensor(w.shape, "F32", lambda w=w: w)
        got = executor_for(g.with_tensors(new))(ids)
        assert torch.isfinite(got).all()
        kld[method] = _kld(base, got)
    print(f"\nqwen3next GPTQ 4-bit g16 KLD vs float: {kld}")
    assert 0 < kld["gptq"] < 0.9 * kld["rtn"], kld



@pytest.mark.support("out_ct", family="qwen3next")
def test_gptq_compressed_tensors_checkpoint_runs_in_transformers(tiny_tok, tmp_path, jargon_text, one_thread):
    """The CLI end to end: GPTQ from calibration text into a compressed-tensors checkpoint (in_proj_qkvz,
    in_proj_ba, out_proj packed as HF modules; conv / A_log / dt_bias float) that transformers loads and runs
    like our executor on the same checkpoint, away from the float model."""
    from quantkit.cli import main
    (tmp_path / "calib.txt").write_text(jargon_text[:20_000])
    out = tmp_path / "ct"
    main([str(a) for a in ("convert", tiny_tok, "-o", out, "--to", "safetensors", "--method", "gptq", "--format",
                           "compressed-tensors", "--group-size", "16", "--calib", tmp_path / "calib.txt",
                           "--calib-samples", "8", "--calib-seqlen", "32", "--no-progress")])
    from safetensors import safe_open
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight_packed" in keys
    assert "model.layers.0.linear_attn.conv1d.weight" in keys and "model.layers.0.linear_attn.A_log" in keys
    ids = ids_for(VOCAB, 16)
    got = hf_logits(out, ids)
    torch.testing.assert_close(got, executor_for(load(out))(ids), atol=2e-2, rtol=2e-2)
    assert (got - hf_logits(tiny_tok, ids)).abs().max() > 1e-3

@pytest.mark.support("kquants", "llamacpp", family="qwen3next")
@pytest.mark.llamacpp
def test_q4_k_m_with_imatrix_in_llamacpp(tmp_path, smollm_tokenizer_dir, jargon_text, one_thread):
    """Widths that take real k-quant blocks (256 columns): q4_k_m with and without an importance matrix from
    our calibration (its entries reach the DeltaNet projections; attn_qkv / attn_gate inherit ssm_in's), and
    with --optimizer gptq (f16 too: conv kernels stay F32); llama.cpp runs each; KLD against the f32 GGUF in
    llama.cpp, on text like the calibration's. --optimizer gptq optimizes attn_qkv / attn_gate (split from the
    fused ssm_in) under their own types with ssm_in's Hessian (bytes unlike plain q4_k_m's) and is no worse than
    plain q4_k_m (32 samples; with 8 its per-expert Hessians are too thin: KLD 0.0215 vs 0.0176)."""
    from gguf import GGUFReader

    from oracles.llamacpp_model import LlamaModel
    from quantkit.calibration.imatrix import imatrix_from_calib, write_imatrix_gguf
    from quantkit.cli import main
    d = make_qwen3_next(tmp_path / "hf", vocab=VOCAB, tok_dir=smollm_tokenizer_dir, hidden_size=256, head_dim=64,
                        linear_key_head_dim=64, linear_value_head_dim=64, moe_intermediate_size=256,
                        shared_expert_intermediate_size=256)
    (tmp_path / "calib.txt").write_text(jargon_text[:30_000])
    im_path = tmp_path / "im.gguf"
    im = imatrix_from_calib(load(d), tmp_path / "calib.txt", n_ctx=64, n_chunks=8, progress=False)
    assert {"blk.0.ssm_in.weight", "blk.0.ssm_ba.weight", "blk.0.ssm_out.weight"} <= set(im.sums)
    write_imatrix_gguf(im, im_path)
    runs = {"f32": ["--q", "f32"], "f16": ["--q", "f16"], "q4_k_m": ["--q", "q4_k_m"],
            "q4_k_m imatrix": ["--q", "q4_k_m", "--imatrix", im_path],
            "q4_k_m optimizer gptq": ["--q", "q4_k_m", "--optimizer", "gptq", "--calib", tmp_path / "calib.txt",
                                      "--calib-samples", "32", "--calib-seqlen", "64"]}
    from quantkit.eval.tokens import encode
    ids = torch.tensor(encode(load(d), jargon_text[-6000:])[0][:48])[None]  # text, as the calibration
    logits = {}
    for k, args in runs.items():
        out = tmp_path / f"{k.replace(' ', '_')}.gguf"
        main([str(a) for a in ("convert", d, "-o", out, "--no-progress", *args)])
        types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
        assert types["blk.0.ssm_conv1d.weight"] == "F32"  # llama.cpp's ssm_conv reads F32 only
        if k.startswith("q4_k_m"):
            assert types["blk.0.attn_gate.weight"] == "Q4_K" and types["blk.0.ssm_out.weight"] in ("Q4_K", "Q6_K")
        with LlamaModel(out, n_ctx=64) as m:
            logits[k] = torch.from_numpy(m.logits(ids[0].tolist()))
    assert _kld(hf_logits(d, ids)[0], logits["f32"]) < 1e-3
    # plain q4_k_m: every tensor's type and bytes as llama.cpp's llama_model_quantize on our f32 file (attn_qkv
    # typed as an attn_v, e.g. Q6_K in some layers)
    from oracles.llamacpp_model import quantize_file
    from quantkit.export import FILE_TYPES
    quantize_file(tmp_path / "f32.gguf", tmp_path / "ref.gguf", int(FILE_TYPES["q4_k_m"]))
    a, b = ({t.name: t for t in GGUFReader(p).tensors} for p in (tmp_path / "q4_k_m.gguf", tmp_path / "ref.gguf"))
    assert {k: t.tensor_type.name for k, t in a.items()} == {k: t.tensor_type.name for k, t in b.items()}
    assert [k for k in a if not np.array_equal(np.asarray(a[k].data), np.asarray(b[k].data))] == []
    c = {t.name: t for t in GGUFReader(tmp_path / "q4_k_m_optimizer_gptq.gguf").tensors}
    for n in ("blk.0.attn_qkv.weight", "blk.0.attn_gate.weight"):
        assert c[n].tensor_type == a[n].tensor_type and not np.array_equal(np.asarray(c[n].data), np.asarray(a[n].data))
    klds = {k: _kld(logits["f32"], v) for k, v in logits.items() if k != "f32"}
    print(f"\nqwen3next KLD vs f32 GGUF (llama.cpp): {klds}")
    assert all(0 < v < 0.1 for v in klds.values()), klds
    assert klds["q4_k_m optimizer gptq"] <= 1.05 * klds["q4_k_m"], klds


def _outlier_norms(g, channels=(3, 17, 40), factor=20.0):
    """Some channels of every (1 + w) pre-norm's output x factor: the activation outliers AWQ's premise needs."""
    from quantkit.graph import LazyTensor
    new = dict(g.tensors)
    for i in range(g.hparams.n_layers):
        for n in (f"blk.{i}.attn_norm.weight", f"blk.{i}.ffn_norm.weight"):
            w = g[n].load().float().clone()
            w[list(channels)] = (w[list(channels)] + 1) * factor - 1
            new[n] = LazyTensor(w.shape, "F32", lambda w=w: w)
    return g.with_tensors(new)


def _rtn(w: torch.Tensor, gs: int = 16) -> torch.Tensor:
    """Textbook asymmetric 4-bit round-to-nearest per group of `gs` input columns (min/max range with 0)."""
    shape, w = w.shape, w.reshape(-1, gs)
    lo, hi = w.min(1, keepdim=True).values.clamp(max=0), w.max(1, keepdim=True).values.clamp(min=0)
    s = ((hi - lo) / 15).clamp(min=1e-8)
    z = torch.round(-lo / s)
    return ((torch.clamp(torch.round(w / s) + z, 0, 15) - z) * s).reshape(shape)


def _decompressed(ct, out):
    """A compressed-tensors checkpoint as plain float safetensors, every packed module decompressed by
    compressed-tensors' own PackedQuantizationCompressor (transformers' merged-expert loader reads no zero
    points, so it cannot load an asymmetric one itself)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file, save_file
    cfg = json.loads((ct / "config.json").read_text())
    (scheme,) = QuantizationConfig.model_validate(cfg.pop("quantization_config")).config_groups.values()
    st = load_file(ct / "model.safetensors")
    packed = {k[: -len("weight_packed")] for k in st if k.endswith(".weight_packed")}
    plain = {k: v for k, v in st.items() if k[: k.rfind(".") + 1] not in packed}
    for p in packed:
        t = {k[len(p):]: v for k, v in st.items() if k.startswith(p) and k.count(".") == p.count(".")}
        plain[p + "weight"] = PackedQuantizationCompressor.decompress(t, scheme)["weight"].float()
    out.mkdir()
    save_file(plain, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.support("awq", "out_ct", family="qwen3next")
def test_awq_folds_exactly_and_beats_rtn(tmp_path, one_thread):
    """AWQ's groups: pre-norm -> in_proj_qkvz + in_proj_ba (DeltaNet), pre-norm -> q (with its gate rows) / k / v
    (full attention; GQA: no v -> o), pre-norm -> router + every expert's gate/up + shared expert + its sigmoid
    gate, up -> down per expert and in the shared expert. Every pre-norm is (1 + w): it folds as (1 + w) / s - 1.
    The folded float model, written as safetensors, gives transformers' logits; the AWQ compressed-tensors
    checkpoint (decompressed by compressed-tensors, run by transformers) is closer to the float model than textbook RTN on the same grid."""
    from quantkit.families.registry import quantizable
    from quantkit.graph import LazyTensor
    from quantkit.jobs.awq import awq_to_safetensors
    from quantkit.quant.awq import AWQConfig, fold_graph, run_awq
    # 8 value heads: in_proj_ba's 16 rows (compressed-tensors' unpacking fails on a one-word packed zero point)
    tiny = make_qwen3_next(tmp_path / "hf", linear_num_value_heads=8)
    g = load(tiny)
    samples = [ids_for(256, 32, seed=s)[0] for s in range(16)]
    ids = ids_for(256, 24, seed=5)
    res = run_awq(g, samples, AWQConfig(group_size=16), progress=False, quantize=False)
    groups = {(i, grp.prev, grp.linears + grp.floats) for i, grp, _ in res.scales}
    moe = ("ffn_gate_exps", "ffn_up_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_gate_inp", "ffn_gate_inp_shexp")
    for i in range(4):
        mixer = ("ssm_in", "ssm_ba") if i in (0, 2) else ("attn_q", "attn_k", "attn_v")
        assert {(i, "attn_norm", mixer), (i, "ffn_norm", moe), (i, "ffn_up_exps", ("ffn_down_exps",)),
                (i, "ffn_up_shexp", ("ffn_down_shexp",))} == {x for x in groups if x[0] == i}, i
    assert all(grp.prev_offset == (1.0 if grp.prev.endswith("norm") else 0.0) for _, grp, _ in res.scales)
    assert all(not torch.allclose(s, torch.ones_like(s)) for _, _, s in res.scales)  # real scales
    folded = fold_graph(g, res.fold_plan())
    assert not torch.equal(folded["blk.0.attn_norm.weight"].load(), g["blk.0.attn_norm.weight"].load().float())
    convert_to_safetensors(folded, tmp_path / "folded", dtype="f32", progress=False)
    torch.testing.assert_close(hf_logits(tmp_path / "folded", ids), hf_logits(tiny, ids), atol=2e-5, rtol=1e-4)

    g = _outlier_norms(g)
    out = tmp_path / "awq"
    awq_to_safetensors(g, out, st_format="compressed-tensors", group_size=16, samples=samples, progress=False,
                       min_expert_tokens=4)
    base = executor_for(g)(ids)
    dec, ours = load(_decompressed(out, tmp_path / "dec")), load(out)
    for n in quantizable(g):  # our reader agrees, up to the decompressor's float16 product
        torch.testing.assert_close(dec[n].load().float(), ours[n].load().float(), atol=0, rtol=2 ** -10)
    got = hf_logits(tmp_path / "dec", ids)
    rtn = g.with_tensors({**g.tensors, **{n: LazyTensor(g[n].shape, "F32", lambda n=n: _rtn(g[n].load().float()))
                                          for n in quantizable(g)}})
    k_awq, k_rtn = _kld(base, got), _kld(base, executor_for(rtn)(ids))
    print(f"\nqwen3next AWQ 4-bit g16 KLD vs float: awq {k_awq:.5f} rtn {k_rtn:.5f}")
    assert 0 < k_awq < 0.8 * k_rtn < 0.05, (k_awq, k_rtn)


@pytest.mark.support("awq", family="qwen3next")
def test_awq_mha_scales_v_into_o_exactly(tmp_path, one_thread):
    """Without GQA, v -> o is a group too: the output gate multiplies v's rows elementwise, so v's rows / s and
    o's columns * s keep the function; the folded model gives transformers' logits."""
    from quantkit.quant.awq import AWQConfig, fold_graph, run_awq
    d = make_qwen3_next(tmp_path / "hf", num_key_value_heads=4)
    g = load(d)
    res = run_awq(g, [ids_for(256, 32, seed=s)[0] for s in range(8)], AWQConfig(group_size=16), progress=False,
                  quantize=False)
    (s,) = [s for i, grp, s in res.scales if (i, grp.prev, grp.linears) == (1, "attn_v", ("attn_output",))]
    assert not torch.allclose(s, torch.ones_like(s))
    ids = ids_for(256, 24, seed=5)
    torch.testing.assert_close(executor_for(fold_graph(g, res.fold_plan()))(ids), hf_logits(d, ids), atol=2e-5,
                               rtol=1e-4)


@pytest.mark.support("kquants", family="qwen3next")
def test_optimizer_gptq_rounds_split_deltanet_projections_with_their_hessian(tmp_path, smollm_tokenizer_dir,
                                                                              one_thread):
    """--optimizer gptq on the tensors GGUF splits from in_proj_qkvz (attn_qkv, attn_gate): each is optimized
    under its own name and planned type with the Hessian of in_proj_qkvz's input, which transformers' model gives
    here (a hook on the calibration samples). Decoded by gguf's dequantizer, both have a lower H-weighted
    error tr(dW H dW^T) than plain q4_k_m's bytes (reference: transformers' in_proj_qkvz, split as llama.cpp's
    converter does)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from quantkit.quant.kquant_gptq import gptq_gguf_kwargs
    d = make_qwen3_next(tmp_path / "hf", vocab=VOCAB, tok_dir=smollm_tokenizer_dir, hidden_size=256, head_dim=64,
                        linear_key_head_dim=64, linear_value_head_dim=64, moe_intermediate_size=256,
                        shared_expert_intermediate_size=256, num_hidden_layers=2)
    g = load(d)
    samples = [ids_for(VOCAB, 64, seed=s)[0] for s in range(8)]
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    xs = []
    model.model.layers[0].linear_attn.in_proj_qkvz.register_forward_pre_hook(lambda m, a: xs.append(a[0][0]))
    with torch.no_grad():
        for s in samples:
            model(s[None])
    x = torch.cat(xs).double()
    H = x.T @ x
    # llama.cpp's split of HF's per-key-head [q k v z] rows: all q, all k, all v (attn_qkv); all z (attn_gate)
    w = model.model.layers[0].linear_attn.in_proj_qkvz.weight.detach().double().view(2, 2 * 64 + 2 * 2 * 64, 256)
    q, k, v, z = w.split([64, 64, 128, 128], dim=1)
    refs = {"blk.0.attn_qkv.weight": torch.cat([q.reshape(-1, 256), k.reshape(-1, 256), v.reshape(-1, 256)]),
            "blk.0.attn_gate.weight": z.reshape(-1, 256)}
    files = {}
    for k, kw in (("plain", {}), ("gptq", gptq_gguf_kwargs(g, "q4_k_m", samples=samples, progress=False))):
        convert_to_gguf(g, tmp_path / f"{k}.gguf", q="q4_k_m", progress=False, **kw)
        files[k] = {t.name: t for t in GGUFReader(tmp_path / f"{k}.gguf").tensors}
    for n, ref in refs.items():
        loss = {}
        for k in ("plain", "gptq"):
            t = files[k][n]
            assert t.tensor_type.name in ("Q4_K", "Q6_K"), (n, t.tensor_type.name)
            dw = torch.from_numpy(dequantize(np.asarray(t.data), t.tensor_type).copy()).double().reshape(ref.shape) - ref
            loss[k] = float(((dw @ H) * dw).sum())
        print(f"\n{n}: tr(dW H dW^T) {loss}")
        assert loss["gptq"] < 0.9 * loss["plain"], (n, loss)


@pytest.mark.support("out_awq", family="qwen3next")
def test_awq_gemm_checkpoint_decodes_close_to_float(tiny, tmp_path, one_thread):
    """The AutoAWQ GEMM checkpoint (DeltaNet projections, attention, shared expert and per-expert modules):
    every module decoded nibble by nibble (test_awq_layout's decoder) into a plain checkpoint that transformers
    runs like our reader's model, close to the float model."""
    from safetensors.torch import load_file, save_file
    from test_awq_layout import decode_gemm

    from quantkit.jobs.awq import awq_to_safetensors
    out = tmp_path / "awq"
    awq_to_safetensors(load(tiny), out, group_size=16, samples=[ids_for(256, 32, seed=s)[0] for s in range(16)],
                       progress=False, min_expert_tokens=4)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.pop("quantization_config")["version"] == "gemm"
    st = load_file(out / "model.safetensors")
    mods = sorted(k[: -len(".qweight")] for k in st if k.endswith(".qweight"))
    assert "model.layers.0.linear_attn.in_proj_qkvz" in mods and "model.layers.3.mlp.experts.3.down_proj" in mods
    plain = {k: v for k, v in st.items() if not k.endswith((".qweight", ".qzeros", ".scales"))}
    for m in mods:
        plain[m + ".weight"] = decode_gemm(st[m + ".qweight"], st[m + ".qzeros"], st[m + ".scales"], 16)
    (tmp_path / "dec").mkdir()
    save_file(plain, tmp_path / "dec" / "model.safetensors")
    (tmp_path / "dec" / "config.json").write_text(json.dumps(cfg))
    ids = ids_for(256, 24, seed=5)
    got = hf_logits(tmp_path / "dec", ids)
    torch.testing.assert_close(got, executor_for(load(out))(ids), atol=1e-4, rtol=1e-4)
    k = _kld(hf_logits(tiny, ids), got)
    print(f"\nqwen3next AWQ GEMM 4-bit g16 KLD vs float: {k:.5f}")
    assert 0 < k < 0.05, k


def test_awq_gguf_imatrix_follows_the_scale_into_split_tensors(tiny, one_thread):
    """--awq with an importance matrix: the folded inputs are x / s, so importances become im / s^2. attn_qkv
    (split from in_proj_qkvz when written) reads in_proj_qkvz's input: the same rows, quantized under either
    name with the same importances, give the same bytes."""
    from gguf import GGMLQuantizationType as QT

    from quantkit.quant.gguf_calibrated import awq_gguf_kwargs
    g = load(tiny)
    gen = torch.Generator().manual_seed(0)
    im = {n: torch.rand(t.shape[-1], generator=gen) + 0.1 for n, t in g.tensors.items() if len(t.shape) == 2}
    kw = awq_gguf_kwargs(g, "q4_0", imatrix=im, samples=[ids_for(256, 32, seed=s)[0] for s in range(4)],
                         progress=False)
    w = kw["transform"]("blk.0.ssm_in.weight", g["blk.0.ssm_in.weight"].load().float())
    x = im["blk.0.ssm_in.weight"]
    a = kw["quantizer"]("blk.0.ssm_in.weight", w, QT.Q4_0, x)
    b = kw["quantizer"]("blk.0.attn_qkv.weight", w, QT.Q4_0, x)
    assert torch.equal(a, b)
    assert not torch.equal(a, kw["quantizer"]("blk.0.ssm_out.weight", w, QT.Q4_0, x))  # unscaled: differs


@pytest.mark.support("rtn", family="qwen3next")
def test_rtn_matches_textbook(tiny_tok, tmp_path):
    """--method rtn reaches the DeltaNet projections, attention, the shared expert and every routed expert:
    each equals a textbook symmetric 4-bit RTN (scale 2 max|w| / 15 in fp16, codes round(w / scale) + 8)."""
    from quantkit.cli import main
    from quantkit.families.registry import quantizable
    out = tmp_path / "rtn"
    main([str(a) for a in ("convert", tiny_tok, "-o", out, "--to", "safetensors", "--method", "rtn",
                           "--group-size", "16", "--no-progress")])
    orig, back = load(tiny_tok), load(out)
    names = quantizable(orig)
    assert {"blk.0.ssm_in.weight", "blk.0.ssm_ba.weight", "blk.1.attn_q.weight", "blk.3.ffn_gate_exps.weight"} <= \
        set(names)
    for n in names:
        w = orig[n].load().float()
        g = w.reshape(*w.shape[:-1], -1, 16)
        scale = (2 * g.abs().amax(-1, keepdim=True) / 15).half().float()
        want = ((torch.clamp(torch.round(g / scale) + 8, 0, 15) - 8) * scale).reshape(w.shape)
        assert torch.equal(back[n].load().float(), want), n
