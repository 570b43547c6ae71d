"""MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) against transformers' own models and llama.cpp.

Oracles: transformers' modeling code (tiny random checkpoints from its config classes, tests/moe_models.py),
llama.cpp's graph (loading our GGUF) and llama.cpp's converter (convert_hf_to_gguf.py on the same checkpoint).
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from moe_models import GGUF_KINDS, MOE_SPECS, make_tiny_moe
from quantkit.export import convert_to_gguf, convert_to_safetensors
from quantkit.errors import UnsupportedArchitecture
from quantkit.families import load
from quantkit.runtime.model import CausalLM
from tiny_models import hf_logits

VOCAB = 49152  # SmolLM2's tokenizer: GGUF files need a real one
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
GGUF_IDS = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(3))
ARCH = {"mixtral": "mixtral", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}
GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> tiny checkpoint (vocab 256), made once per module."""
    root, made = tmp_path_factory.mktemp("moe"), {}

    def get(kind):
        if kind not in made:
            made[kind] = make_tiny_moe(kind, root / kind)
        return made[kind]
    return get


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory, smollm_tokenizer_dir):
    """kind -> tiny checkpoint with SmolLM2's tokenizer (vocab 49152), for GGUF output."""
    root, made = tmp_path_factory.mktemp("moe_tok"), {}

    def get(kind):
        if kind not in made:
            d = make_tiny_moe(kind, root / kind, vocab=VOCAB)
            for f in smollm_tokenizer_dir.iterdir():
                shutil.copy(f, d / f.name)
            made[kind] = d
        return made[kind]
    return get


@pytest.mark.support("load", "run")
@pytest.mark.parametrize("kind", sorted(MOE_SPECS))
def test_executor_matches_transformers(kind, tiny, one_thread):
    d = tiny(kind)
    ours = CausalLM(load(d))(IDS)
    torch.testing.assert_close(ours, hf_logits(d, IDS), atol=2e-5, rtol=1e-4)


def test_hparams_and_layout(tiny):
    g = load(tiny("qwen2_moe_dense"))
    hp = g.hparams
    assert (hp.arch, hp.n_experts, hp.n_experts_used, hp.expert_ffn_size) == ("qwen2moe", 4, 2, 32)
    assert hp.moe_layers == [1] and hp.norm_topk_prob  # decoder_sparse_step 2, mlp_only_layers [2]
    assert g["blk.0.ffn_up.weight"].shape == (128, 64) and "blk.0.ffn_gate_inp.weight" not in g
    assert g["blk.1.ffn_gate_inp_shexp.weight"].shape == (64,) and g["blk.1.ffn_up_shexp.weight"].shape == (64, 64)
    assert g["blk.1.ffn_down_exps.weight"].shape == (4, 64, 32)
    g = load(tiny("olmoe_clip"))
    assert g.hparams.extra["clip_qkv"] == 0.5 and g["blk.0.attn_k_norm.weight"].shape == (32,)
    assert load(tiny("qwen3_moe")).hparams.head_dim == 32
    assert load(tiny("mixtral_swa")).hparams.sliding_window == 6


def test_window_and_routing_matter(tiny, one_thread):
    """The options the oracle comparison checks change the logits (so matching them means something)."""
    for kind, change in (("mixtral_swa", lambda hp: setattr(hp, "sliding_window", None)),
                         ("qwen2_moe", lambda hp: setattr(hp, "norm_topk_prob", True)),
                         ("olmoe_clip", lambda hp: hp.extra.pop("clip_qkv"))):
        g = load(tiny(kind))
        change(g.hparams)
        assert (CausalLM(g)(IDS) - hf_logits(tiny(kind), IDS)).abs().max() > 1e-2, kind


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_stacked_experts_are_the_checkpoints_experts(kind, tiny):
    from safetensors.torch import load_file

    from quantkit.families import family_of
    d = tiny(kind)
    g = load(d)
    sd = load_file(d / "model.safetensors")
    experts = family_of(g.hparams.arch).hf_experts(g.hparams)
    assert len(experts) == 3 * g.hparams.n_layers
    for canon, names in experts.items():
        assert len(names) == 4 and all(n in sd for n in names)
        assert torch.equal(g[canon].load(), torch.stack([sd[n] for n in names])), canon


@pytest.mark.support("out_safetensors")
@pytest.mark.parametrize("kind", sorted(MOE_SPECS))
def test_safetensors_export_loads_in_transformers(kind, tiny, tmp_path, one_thread):
    d = tiny(kind)
    convert_to_safetensors(load(d), tmp_path / "out", dtype="f32", progress=False)
    torch.testing.assert_close(hf_logits(tmp_path / "out", IDS), hf_logits(d, IDS), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- GGUF

@pytest.mark.support("out_gguf", "llamacpp")
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_llamacpp_logits_match_transformers(kind, tiny_tok, tmp_path):
    from oracles.llamacpp_model import LlamaModel
    d = tiny_tok(kind)
    out = tmp_path / f"{kind}.gguf"
    convert_to_gguf(load(d), out, q="f32", progress=False)
    ref = hf_logits(d, GGUF_IDS)[0].numpy()
    with LlamaModel(out, n_ctx=64) as m:
        got = m.logits(GGUF_IDS[0].tolist())
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-3)


