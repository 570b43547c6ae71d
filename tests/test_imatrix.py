"""Importance matrix vs llama.cpp: the same statistics collected inside llama.cpp's graph (eval callback,
tests/oracles/llamacpp_imatrix.py) on an f32 GGUF of the same model, fed identical token ids; file formats
against the `gguf` package's reader and hand-written legacy bytes; read semantics against llama-quantize's."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
import torch

from quantkit.calibration import imatrix as imx
from quantkit.errors import QuantkitError
from quantkit.families import expected_shapes, load
from quantkit.graph import Graph, HParams, LazyTensor, Tokenizer
from tiny_models import make_tiny

SMOL_VOCAB = 49152


@pytest.fixture(scope="module")
def smol(smollm_gguf) -> Graph:
    return load(smollm_gguf)


def _with_smol_tokenizer(g: Graph, smol: Graph, add_bos: bool | None = None) -> Graph:
    kv = dict(smol.tokenizer.gguf_kv)
    if add_bos is not None:
        kv["tokenizer.ggml.add_bos_token"] = add_bos
    return dataclasses.replace(g, tokenizer=Tokenizer(gguf_kv=kv),
                               metadata={"gguf_kv_types": smol.metadata["gguf_kv_types"]})


def _tiny_moe(smol: Graph, seed: int = 0) -> Graph:
    """A Mixtral-style llama graph (softmax top-2 of 4 experts), random weights."""
    hp = HParams(arch="llama", vocab_size=SMOL_VOCAB, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                 head_dim=16, ffn_size=96, n_experts=4, n_experts_used=2, expert_ffn_size=96, norm_eps=1e-5,
                 rope_theta=10000.0, context_length=256, name="tiny-moe")
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in expected_shapes(hp).items():
        t = (1.0 + 0.1 * torch.randn(shape, generator=gen)) if len(shape) == 1 else \
            torch.randn(shape, generator=gen) * (0.5 / shape[-1] ** 0.5 if "token_embd" not in name else 1.0)
        tensors[name] = LazyTensor(shape, "F32", lambda t=t: t.clone(), source=name)
    return _with_smol_tokenizer(Graph(hp, tensors, source="tiny-moe", source_format="hf"), smol, add_bos=True)


def _ids(n_chunks: int, n_ctx: int, seed: int = 3) -> list[int]:
    return torch.randint(3, SMOL_VOCAB, (n_chunks * n_ctx + 7,), generator=torch.Generator().manual_seed(seed)).tolist()


def _compare(ours: imx.IMatrix, sums: dict, counts: dict, rtol: float = 1e-4):
    assert sorted(ours.sums) == sorted(sums)
    for name in sums:
        np.testing.assert_array_equal(ours.counts[name].numpy(), counts[name], err_msg=name)
        ref = sums[name]
        got = ours.sums[name].numpy()
        assert got.shape == ref.shape, name
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()) * 1e-2, err_msg=name)


@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_matches_llamacpp_eval_callback(kind, smol, tmp_path):
    pytest.importorskip("llama_cpp")
    from oracles.llamacpp_imatrix import llamacpp_imatrix

    from quantkit.export import convert_to_gguf
    if kind == "dense":
        g = _with_smol_tokenizer(load(make_tiny("llama_gqa_llama3", tmp_path / "m", vocab=SMOL_VOCAB)), smol,
                                 add_bos=True)
    else:
        g = _tiny_moe(smol)
    gguf = tmp_path / "m.gguf"
    convert_to_gguf(g, gguf, q="f32", progress=False)
    n_ctx = 32
    ids = _ids(3, n_ctx)
    chunks = imx.chunk_tokens(ids, n_ctx, None, bos=1)
    assert len(chunks) == 3 and all(int(c[0]) == 1 for c in chunks)
    ours = imx.compute_imatrix(g, chunks, process_output=True, progress=False)
    sums, counts, add_bos = llamacpp_imatrix(gguf, [ids[i * n_ctx:(i + 1) * n_ctx] for i in range(3)],
                                             process_output=True)
    assert add_bos
    expect = {f"blk.{i}.{s}.weight" for i in range(2) for s in ("attn_q", "attn_k", "attn_v", "attn_output")}
    if kind == "dense":
        expect |= {f"blk.{i}.{s}.weight" for i in range(2) for s in ("ffn_gate", "ffn_up", "ffn_down")}
    else:
        expect |= {f"blk.{i}.{s}.weight" for i in range(2)
                   for s in ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
    assert set(sums) == expect | {"output.weight"}
    _compare(ours, sums, counts)
    assert ours.chunk_count == 3 and ours.chunk_size == n_ctx
    if kind == "moe":
        c = ours.counts["blk.0.ffn_down_exps.weight"]
        assert c.shape == (4,) and int(c.sum()) == 3 * n_ctx * 2 and len(set(c.tolist())) > 1


@pytest.mark.llamacpp
@pytest.mark.slow
def test_real_smollm_matches_llamacpp(smol, jargon_text, tmp_path):
    """SmolLM2 (f32 GGUF of the real weights), 2 chunks of 64 tokens of the Jargon File."""
    pytest.importorskip("llama_cpp")
    from oracles.llamacpp_imatrix import llamacpp_imatrix

    from quantkit.export import convert_to_gguf
    from quantkit.eval.tokens import encode
    gguf = tmp_path / "smol-f32.gguf"
    convert_to_gguf(smol, gguf, q="f32", progress=False)
    ids, bos = encode(smol, jargon_text[:5000])
    assert bos is None  # SmolLM2 adds no BOS
    n_ctx = 64
    chunks = imx.chunk_tokens(ids, n_ctx, 2, bos)
    ours = imx.compute_imatrix(smol, chunks, progress=False)
    sums, counts, add_bos = llamacpp_imatrix(gguf, [c.tolist() for c in chunks])
    assert not add_bos and len(sums) == 30 * 7
    _compare(ours, sums, counts, rtol=1e-3)


def test_chunking_follows_llama_imatrix():
    ids = list(range(100, 200))
    ch = imx.chunk_tokens(ids, 16, None, bos=1)
    assert len(ch) == 6  # floor(100/16), every chunk fully used
    assert ch[2].tolist() == [1] + list(range(133, 148))
    assert imx.chunk_tokens(ids, 16, 2, None)[1].tolist() == list(range(116, 132))
    with pytest.raises(QuantkitError, match="100 tokens.*at least 128"):
        imx.chunk_tokens(ids, 64)


def _im(seed=0) -> imx.IMatrix:
    gen = torch.Generator().manual_seed(seed)
    im = imx.IMatrix(chunk_count=5, chunk_size=64, datasets=["a.txt"])
    im.sums["blk.0.attn_q.weight"] = torch.rand(1, 32, generator=gen, dtype=torch.float64) * 100
    im.counts["blk.0.attn_q.weight"] = torch.tensor([320])
    im.sums["blk.0.ffn_down_exps.weight"] = torch.rand(3, 16, generator=gen, dtype=torch.float64) * 10
    im.counts["blk.0.ffn_down_exps.weight"] = torch.tensor([200, 0, 77])
    im.sums["blk.0.ffn_down_exps.weight"][1] = 0
    return im


def test_gguf_format_read_by_gguf_package(tmp_path):
    from gguf import GGUFReader
    im = _im()
    p = tmp_path / "im.gguf"
    imx.write_imatrix_gguf(im, p)
    r = GGUFReader(str(p))
    f = r.fields
    assert f["general.type"].contents() == "imatrix"
    assert f["imatrix.datasets"].contents() == ["a.txt"]
    assert f["imatrix.chunk_count"].contents() == 5 and f["imatrix.chunk_size"].contents() == 64
    t = {x.name: x for x in r.tensors}
    assert sorted(t) == ["blk.0.attn_q.weight.counts", "blk.0.attn_q.weight.in_sum2",
                         "blk.0.ffn_down_exps.weight.counts", "blk.0.ffn_down_exps.weight.in_sum2"]
    assert list(t["blk.0.ffn_down_exps.weight.in_sum2"].shape) == [16, 3]  # ggml ne: [ne0, n_mat]
    assert list(t["blk.0.ffn_down_exps.weight.counts"].shape) == [1, 3]
    np.testing.assert_array_equal(np.asarray(t["blk.0.ffn_down_exps.weight.counts"].data).reshape(-1), [200, 0, 77])
    np.testing.assert_allclose(np.asarray(t["blk.0.attn_q.weight.in_sum2"].data).reshape(-1),
                               im.sums["blk.0.attn_q.weight"].reshape(-1).numpy(), rtol=1e-7)
    back = imx.load_imatrix_file(p)
    assert back.chunk_count == 5 and back.datasets == ["a.txt"]
    for n in im.sums:
        torch.testing.assert_close(back.sums[n], im.sums[n].float().double())
        assert back.counts[n].tolist() == im.counts[n].tolist()


def _quantize_values_gguf(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """llama-quantize's load_imatrix (GGUF): sums/count per matrix, 1 where the count is 0."""
    out = np.empty_like(sums)
    for j in range(sums.shape[0]):
        out[j] = sums[j] / counts[j] if counts[j] > 0 else 1.0
    return out


