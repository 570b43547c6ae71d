"""MXFP4 / gpt-oss end to end: GGUF (f32, mxfp4_moe, mxfp4) and MXFP4 safetensors (gpt-oss, compressed-tensors).

Oracles: llama.cpp (loads our GGUF and computes logits; llama_model_quantize makes its own MXFP4_MOE file
from our F32 GGUF), the `gguf` package (reads metadata, dequantizes tensors), transformers (a tiny random
GptOssForCausalLM made with its own classes; its MXFP4 dequantizer reads our gpt-oss checkpoints), and
compressed-tensors (through transformers, decompresses our mxfp4-pack-quantized checkpoints).
The tiny model uses SmolLM2's vocabulary so the GGUF carries a real tokenizer.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from quantkit.errors import QuantkitError, UnsupportedArchitecture

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
QT = gguf.GGMLQuantizationType

E, TOPK, HIDDEN, FF, LAYERS, VOCAB = 4, 2, 64, 64, 2, 49152
IDS = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
F32_FTYPE, MXFP4_MOE_FTYPE = 0, 38


def make_tiny_gpt_oss(out: Path, tok_dir: Path, seed: int = 0) -> Path:
    # yarn with truncate=True: llama.cpp always floors/ceils the yarn correction dims
    cfg = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FF, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=E, num_experts_per_tok=TOPK,
        sliding_window=5, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True,
                         "original_max_position_embeddings": 64, "rope_theta": 150000.0},
        initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 or n.endswith("_bias"):
                p.add_(torch.randn_like(p) * (0.5 if "sinks" in n else 0.1))
    model.save_pretrained(out, safe_serialization=True)
    for f in tok_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


def hf_logits(model_dir: Path, **kw) -> torch.Tensor:
    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return m(IDS).logits[0].float()


def write_gguf(graph, out: Path, q: str, **kw) -> Path:
    from quantkit.export import write_graph_gguf
    from quantkit.quant.mxfp4 import gguf_types
    shapes = {n: t.shape for n, t in graph.tensors.items()}
    if q == "f32":
        types, ft = {n: QT.F32 for n in shapes}, F32_FTYPE
    else:
        types, ft = gguf_types(shapes, q), MXFP4_MOE_FTYPE
    write_graph_gguf(graph, out, types, ft, progress=False, **kw)
    return out


def llamacpp_logits(path: Path) -> torch.Tensor:
    from oracles.llamacpp_model import LlamaModel
    with LlamaModel(path) as m:
        return torch.from_numpy(m.logits(IDS[0].tolist()))


def ours(graph) -> torch.Tensor:
    from quantkit.runtime.model import CausalLM
    return CausalLM(graph)(IDS)[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean())


@functools.lru_cache(maxsize=None)
def gguf_tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


@functools.lru_cache(maxsize=None)
def load_cached(path: Path):
    """Our graph of a file (parsing a GGUF's 49k-token vocabulary takes seconds; do it once per file)."""
    from quantkit.families import load
    return load(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mxfp4_e2e")


@pytest.fixture(scope="module")
def tiny(work, smollm_tokenizer_dir) -> Path:
    return make_tiny_gpt_oss(work / "tiny", smollm_tokenizer_dir)


@pytest.fixture(scope="module")
def graph(tiny):
    from quantkit.families import load
    return load(tiny)


@pytest.fixture(scope="module")
def f32_gguf(graph, work) -> Path:
    return write_gguf(graph, work / "f32.gguf", "f32")


@pytest.fixture(scope="module")
def moe_gguf(graph, work) -> Path:
    return write_gguf(graph, work / "moe.gguf", "mxfp4_moe")


@pytest.fixture(scope="module")
def mx_ckpt(graph, work) -> Path:
    """Our gpt-oss MXFP4 checkpoint of the tiny model (rule "best")."""
    from quantkit.formats.mxfp4_writer import convert_to_mxfp4_safetensors
    convert_to_mxfp4_safetensors(graph, work / "mx", progress=False)
    return work / "mx"


# ---------------------------------------------------------------- GGUF writing

@pytest.mark.support("out_gguf", family="gpt-oss")
def test_gguf_metadata_and_tensor_names(f32_gguf, tiny):
    r = gguf.GGUFReader(str(f32_gguf))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    want = {
        "general.architecture": "gpt-oss", "gpt-oss.block_count": LAYERS, "gpt-oss.embedding_length": HIDDEN,
        "gpt-oss.feed_forward_length": FF, "gpt-oss.expert_feed_forward_length": FF, "gpt-oss.expert_count": E,
        "gpt-oss.expert_used_count": TOPK, "gpt-oss.attention.head_count": 4, "gpt-oss.attention.head_count_kv": 2,
        "gpt-oss.attention.key_length": 16, "gpt-oss.attention.value_length": 16,
        "gpt-oss.attention.sliding_window": 5, "gpt-oss.rope.freq_base": 150000.0, "gpt-oss.context_length": 256,
        "gpt-oss.rope.scaling.type": "yarn", "gpt-oss.rope.scaling.factor": 4.0,
        "gpt-oss.rope.scaling.original_context_length": 64, "gpt-oss.rope.scaling.yarn_beta_fast": 32.0,
        "gpt-oss.rope.scaling.yarn_beta_slow": 1.0, "general.file_type": F32_FTYPE,
    }
    for k, v in want.items():
        assert kv.get(k) == pytest.approx(v), k
    assert kv["gpt-oss.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert len(kv["tokenizer.ggml.tokens"]) == VOCAB
    names = {t.name for t in r.tensors}
    for i in range(LAYERS):
        for s in ("attn_norm.weight", "post_attention_norm.weight", "attn_sinks.weight", "ffn_gate_inp.weight",
                  "ffn_gate_inp.bias", "attn_q.bias", "attn_output.bias", "ffn_gate_exps.weight", "ffn_up_exps.bias",
                  "ffn_down_exps.bias"):
            assert f"blk.{i}.{s}" in names, s
        assert f"blk.{i}.ffn_norm.weight" not in names
    # no Q/K row permutation for this arch (llama.cpp applies NEOX rope to gpt-oss): rows are HF's q_proj rows
    from safetensors.torch import load_file
    sd = load_file(tiny / "model.safetensors")
    q = {t.name: t for t in r.tensors}["blk.1.attn_q.weight"]
    np.testing.assert_array_equal(np.asarray(q.data), sd["model.layers.1.self_attn.q_proj.weight"].float().numpy())
    sinks = {t.name: t for t in r.tensors}["blk.0.attn_sinks.weight"]
    np.testing.assert_array_equal(np.asarray(sinks.data), sd["model.layers.0.self_attn.sinks"].float().numpy())


@pytest.mark.support("out_gguf", "llamacpp", family="gpt-oss")
@pytest.mark.llamacpp
def test_f32_gguf_in_llamacpp_matches_transformers(f32_gguf, tiny):
    ref = hf_logits(tiny)
    got = llamacpp_logits(f32_gguf)
    assert got.shape == ref.shape
    # llama.cpp keeps its KV cache in f16: agreement to ~1e-3 of logits of magnitude ~4
    torch.testing.assert_close(got, ref, atol=1e-2, rtol=0)


@pytest.mark.support("gguf_in", family="gpt-oss")
def test_gguf_reads_back_to_the_same_graph(f32_gguf, graph, tiny):
    g = load_cached(f32_gguf)
    hp, src = g.hparams, graph.hparams
    assert hp.arch == "gpt-oss" and hp.n_experts == E and hp.n_experts_used == TOPK and hp.expert_ffn_size == FF
    assert hp.sliding_window == 5 and hp.layer_types == src.layer_types == ["sliding", "full"]
    assert hp.rope_scaling.kind == "yarn" and hp.rope_scaling.original_context == 64
    assert hp.attn_bias and hp.attn_out_bias and hp.extra["swiglu_limit"] == 7.0
    assert set(g.tensors) == set(graph.tensors)
    for n in graph.tensors:
        assert torch.equal(g[n].load().float(), graph[n].load().float()), n
    torch.testing.assert_close(ours(g), hf_logits(tiny), atol=2e-5, rtol=1e-4)


@pytest.mark.support("mxfp4", "llamacpp", family="gpt-oss")
@pytest.mark.llamacpp
def test_mxfp4_moe_gguf_is_what_llama_quantize_writes(moe_gguf, f32_gguf, work):
    from oracles.llamacpp_model import quantize_file
    theirs = work / "llama_quantize_moe.gguf"
    quantize_file(f32_gguf, theirs, MXFP4_MOE_FTYPE)
    a, b = gguf_tensors(moe_gguf), gguf_tensors(theirs)
    assert set(a) == set(b)
    types = {n: QT(int(t.tensor_type)) for n, t in a.items()}
    assert {n: QT(int(t.tensor_type)) for n, t in b.items()} == types
    assert types["blk.0.ffn_down_exps.weight"] == QT.MXFP4 and types["blk.1.attn_k.weight"] == QT.Q8_0
    assert types["token_embd.weight"] == QT.Q8_0 and types["output.weight"] == QT.Q8_0
    assert types["blk.0.ffn_gate_inp.weight"] == QT.F32 and types["blk.0.attn_sinks.weight"] == QT.F32
    for n in a:  # our default GGUF MXFP4 rule ("floor") and Q8_0 are llama.cpp's bytes
        np.testing.assert_array_equal(np.asarray(a[n].data), np.asarray(b[n].data), err_msg=n)


@pytest.mark.support("mxfp4", "llamacpp", family="gpt-oss")
@pytest.mark.llamacpp
def test_mxfp4_moe_gguf_in_llamacpp(moe_gguf, graph, work):
    g = load_cached(moe_gguf)
    assert g["blk.0.ffn_up_exps.weight"].qtype == "MXFP4"
    mine = ours(g)
    # the same dequantized weights as F32: llama.cpp agrees with our executor closely
    plain = write_gguf(g, work / "moe_dequantized_f32.gguf", "f32")
    torch.testing.assert_close(llamacpp_logits(plain), mine, atol=1e-2, rtol=0)
    # on the MXFP4/Q8_0 file itself llama.cpp also quantizes activations to Q8_0 (router picks can flip
    # in this tiny random model), so compare against the size of the quantization effect itself
    got = llamacpp_logits(moe_gguf)
    assert rel(got, mine) < 0.1
    assert rel(got, mine) < 0.5 * rel(got, ours(graph))


def test_mxfp4_experts_reach_gguf_without_requantization(mx_ckpt, work):
    """Experts of an MXFP4 checkpoint (quantized with rule "best", which llama.cpp's quantizer would not
    reproduce) are carried into the GGUF as the same codes: the gguf package dequantizes them to exactly
    transformers' dequantization of the checkpoint."""
    from safetensors.torch import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from quantkit.families import load
    out = write_gguf(load(mx_ckpt), work / "from_mx.gguf", "mxfp4_moe")
    sd = load_file(mx_ckpt / "model.safetensors")
    t = gguf_tensors(out)
    for i in range(LAYERS):
        p = f"model.layers.{i}.mlp.experts."
        gu = convert_moe_packed_tensors(sd[p + "gate_up_proj_blocks"], sd[p + "gate_up_proj_scales"],
                                        dtype=torch.float32)  # [E, in, 2*ff]
        dn = convert_moe_packed_tensors(sd[p + "down_proj_blocks"], sd[p + "down_proj_scales"], dtype=torch.float32)
        want = {"ffn_gate_exps": gu[..., ::2], "ffn_up_exps": gu[..., 1::2], "ffn_down_exps": dn}
        for s, ref in want.items():
            x = t[f"blk.{i}.{s}.weight"]
            assert QT(int(x.tensor_type)) == QT.MXFP4
            got = gguf.quants.dequantize(np.asarray(x.data), QT.MXFP4)
            np.testing.assert_array_equal(got, ref.transpose(1, 2).numpy(), err_msg=s)


@pytest.mark.llamacpp
def test_mxfp4_gguf_all_linear_weights(graph, work):
    out = write_gguf(graph, work / "all_mxfp4.gguf", "mxfp4")
    t = gguf_tensors(out)
    types = {n: QT(int(x.tensor_type)) for n, x in t.items()}
    quantized = {n for n, ty in types.items() if ty == QT.MXFP4}
    assert {"token_embd.weight", "output.weight", "blk.0.attn_q.weight", "blk.1.attn_output.weight",
            "blk.1.ffn_gate_exps.weight"} <= quantized
    assert all(types[n] == QT.F32 for n in types if n.endswith(("_norm.weight", ".bias", "sinks.weight"))
               or "ffn_gate_inp" in n)
    mine = ours(load_cached(out))
    got = llamacpp_logits(out)
    assert rel(got, mine) < 0.1
    assert rel(got, mine) < 0.5 * rel(got, ours(graph))


def test_mxfp4_type_rules_shape_fallback():
    from quantkit.quant.mxfp4 import gguf_types
    shapes = {"token_embd.weight": (100, 48), "blk.0.attn_q.weight": (64, 64), "blk.0.ffn_up_exps.weight": (4, 8, 64),
              "blk.0.ffn_down_exps.weight": (4, 64, 40), "blk.0.attn_norm.weight": (64,)}
    t = gguf_types(shapes, "mxfp4_moe")
    assert t == {"token_embd.weight": QT.F16, "blk.0.attn_q.weight": QT.Q8_0, "blk.0.ffn_up_exps.weight": QT.MXFP4,
                 "blk.0.ffn_down_exps.weight": QT.F16, "blk.0.attn_norm.weight": QT.F32}
    assert gguf_types(shapes, "mxfp4_moe", overrides=[("attn_q", "f32")])["blk.0.attn_q.weight"] == QT.F32
    assert gguf_types(shapes, "mxfp4")["blk.0.attn_q.weight"] == QT.MXFP4
    with pytest.raises(QuantkitError, match="q4_0"):
        gguf_types(shapes, "q4_0")


# ---------------------------------------------------------------- safetensors writing

@pytest.mark.support("mxfp4", "out_mxfp4", family="gpt-oss")
def test_gpt_oss_checkpoint_dequantizes_in_transformers_to_our_values(mx_ckpt, graph):
    from transformers import Mxfp4Config

    from quantkit.families import load
    from quantkit.quant.mxfp4 import dequantize_mxfp4, quantize_mxfp4
    cfg = json.loads((mx_ckpt / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert (mx_ckpt / "tokenizer.json").exists()
    m = transformers.AutoModelForCausalLM.from_pretrained(
        mx_ckpt, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True)).eval()
    for i in range(LAYERS):
        ex = m.model.layers[i].mlp.experts
        for suffix, hf in (("ffn_gate_exps", ex.gate_up_proj[..., ::2]), ("ffn_up_exps", ex.gate_up_proj[..., 1::2]),
                           ("ffn_down_exps", ex.down_proj)):
            w = graph[f"blk.{i}.{suffix}.weight"].load()
            want = dequantize_mxfp4(*quantize_mxfp4(w, rule="best"))
            assert torch.equal(hf.transpose(1, 2).float(), want), (i, suffix)
        assert torch.equal(ex.gate_up_proj_bias[..., ::2].float(),
                           graph[f"blk.{i}.ffn_gate_exps.bias"].load().to(torch.bfloat16).float())
    assert torch.equal(m.model.layers[1].self_attn.sinks.float(),
                       graph["blk.1.attn_sinks.weight"].load().to(torch.bfloat16).float())
    with torch.no_grad():
        ref = m(IDS).logits[0].float()
    back = load(mx_ckpt)
    assert back["blk.0.ffn_gate_exps.weight"].qtype == "MXFP4"
    torch.testing.assert_close(ours(back), ref, atol=2e-5, rtol=1e-4)


def test_gpt_oss_checkpoint_keeps_mxfp4_codes(mx_ckpt, moe_gguf, work):
    """Rewriting an MXFP4 source (checkpoint or GGUF) keeps its codes; from GGUF with f32 for the rest,
    transformers then computes exactly what our executor computes on the GGUF."""
    from safetensors.torch import load_file
    from transformers import Mxfp4Config

    from quantkit.families import load
    from quantkit.formats.mxfp4_writer import convert_to_mxfp4_safetensors
    again = work / "mx_again"
    convert_to_mxfp4_safetensors(load(mx_ckpt), again, rule="floor", progress=False)
    a, b = load_file(mx_ckpt / "model.safetensors"), load_file(again / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    from_gguf = work / "mx_from_gguf"
    g = load_cached(moe_gguf)
    convert_to_mxfp4_safetensors(g, from_gguf, dtype=torch.float32, progress=False)
    ref = hf_logits(from_gguf, quantization_config=Mxfp4Config(dequantize=True))
    torch.testing.assert_close(ours(g), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # transformers: dequantize=True is ours
def test_compressed_tensors_checkpoint_decompresses_to_our_values(work):
    from compressed_tensors.quantization import QuantizationConfig
    from tiny_models import make_tiny
    from transformers import CompressedTensorsConfig

    from quantkit.families import load
    from quantkit.pipeline import convert
    from quantkit.quant.mxfp4 import dequantize_mxfp4, quantize_mxfp4
    src = make_tiny("qwen2", work / "qwen2", ffn=96)  # tied embeddings, q/k/v biases
    out = work / "qwen2_mxfp4"
    r = convert(src, out, to="safetensors", q="mxfp4", progress=False)  # the CLI's --to safetensors --q mxfp4
    assert r["layout"] == "compressed-tensors"
    cfg = json.loads((out / "config.json").read_text())
    qc = QuantizationConfig.model_validate(cfg["quantization_config"])
    assert qc.format == "mxfp4-pack-quantized" and qc.config_groups["group_0"].weights.group_size == 32
    m = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    sd = m.state_dict()
    g = load(src)
    n_linear = 0
    for i in range(2):
        for canon, hf in (("attn_q", "self_attn.q_proj"), ("attn_v", "self_attn.v_proj"),
                          ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"),
                          ("ffn_down", "mlp.down_proj")):
            want = dequantize_mxfp4(*quantize_mxfp4(g[f"blk.{i}.{canon}.weight"].load(), rule="best"))
            assert torch.equal(sd[f"model.layers.{i}.{hf}.weight"].float(), want), (i, canon)
            n_linear += 1
        assert torch.equal(sd[f"model.layers.{i}.self_attn.k_proj.bias"].float(),
                           g[f"blk.{i}.attn_k.bias"].load().to(torch.bfloat16).float())
    assert n_linear == 10
    assert torch.equal(sd["model.embed_tokens.weight"].float(), g["token_embd.weight"].load().to(torch.bfloat16).float())


def test_writer_errors(graph, work, tmp_path):
    import dataclasses

    from tiny_models import make_tiny

    from quantkit.families import load
    from quantkit.formats.mxfp4_writer import convert_to_mxfp4_safetensors
    dense = load(make_tiny("llama_mha", tmp_path / "llama"))
    with pytest.raises(QuantkitError, match="gpt-oss"):
        convert_to_mxfp4_safetensors(dense, tmp_path / "a", layout="gpt-oss", progress=False)
    with pytest.raises(QuantkitError, match="experts"):
        convert_to_mxfp4_safetensors(graph, tmp_path / "b", layout="compressed-tensors", progress=False)
    with pytest.raises(QuantkitError, match="rule 'round'"):
        convert_to_mxfp4_safetensors(graph, tmp_path / "c", rule="round", progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(QuantkitError, match="exists"):
        convert_to_mxfp4_safetensors(graph, tmp_path / "exists", progress=False)
    assert not any(p.name.startswith(".exists") for p in tmp_path.iterdir())
    # llama.cpp hard-codes gpt-oss's SwiGLU limit: another one cannot go to GGUF
    hp = dataclasses.replace(graph.hparams, extra={**graph.hparams.extra, "swiglu_limit": 1.5})
    with pytest.raises(UnsupportedArchitecture, match="swiglu_limit"):
        write_gguf(graph.with_tensors(graph.tensors, hparams=hp), tmp_path / "bad.gguf", "f32")
    assert not (tmp_path / "bad.gguf").exists()
