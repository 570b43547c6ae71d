"""OLMo 1/2/3, Gemma 1/2/3 and Seed-OSS against transformers (executor logits) and llama.cpp (our GGUF)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from quantkit.families import load
from quantkit.runtime import executor_for
from support import family_of_kind

VOCAB = 49152
GEMMA_ROPE = {"rope_theta": 10000.0}

# kind -> (config class, model class, config overrides); every model: hidden 64, 4 heads
SPECS = {
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(num_key_value_heads=2)),
    "olmo_clip": ("OlmoConfig", "OlmoForCausalLM", dict(num_key_value_heads=4, clip_qkv=0.15)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2)),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(
        num_key_value_heads=2, num_hidden_layers=4, sliding_window=6,
        rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
                                            "original_max_position_embeddings": 32},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 50000.0}})),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=6, num_hidden_layers=3,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=6, num_hidden_layers=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        final_logit_softcapping=None)),
    "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM", dict(num_key_value_heads=2, head_dim=32,
                                                             attention_bias=True)),
}
# llama.cpp (0c1e570) architecture each family is written as (all of them have one)
GGUF_ARCH = {"olmo": "olmo", "olmo_clip": "olmo", "olmo2": "olmo2", "olmo3": "olmo2", "gemma": "gemma",
             "gemma2": "gemma2", "gemma3": "gemma3", "seed_oss": "seed_oss"}


def make(kind: str, out, vocab: int = 256, seed: int = 0, gain: float = 3.0, **over):
    """gain: weights scaled up so clipping and soft-caps bite (1: transformers' init)."""
    import transformers
    cfg_cls, model_cls, extra = SPECS[kind]
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=kind.startswith("gemma"))
    kw.update(extra)
    kw.update(over)
    if kind in ("gemma", "gemma2"):
        kw["hidden_activation"] = "gelu_pytorch_tanh"
    cfg = getattr(transformers, cfg_cls)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases; larger weights so clipping and soft-caps bite
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif "embed" not in n:
                p.mul_(gain)
    model.save_pretrained(out, safe_serialization=True)
    return out


def hf_logits(d, ids):
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return m.eval()(ids).logits.float()


