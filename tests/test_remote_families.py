"""Dense families from remote code (Qwen v1, Baichuan 1/2) and BLOOM.

Oracles: transformers' BloomForCausalLM; for the remote-code families (no transformers class; their code is
never run) a plain-torch reference forward written here from the published architecture, over checkpoints
this test writes under the published tensor names and config keys; llama.cpp on our GGUF for all of them,
and llama.cpp's own converter for BLOOM.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quantkit.families import load
from quantkit.runtime import executor_for
from test_dense_families import hf_logits, ids_of, kld, llamacpp_convert, with_weights

VOCAB = 49152  # SmolLM2's tokenizer (llama.cpp needs a real one)


# ---------------------------------------------------------------------- checkpoints written by the test

def save(d, cfg: dict, tensors: dict, tok_dir=None):
    from safetensors.torch import save_file
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(cfg))
    if tok_dir is not None:
        for f in tok_dir.iterdir():
            shutil.copy(f, d / f.name)
    return d


def rnd(gen, *shape, std=None, layers=None):
    """layers: a projection writing into the residual stream, scaled down with depth (as trained deep models
    keep their residual stream from blowing up)."""
    std = std if std is not None else shape[-1] ** -0.5
    if layers is not None:
        std /= (2 * layers) ** 0.5
    return torch.randn(*shape, generator=gen) * std


def norm_w(gen, d):
    return 1 + 0.1 * torch.randn(d, generator=gen)


def qwen_ckpt(d, vocab=256, hidden=64, heads=4, layers=2, mlp=96, tok_dir=None, seed=0, **over):
    """Qwen v1 as published: QWenLMHeadModel's names, intermediate_size = 2 x the MLP width."""
    g = torch.Generator().manual_seed(seed)
    cfg = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "auto_map": {
        "AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "vocab_size": vocab, "hidden_size": hidden, "num_attention_heads": heads, "num_hidden_layers": layers,
        "kv_channels": hidden // heads, "intermediate_size": 2 * mlp, "layer_norm_epsilon": 1e-6,
        "rotary_emb_base": 10000, "rotary_pct": 1.0, "max_position_embeddings": 8192, "seq_length": 8192,
        "no_bias": True, "scale_attn_weights": True, "use_dynamic_ntk": True, "use_logn_attn": True,
        "tie_word_embeddings": False, **over}
    t = {"transformer.wte.weight": rnd(g, vocab, hidden, std=1.0), "transformer.ln_f.weight": norm_w(g, hidden),
         "lm_head.weight": rnd(g, vocab, hidden)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        t.update({p + "ln_1.weight": norm_w(g, hidden), p + "ln_2.weight": norm_w(g, hidden),
                  p + "attn.c_attn.weight": rnd(g, 3 * hidden, hidden), p + "attn.c_attn.bias": rnd(g, 3 * hidden, std=.1),
                  p + "attn.c_proj.weight": rnd(g, hidden, hidden, layers=layers), p + "mlp.w1.weight": rnd(g, mlp, hidden),
                  p + "mlp.w2.weight": rnd(g, mlp, hidden), p + "mlp.c_proj.weight": rnd(g, hidden, mlp, layers=layers)})
    return save(d, cfg, t, tok_dir)


def baichuan_ckpt(d, vocab=256, hidden=64, heads=4, layers=2, ffn=128, tok_dir=None, seed=0, arch="BaichuanForCausalLM"):
    g = torch.Generator().manual_seed(seed)
    cfg = {"architectures": [arch], "model_type": "baichuan", "vocab_size": vocab, "hidden_size": hidden,
           "num_attention_heads": heads, "num_hidden_layers": layers, "intermediate_size": ffn, "hidden_act": "silu",
           "rms_norm_eps": 1e-6, "model_max_length": 4096, "tie_word_embeddings": False}
    if layers != 40:  # the 7B configs carry it, the 13B (ALiBi) ones do not
        cfg["max_position_embeddings"] = 4096
    t = {"model.embed_tokens.weight": rnd(g, vocab, hidden, std=1.0), "model.norm.weight": norm_w(g, hidden),
         "lm_head.weight": rnd(g, vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": norm_w(g, hidden), p + "post_attention_layernorm.weight": norm_w(g, hidden),
                  p + "self_attn.W_pack.weight": rnd(g, 3 * hidden, hidden), p + "self_attn.o_proj.weight": rnd(g, hidden, hidden, layers=layers),
                  p + "mlp.gate_proj.weight": rnd(g, ffn, hidden), p + "mlp.up_proj.weight": rnd(g, ffn, hidden),
                  p + "mlp.down_proj.weight": rnd(g, hidden, ffn, layers=layers)})
    return save(d, cfg, t, tok_dir)


# ---------------------------------------------------------------------- reference forwards (plain torch)

def ref_rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def ref_rope(x, base):
    """Rotate-half RoPE over the whole head: x [T, H, D]."""
    t, _, dim = x.shape
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None].float(), torch.cat([ang.sin()] * 2, -1)[:, None].float()
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def ref_slopes(n):
    """Baichuan's / BLOOM's `_get_interleave`."""
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return pow2(n)
    c = 2 ** math.floor(math.log2(n))
    return pow2(c) + ref_slopes(2 * c)[0::2][: n - c]


