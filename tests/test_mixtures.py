"""quantkit's per-tensor type plan vs the types llama.cpp's llama_model_quantize really writes.

The model files are SmolLM2's real tensor list/shapes/metadata (and a synthetic 8-expert MoE built on
its vocab) with zero-valued F16 weights: the type rules depend on names, shapes and hparams only,
and zeros keep llama.cpp's quantization fast."""

from __future__ import annotations

import ctypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from quantkit.errors import QuantkitError
from quantkit.quant.mixtures import FTYPES, ArchInfo, allows_quantization, plan_tensor_types

gguf = pytest.importorskip("gguf")

ALL_FTYPES = ["f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k_s", "q3_k_m",
              "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]


def _copy_kv(reader, writer, changes: dict) -> None:
    from gguf import GGUFValueType as V

    for key, f in reader.fields.items():
        # the tokenizer is not read by llama_model_quantize; leaving it out keeps the files fast to parse
        if key.startswith(("GGUF.", "tokenizer.")) or key == "general.architecture" or key in changes:
            continue
        vt = f.types[0]
        writer.add_key_value(key, f.contents(), vt, sub_type=f.types[-1] if vt == V.ARRAY else None)
    for key, (val, vt) in changes.items():
        writer.add_key_value(key, val, vt)


def _write(path, reader, changes: dict, tensors: list[tuple[str, tuple[int, ...], bool]]) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    _copy_kv(reader, w, changes)
    for name, shape, is_f32 in tensors:
        w.add_tensor(name, np.zeros(shape, np.float32 if is_f32 else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm_gguf):
    from gguf import GGUFValueType as V

    d = tmp_path_factory.mktemp("mixtures")
    r = gguf.GGUFReader(smollm_gguf)
    shapes = [(t.name, tuple(int(v) for v in reversed(t.shape)), len(t.shape) == 1) for t in r.tensors]
    _write(d / "smol.gguf", r, {"general.file_type": (1, V.UINT32)}, shapes)

    # synthetic MoE: 8 layers, 8 experts, untied output, n_ff 256 (k-quant friendly), n_embd 576 (not)
    E, L, ff, emb, nv, kv = 8, 8, 256, 576, 49152, 192
    moe = [("token_embd.weight", (nv, emb), False), ("output.weight", (nv, emb), False), ("output_norm.weight", (emb,), True)]
    for i in range(L):
        p = f"blk.{i}."
        moe += [(p + "attn_norm.weight", (emb,), True), (p + "ffn_norm.weight", (emb,), True),
                (p + "attn_q.weight", (emb, emb), False), (p + "attn_k.weight", (kv, emb), False),
                (p + "attn_v.weight", (kv, emb), False), (p + "attn_output.weight", (emb, emb), False),
                (p + "ffn_gate_inp.weight", (E, emb), True), (p + "ffn_gate_exps.weight", (E, ff, emb), False),
                (p + "ffn_up_exps.weight", (E, ff, emb), False), (p + "ffn_down_exps.weight", (E, emb, ff), False)]
    _write(d / "moe.gguf", r, {"general.file_type": (1, V.UINT32), "llama.block_count": (L, V.UINT32),
                               "llama.feed_forward_length": (ff, V.UINT32), "llama.expert_count": (E, V.UINT32),
                               "llama.expert_used_count": (2, V.UINT32)}, moe)
    return {"smol": _info(d / "smol.gguf"), "moe": _info(d / "moe.gguf")}


def _info(path) -> dict:
    r = gguf.GGUFReader(path)
    f = r.fields
    arch = ArchInfo(
        n_layer=int(f["llama.block_count"].contents()),
        n_head=int(f["llama.attention.head_count"].contents()),
        n_head_kv=int(f["llama.attention.head_count_kv"].contents()),
        n_expert=int(f["llama.expert_count"].contents()) if "llama.expert_count" in f else 0,
    )
    tensors = [(t.name, tuple(int(v) for v in reversed(t.shape))) for t in r.tensors]
    src = {t.name: T(int(t.tensor_type)) for t in r.tensors}
    return {"path": path, "arch": arch, "tensors": tensors, "src": src}


def _llama_quantize(src, dst, ftype: str, pure=False, overrides=()):
    llama_cpp = pytest.importorskip("llama_cpp")
    _quiet(llama_cpp)
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPES[ftype][0]
    p.nthread = 2
    p.pure = pure
    keep = []
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pat, ty) in enumerate(overrides):
            keep.append(pat.encode())
            arr[i].pattern = keep[-1]
            arr[i].type = int(ty)
        arr[len(overrides)].pattern = None
        p.tt_overrides = ctypes.cast(arr, type(p.tt_overrides))
        keep.append(arr)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    assert rc == 0, f"llama_model_quantize failed for {ftype}"
    out = gguf.GGUFReader(dst)
    return {t.name: T(int(t.tensor_type)) for t in out.tensors}


_LOG_CB = None


def _quiet(llama_cpp):
    global _LOG_CB
    if _LOG_CB is None:
        _LOG_CB = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


def _our_plan(m, ftype, **kw):
    return plan_tensor_types(m["tensors"], ftype, m["arch"], source_types=m["src"], **kw)


def _diff(ours, ref):
    assert ours.keys() == ref.keys()
    return {n: (ours[n].name, ref[n].name) for n in ref if ours[n] != ref[n]}


@pytest.mark.llamacpp
@pytest.mark.slow
def test_smollm2_plan_matches_llama_cpp(models, tmp_path):
    m = models["smol"]
    seen = set()
    for ft in ALL_FTYPES:
        ref = _llama_quantize(m["path"], tmp_path / f"{ft}.gguf", ft)
        assert not _diff(_our_plan(m, ft), ref), f"{ft}: {_diff(_our_plan(m, ft), ref)}"
        seen |= set(ref.values())
        (tmp_path / f"{ft}.gguf").unlink()
    # the rules were exercised: bumps and shape fallbacks of the 576-wide rows all occur
    assert {T.Q6_K, T.Q5_K, T.Q4_K, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_0, T.Q3_K, T.F16, T.BF16} <= seen


@pytest.mark.llamacpp
@pytest.mark.slow
def test_moe_plan_matches_llama_cpp(models, tmp_path):
    m = models["moe"]
    for ft in ["q4_0", "q8_0", "q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k"]:
        ref = _llama_quantize(m["path"], tmp_path / f"{ft}.gguf", ft)
        assert not _diff(_our_plan(m, ft), ref), f"{ft}: {_diff(_our_plan(m, ft), ref)}"
        (tmp_path / f"{ft}.gguf").unlink()
    assert ref["blk.0.attn_v.weight"] == T.Q8_0 and ref["blk.0.ffn_gate_inp.weight"] == T.F32


@pytest.mark.llamacpp
@pytest.mark.slow
def test_pure_and_overrides_match_llama_cpp(models, tmp_path):
    m = models["smol"]
    src = m["path"]
    ref = _llama_quantize(src, tmp_path / "pure.gguf", "q4_k_m", pure=True)
    assert not _diff(_our_plan(m, "q4_k_m", pure=True), ref)
    ov = [(r"attn_v", T.Q8_0), (r"blk\.1[0-9]\.ffn_down", T.Q5_K), (r"ffn_(up|gate)", T.Q4_K), (r"token_embd", T.Q6_K)]
    ref = _llama_quantize(src, tmp_path / "ov.gguf", "q5_k_s", overrides=ov)
    assert not _diff(_our_plan(m, "q5_k_s", overrides=ov), ref)
    assert ref["blk.12.ffn_down.weight"] == T.Q5_K and ref["blk.3.attn_v.weight"] == T.Q8_0
    assert ref["blk.3.ffn_up.weight"] == T.Q5_0  # override Q4_K, then the 576-column fallback


def test_plan_rules_without_llama_cpp():
    """Direct checks of llama.cpp's rules (read off src/llama-quant.cpp) on a 32-layer GQA model."""
    tensors = [("token_embd.weight", (32000, 4096)), ("output.weight", (32000, 4096)), ("output_norm.weight", (4096,))]
    for i in range(32):
        tensors += [(f"blk.{i}.attn_v.weight", (1024, 4096)), (f"blk.{i}.ffn_down.weight", (4096, 14336)),
                    (f"blk.{i}.attn_norm.weight", (4096,)), (f"blk.{i}.attn_q.weight", (4096, 4096))]
    arch = ArchInfo(n_layer=32, n_head=32, n_head_kv=8)
    p = plan_tensor_types(tensors, "q4_k_m", arch)
    more = [i for i in range(32) if p[f"blk.{i}.ffn_down.weight"] == T.Q6_K]
    assert more == [i for i in range(32) if i < 4 or i >= 28 or (i - 4) % 3 == 2]
    assert p["output.weight"] == T.Q6_K and p["token_embd.weight"] == T.Q4_K
    assert p["blk.0.attn_norm.weight"] == T.F32 and p["blk.5.attn_q.weight"] == T.Q4_K
    assert plan_tensor_types(tensors, "q4_k_s", arch)["blk.3.attn_v.weight"] == T.Q5_K
    assert plan_tensor_types(tensors, "q4_k_s", arch)["blk.4.attn_v.weight"] == T.Q4_K
    odd = plan_tensor_types([("blk.0.ffn_down.weight", (8, 100))], "q4_k_m", ArchInfo(n_layer=1))
    assert odd["blk.0.ffn_down.weight"] == T.F16
    assert not allows_quantization("blk.0.ffn_gate_inp.weight", (8, 4096))
    with pytest.raises(QuantkitError, match="ftype"):
        plan_tensor_types(tensors, "q9_k", arch)
    with pytest.raises(QuantkitError, match="regex"):
        plan_tensor_types(tensors, "q4_0", arch, overrides=[("(", T.Q8_0)])
