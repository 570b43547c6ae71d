"""Tiny random GLM-4.5, MiniMax-M2 and Llama 4 checkpoints made with transformers' own classes (the oracle),
and what their tests share (transformers logits with eager attention, GGUF writing, llama.cpp logits,
llama.cpp's converter).

Routers are scaled up from transformers' init so top-k choices are clear-cut (no near-ties that float rounding
could flip between implementations); norms and selection biases get non-trivial values so each matters."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

VOCAB = 49152  # SmolLM2's tokenizer (conftest's smollm_tokenizer_dir): GGUF files need a real one

GLM = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=2, head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
           n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=128, rms_norm_eps=1e-5,
           tie_word_embeddings=False)
MINIMAX = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2, rotary_dim=16,
               max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None,
               eos_token_id=None)
# 4 layers: the fourth is the no-RoPE (NoPE) one; MoE every second layer
LLAMA4 = dict(hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
              interleave_moe_layer_step=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)

SPECS = {
    # GLM-4.5 (355B style): q/k norm, q/k/v biases, 2 expert groups of 2 (one kept), routed scale
    "glm": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
            dict(GLM, use_qk_norm=True, attention_bias=True, n_group=2, topk_group=1, routed_scaling_factor=2.5)),
    # GLM-4.5-Air style: no q/k norm, no groups, no top-k renormalisation
    "glm_air": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                dict(GLM, use_qk_norm=False, attention_bias=True, norm_topk_prob=False, routed_scaling_factor=1.0)),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", dict(MINIMAX)),
    # llama.cpp's chunk (8192) and temperature floor (8192) are fixed: the GGUF kinds keep transformers' defaults
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(LLAMA4)),
    # Scout's llama3 RoPE scaling (llama.cpp: rope_freqs factors)
    "llama4_scaled": ("Llama4TextConfig", "Llama4ForCausalLM",
                      dict(LLAMA4, rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                                    "rope_theta": 500000.0})),
    # short chunks and a low temperature floor, so 24 tokens exercise both (executor against transformers)
    "llama4_chunked": ("Llama4TextConfig", "Llama4ForCausalLM",
                       dict(LLAMA4, attention_chunk_size=8, floor_scale=4, attn_scale=0.5)),
}


def make_tiny(kind: str, out: Path, vocab: int = 256, tok_dir: Path | None = None, seed: int = 0,
              **overrides) -> Path:
    import transformers
    cfg_cls, model_cls, extra = SPECS[kind]
    cfg = getattr(transformers, cfg_cls)(vocab_size=vocab, **{**extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
            elif n.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "feed_forward.router.weight")):
                p.normal_(0.0, 0.5)
            elif "experts" in n or "shared_expert" in n:
                p.normal_(0.0, 0.05)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.2)
    model.save_pretrained(out, safe_serialization=True)
    if tok_dir is not None:
        for f in tok_dir.iterdir():
            shutil.copy(f, out / f.name)
    return out


def hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """transformers' float32 logits with eager attention."""
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        return m(ids).logits.float()