def ids_of(n, t, seed):
    return torch.randint(0, n, (1, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.support("load", "run")
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_executor_matches_transformers(kind, tmp_path):
    d = make(kind, tmp_path / kind)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(d, ids)
    g = load(d)
    assert g.hparams.arch == kind.split("_clip")[0]
    torch.testing.assert_close(executor_for(g)(ids), ref, atol=2e-5, rtol=1e-4)


def with_tokenizer(kind, tmp_path, tok_dir, **kw):
    """A tiny model with SmolLM2's vocabulary (llama.cpp needs a real tokenizer)."""
    d = make(kind, tmp_path / kind, vocab=VOCAB, **kw)
    for f in tok_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.mark.support("out_gguf", "llamacpp")
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_llamacpp_logits_match_transformers(kind, tmp_path, smollm_tokenizer_dir):
    """Our f32 GGUF in llama.cpp == transformers (past the sliding windows: 20 tokens, windows of 6).
    transformers' init scale: llama.cpp keeps K/V in f16, whose error grows with the activations."""
    from gguf import GGUFReader

    from oracles.llamacpp_model import LlamaModel
    from quantkit.export import convert_to_gguf
    # gemma2 at 3x: attention logits large enough for its soft-cap to matter
    d = with_tokenizer(kind, tmp_path, smollm_tokenizer_dir, gain=3.0 if kind == "gemma2" else 1.0)
    out = tmp_path / f"{kind}.gguf"
    convert_to_gguf(load(d), out, q="f32", progress=False)
    assert GGUFReader(out).fields["general.architecture"].contents() == GGUF_ARCH[kind]
    ids = ids_of(VOCAB, 20, 3)
    ref = hf_logits(d, ids)[0].numpy()
    with LlamaModel(out, n_ctx=32) as m:
        got = m.logits(ids[0].tolist())
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-3)


@pytest.mark.support("out_gguf", "gguf_in")
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_our_gguf_read_back_matches_transformers(kind, tmp_path, smollm_tokenizer_dir):
    """HF -> our GGUF (f32; Gemma norms stored as 1 + w) -> our GGUF reader -> executor == transformers."""
    from quantkit.export import convert_to_gguf
    d = with_tokenizer(kind, tmp_path, smollm_tokenizer_dir)
    out = tmp_path / "m.gguf"
    g = load(d)
    convert_to_gguf(g, out, q="f32", progress=False)
    g2 = load(out)
    assert g2.hparams.arch == g.hparams.arch and set(g2.tensors) == set(g.tensors)
    ids = ids_of(VOCAB, 20, 5)
    torch.testing.assert_close(executor_for(g2)(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind,over,why", [
    ("olmo", dict(attention_bias=True), "no output projection bias"),
    ("olmo2", dict(tie_word_embeddings=True), "requires a separate output.weight"),
    ("olmo3", dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 5e5},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
     "one RoPE base for every layer"),
    ("gemma", dict(tie_word_embeddings=False), "always uses token_embd"),
    ("gemma2", dict(query_pre_attn_scalar=32), "scales attention by 1/sqrt"),
    ("gemma3", dict(query_pre_attn_scalar=24), "scales attention by 1/sqrt"),
    ("seed_oss", dict(attention_out_bias=True), "loads neither bias"),
])
def test_gguf_refuses_what_llamacpp_cannot_run(kind, over, why, tmp_path, smollm_tokenizer_dir):
    """Models transformers runs but llama.cpp's graph for the architecture cannot: a one-line reason."""
    from quantkit.export import convert_to_gguf
    from quantkit.errors import UnsupportedArchitecture
    d = with_tokenizer(kind, tmp_path, smollm_tokenizer_dir, **over)
    g = load(d)
    ids = ids_of(VOCAB, 12, 7)  # the executor still runs it
    torch.testing.assert_close(executor_for(g)(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)
    with pytest.raises(UnsupportedArchitecture, match=why) as e:
        convert_to_gguf(g, tmp_path / "x.gguf", q="f32", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "x.gguf").exists()


FAMILIES = ["gemma", "gemma2", "gemma3", "olmo", "olmo2", "olmo3", "seed_oss"]


def kld(base: torch.Tensor, q: torch.Tensor) -> float:
    """Mean KL(base || q) per token, from logits."""
    lb, lq = torch.log_softmax(base.double(), -1), torch.log_softmax(q.double(), -1)
    return float((lb.exp() * (lb - lq)).sum(-1).mean())


def with_weights(g, new: dict):
    """The graph with some tensors replaced (dequantized results)."""
    from quantkit.graph import Graph, LazyTensor
    tensors = dict(g.tensors)
    for name, w in new.items():
        tensors[name] = LazyTensor(w.shape, "F32", lambda w=w: w)
    return Graph(g.hparams, tensors, g.tokenizer, source=g.source, source_format=g.source_format)


@pytest.mark.support("gptq")
@pytest.mark.parametrize("kind", FAMILIES)
def test_gptq_end_to_end(kind, tmp_path, one_thread):
    """GPTQ (4 bit, groups of 32) through the layer streamer (per-layer RoPE, embed scale): small KLD, and
    on the calibration tokens (what GPTQ minimises its error on) it beats round-to-nearest on that grid."""
    from quantkit.quant.gptq_driver import GridOptions, quantize_graph
    g = load(make(kind, tmp_path / kind, gain=1.0))
    gen = torch.Generator().manual_seed(11)
    samples = [torch.randint(0, 256, (32,), generator=gen) for _ in range(16)]
    ids = torch.stack(samples)
    base = executor_for(g)(ids)
    out = {}
    for method in ("gptq", "rtn"):
        res = quantize_graph(g, samples if method == "gptq" else None, GridOptions(method=method, group_size=32),
                             progress=False)
        assert len(res.linears) == 7 * g.hparams.n_layers
        out[method] = kld(base, executor_for(with_weights(g, {n: q.dequantize() for n, q in res.linears.items()}))(ids))
    assert 0 < out["gptq"] < 0.05 and out["gptq"] < out["rtn"], out


@pytest.mark.support("kquants", "llamacpp")
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", FAMILIES)
def test_q4_k_m_with_imatrix_end_to_end(kind, tmp_path, smollm_tokenizer_dir, one_thread):
    """imatrix (our calibration streamer) -> q4_k_m GGUF: llama.cpp runs it as our reader+executor does, and
    its KLD against the float model is small."""
    from oracles.llamacpp_model import LlamaModel
    from quantkit.calibration.imatrix import compute_imatrix
    from quantkit.export import convert_to_gguf
    # hidden 256: k-quant rows (256 wide) fit the projections that read the hidden state
    d = with_tokenizer(kind, tmp_path, smollm_tokenizer_dir, gain=1.0, hidden_size=256, intermediate_size=512)
    g = load(d)
    gen = torch.Generator().manual_seed(12)
    im = compute_imatrix(g, [torch.randint(0, VOCAB, (32,), generator=gen) for _ in range(4)], progress=False)
    out = tmp_path / "q.gguf"
    rep = convert_to_gguf(g, out, q="q4_k_m", imatrix=im.means(), progress=False)
    assert rep["types"]["blk.0.ffn_gate.weight"] in ("Q4_K", "Q5_K", "Q6_K")
    ids = ids_of(VOCAB, 20, 13)
    ours = executor_for(load(out))(ids)[0]
    with LlamaModel(out, n_ctx=32) as m:
        theirs = torch.from_numpy(m.logits(ids[0].tolist()))
    assert np.corrcoef(theirs.numpy().ravel(), ours.numpy().ravel())[0, 1] > 0.999
    k = kld(hf_logits(d, ids)[0], ours)
    assert 0 < k < 0.05, k


def llamacpp_convert(src, d, out):
    import subprocess
    import sys
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(d), "--outtype", "f32", "--outfile",
                    str(out)], check=True, capture_output=True)


