"""`quantkit convert --to safetensors --method rtn|gptq|awq` on a DeepSeek-V3-shaped tiny model: MLA attention,
a dense first layer, a shared expert and 8 routed experts, one of which the router never picks.

The random model gets what calibrated methods exploit in real LLMs and random weights lack: a few hidden channels
with outlier activations (the pre-norms' weights x10 there). Its router is scaled up so that top-k choices are
clear-cut (near-ties flip under any rounding, and the KLD would measure the flips, not the quantizers).

Oracles: the checkpoints are decoded by the bit-level decoders written in test_gptq_e2e / test_awq_layout (and
compressed-tensors' own decompressor), the decoded weights run in transformers' DeepseekV3 class, and the KLD
against the float model is measured on held-out text (not the calibration text).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_deepseek import VOCAB, hf_logits, make_tiny_deepseek
from test_moe_methods import awq_gemm_modules, ct_modules, dequantized_dir, gptq_modules, kld

from quantkit.cli import main

transformers = pytest.importorskip("transformers")

STARVED = 3  # the expert no token reaches (selection bias -1e4 in every MoE layer)
OUTLIERS, OUTLIER_GAIN, ROUTER_GAIN = 4, 10.0, 4.0
RUNS = {"rtn": ("--method", "rtn"), "gptq": ("--method", "gptq"), "awq": ("--method", "awq"),
        "rtn-asym": ("--method", "rtn", "--asym"),
        "gptq-ct": ("--method", "gptq", "--format", "compressed-tensors")}
KLD: dict[str, float] = {}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ds_methods")


@pytest.fixture(scope="module")
def model(work, smollm_tokenizer_dir) -> Path:
    d = make_tiny_deepseek("v3_plain_rope", work / "v3", vocab=VOCAB, tok_dir=smollm_tokenizer_dir)
    sd = load_file(d / "model.safetensors")
    for i in (1, 2):
        sd[f"model.layers.{i}.mlp.gate.e_score_correction_bias"][STARVED] = -1e4
        sd[f"model.layers.{i}.mlp.gate.weight"] *= ROUTER_GAIN
    for i in range(3):
        for n in ("input_layernorm", "post_attention_layernorm"):
            sd[f"model.layers.{i}.{n}.weight"][:OUTLIERS] *= OUTLIER_GAIN
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.fixture(scope="module")
def outs(model, work, jargon_text) -> dict[str, Path]:
    calib = work / "calib.txt"
    calib.write_text(jargon_text[:40_000])
    out = {}
    for k, args in RUNS.items():
        out[k] = work / f"out_{k}"
        flags = [] if k.startswith("rtn") else ["--calib", calib, "--calib-samples", "32", "--calib-seqlen", "64"]
        main([str(a) for a in ("convert", model, "--to", "safetensors", "--group-size", "16", "-o", out[k],
                               "--no-progress", *flags, *args)])
    return out


@pytest.fixture(scope="module")
def eval_ids(model, jargon_text) -> torch.Tensor:
    tok = transformers.AutoTokenizer.from_pretrained(model)
    ids = tok(jargon_text[-20_000:], add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:4 * 64]).reshape(4, 64)


def hf_logits_all_read(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits, checking that it read every parameter from the checkpoint (none left at init)."""
    m, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return m.eval()(ids).logits.float()


def decoded(out: Path, kind: str) -> dict[str, torch.Tensor]:
    st = load_file(out / "model.safetensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    if qc["quant_method"] == "awq":
        return awq_gemm_modules(st, qc["group_size"])
    if qc["quant_method"] == "gptq":
        return gptq_modules(st, qc["bits"], qc["checkpoint_format"])
    return ct_modules(st, qc)


@pytest.mark.support("gptq", "awq", "out_gptq", "out_awq", "out_ct", family="deepseek3")
def test_gptq_and_awq_checkpoints_decode_and_beat_rtn(model, outs, eval_ids, work, one_thread):
    from quantkit.families import load
    from quantkit.runtime import executor_for
    base = hf_logits(model, eval_ids)
    klds = {}
    for k, out in outs.items():
        rep = json.loads((out / "quantkit_report.json").read_text())
        mods = decoded(out, k)
        # every MLA projection, the dense MLP, the shared expert and all 8 experts (the starved one too) packed
        for p in ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
                  "self_attn.o_proj", "mlp.shared_experts.down_proj", f"mlp.experts.{STARVED}.up_proj",
                  "mlp.experts.7.gate_proj"):
            assert f"model.layers.2.{p}" in mods, (k, p)
        assert "model.layers.0.mlp.down_proj" in mods and len(mods) == 2 * (5 + 3) + 5 + 3 + 2 * 3 * 8, (k, len(mods))
        assert all(torch.isfinite(w).all() for w in mods.values())
        if k != "rtn" and k != "rtn-asym":  # the starved expert got no token and fell back to RTN, reported
            starved = {(f["tensor"], f["expert"], f["tokens"]) for f in rep["fallbacks"] if f["expert"] == STARVED}
            assert starved == {(f"blk.{i}.ffn_{p}_exps.weight", STARVED, 0) for i in (1, 2)
                               for p in ("gate", "up", "down")}, (k, rep["fallbacks"])
        q = hf_logits_all_read(dequantized_dir(out, mods, work / f"deq_{k}"), eval_ids)
        if k in ("gptq", "awq"):  # quantkit's own reader of the packed checkpoint runs what transformers ran
            torch.testing.assert_close(executor_for(load(out))(eval_ids[:1]), q[:1], atol=2e-3, rtol=1e-3)
        klds[k] = KLD[f"deepseek-v3 {k} w4g16"] = kld(base, q)
    print("\nDeepSeek-V3 tiny, KLD vs float on held-out text:", {k: round(v, 5) for k, v in klds.items()})
    assert all(math.isfinite(v) and v > 0 for v in klds.values()), klds
    # same grids: GPTQ (sym) against sym RTN, AWQ (asym, its default) against asym RTN
    assert klds["gptq"] < 0.95 * klds["rtn"] and klds["gptq-ct"] < 0.95 * klds["rtn"], klds
    assert klds["awq"] < 0.95 * klds["rtn-asym"], klds


@pytest.mark.support("awq", family="deepseek3")
def test_awq_fold_keeps_the_float_function(model, eval_ids, jargon_text, tmp_path, one_thread):
    """The scales found (input norm -> q_a / kv_a_mqa; post-attention norm -> router columns, every expert's
    gate/up and the shared expert's; up -> down per expert and shared) folded into the float model: transformers'
    logits are unchanged. MLA has no v -> o group (the latent sits between them) and its inner norms are left
    alone (scaling q_b / kv_b through them made the KLD worse)."""
    from quantkit.calibration.data import load_calibration
    from quantkit.families import load
    from quantkit.quant.awq import AWQConfig, fold_graph, run_awq
    from quantkit.runtime.model import CausalLM
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
    ref = hf_logits(model, eval_ids[:2])
    torch.testing.assert_close(CausalLM(fold_graph(g, res.fold_plan()))(eval_ids[:2]), ref, atol=2e-4, rtol=1e-4)
