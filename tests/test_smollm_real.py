"""Real model (SmolLM2-135M): loaders, writers and the perplexity harness against transformers and llama.cpp."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from quantkit.export import convert_to_gguf
from quantkit.eval.perplexity import perplexity
from quantkit.families import load
from quantkit.runtime import executor_for

pytestmark = [pytest.mark.slow]


@pytest.mark.support("gguf_in", family="llama")
def test_gguf_loader_matches_transformers_gguf(smollm_gguf):
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(
        smollm_gguf.parent, gguf_file=smollm_gguf.name, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids).logits
    ours = executor_for(load(smollm_gguf))(ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.support("out_gguf", "llamacpp", family="llama")
@pytest.mark.llamacpp
def test_f32_gguf_equals_llamacpp_converter(smollm_hf, tmp_path, llamacpp_src, jargon_text):
    from gguf import GGUFReader

    from oracles.llamacpp_model import LlamaModel
    from oracles.llamacpp_model import perplexity as lcpp_ppl
    ours = tmp_path / "ours.gguf"
    convert_to_gguf(load(smollm_hf), ours, q="f32", progress=False)
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([sys.executable, str(llamacpp_src / "convert_hf_to_gguf.py"), str(smollm_hf), "--outtype", "f32",
                    "--outfile", str(theirs)], check=True, capture_output=True)
    a, b = GGUFReader(ours), GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for n in ta:
        assert ta[n].tensor_type == tb[n].tensor_type, n
        assert np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data)), n
    fb = {k: f.contents() for k, f in b.fields.items() if k.startswith(("llama.", "tokenizer."))}
    fa = {k: f.contents() for k, f in a.fields.items() if k.startswith(("llama.", "tokenizer."))}
    assert fa == fb
    with LlamaModel(ours) as ma:
        ids = ma.tokenize(jargon_text[:60000])
        pa = lcpp_ppl(ma, ids, 512, 3)
    with LlamaModel(theirs) as mb:
        pb = lcpp_ppl(mb, ids, 512, 3)
    assert abs(pa["ppl"] / pb["ppl"] - 1) < 1e-3
    # and our own executor agrees with llama.cpp's on the same ids
    pq = perplexity(executor_for(load(smollm_hf)), ids, 512, 3)
    assert abs(pq["ppl"] / pa["ppl"] - 1) < 2e-3, (pq, pa)


def test_perplexity_matches_transformers(smollm_hf, jargon_text):
    import transformers

    from quantkit.eval.tokens import encode
    g = load(smollm_hf)
    ids, bos = encode(g, jargon_text[:60000])
    ours = perplexity(executor_for(g), ids, n_ctx=512, n_chunks=3, bos_id=bos)
    # the protocol written out plainly with transformers' model and tokenizer
    tok = transformers.AutoTokenizer.from_pretrained(smollm_hf)
    hf_ids = tok(jargon_text[:60000], add_special_tokens=False)["input_ids"]
    assert hf_ids[:len(ids)] == ids[:len(hf_ids)]
    m = transformers.AutoModelForCausalLM.from_pretrained(smollm_hf, torch_dtype=torch.float32).eval()
    nll = []
    for c in range(3):
        x = torch.tensor(hf_ids[c * 512:(c + 1) * 512])[None]
        with torch.no_grad():
            lp = torch.log_softmax(m(x).logits[0].double(), -1)
        for j in range(256, 511):
            nll.append(-lp[j, x[0, j + 1]].item())
    ref = float(np.exp(np.mean(nll)))
    assert ours["n_tokens"] == len(nll)
    assert abs(ours["ppl"] / ref - 1) < 2e-3, (ours["ppl"], ref)


def test_kld_of_model_against_itself_is_zero(smollm_hf, jargon_text):
    from quantkit.eval.tokens import encode
    g = load(smollm_hf)
    ids, bos = encode(g, jargon_text[:30000])
    ex = executor_for(g)
    r = perplexity(ex, ids, n_ctx=256, n_chunks=2, bos_id=bos, base=ex)
    assert r["kld_mean"] < 1e-6 and r["top1_agreement"] == 1.0 and abs(r["ppl_ratio"] - 1) < 1e-9


def test_packed_weights_executor_matches_dense(smollm_gguf):
    """The executor can run GGUF tensors from their stored blocks (what it does on CUDA with the Triton
    kernels); on the CPU the same path goes through the kernels' torch reference."""
    g = load(smollm_gguf)
    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(2))
    dense = executor_for(g, packed=False)
    packed = executor_for(g, packed=True)
    from quantkit.runtime.model import PackedLinear
    assert isinstance(packed.layer(0).attn.q, PackedLinear)
    torch.testing.assert_close(packed(ids), dense(ids), atol=1e-4, rtol=1e-4)
