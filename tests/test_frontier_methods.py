"""`quantkit convert --to safetensors --method rtn|gptq|awq` on tiny DeepSeek-V3 (MLA attention, a dense first
layer, a shared expert, 8 routed experts), V2-Lite, V3.2, GLM-4.5 (q/k norm, biases, shared expert), MiniMax-M2,
Qwen3-MoE and OLMoE; where the router has a selection bias, one routed expert is never picked (bias -1e4) and
must fall back to RTN, reported. Llama 4 in memory (its checkpoints: test_moe_outputs).

The random models get what calibrated methods exploit in real LLMs and random weights lack: a few hidden channels
with outlier activations (the pre-norms' weights x10 there). Routers are scaled up so that top-k choices are
clear-cut (near-ties flip under any rounding, and the KLD would measure the flips, not the quantizers).

Oracles: the checkpoints are decoded by the bit-level decoders written in test_gptq_e2e / test_awq_layout (and
compressed-tensors' own decompressor), the decoded weights run in transformers' own classes, and the KLD against
the float model is measured on held-out text (not the calibration text).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from frontier_models import VOCAB, dequantized, hf_logits, make_tiny
from hybrid_models import make_deepseek_v32
from moe_models import MOE_SPECS, make_tiny_moe
from quantized_outputs import held_out_ids, model_fixtures
from test_deepseek import make_tiny_deepseek
from test_moe_methods import awq_gemm_modules, ct_modules, dequantized_dir, gptq_modules, kld

from quantkit.cli import main

transformers = pytest.importorskip("transformers")

STARVED = 3  # the expert no token reaches
OUTLIERS, OUTLIER_GAIN, ROUTER_GAIN = 4, 10.0, 4.0
RUNS = {"rtn": ("--method", "rtn"), "gptq": ("--method", "gptq"), "awq": ("--method", "awq"),
        "rtn-asym": ("--method", "rtn", "--asym"),
        "gptq-ct": ("--method", "gptq", "--format", "compressed-tensors")}
# kind -> (family, MoE layers, HF modules (of the last layer) that must be packed)
KINDS = {
    "deepseek_v3": ("deepseek3", (1, 2), ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa",
                                          "self_attn.kv_b_proj", "self_attn.o_proj", "mlp.shared_experts.down_proj",
                                          f"mlp.experts.{STARVED}.up_proj", "mlp.experts.7.gate_proj")),
    # V2-Lite: one q projection, softmax routing
    "deepseek_v2_lite": ("deepseek2", (1, 2), ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa",
                                               "self_attn.kv_b_proj", "mlp.shared_experts.gate_proj",
                                               "mlp.experts.7.down_proj")),
    # V3.2: MLA plus the lightning indexer (its q/k projections quantized, its head weights float). index_topk 64
    # keeps every key of the 64-token rows: past it, which keys survive flips under any 4-bit rounding and the
    # flips, not the weight error, dominate the KLD. Calibrating at <= index_topk (real V3.2: 2048 vs 512) the
    # indexer's q projection never runs: AWQ takes its input where q_b reads it
    "deepseek_v32": ("deepseek32", (1, 2), ("self_attn.indexer.wk", "self_attn.indexer.wq_b", "self_attn.q_b_proj",
                                            f"mlp.experts.{STARVED}.gate_proj")),
    "glm": ("glm4moe", (1, 2), ("self_attn.q_proj", "self_attn.o_proj", "mlp.shared_experts.up_proj",
                                f"mlp.experts.{STARVED}.down_proj")),
    "minimax_m2": ("minimax-m2", (0, 1), ("self_attn.k_proj", f"block_sparse_moe.experts.{STARVED}.w1",
                                          "block_sparse_moe.experts.0.w2")),
    # softmax routers without a selection bias (no expert starved on purpose)
    "qwen3_moe": ("qwen3moe", (0, 1), ("self_attn.q_proj", "mlp.experts.3.down_proj")),
    "olmoe": ("olmoe", (0, 1), ("self_attn.v_proj", "mlp.experts.3.gate_proj")),
}
STARVABLE = ("deepseek_v3", "deepseek_v32", "glm", "minimax_m2")  # routers with a selection bias


def family(kind: str) -> str:
    return KINDS[kind][0]


def _make(kind: str, out: Path, tok_dir: Path, **topk) -> Path:
    if kind == "deepseek_v32":
        d = make_deepseek_v32(out, vocab=VOCAB, tok_dir=tok_dir, **topk)
    elif kind.startswith("deepseek"):
        d = make_tiny_deepseek(kind.replace("deepseek_", "").replace("v3", "v3_plain_rope"), out, vocab=VOCAB,
                               tok_dir=tok_dir)
    elif kind in MOE_SPECS:
        d = make_tiny_moe(kind, out, vocab=VOCAB)
        for f in tok_dir.iterdir():
            shutil.copy2(f, d / f.name)
    else:
        d = make_tiny(kind, out, vocab=VOCAB, tok_dir=tok_dir)
    sd = load_file(d / "model.safetensors")
    n_layers = json.loads((d / "config.json").read_text())["num_hidden_layers"]
    for k in [k for k in sd if k.endswith("e_score_correction_bias")]:
        sd[k][STARVED] = -1e4
    if kind.startswith("deepseek"):  # the other makers scale their routers up already
        for k in [k for k in sd if k.endswith("mlp.gate.weight")]:
            sd[k] *= ROUTER_GAIN
    for i in range(n_layers):
        for n in ("input_layernorm", "post_attention_layernorm"):
            sd[f"model.layers.{i}.{n}.weight"][:OUTLIERS] *= OUTLIER_GAIN
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


def make_kind(kind: str, out: Path, tok_dir: Path) -> Path:
    """`_make`, V3.2 keeping every key (index_topk 64: no selection flips)."""
    return _make(kind, out, tok_dir, **({"index_topk": 64} if kind == "deepseek_v32" else {}))


kind, model = model_fixtures(KINDS, make_kind)


@pytest.fixture(scope="module")
def outs(model, jargon_text) -> dict[str, Path]:
    calib = model.parent / "calib.txt"
    calib.write_text(jargon_text[:40_000])
    out = {}
    for k, args in RUNS.items():
        out[k] = model.parent / f"out_{k}"
        flags = [] if k.startswith("rtn") else ["--calib", calib, "--calib-samples", "32", "--calib-seqlen", "64"]
        main([str(a) for a in ("convert", model, "--to", "safetensors", "--group-size", "16", "-o", out[k],
                               "--no-progress", *flags, *args)])
    return out


@pytest.fixture(scope="module")
def eval_ids(model, jargon_text) -> torch.Tensor:
    return held_out_ids(model, jargon_text, 4, 64, 20_000)


def hf_logits_all_read(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits, checking that it read every parameter from the checkpoint (none left at init)."""
    m, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                                attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return m.eval()(ids).logits.float()


