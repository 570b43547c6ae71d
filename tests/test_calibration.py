"""Calibration data: every source type, chat rendering vs transformers' apply_chat_template (the oracle),
token ids vs transformers' tokenizer, windows, determinism, and the error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantkit.calibration.data import load_calibration, read_documents, token_stream
from quantkit.errors import QuantkitError
from quantkit.families import load
from quantkit.graph import Graph, HParams, Tokenizer

EOS = 2  # SmolLM2's <|im_end|>

DOCS = ["The quick brown fox jumps over the lazy dog.", "Hacker slang: a kludge is a clever fix.",
        "Third document, with unicode: naïve café."]
CHATS = [[{"role": "user", "content": "What is a kludge?"}, {"role": "assistant", "content": "A hack."}],
         [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi <b>\"there\"</b>"}]]


@pytest.fixture(scope="module")
def smol(smollm_gguf) -> Graph:
    return load(smollm_gguf)


@pytest.fixture(scope="module")
def smol_hf_dir(smollm_gguf, tmp_path_factory) -> Path:
    from quantkit.formats.hf_tokenizer import read_gguf_kv, write_hf_tokenizer
    out = tmp_path_factory.mktemp("smol_hf")
    write_hf_tokenizer(read_gguf_kv(smollm_gguf), out)
    (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
                                                 "bos_token_id": 1, "eos_token_id": EOS}))
    return out


@pytest.fixture(scope="module")
def tf_tok(smol_hf_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smol_hf_dir))


@pytest.fixture(scope="module")
def hf_graph(smol_hf_dir) -> Graph:
    hp = HParams(arch="llama", vocab_size=49152, hidden_size=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8,
                 ffn_size=8)
    return Graph(hp, {}, Tokenizer(hf_dir=smol_hf_dir), source=str(smol_hf_dir), source_format="hf")


def _ids(tf_tok, text: str) -> list[int]:
    return tf_tok(text, add_special_tokens=False)["input_ids"]


def _joined(tf_tok, docs: list[str]) -> list[int]:
    out: list[int] = []
    for k, d in enumerate(docs):
        out += ([EOS] if k else []) + _ids(tf_tok, d)
    return out


def _write_jsonl(p: Path, recs) -> Path:
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return p


def test_txt_is_one_document(smol, tf_tok, tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("\n\n".join(DOCS))
    ids, bos = token_stream(smol, p)
    assert bos is None and ids == _ids(tf_tok, "\n\n".join(DOCS))


def test_jsonl_text_documents_joined_with_eos(smol, tf_tok, tmp_path):
    p = _write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in DOCS])
    ids, _ = token_stream(smol, p)
    assert ids == _joined(tf_tok, DOCS)


@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_chat_matches_apply_chat_template(source, smol, hf_graph, tf_tok, tmp_path):
    g = smol if source == "gguf" else hf_graph
    p = _write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in CHATS])
    docs = read_documents(g, p)
    assert docs == [tf_tok.apply_chat_template(m, tokenize=False) for m in CHATS]
    assert docs[0].startswith("<|im_start|>system\nYou are a helpful AI assistant")  # the template's default
    ids, _ = token_stream(g, p)
    want = [tf_tok.apply_chat_template(m, tokenize=True) for m in CHATS]
    want = [w["input_ids"] if isinstance(w, dict) or hasattr(w, "keys") else w for w in want]
    assert ids == want[0] + [EOS] + want[1]
    assert ids.count(tf_tok.convert_tokens_to_ids("<|im_start|>")) == 5  # special tokens became their ids


def test_parquet_and_arrow_and_folders(smol, tf_tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    want = _joined(tf_tok, DOCS)
    table = pa.table({"text": DOCS, "id": [1, 2, 3]})
    pq.write_table(table, tmp_path / "d.parquet")
    assert token_stream(smol, tmp_path / "d.parquet")[0] == want
    # datasets.save_to_disk layout: arrow stream shards named in state.json
    ds = tmp_path / "ds"
    ds.mkdir()
    for k, part in enumerate((DOCS[:2], DOCS[2:])):
        with pa.OSFile(str(ds / f"data-0000{k}-of-00002.arrow"), "wb") as f, \
                pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(pa.table({"text": part, "id": list(range(len(part)))}))
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00002.arrow"},
                                                               {"filename": "data-00001-of-00002.arrow"}]}))
    (ds / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    assert token_stream(smol, ds)[0] == want
    # DatasetDict: the train split is used
    dd = tmp_path / "dd"
    (dd / "test").mkdir(parents=True)
    ds.rename(dd / "train")
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "train"]}))
    assert token_stream(smol, dd)[0] == want
    # a plain folder of jsonl/parquet files, in name order
    fo = tmp_path / "fo"
    fo.mkdir()
    _write_jsonl(fo / "a.jsonl", [{"text": DOCS[0]}])
    pq.write_table(pa.table({"text": DOCS[1:]}), fo / "b.parquet")
    assert token_stream(smol, fo)[0] == want


def test_windows_disjoint_and_deterministic(smol, jargon_text, tmp_path):
    p = tmp_path / "j.txt"
    p.write_text(jargon_text[:30000])
    stream, _ = token_stream(smol, p)
    a = load_calibration(smol, p, n_samples=8, seqlen=64, seed=1)
    b = load_calibration(smol, p, n_samples=8, seqlen=64, seed=1)
    c = load_calibration(smol, p, n_samples=8, seqlen=64, seed=2)
    assert len(a) == 8 and all(w.dtype == torch.long and w.shape == (64,) for w in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    s = torch.tensor(stream)
    starts = []
    for w in a:  # each window is a slice of the stream; slices do not overlap
        hits = [i for i in range(len(stream) - 63) if torch.equal(s[i:i + 64], w)]
        assert hits, "window is not a slice of the token stream"
        starts.append(hits[0])
    starts.sort()
    assert all(b_ - a_ >= 64 for a_, b_ in zip(starts, starts[1:]))


def test_bos_at_each_window_when_vocab_adds_one(smol, tmp_path):
    import dataclasses
    kv = dict(smol.tokenizer.gguf_kv, **{"tokenizer.ggml.add_bos_token": True})
    g = dataclasses.replace(smol, tokenizer=Tokenizer(gguf_kv=kv))
    p = tmp_path / "a.txt"
    p.write_text(" ".join(DOCS * 20))
    ids, bos = token_stream(g, p)
    assert bos == 1 and ids[0] == 1
    ws = load_calibration(g, p, n_samples=3, seqlen=32)
    assert all(int(w[0]) == 1 for w in ws)


def test_errors(smol, tmp_path):
    with pytest.raises(QuantkitError, match="--calib is required"):
        load_calibration(smol, None)
    with pytest.raises(QuantkitError, match="nope.txt: no such file"):
        load_calibration(smol, tmp_path / "nope.txt")
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n\n{"text": broken}\n')
    with pytest.raises(QuantkitError, match=r"bad.jsonl: line 3: not valid JSON"):
        load_calibration(smol, p)
    _write_jsonl(tmp_path / "k.jsonl", [{"body": "x"}])
    with pytest.raises(QuantkitError, match=r"line 1: expected an object with a 'text'"):
        load_calibration(smol, tmp_path / "k.jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["a"], "n": [1]}), tmp_path / "x.parquet")
    with pytest.raises(QuantkitError, match=r"x.parquet: no 'text' column \(columns: content, n\)"):
        load_calibration(smol, tmp_path / "x.parquet")
    (tmp_path / "s.txt").write_text("a few words only")
    with pytest.raises(QuantkitError, match=r"s.txt: 4 tokens, but 128 samples of 512 tokens need 65536"):
        load_calibration(smol, tmp_path / "s.txt")
    (tmp_path / "b.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(QuantkitError, match="not UTF-8"):
        load_calibration(smol, tmp_path / "b.txt")
    _write_jsonl(tmp_path / "m.jsonl", [{"messages": CHATS[0]}])
    no_template = Graph(smol.hparams, {}, Tokenizer(gguf_kv={k: v for k, v in smol.tokenizer.gguf_kv.items()
                                                            if k != "tokenizer.chat_template"}), source="m")
    with pytest.raises(QuantkitError, match="line 1: 'messages' needs a chat template"):
        load_calibration(no_template, tmp_path / "m.jsonl")