# llama.cpp's converter needs a sentencepiece tokenizer.model for gemma / gemma2: not covered here
@pytest.mark.support("out_gguf", "gguf_in", "llamacpp")
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["gemma3", "olmo", "olmo2", "olmo3", "seed_oss"])
def test_llamacpp_converter_gguf(kind, tmp_path, smollm_tokenizer_dir, llamacpp_src):
    """llama.cpp's own converter on the same checkpoint: the same tensors, bit for bit (Gemma norms as 1 + w),
    and its file read by quantkit runs as transformers does. Gemma 3 with its default layer pattern (the
    converter writes no pattern: llama.cpp assumes every 6th layer full)."""
    from gguf import GGUFReader

    from quantkit.export import convert_to_gguf
    over = dict(layer_types=None, num_hidden_layers=7) if kind == "gemma3" else {}
    d = with_tokenizer(kind, tmp_path, smollm_tokenizer_dir, **over)
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    convert_to_gguf(load(d), ours, q="f32", progress=False)
    llamacpp_convert(llamacpp_src, d, theirs)
    ta = {t.name: t for t in GGUFReader(ours).tensors}
    tb = {t.name: t for t in GGUFReader(theirs).tensors}
    assert set(ta) == set(tb)
    for n in ta:
        assert np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data)), n
    ids = ids_of(VOCAB, 20, 9)
    torch.testing.assert_close(executor_for(load(theirs))(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)


@pytest.mark.support("gguf_in", "kquants", "llamacpp", family="gemma3")
@pytest.mark.llamacpp
def test_gemma3_converter_gguf_requantized(tmp_path, smollm_tokenizer_dir, llamacpp_src, one_thread):
    """A Gemma 3 GGUF as users download it (llama.cpp's converter) re-quantized to q4_k_m by quantkit:
    llama.cpp runs it, close to the float model."""
    from oracles.llamacpp_model import LlamaModel
    from quantkit.export import convert_to_gguf
    d = with_tokenizer("gemma3", tmp_path, smollm_tokenizer_dir, layer_types=None, num_hidden_layers=7,
                       hidden_size=256, intermediate_size=512, gain=1.0)
    theirs, q = tmp_path / "theirs.gguf", tmp_path / "q.gguf"
    llamacpp_convert(llamacpp_src, d, theirs)
    rep = convert_to_gguf(load(theirs), q, q="q4_k_m", progress=False)
    assert rep["types"]["blk.0.ffn_up.weight"] in ("Q4_K", "Q5_K", "Q6_K")
    ids = ids_of(VOCAB, 20, 10)
    with LlamaModel(q, n_ctx=32) as m:
        got = torch.from_numpy(m.logits(ids[0].tolist()))
    k = kld(hf_logits(d, ids)[0], got)
    assert 0 < k < 0.05, k


@pytest.mark.support("gguf_in", "out_safetensors")
@pytest.mark.parametrize("kind", sorted(SPECS))
def test_safetensors_from_our_gguf_loads_in_transformers(kind, tmp_path, smollm_tokenizer_dir):
    """GGUF -> quantkit -> HF safetensors with the family's own config.json (the GGUF carries none):
    transformers builds and runs it as the original."""
    from quantkit.export import convert_to_gguf, convert_to_safetensors
    d = with_tokenizer(kind, tmp_path, smollm_tokenizer_dir)
    convert_to_gguf(load(d), tmp_path / "m.gguf", q="f32", progress=False)
    g = load(tmp_path / "m.gguf")
    assert g.hf_config is None
    convert_to_safetensors(g, tmp_path / "hf", dtype="f32", progress=False)
    ids = ids_of(VOCAB, 20, 8)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gemma3", "olmo3", "gemma2"])
def test_layer_stream_uses_each_layers_rope(kind, tmp_path):
    """The calibration streamer (one layer at a time) hands every layer its own RoPE, and the embedding
    scale and final soft-cap apply: streamed final states through the head == transformers."""
    from quantkit.calibration.stream import stream_layers
    d = make(kind, tmp_path / kind)
    g = load(d)
    ex = executor_for(g, keep=False)
    samples = list(torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(4)))
    finals, ropes = [], []

    def on_layer(i, layer, inputs, rope):
        ropes.append(rope)
        if i == g.hparams.n_layers - 1:
            finals.append(torch.stack([layer(x[None], *rope)[0] for x in inputs.data]))
    stream_layers(g, samples, on_layer, progress=False, executor=ex)
    kinds = {i: g.hparams.is_sliding(i) for i in range(g.hparams.n_layers)}
    assert len({id(r) for r in ropes}) == (2 if kind != "gemma2" else 1)  # computed once per RoPE kind
    assert ropes[0] is ropes[[i for i, s in kinds.items() if s][0]]
    torch.testing.assert_close(ex.head(finals[0]), hf_logits(d, torch.stack(samples)), atol=2e-5, rtol=1e-4)