def ref_attention(q, k, v, alibi: bool):
    """q, k, v [T, H, D] -> [T, H * D], causal; ALiBi adds slope_h * key position."""
    t, h, dd = q.shape
    s = torch.einsum("thd,shd->hts", q, k) / math.sqrt(dd)
    if alibi:
        s = s + torch.tensor(ref_slopes(h))[:, None, None].float() * torch.arange(t).float()[None, None, :]
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hts,shd->thd", s.softmax(-1), v).reshape(t, h * dd)


def qwen_ref(d, ids):
    from safetensors.torch import load_file
    cfg, w = json.loads((d / "config.json").read_text()), load_file(str(d / "model.safetensors"))
    hd, nh, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_epsilon"]
    x = w["transformer.wte.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        h = ref_rms(x, w[p + "ln_1.weight"], eps)
        q, k, v = (F.linear(h, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"])
                   .view(len(ids), 3, nh, hd // nh).unbind(1))
        q, k = ref_rope(q, cfg["rotary_emb_base"]), ref_rope(k, cfg["rotary_emb_base"])
        x = x + F.linear(ref_attention(q, k, v, False), w[p + "attn.c_proj.weight"], w.get(p + "attn.c_proj.bias"))
        h = ref_rms(x, w[p + "ln_2.weight"], eps)
        up = F.linear(h, w[p + "mlp.w1.weight"], w.get(p + "mlp.w1.bias"))
        gate = F.linear(h, w[p + "mlp.w2.weight"], w.get(p + "mlp.w2.bias"))
        x = x + F.linear(up * F.silu(gate), w[p + "mlp.c_proj.weight"], w.get(p + "mlp.c_proj.bias"))
    return F.linear(ref_rms(x, w["transformer.ln_f.weight"], eps), w["lm_head.weight"])


def baichuan_ref(d, ids):
    from safetensors.torch import load_file
    cfg, w = json.loads((d / "config.json").read_text()), load_file(str(d / "model.safetensors"))
    hd, nh, eps, nl = cfg["hidden_size"], cfg["num_attention_heads"], cfg["rms_norm_eps"], cfg["num_hidden_layers"]
    alibi = nl == 40  # 13B = ALiBi
    x = w["model.embed_tokens.weight"][ids]
    for i in range(nl):
        p = f"model.layers.{i}."
        h = ref_rms(x, w[p + "input_layernorm.weight"], eps)
        q, k, v = F.linear(h, w[p + "self_attn.W_pack.weight"]).view(len(ids), 3, nh, hd // nh).unbind(1)
        if not alibi:
            q, k = ref_rope(q, 10000.0), ref_rope(k, 10000.0)
        x = x + F.linear(ref_attention(q, k, v, alibi), w[p + "self_attn.o_proj.weight"])
        h = ref_rms(x, w[p + "post_attention_layernorm.weight"], eps)
        x = x + F.linear(F.silu(F.linear(h, w[p + "mlp.gate_proj.weight"])) * F.linear(h, w[p + "mlp.up_proj.weight"]),
                         w[p + "mlp.down_proj.weight"])
    head = w["lm_head.weight"]
    if cfg["vocab_size"] == 125696:  # Baichuan 2's NormHead
        head = F.normalize(head)
    return F.linear(ref_rms(x, w["model.norm.weight"], eps), head)


def bloom_ckpt(d, vocab=256, hidden=64, heads=4, layers=2, tok_dir=None, seed=0, gain=3.0, **over):
    """gain: the projections scaled up from transformers' init (std 0.02); the (tied) embeddings to std ~0.1
    so the logits spread (at the init's scale the softmax is nearly flat and any KLD is tiny)."""
    import transformers
    cfg = transformers.BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads,
                                   layer_norm_epsilon=1e-5, **over)
    torch.manual_seed(seed)
    m = transformers.BloomForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif "word_embeddings" in n:
                p.mul_(5.0)
            else:
                p.mul_(gain)
    m.save_pretrained(d, safe_serialization=True)
    if tok_dir is not None:
        for f in tok_dir.iterdir():
            shutil.copy(f, d / f.name)
    return d


def codegeex_ckpt(d, vocab=256, hidden=64, heads=4, layers=2, positions=64, seed=0):
    """CodeGeeXModel's state dict flattened (the layout quantkit defines for it): `layers` ordinary layers plus
    the top query layer."""
    g = torch.Generator().manual_seed(seed)
    cfg = {"architectures": ["CodeGeeXForCausalLM"], "model_type": "codegeex", "vocab_size": vocab,
           "hidden_size": hidden, "num_layers": layers, "num_attention_heads": heads,
           "max_position_embeddings": positions, "layernorm_epsilon": 1e-5}
    p = "language_model."
    t = {p + "embedding.word_embeddings.weight": rnd(g, vocab, hidden, std=0.5),
         p + "embedding.position_embeddings.weight": rnd(g, positions, hidden, std=0.5),
         p + "topQueryEmbedding.top_query_embeddings.weight": rnd(g, positions, hidden, std=1.0),
         p + "transformer.final_layernorm.weight": norm_w(g, hidden),
         p + "transformer.final_layernorm.bias": 0.1 * rnd(g, hidden, std=1.0)}
    n = layers + 1
    for pre in [f"{p}transformer.layers.{i}." for i in range(layers)] + [f"{p}transformer.topQueryLayer."]:
        for ln in ("input_layernorm", "post_attention_layernorm"):
            t[pre + ln + ".weight"], t[pre + ln + ".bias"] = norm_w(g, hidden), 0.1 * rnd(g, hidden, std=1.0)
        for name, o, i, res in (("attention.query", hidden, hidden, False), ("attention.key", hidden, hidden, False),
                                ("attention.value", hidden, hidden, False), ("attention.dense", hidden, hidden, True),
                                ("mlp.dense_h_to_4h", 4 * hidden, hidden, False),
                                ("mlp.dense_4h_to_h", hidden, 4 * hidden, True)):
            t[pre + name + ".weight"] = rnd(g, o, i, layers=n if res else None)
            t[pre + name + ".bias"] = 0.1 * rnd(g, o, std=1.0)
    return save(d, cfg, t)


def codegeex_ref(d, ids):
    """CodeGeeX's forward (THUDM/CodeGeeX codegeex_model.py) in plain torch."""
    from safetensors.torch import load_file
    cfg, w = json.loads((d / "config.json").read_text()), load_file(str(d / "model.safetensors"))
    hd, nh, eps, t = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layernorm_epsilon"], len(ids)
    p = "language_model."

    def ln(x, pre):
        return F.layer_norm(x, (hd,), w[pre + ".weight"], w[pre + ".bias"], eps)

    def lin(x, pre):
        return F.linear(x, w[pre + ".weight"], w[pre + ".bias"])

    def fast_gelu(x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))

    def layer(x, pre, query=None):
        h = ln(x, pre + "input_layernorm")
        q = lin(h if query is None else query, pre + "attention.query").view(t, nh, -1)
        k, v = lin(h, pre + "attention.key").view(t, nh, -1), lin(h, pre + "attention.value").view(t, nh, -1)
        x = x + lin(ref_attention(q, k, v, False), pre + "attention.dense")
        h = ln(x, pre + "post_attention_layernorm")
        return x + lin(fast_gelu(lin(h, pre + "mlp.dense_h_to_4h")), pre + "mlp.dense_4h_to_h")

    x = w[p + "embedding.word_embeddings.weight"][ids] + w[p + "embedding.position_embeddings.weight"][:t]
    for i in range(cfg["num_layers"]):
        x = layer(x, f"{p}transformer.layers.{i}.")
    x = ln(x, p + "transformer.final_layernorm")
    x = layer(x, p + "transformer.topQueryLayer.", query=w[p + "topQueryEmbedding.top_query_embeddings.weight"][:t])
    return F.linear(x, w[p + "embedding.word_embeddings.weight"])


# kind -> (checkpoint maker, reference logits(d, ids[T]) -> [T, V], kwargs)
def _bloom_ref(d, ids):
    return hf_logits(d, ids[None])[0]


KINDS = {
    "bloom": (bloom_ckpt, _bloom_ref, dict(heads=4)),
    "bloom6": (bloom_ckpt, _bloom_ref, dict(hidden=96, heads=6)),  # heads not a power of two: interleaved slopes
    "qwen": (qwen_ckpt, qwen_ref, {}),
    "baichuan": (baichuan_ckpt, baichuan_ref, {}),
    "baichuan_alibi": (baichuan_ckpt, baichuan_ref, dict(layers=40, heads=6, hidden=48)),
    "baichuan7b_v1": (baichuan_ckpt, baichuan_ref, dict(arch="BaiChuanForCausalLM")),
    "codegeex": (codegeex_ckpt, codegeex_ref, {}),
}
ARCH = {"bloom": "bloom", "bloom6": "bloom", "qwen": "qwen", "baichuan": "baichuan", "baichuan_alibi": "baichuan",
        "baichuan7b_v1": "baichuan", "codegeex": "codegeex"}


@pytest.mark.support("load", "run")
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_executor_matches_reference(kind, tmp_path):
    make, ref, kw = KINDS[kind]
    d = make(tmp_path / kind, **kw)
    g = load(d)
    assert g.hparams.arch == ARCH[kind]
    ids = ids_of(256, 20, 1)
    torch.testing.assert_close(executor_for(g)(ids)[0], ref(d, ids[0]), atol=5e-5, rtol=1e-4)


@pytest.mark.support("load", "run", family="baichuan")
def test_baichuan2_normhead(tmp_path):
    """Baichuan 2 (vocab 125696): lm_head rows are L2-normalized once at load, as its NormHead does per call."""
    d = baichuan_ckpt(tmp_path / "b2", vocab=125696, hidden=32, heads=2, layers=1, ffn=32)
    g = load(d)
    assert torch.allclose(g["output.weight"].load().norm(dim=1), torch.ones(125696), atol=1e-5)
    ids = ids_of(125696, 12, 2)
    torch.testing.assert_close(executor_for(g)(ids)[0], baichuan_ref(d, ids[0]), atol=5e-5, rtol=1e-4)


# llama.cpp (0c1e570) runs RoPE only for 32-layer baichuan files and ALiBi for 40-layer ones
LLAMACPP = {
    "qwen": dict(hidden=64, heads=4),
    "baichuan": dict(hidden=64, heads=4, layers=32),
    "baichuan_alibi": dict(hidden=48, heads=6, layers=40),
}


@pytest.mark.support("out_gguf", "gguf_in", "llamacpp", "out_safetensors")
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", sorted(LLAMACPP))
def test_llamacpp_logits_match_reference(kind, tmp_path, smollm_tokenizer_dir):
    """Our f32 GGUF in llama.cpp (f32 KV cache) == the reference; read back by quantkit == the reference."""
    from oracles.llamacpp_model import LlamaModel
    from quantkit.export import convert_to_gguf
    make, ref, _ = KINDS[kind]
    d = make(tmp_path / kind, vocab=VOCAB, tok_dir=smollm_tokenizer_dir, **LLAMACPP[kind])
    out = tmp_path / f"{kind}.gguf"
    convert_to_gguf(load(d), out, q="f32", progress=False)
    ids = ids_of(VOCAB, 20, 3)
    want = ref(d, ids[0])
    with LlamaModel(out, n_ctx=32, exact=True) as m:
        got = m.logits(ids[0].tolist())
    np.testing.assert_allclose(got, want.numpy(), atol=2e-3, rtol=1e-3)
    g2 = load(out)
    assert g2.hparams.arch == ARCH[kind]
    torch.testing.assert_close(executor_for(g2)(ids)[0], want, atol=5e-5, rtol=1e-4)
    # GGUF -> HF safetensors with the family's own config.json (the GGUF carries none) -> the same model
    from quantkit.export import convert_to_safetensors
    convert_to_safetensors(g2, tmp_path / "hf", dtype="f32", progress=False)
    assert load(tmp_path / "hf").hparams.arch == ARCH[kind]
    torch.testing.assert_close(ref(tmp_path / "hf", ids[0]), want, atol=5e-5, rtol=1e-4)


@pytest.mark.support("out_gguf", "gguf_in", "llamacpp", family="bloom")
@pytest.mark.llamacpp
def test_bloom_llamacpp_converter_gguf(tmp_path, smollm_tokenizer_dir, llamacpp_src):
    """BLOOM with 6 heads (ALiBi slopes interleaved past the power of two): our f32 GGUF in llama.cpp ==
    transformers; llama.cpp's converter on the same checkpoint writes the same tensors bit for bit (its q/k/v
    reorder) and the same hyperparameters; its file read by quantkit runs as transformers does."""
    from oracles.llamacpp_model import LlamaModel
    from quantkit.export import convert_to_gguf
    from quantkit.formats.gguf_reader import open_gguf, tensor_bytes
    d = bloom_ckpt(tmp_path / "b", vocab=VOCAB, hidden=96, heads=6, tok_dir=smollm_tokenizer_dir)
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    convert_to_gguf(load(d), ours, q="f32", progress=False)
    ids = ids_of(VOCAB, 20, 9)
    ref = hf_logits(d, ids)
    with LlamaModel(ours, n_ctx=32, exact=True) as m:
        got = m.logits(ids[0].tolist())
    np.testing.assert_allclose(got, ref[0].numpy(), atol=2e-3, rtol=1e-3)
    llamacpp_convert(llamacpp_src, d, theirs)
    fa, fb = open_gguf(ours), open_gguf(theirs)
    ta, tb = {t.name: t for t in fa.tensors}, {t.name: t for t in fb.tensors}
    assert set(ta) == set(tb)
    for n in ta:
        assert ta[n].shape == tb[n].shape and ta[n].tensor_type == tb[n].tensor_type, n
        assert np.array_equal(tensor_bytes(ta[n], ours), tensor_bytes(tb[n], theirs)), n
    for k, v in fb.fields.items():
        if k.startswith("bloom."):
            assert fa.fields[k] == pytest.approx(v), k
    torch.testing.assert_close(executor_for(load(theirs))(ids), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind,over,why", [
    ("qwen", dict(no_bias=False), "no_bias false"),
    ("qwen", dict(tie_word_embeddings=True), "separate output.weight"),
    ("baichuan", {}, "applies RoPE only to 32-layer models"),
])
def test_gguf_refuses_what_llamacpp_cannot_run(kind, over, why, tmp_path, smollm_tokenizer_dir):
    from quantkit.errors import UnsupportedArchitecture
    from quantkit.export import convert_to_gguf
    make, ref, _ = KINDS[kind]
    d = make(tmp_path / kind, tok_dir=smollm_tokenizer_dir, **over)
    if over.get("no_bias") is False:  # the biases the config now declares
        with_qwen_biases(d)
    g = load(d)
    with pytest.raises(UnsupportedArchitecture, match=why) as e:
        convert_to_gguf(g, tmp_path / "x.gguf", q="f32", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "x.gguf").exists()


@pytest.mark.support("load", "run", family="qwen")
def test_qwen_mlp_biases_run(tmp_path):
    """no_bias false: the c_proj / w1 / w2 biases are read and used."""
    d = with_qwen_biases(qwen_ckpt(tmp_path / "q", no_bias=False))
    g = load(d)
    assert "blk.0.ffn_gate.bias" in g and "blk.1.attn_output.bias" in g
    ids = ids_of(256, 12, 4)
    torch.testing.assert_close(executor_for(g)(ids)[0], qwen_ref(d, ids[0]), atol=5e-5, rtol=1e-4)


def with_qwen_biases(d, layers=2, hidden=64, mlp=96):
    from safetensors.torch import load_file, save_file
    t = load_file(str(d / "model.safetensors"))
    gen = torch.Generator().manual_seed(5)
    for i in range(layers):
        for n, size in (("attn.c_proj", hidden), ("mlp.w1", mlp), ("mlp.w2", mlp), ("mlp.c_proj", hidden)):
            t[f"transformer.h.{i}.{n}.bias"] = torch.randn(size, generator=gen) * 0.1
    save_file(t, str(d / "model.safetensors"))
    return d


# GPTQ: every projection of every family (Baichuan 13B's ALiBi at its 40 layers)
GPTQ = {"bloom": ({}, 4), "qwen": ({}, 5), "baichuan": ({}, 7), "baichuan_alibi": (dict(layers=40), 7),
        "codegeex": ({}, 6)}


@pytest.mark.support("gptq")
@pytest.mark.parametrize("kind", sorted(GPTQ))
def test_gptq_end_to_end(kind, tmp_path, one_thread):
    """GPTQ (4 bit, groups of 32) through the layer streamer: every projection quantized, small KLD against
    the float model, and on the calibration tokens it beats round-to-nearest on that grid."""
    from quantkit.quant.gptq_driver import GridOptions, quantize_graph
    make, _, _ = KINDS[kind]
    over, per_layer = GPTQ[kind]
    g = load(make(tmp_path / kind, **over))
    gen = torch.Generator().manual_seed(11)
    samples = [torch.randint(0, 256, (32,), generator=gen) for _ in range(16)]
    ids = torch.stack(samples)
    base = executor_for(g)(ids)
    out = {}
    for method in ("gptq", "rtn"):
        res = quantize_graph(g, samples if method == "gptq" else None, GridOptions(method=method, group_size=32),
                             progress=False)
        assert len(res.linears) == per_layer * g.hparams.n_layers
        out[method] = kld(base, executor_for(with_weights(g, {n: q.dequantize() for n, q in res.linears.items()}))(ids))
    print(f"{kind}: KLD vs float gptq {out['gptq']:.3g} rtn {out['rtn']:.3g}")
    assert 0 < out["gptq"] < 0.05 and out["gptq"] < out["rtn"], out


# hidden 256 so k-quant rows fit; Baichuan at 32 layers (the RoPE depth llama.cpp runs)
KQUANT = {"bloom": dict(hidden=256, heads=4), "qwen": dict(hidden=256, heads=4, mlp=256),
          "baichuan": dict(hidden=256, heads=4, ffn=256, layers=32)}


@pytest.mark.support("kquants", "llamacpp")
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", sorted(KQUANT))
def test_q4_k_m_with_imatrix_end_to_end(kind, tmp_path, smollm_tokenizer_dir, one_thread):
    """imatrix (our calibration streamer) -> q4_k_m GGUF: llama.cpp runs it as our reader+executor does, and
    its KLD against the float reference is small."""
    from oracles.llamacpp_model import LlamaModel
    from quantkit.calibration.imatrix import compute_imatrix
    from quantkit.export import convert_to_gguf
    make, ref, _ = KINDS[kind]
    d = make(tmp_path / kind, vocab=VOCAB, tok_dir=smollm_tokenizer_dir, **KQUANT[kind])
    g = load(d)
    gen = torch.Generator().manual_seed(12)
    im = compute_imatrix(g, [torch.randint(0, VOCAB, (32,), generator=gen) for _ in range(4)], progress=False)
    out = tmp_path / "q.gguf"
    rep = convert_to_gguf(g, out, q="q4_k_m", imatrix=im.means(), progress=False)
    assert rep["types"]["blk.0.ffn_up.weight"] in ("Q4_K", "Q5_K", "Q6_K")
    ids = ids_of(VOCAB, 20, 13)
    ours = executor_for(load(out))(ids)[0]
    with LlamaModel(out, n_ctx=32) as m:
        theirs = torch.from_numpy(m.logits(ids[0].tolist()))
    assert np.corrcoef(theirs.numpy().ravel(), ours.numpy().ravel())[0, 1] > 0.999
    k = kld(ref(d, ids[0]), ours)
    print(f"{kind}: q4_k_m + imatrix KLD vs float {k:.3g}")
    assert 0 < k < 0.05, k


@pytest.mark.parametrize("kind", ["bloom", "qwen", "baichuan", "codegeex"])
def test_inspect_and_safetensors_round_trip(kind, tmp_path):
    """`quantkit inspect` names the family; HF safetensors written back (fused / interleaved layouts
    rebuilt) load again to the same logits as the reference."""
    from quantkit.export import convert_to_safetensors
    from quantkit.pipeline import inspect
    make, ref, kw = KINDS[kind]
    d = make(tmp_path / kind, **kw)
    r = inspect(d)
    assert r["architecture"] == ARCH[kind] and r["n_params"] > 0
    convert_to_safetensors(load(d), tmp_path / "hf", dtype="f32", progress=False)
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), "pt") as a, safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for n in a.keys():
            assert torch.equal(a.get_tensor(n), b.get_tensor(n)), n


