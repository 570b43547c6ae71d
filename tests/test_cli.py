"""The CLI's main jobs on a tiny checkpoint with a real vocabulary."""

import json
import shutil

from test_bad_input import run_cli
from tiny_models import make_tiny


def tiny_tok(tmp_path, tok_dir):
    d = make_tiny("llama_gqa_llama3", tmp_path / "m", vocab=49152)
    for f in tok_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


def test_convert_inspect_perplexity_json(tmp_path, smollm_tokenizer_dir, jargon_text):
    d = tiny_tok(tmp_path, smollm_tokenizer_dir)
    out = tmp_path / "m.gguf"
    r = run_cli("convert", d, "--to", "gguf", "--q", "q8_0", "-o", out, "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["output"] == str(out) and res["types"]["blk.0.attn_q.weight"] == "Q8_0"
    r = run_cli("inspect", out, "--json")
    info = json.loads(r.stdout)
    assert info["architecture"] == "llama" and info["hparams"]["n_kv_heads"] == 2
    q = {t["name"]: t for t in info["tensors"]}
    assert q["blk.0.attn_q.weight"]["type"] == "Q8_0" and abs(q["blk.0.attn_q.weight"]["bpw"] - 8.5) < 1e-9
    txt = tmp_path / "eval.txt"
    txt.write_text(jargon_text[:20000])
    r = run_cli("perplexity", out, "--text", txt, "--ctx", "128", "--chunks", "3", "--base", d, "--json",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    for k in ("ppl", "ppl_stderr", "n_tokens", "kld_mean", "kld_median", "kld_p99", "top1_agreement", "ppl_ratio"):
        assert k in p, k
    assert p["n_tokens"] == 3 * 63 and 0 < p["kld_mean"] < 0.05 and p["top1_agreement"] > 0.8
    r = run_cli("perplexity", out, "--text", txt, "--ctx", "128", "--chunks", "2", "--no-progress")
    assert r.returncode == 0 and r.stdout.startswith("PPL = ")


def test_hf_roundtrip_safetensors(tmp_path, smollm_tokenizer_dir):
    """HF -> safetensors (bf16) -> loads in transformers with the same weights."""
    import torch
    import transformers
    d = tiny_tok(tmp_path, smollm_tokenizer_dir)
    out = tmp_path / "st"
    r = run_cli("convert", d, "--to", "safetensors", "--q", "bf16", "-o", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    a = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
    b = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in sa.items():
        assert torch.equal(v.to(torch.bfloat16).float(), sb[k]), k
    assert transformers.AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == \
        transformers.AutoTokenizer.from_pretrained(d)("hello world")["input_ids"]


def test_gguf_to_hf_sharded(tmp_path, smollm_gguf):
    """GGUF in -> sharded HF safetensors out, read back lazily."""
    from quantkit.export import convert_to_safetensors
    from quantkit.families import load
    g = load(smollm_gguf)
    out = tmp_path / "hf"
    res = convert_to_safetensors(g, out, dtype="bf16", max_shard_bytes=60 * 2**20, progress=False)
    assert len(res["files"]) > 1 and (out / "model.safetensors.index.json").exists()
    g2 = load(out)
    for n in ("blk.3.attn_q.weight", "blk.29.ffn_down.weight", "token_embd.weight"):
        assert (g2[n].load().float() - g[n].load().to(g2[n].load().dtype).float()).abs().max() == 0