@pytest.mark.support("out_gguf", "gguf_in", "out_safetensors")
@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_gguf_roundtrip_through_our_reader(kind, tiny_tok, tmp_path, one_thread):
    """HF -> our GGUF (llama.cpp's arch names, stacked experts) -> our reader -> executor == transformers; and
    that graph written back as plain HF (config from the GGUF hyperparameters) loads in transformers."""
    from gguf import GGUFReader
    d = tiny_tok(kind)
    out = tmp_path / "m.gguf"
    convert_to_gguf(load(d), out, q="f32", progress=False)
    r = GGUFReader(out)
    kv = {k: f.contents() for k, f in r.fields.items()}
    a = GGUF_ARCH[kind]
    assert kv["general.architecture"] == a and kv[f"{a}.expert_count"] == 4 and kv[f"{a}.expert_used_count"] == 2
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # GGUF order: ne0 first
    ff = 128 if kind in ("mixtral", "olmoe") else 32
    assert shapes["blk.1.ffn_gate_exps.weight"] == (64, ff, 4) and shapes["blk.1.ffn_down_exps.weight"] == (ff, 64, 4)
    assert shapes["blk.1.ffn_gate_inp.weight"] == (64, 4)
    g = load(out)
    assert g.hparams.arch == ARCH[kind] and g.hparams.n_experts == 4
    ids = GGUF_IDS[:, :24]
    ref = hf_logits(d, ids)
    torch.testing.assert_close(CausalLM(g)(ids), ref, atol=2e-5, rtol=1e-4)
    assert g.hf_config is None  # written from the family's hf_config
    convert_to_safetensors(g, tmp_path / "hf", dtype="f32", progress=False)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == \
        [MOE_SPECS[kind][1]]
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.support("llamacpp", family="qwen2moe")
@pytest.mark.llamacpp
def test_llamacpp_runs_our_q8_0(tiny_tok, tmp_path, one_thread):
    from oracles.llamacpp_model import LlamaModel
    d = tiny_tok("qwen2_moe")
    out = tmp_path / "q8.gguf"
    res = convert_to_gguf(load(d), out, q="q8_0", progress=False)
    assert res["types"]["blk.0.ffn_down_exps.weight"] == "Q8_0" and res["types"]["blk.0.ffn_gate_inp.weight"] == "F32"
    ids = GGUF_IDS[:, :16]
    ours = CausalLM(load(out))(ids)[0].numpy()  # our executor on the dequantized Q8_0 weights
    with LlamaModel(out, n_ctx=32) as m:
        got = m.logits(ids[0].tolist())
    # llama.cpp quantizes activations to Q8_0 for the dot products: close, not bit-equal
    assert np.corrcoef(got.ravel(), ours.ravel())[0, 1] > 0.999
    assert np.corrcoef(got.ravel(), hf_logits(d, ids)[0].numpy().ravel())[0, 1] > 0.99


REFUSED = {
    "mixtral_swa": ["sliding_window 6"],
    "qwen2_moe_dense": ["norm_topk_prob=True", "dense layers [0, 2]"],
    "qwen3_moe_dense": ["norm_topk_prob=False", "dense layers [0]", "output bias"],
    "olmoe_clip": ["norm_topk_prob=True", "clip_qkv=0.5", "2 kv heads for 4 heads"],
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_gguf_refuses_what_llamacpp_computes_differently(kind, tiny_tok, tmp_path):
    d = tiny_tok(kind)
    out = tmp_path / "x.gguf"
    with pytest.raises(UnsupportedArchitecture) as e:
        convert_to_gguf(load(d), out, q="f32", progress=False)
    for reason in REFUSED[kind]:
        assert reason in str(e.value)
    assert not out.exists()


@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["qwen3_moe", "olmoe"])
def test_refused_routing_really_differs_in_llamacpp(kind, tiny_tok, tmp_path, monkeypatch):
    """Written anyway with the top-k normalisation flipped, llama.cpp's hard-coded choice no longer matches
    transformers: the refusal guards a real difference."""
    from oracles.llamacpp_model import LlamaModel
    from quantkit.families import hf_moe
    monkeypatch.setattr(hf_moe, "refuse", lambda arch, problems: None)
    d = tiny_tok(kind)
    cfg = json.loads((d / "config.json").read_text())
    flipped = tmp_path / "flipped"
    shutil.copytree(d, flipped)
    (flipped / "config.json").write_text(json.dumps({**cfg, "norm_topk_prob": not cfg["norm_topk_prob"]}))
    out = tmp_path / "x.gguf"
    convert_to_gguf(load(flipped), out, q="f32", progress=False)
    with LlamaModel(out, n_ctx=64) as m:
        got = m.logits(GGUF_IDS[0].tolist())
    np.testing.assert_allclose(got, hf_logits(d, GGUF_IDS)[0].numpy(), atol=2e-3, rtol=1e-3)  # llama.cpp: as before
    assert np.abs(got - hf_logits(flipped, GGUF_IDS)[0].numpy()).max() > 1e-2