def _graph_for(names_shapes: dict) -> Graph:
    hp = HParams(arch="llama", vocab_size=8, hidden_size=32, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=32,
                 ffn_size=16)
    return Graph(hp, {n: LazyTensor(s, "F32", lambda: None, source=n) for n, s in names_shapes.items()},
                 source="g")


GRAPH_SHAPES = {"blk.0.attn_q.weight": (32, 32), "blk.0.ffn_down_exps.weight": (3, 32, 16)}


def test_read_imatrix_gguf_semantics(tmp_path):
    im = _im()
    p = tmp_path / "im.gguf"
    imx.write_imatrix_gguf(im, p)
    got = imx.read_imatrix(p, _graph_for(GRAPH_SHAPES))
    for n in im.sums:
        ref = _quantize_values_gguf(im.sums[n].float().numpy(), im.counts[n].numpy())
        ref = ref[0] if n.endswith("attn_q.weight") else ref
        np.testing.assert_allclose(got[n].numpy(), ref, rtol=1e-6)
    assert got["blk.0.attn_q.weight"].shape == (32,) and got["blk.0.ffn_down_exps.weight"].shape == (3, 16)
    assert (got["blk.0.ffn_down_exps.weight"][1] == 1).all()  # unseen expert


def _legacy_bytes(entries: list[tuple[str, int, np.ndarray]], last_chunk: int, dataset: str) -> bytes:
    """The .dat layout written by hand: int32 n; per entry int32 len, name, int32 ncall, int32 nval, f32[nval];
    then int32 chunk count, int32 len, dataset."""
    b = struct.pack("<i", len(entries))
    for name, ncall, vals in entries:
        nb = name.encode()
        b += struct.pack("<i", len(nb)) + nb + struct.pack("<ii", ncall, vals.size) + vals.astype("<f4").tobytes()
    return b + struct.pack("<ii", last_chunk, len(dataset)) + dataset.encode()


