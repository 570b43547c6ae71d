"""DeepSeek V2 / V2-Lite / V3 families: tiny random models from transformers' own classes are the oracle.

Our executor against transformers (float32); our GGUF (llama.cpp's deepseek2 layout) against llama.cpp and
read back by quantkit; GPTQ end to end on a V3-shaped model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 49152  # SmolLM2's tokenizer (conftest's smollm_tokenizer_dir) gives the tiny models a vocabulary
BASE = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256, initializer_range=0.1,
            rms_norm_eps=1e-6, tie_word_embeddings=False)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707, "rope_theta": 10000.0}

KINDS = {
    # V3: sigmoid router + selection bias, 2 groups of 4 (one kept), routed scale, YaRN with mscale_all_dim
    "v3": ("v3", dict(n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                      rope_parameters=YARN)),
    "v3_plain_rope": ("v3", dict(n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True)),
    # rope dims in rotate-half order: GGUF reorders them to the adjacent pairs llama.cpp rotates
    "v3_rotate_half": ("v3", dict(n_group=2, topk_group=1, rope_interleave=False)),
    # V2: softmax top-k (greedy), no renormalisation, scaled
    "v2": ("v2", dict(topk_method="greedy", routed_scaling_factor=1.5, norm_topk_prob=False,
                      rope_parameters=YARN)),
    # V2-Lite: plain q projection
    "v2_lite": ("v2", dict(q_lora_rank=None, topk_method="greedy", routed_scaling_factor=1.0,
                           norm_topk_prob=False)),
    # V2 236B style: group-limited greedy (groups scored by their best expert)
    "v2_groups": ("v2", dict(topk_method="group_limited_greedy", n_group=2, topk_group=1,
                             routed_scaling_factor=1.0, norm_topk_prob=False)),
}


def deepseek_family(kind: str) -> str:
    """The registered family a kind's checkpoint is read as (its transformers class: V2 or V3)."""
    return "deepseek3" if KINDS[kind][0] == "v3" else "deepseek2"


def make_tiny_deepseek(kind: str, out: Path, vocab: int = 512, tok_dir: Path | None = None, seed: int = 0) -> Path:
    version, extra = KINDS[kind]
    cls = transformers.DeepseekV3Config if version == "v3" else transformers.DeepseekV2Config
    model_cls = transformers.DeepseekV3ForCausalLM if version == "v3" else transformers.DeepseekV2ForCausalLM
    cfg = cls(vocab_size=vocab, **{**BASE, **extra})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # non-trivial norms and selection bias so each of them matters
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.2)
    model.save_pretrained(out, safe_serialization=True)
    if tok_dir is not None:
        for f in tok_dir.iterdir():
            shutil.copy(f, out / f.name)
    return out


def hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits.float()


