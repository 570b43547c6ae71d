"""MoE families into MXFP4 compressed-tensors checkpoints and textbook RTN, every expert a module of its own.

Tiny random checkpoints of each family (test_frontier_methods' makers: transformers' own classes, routers scaled
so top-k choices are clear-cut). Oracles: compressed-tensors' own MXFP4 decompressor and the GPTQ bit decoder of
test_gptq_e2e, compared module by module with the *source* checkpoint's tensor of the same HF name (Llama 4:
the slice of its fused gate_up_proj / down_proj), so names and row orders are checked too; the decoded
weights run in transformers' own classes against the float model.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_frontier_methods import _make, hf_logits_all_read
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


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(kind, tmp_path_factory, smollm_tokenizer_dir):
    topk = {"index_topk": 64} if kind == "deepseek_v32" else {}  # every key kept: no selection flips
    return _make(kind, tmp_path_factory.mktemp(kind) / "model", smollm_tokenizer_dir, **topk)


@pytest.fixture(scope="module")
def eval_ids(model, jargon_text) -> torch.Tensor:
    tok = transformers.AutoTokenizer.from_pretrained(model)
    return torch.tensor(tok(jargon_text[-8_000:], add_special_tokens=False)["input_ids"][:2 * 48]).reshape(2, 48)


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
    decompressed model runs in transformers close to the float one."""
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from quantkit.quant.mxfp4 import dequantize_mxfp4, quantize_mxfp4
    out = model.parent / "mxfp4"
    convert(model, out, "--q", "mxfp4")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(qc)
    assert scheme.format == "mxfp4-pack-quantized"
    st = load_file(out / "model.safetensors")
    src = source_weights(model)
    routers = [p for p in src if (p + ".weight").endswith(ROUTERS)]
    assert routers and set(routers) <= set(qc["ignore"]) and "lm_head" in qc["ignore"]
    assert all(p + ".weight" in st for p in routers)
    mods = {}
    for p in {k[: -len(".weight_packed")] for k in st if k.endswith(".weight_packed")}:
        t = {k: st[f"{p}.{k}"] for k in ("weight_packed", "weight_scale")}
        w = MXFP4PackedCompressor.decompress(t, scheme.config_groups["group_0"])["weight"].float()
        assert torch.equal(w, dequantize_mxfp4(*quantize_mxfp4(src[p], rule="best"))), p
        mods[p] = w
    # every source linear is packed or ignored; every expert of every MoE layer is packed
    assert set(src) - {"model.embed_tokens"} == set(mods) | set(qc["ignore"]), set(src) ^ set(mods)
    assert set(expert_modules(mods)) == set(expert_modules(src)) and len(expert_modules(mods)) >= 24
    base = hf_logits_all_read(model, eval_ids)
    q = run_decoded(kind, model, out, mods, eval_ids, "mxfp4")
    k = kld(base, q)
    print(f"\n{kind} MXFP4 (compressed-tensors) KLD vs float: {k:.5f} (RTN w4g32: {rtn[2]:.5f})")
    # MXFP4 (power-of-two scales, an FP4 grid) is a little coarser than int4 g32 with fp16 scales
    assert 0 < k < min(0.2, 3 * rtn[2]), (k, rtn[2])