def test_legacy_dat_read(tmp_path):
    rng = np.random.default_rng(0)
    q = rng.random(32).astype(np.float32) * 7
    e = rng.random(3 * 16).astype(np.float32)
    p = tmp_path / "im.dat"
    p.write_bytes(_legacy_bytes([("blk.0.attn_q.weight", 7, q), ("blk.0.ffn_down_exps.weight", 4, e)], 7, "d.txt"))
    im = imx.load_imatrix_file(p)
    assert im.chunk_count == 7 and im.datasets == ["d.txt"]
    got = imx.read_imatrix(p, _graph_for(GRAPH_SHAPES))
    # llama-quantize: legacy values / ncall
    np.testing.assert_allclose(got["blk.0.attn_q.weight"].numpy(), q / 7, rtol=1e-6)
    np.testing.assert_allclose(got["blk.0.ffn_down_exps.weight"].numpy(), (e / 4).reshape(3, 16), rtol=1e-6)
    p.write_bytes(p.read_bytes()[:30])
    with pytest.raises(QuantkitError, match="truncated"):
        imx.load_imatrix_file(p)


def test_legacy_dat_written_as_save_imatrix_legacy(tmp_path):
    im = _im()
    p = tmp_path / "im.dat"
    imx.write_imatrix_dat(im, p)
    b = p.read_bytes()
    (n,) = struct.unpack_from("<i", b, 0)
    assert n == 2
    pos, seen = 4, {}
    for _ in range(n):
        (ln,) = struct.unpack_from("<i", b, pos)
        name = b[pos + 4:pos + 4 + ln].decode()
        ncall, nval = struct.unpack_from("<ii", b, pos + 4 + ln)
        vals = np.frombuffer(b, "<f4", nval, pos + 12 + ln)
        seen[name] = (ncall, vals)
        pos += 12 + ln + 4 * nval
    assert struct.unpack_from("<ii", b, pos) == (5, 5) and b[pos + 8:] == b"a.txt"
    # ncall = ceil(max count / chunk_size); value = sum/count * ncall, 1*ncall for an expert with no data
    ncall, vals = seen["blk.0.attn_q.weight"]
    assert ncall == 5
    np.testing.assert_allclose(vals, im.sums["blk.0.attn_q.weight"][0].numpy() / 320 * 5, rtol=1e-6)
    ncall, vals = seen["blk.0.ffn_down_exps.weight"]
    assert ncall == 4
    s = im.sums["blk.0.ffn_down_exps.weight"].numpy()  # counts [200, 0, 77], chunk_size 64 -> ncall 4
    ref = np.stack([s[0] / 200 * 4, np.full(16, 4.0), s[2] / 77 * 4]).reshape(-1)
    np.testing.assert_allclose(vals, ref, rtol=1e-6)
    # read back: llama-quantize's value/ncall gives the same importances as the GGUF file would
    got = imx.read_imatrix(p, _graph_for(GRAPH_SHAPES))
    for n in im.sums:
        want = _quantize_values_gguf(im.sums[n].numpy(), im.counts[n].numpy())
        np.testing.assert_allclose(got[n].numpy().reshape(want.shape), want, rtol=1e-6)


