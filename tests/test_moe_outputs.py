"""MoE checkpoints written per expert: MXFP4 compressed-tensors and textbook RTN for ten MoE families, Llama 4's
fused experts as GPTQ / AWQ / compressed-tensors modules, Qwen2-MoE AWQ and compressed-tensors, DeepSeek V2 plain
safetensors; and the executor's pick among saturated sigmoid router scores.

Tiny random checkpoints of each family (test_frontier_methods' makers: transformers' own classes, routers scaled
so top-k choices are clear-cut). Oracles: compressed-tensors' own decompressors, the GPTQ / AWQ bit decoders of
test_gptq_e2e / test_awq_layout, compared module by module with the *source* checkpoint's tensor of the same HF
name (Llama 4: the slice of its fused gate_up_proj / down_proj), so names and row orders are checked too; the
decoded weights run in transformers' own classes against the float model (KLD on held-out text).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from frontier_models import VOCAB
from quantized_outputs import calib_flags, held_out_ids, model_fixtures, mxfp4_modules
from test_frontier_methods import _make, hf_logits_all_read, make_kind
from test_moe_methods import dequantized_dir, gptq_modules, kld

from quantkit.cli import main

transformers = pytest.importorskip("transformers")

# kind -> family
FAMILIES = {"mixtral": "mixtral", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe",
            "deepseek_v2_lite": "deepseek2", "deepseek_v3": "deepseek3", "deepseek_v32": "deepseek32",
            "glm": "glm4moe", "minimax_m2": "minimax-m2", "llama4": "llama4"}
ROUTERS = (".mlp.gate.weight", ".block_sparse_moe.gate.weight", ".feed_forward.router.weight",
           ".shared_expert_gate.weight", ".indexer.weights_proj.weight")


def family(kind: str) -> str:
    return FAMILIES[kind]


kind, model = model_fixtures(FAMILIES, make_kind)


@pytest.fixture(scope="module")
def eval_ids(model, jargon_text) -> torch.Tensor:
    return held_out_ids(model, jargon_text)


def source_weights(model) -> dict[str, torch.Tensor]:
    """HF module -> float weight [out, in] of the source checkpoint; Llama 4's fused experts split the way
    llm-compressor unfuses them (experts.{e}.gate_proj = gate_up_proj[e, :, :f].T ...)."""
    st = load_file(model / "model.safetensors")
    out = {k[: -len(".weight")]: v.float() for k, v in st.items() if k.endswith(".weight") and v.dim() == 2}
    for k, v in st.items():
        if k.endswith("experts.gate_up_proj"):
            f, p = v.shape[2] // 2, k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                out[f"{p}{e}.gate_proj"], out[f"{p}{e}.up_proj"] = v[e, :, :f].T.float(), v[e, :, f:].T.float()
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                out[f"{k[: -len('down_proj')]}{e}.down_proj"] = v[e].T.float()
    return out


def fuse_llama4(d, n_experts: int) -> None:
    """Per-expert Llama 4 weights back into transformers' fused gate_up_proj [E, d, 2f] / down_proj [E, f, d]."""
    sd = load_file(d / "model.safetensors")
    layers = {k.split(".experts.")[0] for k in sd if ".feed_forward.experts." in k}
    for p in layers:
        w = {h: [sd.pop(f"{p}.experts.{e}.{h}.weight") for e in range(n_experts)]
             for h in ("gate_proj", "up_proj", "down_proj")}
        sd[f"{p}.experts.gate_up_proj"] = torch.stack([torch.cat([g.T, u.T], 1) for g, u in
                                                       zip(w["gate_proj"], w["up_proj"])]).contiguous()
        sd[f"{p}.experts.down_proj"] = torch.stack([x.T for x in w["down_proj"]]).contiguous()
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def run_decoded(kind, model, out, mods, ids, name) -> torch.Tensor:
    d = dequantized_dir(out, mods, model.parent / f"deq_{name}")
    if kind == "llama4":
        fuse_llama4(d, json.loads((model / "config.json").read_text())["num_local_experts"])
    return hf_logits_all_read(d, ids)


def expert_modules(mods) -> list[str]:
    return [p for p in mods if ".experts." in p]


def convert(model, out, *args):
    main([str(a) for a in ("convert", model, "--to", "safetensors", "-o", out, "--no-progress", *args)])
    return out


@pytest.fixture(scope="module")
def rtn(kind, model, eval_ids):
    """RTN w4 g32 (GPTQ layout): its modules decoded bit by bit, and the decoded model's KLD against the float one."""
    out = convert(model, model.parent / "rtn", "--method", "rtn", "--group-size", "32")
    mods = gptq_modules(load_file(out / "model.safetensors"), 4, "gptq")
    return out, mods, kld(hf_logits_all_read(model, eval_ids), run_decoded(kind, model, out, mods, eval_ids, "rtn"))


