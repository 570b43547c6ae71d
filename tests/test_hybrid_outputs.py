"""Quantized checkpoints of the hybrid families MiniMax-Text-01 / M1 (lightning attention + softmax attention,
MoE) and Qwen3-Next (Gated DeltaNet with fused in_proj_qkvz / in_proj_ba, gated attention, MoE with a gated
shared expert): GPTQ layout, AutoAWQ GEMM, MXFP4 compressed-tensors, and `--q mxfp4_moe` GGUF.

Tiny random checkpoints from transformers' own classes (tests/hybrid_models.py), a few outlier channels in the
pre-norms. Oracles: the GPTQ / AWQ bit decoders of test_gptq_e2e / test_awq_layout and compressed-tensors' own
MXFP4 decompressor, compared module by module with the source checkpoint's tensor of that HF name; the decoded
weights run in transformers' MiniMax / Qwen3Next classes against the float model (KLD on held-out text);
llama.cpp's llama_model_quantize on our f32 GGUF writes the mxfp4_moe bytes, and llama.cpp runs them.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from hybrid_models import make_minimax, make_qwen3_next
from quantized_outputs import calib_flags, held_out_ids, model_fixtures, mxfp4_modules
from test_frontier_methods import decoded, digests
from test_moe_methods import dequantized_dir, kld
from test_moe_outputs import expert_modules, source_weights

from quantkit.cli import main

transformers = pytest.importorskip("transformers")

VOCAB = 49152  # SmolLM2's tokenizer: calibration text and GGUF vocabularies
KINDS = {"minimax": "minimax", "qwen3_next": "qwen3next"}
ROUTERS = (".block_sparse_moe.gate", ".mlp.gate", ".shared_expert_gate")
# llama.cpp's minimax-01 holds one residual scale for every alpha and no betas (test_hybrid_families)
MINIMAX_GGUF = dict(full_attn_alpha_factor=1.3, linear_attn_alpha_factor=1.3, mlp_alpha_factor=1.3,
                    full_attn_beta_factor=1.0, linear_attn_beta_factor=1.0, mlp_beta_factor=1.0, rms_norm_eps=1e-6)
OUTLIERS, GAIN = 4, 10.0
DECAY = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


def family(kind: str) -> str:
    return KINDS[kind]


def make(kind, out, tok_dir, outliers=True):
    """The tiny model; its pre-norms scaled up on a few channels (Qwen3-Next's norms are 1 + w)."""
    if kind == "minimax":  # init 0.1: at 0.02 the post-norm residual hides the weights (test_hybrid_families)
        d = make_minimax(out, vocab=VOCAB, tok_dir=tok_dir, initializer_range=0.1, **MINIMAX_GGUF)
    else:
        d = make_qwen3_next(out, vocab=VOCAB, tok_dir=tok_dir)
    if outliers:
        sd = load_file(d / "model.safetensors")
        for k in [k for k in sd if k.endswith(("input_layernorm.weight", "post_attention_layernorm.weight"))]:
            w = sd[k][:OUTLIERS]
            sd[k][:OUTLIERS] = w * GAIN if kind == "minimax" else (w + 1) * GAIN - 1
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


kind, model = model_fixtures(KINDS, make)


@pytest.fixture(scope="module")
def eval_ids(model, jargon_text) -> torch.Tensor:
    return held_out_ids(model, jargon_text)


@pytest.fixture(scope="module")
def base(model, eval_ids) -> torch.Tensor:
    return hf_logits_all_read(model, eval_ids)


def hf_logits_all_read(model_dir, ids) -> torch.Tensor:
    """transformers' logits, every parameter read from the checkpoint (none left at init); MiniMax's decay
    buffers are not stored (transformers computes them from the config on load)."""
    m, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                                attn_implementation="eager", output_loading_info=True)
    missing = {k for k in info["missing_keys"] if not k.endswith(DECAY)}
    assert not missing and not info["mismatched_keys"], info
    with torch.no_grad():
        return m.eval()(ids).logits.float()


def convert(model, out, *args):
    main([str(a) for a in ("convert", model, "-o", out, "--no-progress", *args)])
    return out