def test_read_imatrix_errors(tmp_path):
    im = _im()
    p = tmp_path / "im.gguf"
    imx.write_imatrix_gguf(im, p)
    with pytest.raises(QuantkitError, match="attn_q.weight.*16 values.*32 input columns|32 values.*16"):
        imx.read_imatrix(p, _graph_for({"blk.0.attn_q.weight": (32, 16)}))
    with pytest.raises(QuantkitError, match="no such file"):
        imx.read_imatrix(tmp_path / "nope.gguf", _graph_for(GRAPH_SHAPES))
    (tmp_path / "bad.dat").write_bytes(b"\x00\x00\x00\x00")
    with pytest.raises(QuantkitError, match="0 entries"):
        imx.read_imatrix(tmp_path / "bad.dat", _graph_for(GRAPH_SHAPES))


def test_cli_imatrix(smol, jargon_text, tmp_path):
    """CLI end to end on a tiny model with SmolLM2's tokenizer: file written atomically, readable, errors."""
    import json

    from click.testing import CliRunner

    from quantkit.cli import cli
    from quantkit.export import convert_to_gguf
    g = _with_smol_tokenizer(load(make_tiny("llama_mha", tmp_path / "m", vocab=SMOL_VOCAB)), smol)
    model = tmp_path / "m.gguf"
    convert_to_gguf(g, model, q="f32", progress=False)
    text = tmp_path / "c.txt"
    text.write_text(jargon_text[:6000])
    out = tmp_path / "im.gguf"
    r = CliRunner().invoke(cli, ["imatrix", str(model), "--calib", str(text), "-o", str(out), "--ctx", "64",
                                 "--chunks", "3", "--json", "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["chunk_count"] == 3 and res["entries"] == 14
    got = imx.read_imatrix(out, load(model))
    assert set(got) == {f"blk.{i}.{s}.weight" for i in range(2) for s in
                        ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    r = CliRunner().invoke(cli, ["imatrix", str(model), "--calib", str(text), "-o", str(out)])
    assert r.exit_code != 0 and "exists" in str(r.exception)
    r = CliRunner().invoke(cli, ["imatrix", str(model), "--calib", str(text), "-o", str(tmp_path / "x.dat"),
                                 "--format", "dat", "--ctx", "4096"])
    assert r.exit_code != 0 and "needs at least 8192" in str(r.exception)
    assert not (tmp_path / "x.dat").exists()