def make_gemma3_multimodal(out, vocab: int):
    """A tiny Gemma3ForConditionalGeneration (SigLIP tower + projector) saved as the Hub checkpoints are."""
    import transformers
    tc = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
              max_position_embeddings=128, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8)
    cfg = transformers.Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=4,
                                    image_token_index=vocab - 1, boi_token_index=vocab - 3, eoi_token_index=vocab - 2)
    torch.manual_seed(0)
    m = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    m.save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.support("load", "run", family="gemma3")
def test_gemma3_multimodal_checkpoint_text_model(tmp_path):
    """Gemma3ForConditionalGeneration (how Gemma 3 4B+ ships): its text model is read and runs as transformers
    runs the full model on text; HF export refuses rather than drop the vision tower."""
    from quantkit.export import convert_to_safetensors
    from quantkit.errors import UnsupportedArchitecture
    d = make_gemma3_multimodal(tmp_path / "mm", 256)
    g = load(d)
    assert g.hparams.arch == "gemma3" and g.hparams.layer_types == ["sliding", "full", "sliding"]
    assert not any("vision" in n or "mm_" in n for n in g.tensors)
    ids = ids_of(250, 20, 14)
    torch.testing.assert_close(executor_for(g)(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)
    with pytest.raises(UnsupportedArchitecture, match="vision tower"):
        convert_to_safetensors(g, tmp_path / "hf", progress=False)


@pytest.mark.support("out_gguf", "llamacpp", family="gemma3")
@pytest.mark.llamacpp
def test_gemma3_multimodal_text_gguf_in_llamacpp(tmp_path, smollm_tokenizer_dir):
    from oracles.llamacpp_model import LlamaModel
    from quantkit.export import convert_to_gguf
    d = make_gemma3_multimodal(tmp_path / "mm", VOCAB)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    convert_to_gguf(load(d), tmp_path / "t.gguf", q="f32", progress=False)
    ids = ids_of(VOCAB - 8, 20, 15)
    with LlamaModel(tmp_path / "t.gguf", n_ctx=32) as m:
        got = m.logits(ids[0].tolist())
    np.testing.assert_allclose(got, hf_logits(d, ids)[0].numpy(), atol=2e-3, rtol=1e-3)


@pytest.mark.support("kquants", "llamacpp")
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["gemma3", "olmo3"])
def test_optimizer_gptq_gguf(kind, tmp_path, smollm_tokenizer_dir, one_thread):
    """--optimizer gptq (Hessian-aware k-quant rounding computed layer by layer while writing) on families with
    per-layer RoPE: llama.cpp runs the file, and it is at least as close to the float model as plain q4_k_m."""
    from oracles.llamacpp_model import LlamaModel
    from quantkit.export import convert_to_gguf
    from quantkit.quant.kquant_gptq import gptq_gguf_kwargs
    d = with_tokenizer(kind, tmp_path, smollm_tokenizer_dir, gain=1.0, hidden_size=256, intermediate_size=512)
    g = load(d)
    gen = torch.Generator().manual_seed(16)
    samples = [torch.randint(0, VOCAB, (32,), generator=gen) for _ in range(8)]
    ids = torch.stack(samples[:1])
    ref = hf_logits(d, ids)[0]
    got = {}
    for name, kw in (("plain", {}), ("gptq", gptq_gguf_kwargs(g, "q4_k_m", samples=samples, progress=False))):
        convert_to_gguf(g, tmp_path / f"{name}.gguf", q="q4_k_m", progress=False, **kw)
        with LlamaModel(tmp_path / f"{name}.gguf", n_ctx=32) as m:
            got[name] = kld(ref, torch.from_numpy(m.logits(ids[0].tolist())))
    assert 0 < got["gptq"] < 0.05 and got["gptq"] <= got["plain"] * 1.05, got