def test_codegeex_gguf_refuses(tmp_path):
    """llama.cpp has no CodeGeeX (1) architecture (CodeGeeX2/4 are ChatGLM): one line, no file."""
    from quantkit.errors import UnsupportedArchitecture
    from quantkit.export import convert_to_gguf
    g = load(codegeex_ckpt(tmp_path / "c"))
    with pytest.raises(UnsupportedArchitecture, match="codegeex.*cannot be written to GGUF") as e:
        convert_to_gguf(g, tmp_path / "x.gguf", q="q8_0", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("kind", ["codegeex", "qwen", "baichuan", "bloom"])
def test_rtn_gptq_checkpoint(kind, tmp_path, one_thread):
    """RTN into a GPTQ-format checkpoint (every projection under the family's own names: CodeGeeX's top query
    layer too, Qwen v1's fused c_attn, Baichuan's W_pack = [q; k; v] and BLOOM's per-head interleaved
    query_key_value as one module, as published GPTQ checkpoints hold them): read back by quantkit it holds the
    in-process RTN weights, and stays close to the float reference."""
    from quantkit.jobs.gptq import gptq_to_safetensors
    from quantkit.quant.gptq_driver import GridOptions, quantize_graph
    make, ref, kw = KINDS[kind]
    d = make(tmp_path / kind, **kw)
    g = load(d)
    gptq_to_safetensors(g, tmp_path / "q", method="rtn", group_size=32, progress=False)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "gptq"
    from safetensors import safe_open
    with safe_open(str(next((tmp_path / "q").glob("*.safetensors"))), "pt") as f:
        assert {"codegeex": "language_model.transformer.topQueryLayer.attention.query.qweight",
                "qwen": "transformer.h.1.attn.c_attn.qweight", "baichuan": "model.layers.1.self_attn.W_pack.qweight",
                "bloom": "transformer.h.1.self_attention.query_key_value.qweight"}[kind] in set(f.keys())
    q = load(tmp_path / "q")
    res = quantize_graph(g, None, GridOptions(method="rtn", group_size=32), progress=False)
    assert "blk.1.attn_output.weight" in res.linears
    for n, ql in res.linears.items():
        torch.testing.assert_close(q[n].load().float(), ql.dequantize().float(), atol=1e-3, rtol=1e-3)
    ids = ids_of(256, 20, 6)
    k = kld(ref(d, ids[0]), executor_for(q)(ids)[0])
    assert 0 < k < 0.05, k


@pytest.mark.support("kquants", "llamacpp")
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["bloom", "qwen"])
def test_q4_k_m_matches_llama_quantize(kind, tmp_path, smollm_tokenizer_dir, one_thread):
    """q4_k_m from our f32 GGUF: the same type per tensor (the fused attn_qkv's mixture rule, BLOOM's
    embedding norm and biases) and the same bytes as llama.cpp's llama_model_quantize on that file."""
    from oracles.llamacpp_model import quantize_file
    from quantkit.export import FILE_TYPES, convert_to_gguf
    from quantkit.formats.gguf_reader import open_gguf, tensor_bytes
    make, _, _ = KINDS[kind]
    d = make(tmp_path / kind, vocab=VOCAB, tok_dir=smollm_tokenizer_dir, **KQUANT[kind])
    f32, ours, ref = tmp_path / "f32.gguf", tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    convert_to_gguf(load(d), f32, q="f32", progress=False)
    convert_to_gguf(load(f32), ours, q="q4_k_m", progress=False)
    quantize_file(f32, ref, int(FILE_TYPES["q4_k_m"]))
    a, b = ({t.name: t for t in open_gguf(p).tensors} for p in (ours, ref))
    assert {k: t.tensor_type.name for k, t in a.items()} == {k: t.tensor_type.name for k, t in b.items()}
    assert a["blk.0.attn_qkv.weight"].tensor_type.name.endswith("_K")
    bad = [k for k in a if not np.array_equal(tensor_bytes(a[k], ours), tensor_bytes(b[k], ref))]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.mark.support("awq")