def ids_for(vocab: int, t: int = 24, seed: int = 3, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


def gguf_of(model_dir: Path, out: Path, q: str = "f32") -> Path:
    from quantkit.export import convert_to_gguf
    from quantkit.families import load
    convert_to_gguf(load(model_dir), out, q=q, progress=False)
    return out


def llamacpp_logits(path: Path, ids: torch.Tensor, n_ctx: int = 64) -> np.ndarray:
    from oracles.llamacpp_model import LlamaModel
    with LlamaModel(path, n_ctx=n_ctx, exact=True) as m:  # F32 cache, no flash attention
        return m.logits(ids[0].tolist())


# run llama.cpp's converter with one model class's vocabulary reader swapped for the GPT-2 BPE one: the tiny
# checkpoints carry SmolLM2's tokenizer, not GLM's (whose reader looks up GLM's own special tokens)
_CONVERT = """
import runpy, sys
sys.path.insert(0, {src!r})
if {patch!r}:
    import importlib
    mod, cls = {patch!r}.rsplit(".", 1)
    setattr(getattr(importlib.import_module(mod), cls), "set_vocab", lambda self: self._set_vocab_gpt2())
sys.argv = {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def llamacpp_last_logits(path: Path, ids: torch.Tensor, last: int) -> np.ndarray:
    """llama.cpp's logits for the last `last` positions of one long sequence (the others are not output)."""
    from oracles.llamacpp_model import LlamaModel, lib
    L, toks = lib(), ids[0].tolist()
    n = len(toks)
    with LlamaModel(path, n_ctx=n, exact=True) as m:
        L.llama_memory_clear(L.llama_get_memory(m.ctx), True)
        batch = L.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(toks):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(t), i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = int(i >= n - last)
            batch.n_tokens = n
            if L.llama_decode(m.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
        finally:
            L.llama_batch_free(batch)
        ptr = L.llama_get_logits(m.ctx)
        return np.ctypeslib.as_array(ptr, shape=(last * m.n_vocab,)).reshape(last, m.n_vocab).copy()


def hf_last_logits(model_dir: Path, ids: torch.Tensor, last: int) -> torch.Tensor:
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        return m(ids, logits_to_keep=last).logits.float()


def executor_last_logits(graph, ids: torch.Tensor, last: int) -> torch.Tensor:
    from quantkit.runtime import executor_for
    ex = executor_for(graph)
    with torch.no_grad():
        x = ex.embed(ids)
        ropes = ex.ropes(ids.shape[1])
        for i in range(graph.hparams.n_layers):
            x = ex.layer(i)(x, *ropes[i])
        return ex.head(x[:, -last:]).float()


def their_gguf(llamacpp_src: Path, model_dir: Path, out: Path, *args: str, gpt2_vocab: str = "") -> Path:
    """llama.cpp's convert_hf_to_gguf.py (f32) on `model_dir`; gpt2_vocab: 'conversion.MODULE.CLASS' whose
    set_vocab is replaced by the GPT-2 one."""
    script = str(llamacpp_src / "convert_hf_to_gguf.py")
    argv = [script, str(model_dir), "--outtype", "f32", "--outfile", str(out), *args]
    code = _CONVERT.format(src=str(llamacpp_src), patch=gpt2_vocab, argv=argv, script=script)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"convert_hf_to_gguf.py failed: {r.stderr[-3000:]}")
    return out


def gguf_contents(path: Path, arch: str) -> tuple[dict, dict]:
    """({tensor name: GGUF tensor}, {arch.* key: value})."""
    from gguf import GGUFReader
    r = GGUFReader(path)
    return ({t.name: t for t in r.tensors},
            {k: f.contents() for k, f in r.fields.items() if k.startswith(arch + ".")})


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs), (sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours)))
    for n in ours:
        assert ours[n].tensor_type == theirs[n].tensor_type, n
        assert [int(x) for x in ours[n].shape] == [int(x) for x in theirs[n].shape], n
        assert np.array_equal(np.asarray(ours[n].data).ravel(), np.asarray(theirs[n].data).ravel()), n


def kld(base_logits: torch.Tensor, logits: torch.Tensor) -> float:
    p, q = torch.log_softmax(base_logits.float(), -1), torch.log_softmax(logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def dequantized(g, res):
    """A graph whose GPTQ/RTN-quantized linears and experts are replaced by their dequantized weights."""
    from quantkit.graph import LazyTensor
    new = dict(g.tensors)
    for n, ql in res.linears.items():
        w = ql.dequantize().float()
        new[n] = LazyTensor(w.shape, "F32", lambda w=w: w)
    for n, qls in res.experts.items():
        w = torch.stack([q.dequantize().float() for q in qls])
        new[n] = LazyTensor(w.shape, "F32", lambda w=w: w)
    return g.with_tensors(new)