@pytest.mark.support("rtn", family=family)
def test_rtn_is_textbook_per_expert(kind, model, rtn, one_thread):
    """Each module of the RTN checkpoint, decoded by test_gptq_e2e's decoder, is textbook RTN of the source
    weight of that HF name; every expert of every MoE layer is its own module, the routers stay float."""
    from test_dense_quant_outputs import textbook_rtn
    out, mods, k = rtn
    src = source_weights(model)
    for p, w in mods.items():
        n = src[p].shape[1]  # a last partial group (DeepSeek's 16-wide latents): zero padding leaves max|w| as is
        want = textbook_rtn(torch.nn.functional.pad(src[p], (0, -n % 32)), 32)[:, :n]
        assert torch.equal(w, want), p
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32
    assert set(expert_modules(mods)) == set(expert_modules(src)) and len(expert_modules(mods)) >= 24
    routers = [p for p in src if (p + ".weight").endswith(ROUTERS)]
    assert routers and not set(routers) & set(mods)
    print(f"\n{kind} RTN w4g32 KLD vs float: {k:.5f}")
    assert 0 < k < 0.5, k


@pytest.mark.support("out_mxfp4", "mxfp4", family=family)
def test_mxfp4_compressed_tensors_per_expert(kind, model, eval_ids, rtn, one_thread):
    """Every projection and expert is an mxfp4-pack-quantized module that compressed-tensors decompresses to the
    MXFP4 rounding of the source weight of that name; routers and lm_head stay 16-bit in `ignore`; the
    decompressed model runs in transformers close to the float one, and quantkit reads it back to those logits."""
    from quantkit.families import load
    from quantkit.runtime import executor_for
    out = model.parent / "mxfp4"
    convert(model, out, "--q", "mxfp4")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    st = load_file(out / "model.safetensors")
    src = source_weights(model)
    routers = [p for p in src if (p + ".weight").endswith(ROUTERS)]
    assert routers and set(routers) <= set(qc["ignore"]) and "lm_head" in qc["ignore"]
    assert all(p + ".weight" in st for p in routers)
    mods = mxfp4_modules(st, qc, src)
    # every source linear is packed or ignored; every expert of every MoE layer is packed
    assert set(src) - {"model.embed_tokens"} == set(mods) | set(qc["ignore"]), set(src) ^ set(mods)
    assert set(expert_modules(mods)) == set(expert_modules(src)) and len(expert_modules(mods)) >= 24
    base = hf_logits_all_read(model, eval_ids)
    q = run_decoded(kind, model, out, mods, eval_ids, "mxfp4")
    # quantkit reads its checkpoint back to what transformers ran
    torch.testing.assert_close(executor_for(load(out))(eval_ids[:1]), q[:1], atol=2e-3, rtol=1e-3)
    k = kld(base, q)
    print(f"\n{kind} MXFP4 (compressed-tensors) KLD vs float: {k:.5f} (RTN w4g32: {rtn[2]:.5f})")
    # MXFP4 (power-of-two scales, an FP4 grid) is a little coarser than int4 g32 with fp16 scales
    assert 0 < k < min(0.2, 3 * rtn[2]), (k, rtn[2])