def rtn_graph(g, bits: int = 4, group_size: int = 32):
    """Round-to-nearest on AWQ's grid (asymmetric, min/max range) of every projection (the baseline)."""
    from quantkit.families.registry import quantizable
    from quantkit.quant.awq_search import quantize_linear
    return with_weights(g, {n: quantize_linear(g[n].load().float(), bits, group_size, False).dequantize()
                            for n in quantizable(g)})


def outlier_norms(g, channels, factor, up_factor=None):
    """The graph with some channels of every weighted pre-norm's output multiplied (Gemma: 1 + w scaled)."""
    from quantkit.families import family_of
    idx = torch.tensor(channels)
    new = {}
    for i in range(g.hparams.n_layers):
        for b in family_of(g.hparams.arch).layer(g.hparams, i).branches:
            if b.norm is None or b.norm.kind == "layer_np":
                continue
            w = g[f"blk.{i}.{b.norm.suffix}.weight"].load().float().clone()
            off = 1.0 if b.norm.kind == "rms1p" else 0.0
            w[idx] = (w[idx] + off) * factor - off
            new[f"blk.{i}.{b.norm.suffix}.weight"] = w
        if up_factor:  # and down's input: some rows of up (every family has up -> down, whatever its norms)
            w = g[f"blk.{i}.ffn_up.weight"].load().float().clone()
            w[idx] *= up_factor
            new[f"blk.{i}.ffn_up.weight"] = w
    return with_weights(g, new)