@pytest.mark.parametrize("kind", ["qwen", "baichuan", "bloom", "codegeex"])
def test_awq_runs(kind, tmp_path, one_thread):
    """AWQ on every remote-code family and BLOOM: RMSNorm weights (Qwen v1: fused qkv, one scale group;
    Baichuan) and LayerNorm weight and bias (BLOOM, CodeGeeX) take the scales; every projection is quantized
    and the model stays close to the float one."""
    from quantkit.families.registry import quantizable
    from quantkit.quant.awq import AWQConfig, check_awq_graph, quantized_graph, run_awq
    make, _, kw = KINDS[kind]
    g = load(make(tmp_path / kind, **kw))
    check_awq_graph(g)
    gen = torch.Generator().manual_seed(17)
    samples = [torch.randint(0, 256, (32,), generator=gen) for _ in range(8)]
    res = run_awq(g, samples, AWQConfig(group_size=32), progress=False)
    assert res.scales and set(res.quantized) == set(quantizable(g))
    ids = torch.stack(samples[:2])
    k = kld(executor_for(g)(ids), executor_for(quantized_graph(g, res))(ids))
    print(f"{kind}: AWQ KLD vs float {k:.3g}")
    assert 0 < k < 0.05


def test_bad_input_one_line(tmp_path):
    """A broken remote-code checkpoint: one line naming the file / key / tensor."""
    from quantkit.errors import QuantkitError
    d = qwen_ckpt(tmp_path / "q", intermediate_size=191)
    with pytest.raises(QuantkitError, match="intermediate_size 191 is not even") as e:
        load(d)
    assert "\n" not in str(e.value)
    d = baichuan_ckpt(tmp_path / "b")
    from safetensors.torch import load_file, save_file
    t = load_file(str(d / "model.safetensors"))
    del t["model.layers.1.self_attn.W_pack.weight"]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(QuantkitError, match="'model.layers.1.self_attn.W_pack.weight' is missing"):
        load(d)
    d = bloom_ckpt(tmp_path / "bl", apply_residual_connection_post_layernorm=True)
    with pytest.raises(QuantkitError, match="apply_residual_connection_post_layernorm"):
        load(d)


def test_bloom_original_names(tmp_path):
    """The bigscience checkpoints' names (no `transformer.` prefix) read as the transformers ones."""
    from safetensors.torch import load_file, save_file
    d = bloom_ckpt(tmp_path / "b")
    ids = ids_of(256, 12, 8)
    want = executor_for(load(d))(ids)
    t = load_file(str(d / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in t.items()}, str(d / "model.safetensors"))
    torch.testing.assert_close(executor_for(load(d))(ids), want)