def rotate_half_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF Llama 4's q/k rows (RoPE on adjacent pairs) in the rotate-half order the driver quantizes them in:
    each head's even rows, then its odd rows."""
    out_f, in_f = w.shape
    return w.reshape(heads, out_f // heads // 2, 2, in_f).transpose(1, 2).reshape(out_f, in_f)


@pytest.mark.support("out_gptq", "out_awq", "out_ct", family="llama4")
def test_llama4_quantized_checkpoints_per_expert(tmp_path, smollm_tokenizer_dir, jargon_text, one_thread):
    """GPTQ (GPTQ layout and compressed-tensors), AWQ GEMM and RTN of Llama 4 with its fused experts written one
    module per expert (`feed_forward.experts.{e}.gate_proj ...`, llm-compressor's unfused layout): decoded by the
    independent decoders (GPTQ: exactly the weights the driver evaluated), fused back into transformers'
    Llama4TextExperts and run close to the float model; quantkit reads the checkpoints back to the same logits."""
    from test_frontier_methods import decoded, digests

    from quantkit.families import load
    from quantkit.runtime import executor_for
    model = _make("llama4", tmp_path / "model", smollm_tokenizer_dir)
    cfg = json.loads((model / "config.json").read_text())
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    flags = calib_flags(tmp_path, jargon_text)
    runs = {"rtn": ("--method", "rtn"), "rtn-asym": ("--method", "rtn", "--asym"),
            "gptq": ("--method", "gptq", *flags),
            "gptq-ct": ("--method", "gptq", "--format", "compressed-tensors", *flags),
            "awq": ("--method", "awq", *flags)}
    ids = held_out_ids(model, jargon_text)
    base = hf_logits_all_read(model, ids)
    src = source_weights(model)
    klds = {}
    for k, args in runs.items():
        out = convert(model, tmp_path / k, "--group-size", "16", *args)
        mods = decoded(out)
        assert set(expert_modules(mods)) == set(expert_modules(src)) and len(expert_modules(mods)) == 24, k
        assert "model.layers.3.feed_forward.shared_expert.up_proj" in mods and "model.layers.0.self_attn.q_proj" in mods
        rep = json.loads((out / "quantkit_report.json").read_text())
        if k in ("rtn", "gptq"):  # exact float32 decode: the driver's own digests (q/k back in its row order)
            canon = {p: rotate_half_rows(w, heads[p.rsplit(".", 1)[1]]) if p.endswith(("q_proj", "k_proj")) else w
                     for p, w in mods.items()}
            assert digests(canon) == {info["sha256"] for info in rep["tensors"].values()}, k
        q = run_decoded("llama4", model, out, mods, ids, k)
        if k in ("gptq", "awq"):
            torch.testing.assert_close(executor_for(load(out))(ids[:1]), q[:1], atol=2e-3, rtol=1e-3)
        klds[k] = kld(base, q)
    print("\nllama4 tiny w4g16 checkpoints, KLD vs float on held-out text:", {k: round(v, 5) for k, v in klds.items()})
    assert all(0 < v < 0.05 for v in klds.values()), klds
    assert klds["gptq"] < 1.1 * klds["rtn"] and klds["awq"] < 1.1 * klds["rtn-asym"], klds


@pytest.mark.support("run", family="llama4")
def test_llama4_saturated_router_picks_as_transformers(tmp_path, one_thread):
    """Router logits past ~17 make sigmoid scores 1.0 in float32: transformers takes the top-k of the logits, so
    the executor must not pick among the tied scores (it did: another expert, logits off by ~1)."""
    from frontier_models import ids_for, make_tiny

    from quantkit.families import load
    from quantkit.runtime import executor_for
    d = make_tiny("llama4", tmp_path / "m", vocab=512)
    sd = load_file(d / "model.safetensors")
    for k in [k for k in sd if k.endswith("router.weight")]:
        sd[k] = sd[k] * 40
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    ids = ids_for(512, 48, batch=2)
    ref = hf_logits_all_read(d, ids)
    torch.testing.assert_close(executor_for(load(d))(ids), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.support("out_safetensors", family="deepseek2")
@pytest.mark.parametrize("kind,via_gguf", [("v2", False), ("v2_lite", False), ("v2_groups", True)])
def test_deepseek_v2_safetensors_loads_in_transformers(kind, via_gguf, tmp_path, smollm_tokenizer_dir, one_thread):
    """Our plain HF checkpoint of DeepSeek V2 (YaRN, V2-Lite's single q projection, group-limited greedy; from a
    GGUF: the config rebuilt from its metadata) is read whole by transformers' DeepseekV2 and gives the source's
    logits."""
    from frontier_models import ids_for
    from test_deepseek import make_tiny_deepseek

    from quantkit.export import convert_to_gguf, convert_to_safetensors
    from quantkit.families import load
    vocab = VOCAB if via_gguf else 512  # a GGUF needs a real tokenizer
    d = make_tiny_deepseek(kind, tmp_path / kind, vocab=vocab, tok_dir=smollm_tokenizer_dir if via_gguf else None)
    g = load(d)
    if via_gguf:
        convert_to_gguf(g, tmp_path / "m.gguf", q="f32", progress=False)
        g = load(tmp_path / "m.gguf")
    convert_to_safetensors(g, tmp_path / "hf", dtype="f32", progress=False)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "deepseek_v2"
    ids = ids_for(vocab, 32, batch=2)
    torch.testing.assert_close(hf_logits_all_read(tmp_path / "hf", ids), hf_logits_all_read(d, ids),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.support("awq", "out_awq", "out_ct", family="qwen2moe")
def test_qwen2_moe_awq_and_compressed_tensors(tmp_path, smollm_tokenizer_dir, jargon_text, one_thread):
    """Qwen2-MoE (a shared expert behind a sigmoid gate) as AWQ GEMM and as compressed-tensors (GPTQ, AWQ):
    decoded by test_awq_layout's decoder / compressed-tensors' own decompressor, every expert and the shared
    expert a module, the router and the [1, d] shared gate float (in `ignore`); run in transformers' Qwen2-MoE
    close to the float model."""
    from test_frontier_methods import decoded

    model = _make("qwen2_moe", tmp_path / "model", smollm_tokenizer_dir)
    flags = calib_flags(tmp_path, jargon_text)
    runs = {"rtn-asym-ct": ("--method", "rtn", "--asym", "--format", "compressed-tensors"),
            "awq": ("--method", "awq", *flags), "awq-ct": ("--method", "awq", "--format", "compressed-tensors", *flags),
            "gptq-ct": ("--method", "gptq", "--format", "compressed-tensors", *flags)}
    ids = held_out_ids(model, jargon_text)
    base = hf_logits_all_read(model, ids)
    src = source_weights(model)
    klds = {}
    for k, args in runs.items():
        out = convert(model, tmp_path / k, "--group-size", "32", *args)
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == ("awq" if k == "awq" else "compressed-tensors"), k
        if k != "awq":
            assert {"model.layers.1.mlp.gate", "model.layers.1.mlp.shared_expert_gate"} <= set(qc["ignore"]), k
        mods = decoded(out)
        assert set(expert_modules(mods)) == set(expert_modules(src)) and len(expert_modules(mods)) == 24, k
        assert "model.layers.1.mlp.shared_expert.down_proj" in mods
        assert "model.layers.1.mlp.shared_expert_gate" not in mods
        klds[k] = kld(base, run_decoded("qwen2_moe", model, out, mods, ids, k))
    print("\nqwen2-moe tiny w4g32, KLD vs float on held-out text:", {k: round(v, 5) for k, v in klds.items()})
    assert all(0 < v < 0.05 for v in klds.values()), klds
    assert klds["awq"] < 1.1 * klds["rtn-asym-ct"] and klds["awq-ct"] < 1.1 * klds["rtn-asym-ct"], klds


def test_safetensors_writer_takes_single_group_columns(tmp_path):
    """An asymmetric compressed-tensors zero point of one group (in_features <= group size: Qwen2-MoE's tiny
    down_proj) packs to [n, 1] with stride (1, n): torch calls it contiguous, but its byte view was refused."""
    from quantkit.formats.safetensors_io import PlannedTensor, write_sharded
    t = torch.arange(8, dtype=torch.int32).reshape(1, 8).T
    assert t.is_contiguous() and t.stride(-1) != 1
    write_sharded(tmp_path, [PlannedTensor("z", torch.int32, (8, 1), lambda: t)])
    assert torch.equal(load_file(tmp_path / "model.safetensors")["z"], t)


def test_mxfp4_experts_stream_one_at_a_time(tmp_path):
    """Per-expert sources are encoded expert by expert: no stacked [E, out, in] expert tensor is ever loaded."""
    from moe_models import make_tiny_moe

    from quantkit.families import load
    from quantkit.formats.mxfp4_writer import convert_to_mxfp4_safetensors
    g = load(make_tiny_moe("qwen3_moe", tmp_path / "m"))
    stacked = [lt for lt in g.tensors.values() if lt.parts is not None]
    assert len(stacked) == 6

    def whole():
        raise AssertionError("a whole expert stack was loaded")
    for lt in stacked:
        lt._loader = whole
    convert_to_mxfp4_safetensors(g, tmp_path / "o", progress=False)
    assert "model.layers.1.mlp.experts.3.down_proj.weight_packed" in load_file(tmp_path / "o" / "model.safetensors")


def test_mxfp4_dry_run_plans_what_gets_written(tmp_path):
    """--dry-run of an MXFP4 MoE checkpoint: experts and projections MXFP4, routers and lm_head bf16, and the
    planned bytes are the bytes written."""
    from moe_models import make_tiny_moe

    from quantkit.pipeline import convert as qk_convert
    src = make_tiny_moe("qwen2_moe", tmp_path / "m")
    plan = qk_convert(src, tmp_path / "o", to="safetensors", q="mxfp4", dry_run=True, progress=False)
    types = {r["name"]: r["type"] for r in plan["rows"]}
    assert types["blk.1.ffn_down_exps.weight"] == types["blk.0.attn_q.weight"] == "mxfp4"
    assert types["blk.1.ffn_gate_inp.weight"] == types["output.weight"] == types["token_embd.weight"] == "bf16"
    real = qk_convert(src, tmp_path / "o", to="safetensors", q="mxfp4", progress=False)
    assert plan["bytes"] == real["bytes"]


def test_mxfp4_refuses_experts_without_whole_blocks(tmp_path, capsys):
    """An expert input dim that is not a multiple of 32 has no MXFP4 layout: one line, no output directory."""
    from moe_models import make_tiny_moe
    src = make_tiny_moe("mixtral", tmp_path / "m", ffn=48)
    with pytest.raises(SystemExit):
        convert(src, tmp_path / "o", "--q", "mxfp4")
    err = capsys.readouterr().err
    assert "experts.0.w2: expert input dim 48 is not a multiple of 32" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