def run_decoded(model, out, mods, ids, name) -> torch.Tensor:
    return hf_logits_all_read(dequantized_dir(out, mods, model.parent / f"deq_{name}"), ids)


def routers(src) -> list[str]:
    return [p for p in src if p.endswith(ROUTERS)]


@pytest.mark.support("awq", "out_gptq", "out_awq", family=family)
def test_gptq_and_awq_checkpoints_decode_close_to_float(kind, model, base, eval_ids, jargon_text, one_thread):
    """RTN / GPTQ (GPTQ layout) and AWQ (AutoAWQ GEMM) from the CLI: every projection (lightning qkv_proj /
    output_gate / out_proj; DeltaNet in_proj_qkvz / in_proj_ba / out_proj), attention, shared expert and every
    expert a module, routers float; decoded by the independent decoders (GPTQ: exactly the weights the driver
    evaluated), run in transformers close to the float model; quantkit reads them back to those logits."""
    from quantkit.families import load
    from quantkit.runtime import executor_for
    flags = calib_flags(model.parent, jargon_text)
    runs = {"rtn": ("--method", "rtn"), "rtn-asym": ("--method", "rtn", "--asym"),
            "gptq": ("--method", "gptq", *flags), "awq": ("--method", "awq", *flags)}
    src = source_weights(model)
    klds = {}
    for k, args in runs.items():
        out = convert(model, model.parent / k, "--to", "safetensors", "--group-size", "16", *args)
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == ("awq" if k == "awq" else "gptq"), k
        mods = decoded(out)
        assert set(mods) == set(src) - {"model.embed_tokens", "lm_head"} - set(routers(src)), set(mods) ^ set(src)
        assert len(expert_modules(mods)) == 48, k
        if k == "rtn":  # names and row orders (fused in_proj_qkvz / qkv_proj): textbook RTN of the source tensor
            from test_dense_quant_outputs import textbook_rtn
            assert all(torch.equal(w, textbook_rtn(src[p], 16)) for p, w in mods.items())
        if k in ("rtn", "gptq"):  # exact float32 decode: the driver's own digests
            rep = json.loads((out / "quantkit_report.json").read_text())
            assert digests(mods) == {info["sha256"] for info in rep["tensors"].values()}, k
        q = run_decoded(model, out, mods, eval_ids, k)
        if k in ("gptq", "awq"):
            torch.testing.assert_close(executor_for(load(out))(eval_ids[:1]), q[:1], atol=2e-3, rtol=1e-3)
        klds[k] = kld(base, q)
    print(f"\n{kind} tiny w4g16, KLD vs float on held-out text:", {k: round(v, 5) for k, v in klds.items()})
    assert all(0 < v < 0.05 for v in klds.values()), klds
    assert klds["gptq"] < klds["rtn"] and klds["awq"] < 1.1 * klds["rtn-asym"], klds


@pytest.mark.support("out_mxfp4", family=family)
def test_mxfp4_compressed_tensors_per_expert(kind, model, base, eval_ids, one_thread):
    """`--q mxfp4 --to safetensors`: every projection and expert an mxfp4-pack-quantized module that
    compressed-tensors decompresses to the MXFP4 rounding of the source weight of that name; routers and lm_head
    16-bit in `ignore`; run in transformers close to the float model, and quantkit reads it back to those logits."""
    from quantkit.families import load
    from quantkit.runtime import executor_for
    out = convert(model, model.parent / "mxfp4", "--to", "safetensors", "--q", "mxfp4")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    st = load_file(out / "model.safetensors")
    src = source_weights(model)
    assert routers(src) and set(routers(src)) <= set(qc["ignore"]) and "lm_head" in qc["ignore"]
    mods = mxfp4_modules(st, qc, src)
    assert set(src) - {"model.embed_tokens"} == set(mods) | set(qc["ignore"]), set(src) ^ set(mods)
    assert len(expert_modules(mods)) == 48
    q = run_decoded(model, out, mods, eval_ids, "mxfp4")
    torch.testing.assert_close(executor_for(load(out))(eval_ids[:1]), q[:1], atol=2e-3, rtol=1e-3)
    k = kld(base, q)
    print(f"\n{kind} MXFP4 (compressed-tensors) KLD vs float: {k:.5f}")
    assert 0 < k < 0.1, k