@pytest.mark.support("out_gguf", "gguf_in", "llamacpp")
@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_f32_gguf_equals_llamacpp_converter(kind, tiny_tok, tmp_path, llamacpp_src, one_thread):
    """Same tensors (names, types, shapes, bytes) and metadata as llama.cpp's converter; and its file, read by
    our GGUF reader, runs like transformers."""
    from gguf import GGUFReader
    d = tiny_tok(kind)
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    convert_to_gguf(load(d), ours, q="f32", progress=False)
    subprocess.run([sys.executable, str(llamacpp_src / "convert_hf_to_gguf.py"), str(d), "--outtype", "f32",
                    "--outfile", str(theirs)], check=True, capture_output=True)
    a, b = GGUFReader(ours), GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for n in ta:
        assert ta[n].tensor_type == tb[n].tensor_type, n
        sa, sb = [int(x) for x in ta[n].shape], [int(x) for x in tb[n].shape]
        if n.endswith("ffn_gate_inp_shexp.weight"):  # the converter keeps HF's [1, d] as ne {d, 1}; loads alike
            assert sb == sa + [1], n
        else:
            assert sa == sb, n
        assert np.array_equal(np.asarray(ta[n].data).ravel(), np.asarray(tb[n].data).ravel()), n
    arch = GGUF_ARCH[kind]
    fa = {k: f.contents() for k, f in a.fields.items() if k.startswith(arch + ".")}
    fb = {k: f.contents() for k, f in b.fields.items() if k.startswith(arch + ".")}
    assert {k: fa.get(k) for k in fb} == fb
    # keys we always write and the converter leaves out for some archs: values equal llama.cpp's defaults
    defaults = {f"{arch}.attention.key_length": 16, f"{arch}.attention.value_length": 16,
                f"{arch}.rope.dimension_count": 16, f"{arch}.vocab_size": VOCAB}
    assert {k: v for k, v in fa.items() if k not in fb} == {k: v for k, v in defaults.items() if k not in fb}
    g = load(theirs)
    assert g.hparams.arch == ARCH[kind]
    ids = GGUF_IDS[:, :24]
    torch.testing.assert_close(CausalLM(g)(ids), hf_logits(d, ids), atol=2e-5, rtol=1e-4)


@pytest.mark.llamacpp
@pytest.mark.parametrize("kind,sizes", [
    ("mixtral", dict(num_local_experts=8)),  # llama.cpp's mixture has rules for 8 experts
    ("qwen2_moe", dict(moe_intermediate_size=256, shared_expert_intermediate_size=256)),
])
@pytest.mark.support("kquants", "llamacpp")
def test_kquant_moe_file_matches_llama_quantize(kind, sizes, tmp_path, smollm_tokenizer_dir, one_thread):
    """q4_k_m of a stacked-expert model: the same type for every tensor and the same bytes as llama.cpp's
    llama_model_quantize on the same F32 GGUF, and it runs in llama.cpp."""
    from gguf import GGUFReader

    from oracles.llamacpp_model import LlamaModel, quantize_file
    from quantkit.export import FILE_TYPES
    from quantkit.pipeline import convert
    d = make_tiny_moe(kind, tmp_path / kind, hidden=256, ffn=256, vocab=VOCAB, **sizes)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    f32, ours, ref = tmp_path / "f32.gguf", tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    convert_to_gguf(load(d), f32, q="f32", progress=False)
    convert(f32, ours, to="gguf", q="q4_k_m", progress=False)
    quantize_file(f32, ref, int(FILE_TYPES["q4_k_m"]))
    a, b = ({t.name: t for t in GGUFReader(p).tensors} for p in (ours, ref))
    assert {k: t.tensor_type.name for k, t in a.items()} == {k: t.tensor_type.name for k, t in b.items()}
    assert a["blk.0.ffn_gate_exps.weight"].tensor_type.name == "Q4_K"
    bad = [k for k in a if not np.array_equal(np.asarray(a[k].data), np.asarray(b[k].data))]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"
    ids = GGUF_IDS[:, :16]
    with LlamaModel(ours, n_ctx=32) as m:
        got = m.logits(ids[0].tolist())
    mine = CausalLM(load(ours))(ids)[0].numpy()  # our executor on the dequantized file
    # (4-bit random weights flip routes: compare with the same weights, not with float transformers)
    assert np.corrcoef(got.ravel(), mine.ravel())[0, 1] > 0.99
