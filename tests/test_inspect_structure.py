"""`quantkit inspect` describes the graph in words (blocks' describe(), equal consecutive layers grouped):
checked against the config.json transformers saved for tiny models of a few families (which layers slide,
the head counts, the MoE and MLA sizes), through the CLI, text and --json."""

from __future__ import annotations

import json
import re

import pytest

from quantkit.cli import main

transformers = pytest.importorskip("transformers")


def inspect(capsys, path, *extra):
    main(["inspect", str(path), *extra])
    return capsys.readouterr().out


def groups(out: str) -> dict[tuple[int, int], str]:
    """'  layers 0-1:' / '  layer 2:' headers -> the lines of that group."""
    res, cur = {}, None
    for line in out.splitlines():
        m = re.fullmatch(r"  layers? (\d+)(?:-(\d+))?:", line)
        if m:
            cur = (int(m.group(1)), int(m.group(2) or m.group(1)))
            res[cur] = ""
        elif cur and line.startswith("    "):
            res[cur] += line.strip() + "\n"
        else:
            cur = None
    return res


def layer_text(gr: dict, i: int) -> str:
    return next(t for (a, b), t in gr.items() if a <= i <= b)


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_dense_llama(tmp_path, capsys, kv):
    from tiny_models import make_tiny
    d = make_tiny("llama_gqa_llama3", tmp_path / "m", layers=3)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_key_value_heads"] = kv
    (d / "config.json").write_text(json.dumps(cfg))
    if kv != 2:  # k/v rows for this head count
        from safetensors.torch import load_file, save_file
        sd = load_file(d / "model.safetensors")
        for k in list(sd):
            if k.endswith(("k_proj.weight", "v_proj.weight")):
                sd[k] = sd[k][:1].repeat(kv * 16, 1)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    out = inspect(capsys, d)
    gr = groups(out)
    assert list(gr) == [(0, cfg["num_hidden_layers"] - 1)], out  # identical layers: one group
    text = gr[(0, 2)]
    kind = {4: "MHA", 2: "GQA", 1: "MQA"}[kv]
    assert f"attention: RMSNorm -> {kind} attention ({cfg['num_attention_heads']} heads" in text
    assert (f"{kv} KV heads" in text) == (kv != 4)
    rs = cfg.get("rope_parameters") or {**cfg["rope_scaling"], "rope_theta": cfg["rope_theta"]}  # transformers 5 / 4
    assert f"RoPE θ={int(rs['rope_theta'])} ({rs['rope_type']} ×{rs['factor']:g})" in text
    assert f"ffn: RMSNorm -> SwiGLU MLP (ffn {cfg['intermediate_size']})" in text
    assert "experts" not in out and "family: Llama" in out


def test_gemma3_sliding_and_global_layers(tmp_path, capsys):
    from test_dense_families import make
    types = ["sliding_attention", "full_attention", "full_attention", "sliding_attention", "sliding_attention",
             "full_attention"]
    d = make("gemma3", tmp_path / "g", num_hidden_layers=len(types), layer_types=types)
    cfg = json.loads((d / "config.json").read_text())
    out = inspect(capsys, d)
    gr = groups(out)
    assert list(gr) == [(0, 0), (1, 2), (3, 4), (5, 5)], out  # runs of equal layers
    rp = cfg["rope_parameters"]
    for i, t in enumerate(cfg["layer_types"]):
        text = layer_text(gr, i)
        assert ("sliding window %d" % cfg["sliding_window"] in text) == (t == "sliding_attention"), (i, text)
        p = rp[t]
        want = f"RoPE θ={int(p['rope_theta'])}" + (f" ({p['rope_type']} ×{p['factor']:g})" if p["rope_type"] != "default" else ",")
        assert want in text, (i, want, text)
        assert "q/k RMSNorm (1 + w) per head" in text and "GeGLU MLP" in text
        assert text.count("RMSNorm (1 + w)") == 5  # pre and post norms of both branches, q/k norm
    assert "embeddings ×8" in out and "tied to the embeddings" in out  # sqrt(64)


def test_deepseek_mla_moe_with_dense_first_layer(tmp_path, capsys):
    from test_deepseek import make_tiny_deepseek
    d = make_tiny_deepseek("v3", tmp_path / "ds")
    cfg = json.loads((d / "config.json").read_text())
    r = json.loads(inspect(capsys, d, "--json"))["structure"]
    k = cfg["first_k_dense_replace"]
    assert [(g["first"], g["last"]) for g in r["layer_groups"]] == [(0, k - 1), (k, cfg["num_hidden_layers"] - 1)]
    assert r["experts"] == cfg["n_routed_experts"] and r["experts_used"] == cfg["num_experts_per_tok"]
    assert r["moe_layers"] == list(range(k, cfg["num_hidden_layers"]))
    dense, moe = (g["branches"] for g in r["layer_groups"])
    for br in (dense, moe):
        a = br[0]["mixer"]
        assert a["kind"] == "MLA" and (a["q_lora_rank"], a["kv_lora_rank"]) == (cfg["q_lora_rank"], cfg["kv_lora_rank"])
        assert (a["nope_dim"], a["rope_dim"], a["v_dim"]) == (cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"],
                                                              cfg["v_head_dim"])
        assert a["rope"]["scaling"] == "yarn"
    assert dense[1]["mixer"]["kind"] == "SwiGLU" and dense[1]["mixer"]["ffn_size"] == cfg["intermediate_size"]
    m = moe[1]["mixer"]
    assert (m["kind"], m["experts"], m["top_k"], m["router"]) == ("moe", cfg["n_routed_experts"],
                                                                 cfg["num_experts_per_tok"], "sigmoid")
    assert m["shared_expert"] == cfg["n_shared_experts"] * cfg["moe_intermediate_size"]
    assert m["expert_ffn_size"] == cfg["moe_intermediate_size"]
    text = moe[1]["text"]
    assert f"top-{cfg['topk_group']} of {cfg['n_group']} expert groups" in text and "selection bias" in text
    assert f"routed weights ×{cfg['routed_scaling_factor']:g}" in text and "shared expert" in text
    out = inspect(capsys, d)
    assert f"experts: {cfg['n_routed_experts']} per MoE layer, {cfg['num_experts_per_tok']} used per token" in out
    assert "layer 0:" in out and f"layers 1-{cfg['num_hidden_layers'] - 1}:" in out


def test_every_block_of_every_family_describes_itself():
    """Blocks a family may compose (present and future): describe() gives a phrase, not the class-name default."""
    from quantkit.blocks import Attention, GatedMLP, MLA, MoE, Norm, PlainMLP
    from quantkit.blocks.base import Block
    for cls in (Attention, GatedMLP, MLA, MoE, Norm, PlainMLP):
        assert cls.describe is not Block.describe, cls.__name__
