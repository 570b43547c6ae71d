"""Tokenizer carry-over HF <-> GGUF, checked against llama.cpp (vocab-only loads), sentencepiece, transformers
and gguf-py's own vocab classes.

Text choice: the SmolLM2 ("smollm") and the other pre-tokenizers tested here split the Jargon File, blank-line
space runs included, identically in llama.cpp and the `tokenizers` library, so contiguous slices are compared
as they are (no filtering); a mismatch anywhere fails the test.
"""

from __future__ import annotations

import json
import struct
from hashlib import sha256
from pathlib import Path

import gguf
import pytest

from quantkit.errors import QuantkitError
from quantkit.formats import gguf_tokenizer as gt
from quantkit.formats.gguf_tokenizer import parse_sentencepiece_model, tokenizer_kv
from quantkit.formats.hf_tokenizer import build_hf_tokenizer, read_gguf_kv, write_hf_tokenizer

TT = gguf.TokenType
VT = gguf.GGUFValueType
CHAT = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is a kluge?<|im_end|>\n"
        "<|im_start|>assistant\nA clever hack.<|im_end|>\n")


# ---------------------------------------------------------------- helpers

def _write_vocab_gguf(path: Path, base: gguf.GGUFReader, tok_kvs, *, override: dict | None = None,
                      drop: tuple[str, ...] = ()) -> None:
    """GGUF with the base model's non-tokenizer metadata + the given tokenizer KVs, no tensors (vocab_only)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for name, f in base.fields.items():
        if name.startswith(("GGUF.", "tokenizer.")) or name in ("general.architecture", "llama.vocab_size"):
            continue
        w.add_key_value(name, f.contents(), f.types[0], f.types[-1] if f.types[0] == VT.ARRAY else None)
    for kv in tok_kvs:
        if kv.key in drop:
            continue
        value = (override or {}).get(kv.key, kv.value)
        w.add_key_value(kv.key, value, kv.type, kv.sub_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def _reader_kvs(reader: gguf.GGUFReader):
    """The tokenizer.* fields of a GGUF as TokenizerKV entries (to rewrite them unchanged or edited)."""
    return [gt.TokenizerKV(n, f.contents(), f.types[0], f.types[-1] if f.types[0] == VT.ARRAY else None)
            for n, f in reader.fields.items() if n.startswith("tokenizer.")]


def _first_diff(a: list[int], b: list[int]) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"lengths {len(a)} vs {len(b)}, first difference at {i}: {a[i:i + 6]} vs {b[i:i + 6]}"


@pytest.fixture(scope="module")
def smol_reader(smollm_gguf) -> gguf.GGUFReader:
    return gguf.GGUFReader(str(smollm_gguf))


@pytest.fixture(scope="module")
def smol_kv(smollm_gguf) -> dict:
    kv = read_gguf_kv(smollm_gguf)
    assert kv["tokenizer.ggml.model"] == "gpt2" and len(kv["tokenizer.ggml.tokens"]) == 49152
    return kv


@pytest.fixture(scope="module")
def smol_hf_dir(smol_kv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol_hf")
    write_hf_tokenizer(smol_kv, out)
    # the model config a GGUF->HF conversion writes next to the tokenizer (SmolLM2 is LlamaForCausalLM)
    (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
                                                 "bos_token_id": 1, "eos_token_id": 2}))
    return out


# ---------------------------------------------------------------- real model: GGUF -> HF -> GGUF

@pytest.mark.slow
@pytest.mark.llamacpp
def test_hf_tokenizer_from_gguf_matches_llamacpp(smollm_gguf, smol_hf_dir, jargon_text):
    from oracles.llamacpp_tok import load_vocab
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    text = jargon_text[:400_000]
    hf = Tokenizer.from_file(str(smol_hf_dir / "tokenizer.json"))
    tf = AutoTokenizer.from_pretrained(str(smol_hf_dir))
    with load_vocab(smollm_gguf) as ref:
        want = ref.tokenize(text)
        assert len(want) > 90_000
        got = hf.encode(text).ids
        assert got == want, _first_diff(got, want)
        assert tf(text)["input_ids"] == want
        assert tf.decode(want) == text
        # chat template rendered by transformers -> same ids as llama.cpp parsing the specials
        msgs = [{"role": "user", "content": "What is a kluge?"}]
        rendered = tf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
        ids = tf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        assert ids == ref.tokenize(rendered, add_special=True, parse_special=True)
        assert hf.encode(CHAT).ids == ref.tokenize(CHAT)
    assert (tf.bos_token, tf.eos_token, tf.unk_token, tf.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>")


@pytest.mark.slow
@pytest.mark.llamacpp
def test_tokenizer_kv_roundtrip_equals_original_gguf(smollm_gguf, smol_reader, smol_hf_dir, jargon_text, tmp_path):
    from oracles.llamacpp_tok import llama_cpp, load_vocab

    kvs = tokenizer_kv(smol_hf_dir, 49152)
    ours = {kv.key: kv for kv in kvs}
    orig = {n: f for n, f in smol_reader.fields.items() if n.startswith("tokenizer.")}
    assert ours["tokenizer.ggml.pre"].value == "smollm"  # found through the check-string hash
    for name, field in orig.items():
        assert name in ours, f"missing {name}"
        assert ours[name].value == field.contents(), name
        assert ours[name].type == field.types[0], name
        if field.types[0] == VT.ARRAY:
            assert ours[name].sub_type == field.types[-1], name
    # the only extra key is one that restates llama.cpp's BPE default
    assert {k: kv.value for k, kv in ours.items() if k not in orig} == {"tokenizer.ggml.add_eos_token": False}

    path = tmp_path / "vocab.gguf"
    _write_vocab_gguf(path, smol_reader, kvs)
    text = jargon_text[400_000:700_000]
    with load_vocab(smollm_gguf) as ref, load_vocab(path) as new:
        assert new.n_tokens == ref.n_tokens == 49152
        for s in (text, CHAT, CHAT + text[:3000]):
            for add_special, parse_special in ((True, True), (False, False), (True, False)):
                a, b = new.tokenize(s, add_special, parse_special), ref.tokenize(s, add_special, parse_special)
                assert a == b, _first_diff(a, b)
        assert new.tokenize("<|im_start|>user")[0] == 1
        ids = ref.tokenize(text[:20000])
        assert new.detokenize(ids) == ref.detokenize(ids) == text[:20000]
        attrs = [llama_cpp.llama_vocab_get_attr(new.vocab, i) for i in range(49152)]
        assert attrs == [llama_cpp.llama_vocab_get_attr(ref.vocab, i) for i in range(49152)]


# ---------------------------------------------------------------- pre-tokenizer regexes vs llama.cpp

@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "llama-bpe", "qwen2", "qwen35", "default", "olmo", "dbrx",
                                 "tekken", "gpt-4o", "kimi-k2"])
def test_pre_tokenizer_matches_llamacpp(pre, smol_reader, smol_kv, jargon_text, tmp_path):
    """The SmolLM2 vocab re-labelled with another pre type: llama.cpp and our HF tokenizer must split alike."""
    from oracles.llamacpp_tok import load_vocab

    # without the key, llama.cpp's per-pre add_bos default applies (True for llama-bpe and tekken)
    drop = ("tokenizer.ggml.add_bos_token",) if pre in ("llama-bpe", "tekken", "qwen2") else ()
    path = tmp_path / "pre.gguf"
    _write_vocab_gguf(path, smol_reader, _reader_kvs(smol_reader), override={"tokenizer.ggml.pre": pre}, drop=drop)
    kv = {n: v for n, v in smol_kv.items() if n not in drop}
    kv["tokenizer.ggml.pre"] = pre
    hf = build_hf_tokenizer(kv)
    with load_vocab(path) as ref:
        assert ref.add_bos() == (pre in ("llama-bpe", "tekken"))
        for s in (jargon_text[800_000:860_000], gt.CHKTXT, "x  \n\n   \n\t\t y 1234567 a'LL <|im_end|>"):
            want, got = ref.tokenize(s), hf.encode(s).ids
            assert got == want, _first_diff(got, want)


# ---------------------------------------------------------------- synthetic byte-level BPE (HF -> GGUF)

def _train_bpe(text: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(), trainer)
    tok.add_special_tokens([AddedToken("<|sys|>", special=True, normalized=False)])
    tok.add_tokens([AddedToken("<note>", special=False, normalized=False),
                    AddedToken("<|tool|>", special=False, normalized=False)])
    return tok


@pytest.mark.llamacpp
def test_synthetic_bpe_to_gguf_matches_hf(smol_reader, jargon_text, tmp_path, monkeypatch):
    from oracles.llamacpp_tok import load_vocab

    tok = _train_bpe(jargon_text[:150_000])
    d = tmp_path / "hf"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|sys|>",
                                                         "chat_template": "{{ messages }}"}))
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    vocab_size = n_tok + 5  # embedding rows beyond the tokenizer, padded as llama.cpp does

    # an unseen tokenizer: llama.cpp refuses it, naming the hash
    with pytest.raises(QuantkitError, match="pre-tokenizer not recognized"):
        tokenizer_kv(d, vocab_size)
    # register its hash (computed here, as llama.cpp's update script would) under the GPT-2 regex
    chkhsh = sha256(str(tok.encode(gt.CHKTXT).ids).encode()).hexdigest()
    monkeypatch.setitem(gt.PRE_BY_HASH, chkhsh, "gpt-2")
    kvs = {kv.key: kv for kv in tokenizer_kv(d, vocab_size)}

    tokens, types = kvs["tokenizer.ggml.tokens"].value, kvs["tokenizer.ggml.token_type"].value
    assert len(tokens) == len(types) == vocab_size
    assert tokens[n_tok:] == [f"[PAD{i}]" for i in range(n_tok, vocab_size)]
    assert set(types[n_tok:]) == {TT.UNUSED}
    by_text = dict(zip(tokens, types))
    assert by_text["<|endoftext|>"] == by_text["<|sys|>"] == TT.CONTROL
    assert by_text["<|tool|>"] == TT.CONTROL  # looks special (<|...|>) though not marked special
    assert by_text["<note>"] == TT.USER_DEFINED
    assert kvs["tokenizer.ggml.merges"].value == [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    assert kvs["tokenizer.ggml.eos_token_id"].value == tok.token_to_id("<|endoftext|>")
    assert kvs["tokenizer.ggml.bos_token_id"].value == tok.token_to_id("<|sys|>")
    assert kvs["tokenizer.chat_template"].value == "{{ messages }}"

    path = tmp_path / "syn.gguf"
    _write_vocab_gguf(path, smol_reader, kvs.values())
    text = jargon_text[200_000:230_000] + " <note> x<|sys|>y <|endoftext|>"
    with load_vocab(path) as ref:
        want = tok.encode(text).ids
        got = ref.tokenize(text, add_special=False, parse_special=True)
        assert got == want, _first_diff(got, want)


# ---------------------------------------------------------------- SentencePiece

def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_field(num: int, wire: int, payload: bytes) -> bytes:
    return _pb_varint(num << 3 | wire) + payload


def _pb_piece(piece: str, score: float | None, ptype: int | None) -> bytes:
    body = _pb_field(1, 2, _pb_varint(len(piece.encode())) + piece.encode())
    if score is not None:
        body += _pb_field(2, 5, struct.pack("<f", score))
    if ptype is not None:
        body += _pb_field(3, 0, _pb_varint(ptype))
    return _pb_field(1, 2, _pb_varint(len(body)) + body)


def test_sentencepiece_proto_parser_hand_built():
    inner = _pb_field(3, 0, _pb_varint(300))
    trainer_spec = _pb_field(2, 2, _pb_varint(len(inner)) + inner)  # other ModelProto fields are skipped
    data = (_pb_piece("<unk>", 0.0, 2) + trainer_spec + _pb_piece("<s>", None, 3) + _pb_piece("\u2581the", -1.5, None)
            + _pb_piece("<0x0A>", 0.0, 6) + _pb_piece("ü", -1e4, 5) + _pb_field(5, 1, b"\0" * 8))
    assert parse_sentencepiece_model(data) == [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("\u2581the", -1.5, 1),
                                               ("<0x0A>", 0.0, 6), ("ü", -1e4, 5)]
    with pytest.raises(QuantkitError, match="tokenizer.model"):
        parse_sentencepiece_model(data[:-3] + b"\x0a\xff")


@pytest.fixture(scope="module")
def spm_dir(jargon_text, tmp_path_factory) -> Path:
    spm = pytest.importorskip("sentencepiece")
    import io

    buf = io.BytesIO()
    lines = [line for line in jargon_text[:300_000].splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=800, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=["<ctl>"], minloglevel=2, num_threads=1)
    d = tmp_path_factory.mktemp("spm")
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 832,
                                               "bos_token_id": 1, "eos_token_id": 2}))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "added_tokens_decoder": {"800": {"content": "<tool>", "special": False},
                                 "801": {"content": "<|eot|>", "special": True}}}))
    return d


def test_sentencepiece_vocab_matches_sentencepiece(spm_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    pieces = parse_sentencepiece_model((spm_dir / "tokenizer.model").read_bytes())
    assert [p for p, _, _ in pieces] == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert [s for _, s, _ in pieces] == [sp.get_score(i) for i in range(sp.vocab_size())]

    kvs = {kv.key: kv.value for kv in tokenizer_kv(spm_dir, 832)}
    assert kvs["tokenizer.ggml.model"] == "llama" and kvs["tokenizer.ggml.pre"] == "default"
    tokens, types = kvs["tokenizer.ggml.tokens"], kvs["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == len(kvs["tokenizer.ggml.scores"]) == 832
    for i in range(sp.vocab_size()):
        want = (TT.UNKNOWN if sp.is_unknown(i) else TT.CONTROL if sp.is_control(i) else TT.UNUSED if sp.is_unused(i)
                else TT.BYTE if sp.is_byte(i) else TT.NORMAL)
        assert types[i] == want, (i, tokens[i])
    assert (tokens[800], types[800]) == ("<tool>", TT.USER_DEFINED)
    assert (tokens[801], types[801]) == ("<|eot|>", TT.CONTROL)
    assert tokens[802:] == [f"[PAD{i}]" for i in range(802, 832)] and set(types[802:]) == {TT.UNUSED}
    assert (kvs["tokenizer.ggml.bos_token_id"], kvs["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert kvs["tokenizer.ggml.add_bos_token"] is True and kvs["tokenizer.ggml.add_eos_token"] is False


@pytest.mark.llamacpp
def test_sentencepiece_gguf_tokenizes_like_sentencepiece(spm_dir, smol_reader, jargon_text, tmp_path):
    import sentencepiece as spm
    from oracles.llamacpp_tok import load_vocab

    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    path = tmp_path / "spm.gguf"
    _write_vocab_gguf(path, smol_reader, tokenizer_kv(spm_dir, 832))
    with load_vocab(path) as ref:
        assert ref.add_bos()
        for s in (jargon_text[300_000:340_000], "Hello  world x\n\n  \ty \u65e5\u672c\u8a9e \u00fc \U0001f600 end"):
            want = [sp.bos_id()] + sp.encode(s)
            got = ref.tokenize(s, add_special=True, parse_special=False)
            assert got == want, _first_diff(got, want)
        assert ref.tokenize("a<|eot|>b", add_special=False, parse_special=True)[1] == 801
        assert 800 in ref.tokenize("x <tool> y", add_special=False, parse_special=False)  # user-defined: always


# ---------------------------------------------------------------- llama_hf path and SpecialVocab vs gguf-py

def test_llama_hf_vocab_matches_gguf_py(jargon_text, tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(jargon_text[:100_000].splitlines(),
                            trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    tok.add_tokens([AddedToken("<extra>", special=False)])
    tok.add_special_tokens([AddedToken("<|ctl|>", special=True)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "additional_special_tokens": ["<|ctl|>"]}))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 402}))

    kvs = {kv.key: kv.value for kv in tokenizer_kv(tmp_path, 402)}
    ref = list(gguf.LlamaHfVocab(tmp_path).all_tokens())
    assert kvs["tokenizer.ggml.model"] == "llama"
    assert kvs["tokenizer.ggml.tokens"] == [t.decode() for t, _, _ in ref]
    assert kvs["tokenizer.ggml.scores"] == [s for _, s, _ in ref]
    assert kvs["tokenizer.ggml.token_type"] == [int(t) for _, _, t in ref]
    assert TT.BYTE in kvs["tokenizer.ggml.token_type"]


def test_special_vocab_matches_gguf_py(tmp_path):
    from tokenizers import Tokenizer, models, processors

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "a": 3, "b": 4, "ab": 5}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": {"content": "<pad>"}, "add_bos_token": True,
        "add_eos_token": True, "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}))
    (tmp_path / "config.json").write_text(json.dumps({"unk_token_id": 4, "pad_token_id": 3}))

    ours = {kv.key: kv.value for kv in gt._special_vocab(tmp_path, 6, load_merges=True)}
    ref = gguf.SpecialVocab(tmp_path, load_merges=True, n_vocab=6)
    K = gguf.Keys.Tokenizer
    assert ours[K.MERGES] == ref.merges == ["a b"]
    want_ids = {gt._ID_KEYS[t]: i for t, i in ref.special_token_ids.items()}
    assert {k: v for k, v in ours.items() if k.endswith("_token_id")} == want_ids
    # config.json's pad id loses to tokenizer_config; the pair template's "</s> </s>" makes </s> the separator
    assert want_ids == {K.BOS_ID: 0, K.EOS_ID: 1, K.PAD_ID: 2, K.UNK_ID: 4, K.SEP_ID: 1}
    assert {k: v for k, v in ours.items() if k.startswith("tokenizer.ggml.add_")} == {
        gt._ADD_KEYS[t]: v for t, v in ref.add_special_token.items()}
    assert ours[K.CHAT_TEMPLATE] == ref.chat_template


# ---------------------------------------------------------------- errors

def test_errors(tmp_path):
    with pytest.raises(QuantkitError, match="tokenizer.model and tokenizer.json"):
        tokenizer_kv(tmp_path, 100)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(QuantkitError, match="tokenizer.json"):
        tokenizer_kv(tmp_path, 100)
    with pytest.raises(QuantkitError, match="only 'gpt2'"):
        write_hf_tokenizer({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}, tmp_path / "o")
    with pytest.raises(QuantkitError, match="tokenizer.ggml.pre"):
        build_hf_tokenizer({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"],
                            "tokenizer.ggml.pre": "chatglm-bpe"})