@pytest.mark.support("mxfp4", "llamacpp", family=family)
@pytest.mark.llamacpp
def test_mxfp4_moe_gguf_is_llama_quantizes_and_runs_near_transformers(kind, model, tmp_path, one_thread):
    """`--q mxfp4_moe`: routed experts MXFP4, the rest Q8_0 (F32 where llama.cpp keeps it: norms, conv, the
    decay parameters); every tensor's type and bytes are llama.cpp's llama_model_quantize (MOSTLY_MXFP4_MOE) on
    our f32 GGUF, and llama.cpp runs the file close to transformers."""
    import gguf
    from frontier_models import ids_for, llamacpp_logits
    from test_frontier_gguf import MXFP4_MOE_FTYPE, assert_same_gguf_tensors

    from oracles.llamacpp_model import quantize_file
    f32, ours, theirs = tmp_path / "f32.gguf", tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    main(["-q", "convert", str(model), "--q", "f32", "-o", str(f32)])
    main(["-q", "convert", str(model), "--q", "mxfp4_moe", "-o", str(ours)])
    quantize_file(f32, theirs, MXFP4_MOE_FTYPE)
    a = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(ours)).tensors}
    assert {a[n] for n in a if "_exps.weight" in n} == {"MXFP4"} and len([n for n in a if "_exps" in n]) == 12
    mixers = [n for n in a if n.endswith(("attn_q.weight", "attn_qkv.weight", "attn_gate.weight", "ssm_out.weight"))]
    assert len(mixers) >= 6 and {a[n] for n in mixers} == {"Q8_0"}, {n: a[n] for n in mixers}
    assert_same_gguf_tensors(ours, theirs)
    ids = ids_for(VOCAB, 32, seed=7)
    ref = hf_logits_all_read(model, ids)[0]
    k = kld(ref, torch.from_numpy(llamacpp_logits(ours, ids)))
    k_f32 = kld(ref, torch.from_numpy(llamacpp_logits(f32, ids)))
    print(f"\n{kind} mxfp4_moe in llama.cpp: KLD vs transformers {k:.5f} (f32 GGUF: {k_f32:.2e})")
    assert k_f32 < 1e-4 and 0 < k < 0.05, (k, k_f32)


@pytest.mark.support("awq", family="minimax")
def test_minimax_awq_fold_keeps_the_float_function(tmp_path, one_thread):
    """MiniMax's residual is the normed input (x <- alpha * norm(x) + beta * mixer(norm(x))): a scale folded into
    a pre-norm would change the residual too, so AWQ's only groups are w3 -> w2 per expert (the other linears are
    clipped and quantized unscaled). Folded into the float model and written as safetensors: transformers'
    logits are unchanged (past the 16-token lightning blocks)."""
    from hybrid_models import hf_logits, ids_for

    from quantkit.export import convert_to_safetensors
    from quantkit.families import load
    from quantkit.quant.awq import AWQConfig, fold_graph, run_awq
    d = make_minimax(tmp_path / "hf", initializer_range=0.1)
    g = load(d)
    res = run_awq(g, [ids_for(256, 32, seed=s)[0] for s in range(8)], AWQConfig(group_size=16), progress=False,
                  quantize=False)
    groups = {(i, grp.prev, grp.linears, grp.per_expert) for i, grp, _ in res.scales}
    assert groups == {(i, "ffn_up_exps", ("ffn_down_exps",), True) for i in range(4)}, groups
    assert all(not torch.allclose(s, torch.ones_like(s)) for _, _, s in res.scales)
    convert_to_safetensors(fold_graph(g, res.fold_plan()), tmp_path / "folded", dtype="f32", progress=False)
    ids = ids_for(256, 40, seed=5)
    torch.testing.assert_close(hf_logits(tmp_path / "folded", ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)