@pytest.mark.support("awq")
@pytest.mark.parametrize("kind", FAMILIES)
def test_awq_folds_exactly_and_beats_rtn(kind, tmp_path, one_thread, caplog):
    """AWQ on every dense family. The scales fold exactly: RMSNorm w / s, Gemma's (1 + w) norms
    (1 + w) / s - 1; OLMo's weightless norms take none (the linears after them stay unscaled, v -> o and
    up -> down are still scaled, and that is logged). So the scaled float model (scales folded, nothing
    quantized yet) gives transformers' logits; and the AWQ checkpoint written and read back is closer to the
    float model than round-to-nearest on the same grid."""
    import logging

    from quantkit.jobs.awq import awq_to_safetensors
    from quantkit.quant.awq import AWQConfig, check_awq_graph, fold_graph, run_awq
    d = make(kind, tmp_path / kind, gain=1.0)
    g = load(d)
    with caplog.at_level(logging.WARNING, logger="quantkit.awq"):
        skipped = check_awq_graph(g)
    weightless = g.hparams.norm == "layer_np"
    assert skipped == (["attn_norm", "ffn_norm"] if weightless else [])
    assert ("weightless norms (attn_norm, ffn_norm)" in caplog.text) == weightless
    gen = torch.Generator().manual_seed(17)
    samples = [torch.randint(0, 256, (32,), generator=gen) for _ in range(8)]
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    res = run_awq(g, samples, AWQConfig(group_size=32), progress=False, quantize=False)
    from quantkit.families import family_of
    pre = {b.norm.suffix for b in family_of(g.hparams.arch).layer(g.hparams, 0).branches
           if b.norm is not None and b.norm.kind != "layer_np"}  # OLMo 2/3: post-norms only; OLMo: weightless
    assert {grp.prev for _, grp, _ in res.scales} == pre | {"ffn_up"} | ({"attn_v"} if g.hparams.n_kv_heads ==
                                                                         g.hparams.n_heads else set())
    assert all(not torch.allclose(s, torch.ones_like(s)) for _, _, s in res.scales)  # real scales
    folded = fold_graph(g, res.fold_plan())
    if pre:  # the norms did take scales ...
        assert not torch.equal(folded["blk.0.attn_norm.weight"].load(), g["blk.0.attn_norm.weight"].load().float())
    torch.testing.assert_close(executor_for(folded)(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)  # ... exactly
    # activation outliers, as real LLMs have and AWQ's premise needs: a few channels of each pre-norm x 50, of up x 8
    g = outlier_norms(g, (3, 17, 40), 50.0, up_factor=8.0)
    out = tmp_path / "awq"
    awq_to_safetensors(g, out, group_size=32, samples=samples, progress=False)
    base = executor_for(g)(ids)
    k_awq = kld(base, executor_for(load(out))(ids))
    k_rtn = kld(base, executor_for(rtn_graph(g))(ids))
    assert 0 < k_awq < k_rtn < 0.05, (k_awq, k_rtn)