def digests(mods: dict[str, torch.Tensor]) -> set[str]:
    """sha256 of each decoded module, experts stacked per projection [E, out, in] (as the report digests them)."""
    from quantkit.quant.gptq_driver import sha256_of
    out, experts = set(), {}
    for p, w in mods.items():
        m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)", p)
        if m:
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = w
        else:
            out.add(sha256_of(w))
    return out | {sha256_of(torch.stack([d[e] for e in sorted(d)])) for d in experts.values()}


def decoded(out: Path) -> dict[str, torch.Tensor]:
    st = load_file(out / "model.safetensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    if qc["quant_method"] == "awq":
        return awq_gemm_modules(st, qc["group_size"])
    if qc["quant_method"] == "gptq":
        return gptq_modules(st, qc["bits"], qc["checkpoint_format"])
    return ct_modules(st, qc)


@pytest.mark.support("gptq", "awq", "out_gptq", "out_awq", "out_ct", family=family)
def test_gptq_and_awq_checkpoints_decode_and_beat_rtn(kind, model, outs, eval_ids, one_thread):
    from quantkit.families import load
    from quantkit.runtime import executor_for
    _, moe_layers, must = KINDS[kind]
    last = max(moe_layers)
    base = hf_logits(model, eval_ids)
    klds = {}
    for k, out in outs.items():
        rep = json.loads((out / "quantkit_report.json").read_text())
        mods = decoded(out)
        # every projection and expert the report names (the starved expert too) is a packed module
        assert any("experts" in i for i in rep["tensors"].values()), k
        assert len(mods) == sum(len(i.get("experts", [0])) for i in rep["tensors"].values()), (k, len(mods))
        for p in must:
            assert f"model.layers.{last}.{p}" in mods, (k, p)
        assert all(torch.isfinite(w).all() for w in mods.values())
        if k in ("rtn", "gptq"):  # GPTQ layout, exact float32 decode: the weights the driver evaluated
            assert digests(mods) == {info["sha256"] for info in rep["tensors"].values()}, k
        if not k.startswith("rtn") and kind in STARVABLE:  # the starved expert got no token: RTN, reported
            starved = {(f["tensor"], f["expert"], f["tokens"]) for f in rep["fallbacks"] if f["expert"] == STARVED}
            assert starved == {(f"blk.{i}.ffn_{p}_exps.weight", STARVED, 0) for i in moe_layers
                               for p in ("gate", "up", "down")}, (k, rep["fallbacks"])
        q = hf_logits_all_read(dequantized_dir(out, mods, model.parent / f"deq_{k}"), eval_ids)
        if k in ("gptq", "awq"):  # quantkit's own reader of the packed checkpoint runs what transformers ran
            torch.testing.assert_close(executor_for(load(out))(eval_ids[:1]), q[:1], atol=2e-3, rtol=1e-3)
        klds[k] = kld(base, q)
    print(f"\n{kind} tiny w4g16, KLD vs float on held-out text:", {k: round(v, 5) for k, v in klds.items()})
    assert all(math.isfinite(v) and v > 0 for v in klds.values()), klds
    # same grids: GPTQ (sym) against sym RTN, AWQ (asym, its default) against asym RTN
    assert klds["gptq"] < 0.95 * klds["rtn"] and klds["gptq-ct"] < 0.95 * klds["rtn"], klds
    assert klds["awq"] < 0.95 * klds["rtn-asym"], klds


@pytest.mark.support("awq", family="deepseek3")
def test_deepseek_awq_fold_keeps_the_float_function(jargon_text, tmp_path, smollm_tokenizer_dir, one_thread):
    """The scales found (input norm -> q_a / kv_a_mqa; post-attention norm -> router columns, every expert's
    gate/up and the shared expert's; up -> down per expert and shared) folded into the float model: transformers'
    logits are unchanged. MLA has no v -> o group (the latent sits between them) and its inner norms are left
    alone (scaling q_b / kv_b through them made the KLD worse)."""
    from quantkit.calibration.data import load_calibration
    from quantkit.families import load
    from quantkit.quant.awq import AWQConfig, fold_graph, run_awq
    from quantkit.runtime.model import CausalLM
    model = _make("deepseek_v3", tmp_path / "m", smollm_tokenizer_dir)
    g = load(model)
    (tmp_path / "calib.txt").write_text(jargon_text[:20_000])
    samples = load_calibration(g, tmp_path / "calib.txt", 8, 64, 0)
    res = run_awq(g, samples, AWQConfig(group_size=16), progress=False, quantize=False)
    groups = {(i, grp.prev, grp.linears, grp.per_expert) for i, grp, _ in res.scales}
    assert (1, "attn_norm", ("attn_q_a", "attn_kv_a_mqa"), False) in groups
    assert (2, "ffn_norm", ("ffn_gate_exps", "ffn_up_exps", "ffn_gate_shexp", "ffn_up_shexp"), False) in groups
    assert (2, "ffn_up_exps", ("ffn_down_exps",), True) in groups and (0, "ffn_up", ("ffn_down",), False) in groups
    assert not any(grp.prev in ("attn_q_a_norm", "attn_kv_a_norm", "attn_kv_b") for _, grp, _ in res.scales)
    assert all(not torch.allclose(s, torch.ones_like(s)) for _, grp, s in res.scales if not grp.per_expert)
    ids = torch.stack(samples[:2])
    torch.testing.assert_close(CausalLM(fold_graph(g, res.fold_plan()))(ids), hf_logits(model, ids),
                               atol=2e-4, rtol=1e-4)


@pytest.mark.support("gptq", "awq", family="llama4")
def test_llama4_gptq_and_awq_in_memory_beat_rtn(jargon_text, tmp_path, smollm_tokenizer_dir, one_thread):
    """GPTQ and AWQ over Llama 4's blocks in memory (its per-expert checkpoints: test_moe_outputs); the methods run
    over its blocks (chunked and NoPE attention, the shared expert, routed experts scaled by their router score
    on the input). The dequantized weights are written as a plain checkpoint and run in transformers."""
    from quantkit.calibration.data import load_calibration
    from quantkit.export import convert_to_safetensors
    from quantkit.families import load
    from quantkit.quant.awq import AWQConfig, quantized_graph, run_awq
    from quantkit.quant.gptq_driver import GridOptions, quantize_graph
    d = _make("llama4", tmp_path / "model", smollm_tokenizer_dir)
    g = load(d)
    (tmp_path / "calib.txt").write_text(jargon_text[:40_000])
    samples = load_calibration(g, tmp_path / "calib.txt", 32, 64, 0)
    ids = held_out_ids(d, jargon_text, 4, 64, 20_000)
    base = hf_logits(d, ids)
    graphs = {}
    for name, method, sym in (("rtn", "rtn", True), ("gptq", "gptq", True), ("rtn-asym", "rtn", False)):
        res = quantize_graph(g, samples if method == "gptq" else None,
                             GridOptions(method=method, group_size=16, sym=sym), progress=False)
        assert len(res.experts["blk.3.ffn_down_exps.weight"]) == 4 and "blk.3.ffn_up_shexp.weight" in res.linears
        graphs[name] = dequantized(g, res)
    awq = run_awq(g, samples, AWQConfig(group_size=16), progress=False)
    assert any(grp.per_expert for _, grp, _ in awq.scales) and len(awq.quantized["blk.1.ffn_gate_exps.weight"]) == 4
    graphs["awq"] = quantized_graph(g, awq)
    klds = {}
    for name, q in graphs.items():
        convert_to_safetensors(q, tmp_path / name, dtype="f32", progress=False)
        klds[name] = kld(base, hf_logits_all_read(tmp_path / name, ids))
    print("\nllama4 tiny w4g16, KLD vs float on held-out text:", {k: round(v, 5) for k, v in klds.items()})
    assert all(math.isfinite(v) and v > 0 for v in klds.values()), klds
    assert klds["gptq"] < 0.95 * klds["rtn"] and klds["awq"] < 0.95 * klds["rtn-asym"], klds