def ids_for(vocab: int, t: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (1, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.support("load", "run", family=deepseek_family)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_executor_matches_transformers(kind, tmp_path, one_thread):
    from quantkit.families import load
    from quantkit.runtime import executor_for
    d = make_tiny_deepseek(kind, tmp_path / kind)
    ids = ids_for(512)
    ref = hf_logits(d, ids)
    g = load(d)
    got = executor_for(g)(ids)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    # routing is exercised: the shared expert and routed experts both reach the output
    assert g.hparams.moe_layers == [1, 2]


def test_group_limit_changes_output(tmp_path, one_thread):
    """The oracle comparisons only check group-limited routing if the limit changes the output here."""
    from quantkit.families import load
    from quantkit.runtime import executor_for
    d = make_tiny_deepseek("v3_plain_rope", tmp_path / "v3")
    g = load(d)
    ids = ids_for(512)
    base = executor_for(g)(ids)
    g.hparams.extra["n_group"] = 1  # no group limit
    no_groups = executor_for(g)(ids)
    assert (base - no_groups).abs().max() > 1e-3


def _gguf(kind, tmp_path, tok_dir, q="f32"):
    from quantkit.export import convert_to_gguf
    from quantkit.families import load
    d = make_tiny_deepseek(kind, tmp_path / kind, vocab=VOCAB, tok_dir=tok_dir)
    out = tmp_path / f"{kind}.gguf"
    convert_to_gguf(load(d), out, q=q, progress=False)
    return d, out


@pytest.mark.support("out_gguf", family=deepseek_family)
@pytest.mark.parametrize("kind", ["v3", "v2_lite"])
def test_gguf_metadata_and_tensor_names(kind, tmp_path, smollm_tokenizer_dir):
    """Checked with the gguf package's reader against llama.cpp's deepseek2 key and tensor names."""
    from gguf import GGUFReader
    _, out = _gguf(kind, tmp_path, smollm_tokenizer_dir)
    r = GGUFReader(out)
    kv = {f.name: f.contents() for f in r.fields.values()}
    names = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    assert kv["general.architecture"] == "deepseek2"
    assert kv["deepseek2.leading_dense_block_count"] == 1
    assert kv["deepseek2.attention.head_count_kv"] == 1
    assert kv["deepseek2.attention.key_length"] == 16 + 8 and kv["deepseek2.attention.value_length"] == 16
    assert kv["deepseek2.attention.key_length_mla"] == 24 and kv["deepseek2.attention.value_length_mla"] == 16
    assert kv["deepseek2.rope.dimension_count"] == 8
    assert kv["deepseek2.expert_shared_count"] == 1
    # GGUF ne order: k_b {nope, rank, H}, v_b {rank, v, H}
    assert names["blk.1.attn_k_b.weight"] == (16, 16, 4) and names["blk.1.attn_v_b.weight"] == (16, 16, 4)
    assert "blk.0.attn_kv_b.weight" not in names and "blk.0.ffn_gate.weight" in names
    assert "blk.1.ffn_gate_exps.weight" in names and "blk.1.ffn_up_shexp.weight" in names
    if kind == "v3":
        assert kv["deepseek2.expert_gating_func"] == 2  # sigmoid
        assert kv["deepseek2.expert_group_count"] == 2 and kv["deepseek2.expert_group_used_count"] == 1
        assert abs(kv["deepseek2.expert_weights_scale"] - 2.5) < 1e-6 and kv["deepseek2.expert_weights_norm"]
        assert abs(kv["deepseek2.rope.scaling.yarn_log_multiplier"] - 0.0707) < 1e-6
        assert "blk.1.exp_probs_b.bias" in names and "blk.1.attn_q_a.weight" in names
    else:
        assert kv["deepseek2.expert_gating_func"] == 1 and kv["deepseek2.attention.q_lora_rank"] == 0
        assert "blk.1.attn_q.weight" in names and "blk.1.attn_q_a.weight" not in names


@pytest.mark.support("out_gguf", "llamacpp", family=deepseek_family)
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["v3", "v3_plain_rope", "v3_rotate_half", "v2", "v2_lite"])
def test_llamacpp_logits_match_transformers(kind, tmp_path, smollm_tokenizer_dir):
    from oracles.llamacpp_model import LlamaModel
    d, out = _gguf(kind, tmp_path, smollm_tokenizer_dir)
    ids = ids_for(VOCAB, 32)
    ref = hf_logits(d, ids)[0].numpy()
    with LlamaModel(out, n_ctx=64, exact=True) as m:  # F32 cache, no flash attention: float32 throughout
        got = m.logits(ids[0].tolist())
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.support("gguf_in", family=deepseek_family)
@pytest.mark.parametrize("kind", ["v3", "v3_rotate_half", "v2_lite"])
def test_gguf_read_back_matches_transformers(kind, tmp_path, smollm_tokenizer_dir, one_thread):
    from quantkit.formats.gguf_reader import load_gguf
    from quantkit.runtime import executor_for
    d, out = _gguf(kind, tmp_path, smollm_tokenizer_dir)
    ids = ids_for(VOCAB)
    ref = hf_logits(d, ids)
    g = load_gguf(out)
    assert g.hparams.arch == "deepseek2" and "blk.1.attn_kv_b.weight" in g
    torch.testing.assert_close(executor_for(g)(ids), ref, atol=2e-5, rtol=1e-4)


def _dequantized(g, res):
    from quantkit.graph import LazyTensor
    new = dict(g.tensors)
    for n, ql in res.linears.items():
        w = ql.dequantize().float()
        new[n] = LazyTensor(w.shape, "F32", lambda w=w: w)
    for n, qls in res.experts.items():
        w = torch.stack([q.dequantize().float() for q in qls])
        new[n] = LazyTensor(w.shape, "F32", lambda w=w: w)
    return g.with_tensors(new)


@pytest.mark.support("gptq", family="deepseek3")
def test_gptq_end_to_end_v3(tmp_path, one_thread):
    """GPTQ over MLA projections, the shared expert and every routed expert; the dequantized model stays
    close to the float one, closer than round-to-nearest."""
    from quantkit.families import load
    from quantkit.quant.gptq_driver import GridOptions, quantize_graph
    from quantkit.runtime import executor_for
    g = load(make_tiny_deepseek("v3_plain_rope", tmp_path / "v3"))
    samples = [ids_for(512, 32, seed=s)[0] for s in range(16)]
    ids = ids_for(512, 32, seed=99)
    base = torch.log_softmax(executor_for(g)(ids), -1)
    kld = {}
    for method in ("rtn", "gptq"):
        res = quantize_graph(g, samples if method == "gptq" else None,
                             GridOptions(method=method, bits=4, group_size=16, min_expert_tokens=4), progress=False)
        assert {"blk.1.attn_q_a.weight", "blk.1.attn_kv_b.weight", "blk.2.ffn_down_shexp.weight"} <= set(res.linears)
        assert len(res.experts["blk.2.ffn_gate_exps.weight"]) == 8
        got = torch.log_softmax(executor_for(_dequantized(g, res))(ids), -1)
        assert torch.isfinite(got).all()
        kld[method] = (base.exp() * (base - got)).sum(-1).mean().item()
    assert 0 < kld["gptq"] < 0.2 and kld["gptq"] < 0.9 * kld["rtn"], kld


@pytest.mark.support("out_safetensors", family="deepseek3")
@pytest.mark.parametrize("via_gguf", [False, True])
def test_safetensors_export_loads_in_transformers(via_gguf, tmp_path, smollm_tokenizer_dir, one_thread):
    """Our HF checkpoint (per-expert tensors, config.json; from GGUF: the config rebuilt from metadata) is
    read by transformers' own DeepseekV3 class and gives the source's logits."""
    from quantkit.export import convert_to_gguf, convert_to_safetensors
    from quantkit.families import load
    d = make_tiny_deepseek("v3", tmp_path / "v3", vocab=VOCAB, tok_dir=smollm_tokenizer_dir)
    g = load(d)
    if via_gguf:
        convert_to_gguf(g, tmp_path / "m.gguf", q="f32", progress=False)
        g = load(tmp_path / "m.gguf")
    out = tmp_path / "hf"
    convert_to_safetensors(g, out, dtype="f32", progress=False)
    ids = ids_for(VOCAB)
    torch.testing.assert_close(hf_logits(out, ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)


def test_mtp_layers_dropped_and_reported(tmp_path, caplog):
    """V3 checkpoints carry num_nextn_predict_layers MTP layers after the last decoder layer; llama.cpp's
    deepseek2 has no converter path for them, so they are left out (and said so)."""
    from safetensors.torch import load_file, save_file

    from quantkit.families import load
    d = make_tiny_deepseek("v3_plain_rope", tmp_path / "v3")
    sd = load_file(d / "model.safetensors")
    for k in [k for k in sd if k.startswith("model.layers.2.")]:
        sd[k.replace("model.layers.2.", "model.layers.3.")] = sd[k].clone()
    sd["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("INFO", logger="quantkit"):
        g = load(d)
    assert "MTP" in caplog.text
    assert g.hparams.n_layers == 3 and not any(n.startswith("blk.3.") for n in g.tensors)


@pytest.mark.support("llamacpp", family="deepseek3")
@pytest.mark.llamacpp
def test_llamacpp_runs_our_q8_0(tmp_path, smollm_tokenizer_dir):
    """Quantized deepseek2: k_b/v_b rows (16 wide here) do not fit Q8_0 blocks and stay F16; llama.cpp loads
    the file and follows transformers up to Q8_0 error (a rare routing flip moves one position a lot, so the
    median over positions is checked)."""
    from gguf import GGUFReader

    from oracles.llamacpp_model import LlamaModel
    d, out = _gguf("v3", tmp_path, smollm_tokenizer_dir, q="q8_0")
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.1.attn_k_b.weight"] == "F16" and types["blk.1.attn_q_b.weight"] == "Q8_0"
    ids = ids_for(VOCAB, 32)
    ref = hf_logits(d, ids)[0].numpy()
    with LlamaModel(out, n_ctx=64, exact=True) as m:
        got = m.logits(ids[0].tolist())
    per_pos = np.abs(got - ref).max(axis=1)
    assert np.median(per_pos) < 0.25, per_pos


@pytest.mark.support("out_gguf", "llamacpp", family=deepseek_family)
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["v3", "v2", "v2_lite"])
def test_gguf_equals_llamacpp_converter(kind, tmp_path, llamacpp_src, smollm_tokenizer_dir, one_thread):
    """llama.cpp's convert_hf_to_gguf.py on the same checkpoint: the same tensors byte for byte and the same
    deepseek2 metadata, except keys we add on purpose: expert_gating_func (the converter writes it only from
    a config's scoring_func, and llama.cpp otherwise assumes softmax: wrong for V3), q_lora_rank 0 (llama.cpp
    requires the key unless the layer count is V2-Lite's) and expert_weights_norm false. Its file read by
    quantkit reproduces transformers."""
    import subprocess
    import sys

    from gguf import GGUFReader

    from quantkit.formats.gguf_reader import load_gguf
    from quantkit.runtime import executor_for
    d, ours = _gguf(kind, tmp_path, smollm_tokenizer_dir)
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([sys.executable, str(llamacpp_src / "convert_hf_to_gguf.py"), str(d), "--outtype", "f32",
                    "--outfile", str(theirs)], check=True, capture_output=True)
    a, b = GGUFReader(ours), GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for n in ta:
        assert ta[n].tensor_type == tb[n].tensor_type and list(ta[n].shape) == list(tb[n].shape), n
        assert np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data)), n
    ours_only = {"deepseek2.expert_gating_func", "deepseek2.attention.q_lora_rank", "deepseek2.expert_weights_norm"}
    fa = {k: f.contents() for k, f in a.fields.items() if k.startswith("deepseek2.")}
    fb = {k: f.contents() for k, f in b.fields.items() if k.startswith("deepseek2.")}
    assert {k: v for k, v in fa.items() if k not in fb} == {k: v for k, v in fa.items() if k in ours_only - set(fb)}
    assert {k: fa[k] for k in fb} == fb
    if kind != "v3":  # their V3 file routes with softmax (no scoring_func in the tiny config)
        ids = ids_for(VOCAB)
        torch.testing.assert_close(executor_for(load_gguf(theirs))(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)


@pytest.mark.support("load", family="deepseek3")
def test_block_fp8_v3_reads_as_its_dequantized_twin(tmp_path, one_thread):
    """DeepSeek V3 ships its projections (attention, dense, shared and routed experts) as 128x128 block FP8
    with weight_scale_inv; read directly, they give what transformers gives on the dequantized twin."""
    import json

    from safetensors.torch import load_file, save_file
    from test_fp8 import _block_fp8

    from quantkit.families import load
    from quantkit.runtime import executor_for
    base = make_tiny_deepseek("v3_plain_rope", tmp_path / "base")
    sd = load_file(base / "model.safetensors")
    fp8, twin = {}, {}
    bn, bk = 16, 16  # kv_a_mqa has 24 rows: a partial last block
    for name, t in sd.items():
        if t.dim() == 2 and (".self_attn." in name or ".mlp." in name) and ".mlp.gate." not in name:
            q, s = _block_fp8(t, bn, bk)
            fp8[name], fp8[name.replace(".weight", ".weight_scale_inv")] = q, s
            exp = s.repeat_interleave(bn, 0)[:t.shape[0]].repeat_interleave(bk, 1)[:, :t.shape[1]]
            twin[name] = q.float() * exp
        else:
            fp8[name] = twin[name] = t
    cfg = json.loads((base / "config.json").read_text())
    for kind, tensors in (("fp8", fp8), ("twin", twin)):
        (tmp_path / kind).mkdir()
        c = dict(cfg)
        if kind == "fp8":
            c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": [bn, bk]}
        (tmp_path / kind / "config.json").write_text(json.dumps(c))
        save_file(tensors, tmp_path / kind / "model.safetensors", metadata={"format": "pt"})
    ids = ids_for(512)
    ref = hf_logits(tmp_path / "twin", ids)
    assert (ref - hf_logits(base, ids)).abs().max() > 1e-3  # FP8 rounding is visible: the twin is not the base
    torch.testing.assert_close(executor_for(load(tmp_path / "fp8"))(ids), ref, atol=2e-5, rtol=1e-4)



def test_optimizer_gptq_rounds_rope_reordered_rows_in_file_order(tmp_path, smollm_tokenizer_dir, one_thread):
    """Rotate-half rope rows are reordered for llama.cpp: --optimizer gptq optimizes q_b and kv_a_mqa in that
    file order (its bytes unlike plain Q4_0's), and gguf's dequantizer gives rows close to the f32 file's."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from quantkit.export import convert_to_gguf
    from quantkit.families import load
    from quantkit.quant.kquant_gptq import gptq_gguf_kwargs
    d, f32 = _gguf("v3_rotate_half", tmp_path, smollm_tokenizer_dir)
    g = load(d)
    samples = [ids_for(VOCAB, 64, seed=s)[0] for s in range(8)]
    for k, kw in (("plain", {}), ("gptq", gptq_gguf_kwargs(g, "q4_0", samples=samples, progress=False))):
        convert_to_gguf(g, tmp_path / f"{k}.gguf", q="q4_0", progress=False, **kw)
    f, p, q = ({t.name: t for t in GGUFReader(x).tensors} for x in (f32, tmp_path / "plain.gguf",
                                                                    tmp_path / "gptq.gguf"))
    for n in ("blk.1.attn_q_b.weight", "blk.1.attn_kv_a_mqa.weight"):
        assert q[n].tensor_type.name == "Q4_0" and not np.array_equal(np.asarray(q[n].data), np.asarray(p[n].data))
        ref = np.asarray(f[n].data)
        got = dequantize(np.asarray(q[n].data), q[n].tensor_type).reshape(ref.shape)
        assert np.square(got - ref).sum() / np.square(ref).sum() < 0.05, n
