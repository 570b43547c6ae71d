"""tiktoken rank-file vocabularies (Qwen v1 qwen.tiktoken, Kimi-K2 tiktoken.model) carried into GGUF.

The rank file is made here from a real BPE vocabulary: SmolLM2's merges (from the shared GGUF) turned into
token bytes ranked by merge order, after the 256 single bytes - exactly what a tiktoken file holds. Oracles:

- SmolLM2's own merge list for the merges quantkit recovers from the ranks;
- the `tiktoken` library (tiktoken.Encoding over the same ranks, with the remote code's regex and special
  tokens, written out here from tokenization_qwen.py / tokenization_kimi.py) for the token ids of each text;
- llama.cpp tokenizing with the GGUF quantkit writes for a tiny Qwen v1 / Kimi-K2-shaped (DeepSeek V3) model;
- llama.cpp's convert_hf_to_gguf.py for the GGUF tokenizer metadata, run on the same directory with a stand-in
  for the remote tokenizer class written here on top of tiktoken (the converter imports it through
  AutoTokenizer(trust_remote_code=True); quantkit never does). Its pre-tokenizer name comes from hashing the
  released tokenizers' ids for a check string, which this synthetic vocabulary cannot reproduce: the
  converter's get_vocab_base_pre is patched to return the name it gives the released Qwen / Kimi-K2
  tokenizers ("qwen2", "kimi-k2").

quantkit's calibration tokenizer (calibration/data.token_stream, eval/tokens) must give the same ids.
The regexes: llama.cpp's "qwen2" split is the Qwen v1 pattern, and its "kimi-k2" split is a hand-written
equivalent of tokenization_kimi.py's pattern, so the oracle uses the remote code's regexes as they are.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from quantkit.errors import BadInput

tiktoken = pytest.importorskip("tiktoken")

# tokenization_qwen.py PAT_STR and SPECIAL_START_ID / special tokens
QWEN_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_START = 151643
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
# tokenization_kimi.py pat_str
KIMI_PAT = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
KIMI_NAMED = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>",
              "<|end_header_id|>", "[EOT]", "<|im_system|>", "<|im_middle|>"]

TEXTS = [
    "Hello world! It's a test: we'll see, they've gone; I'M LOUD and SHE'S HERE.",
    "def f(x):\n    return x ** 2  # square\n\n\n\tif (a && b) { c->d[3] = 0x1F; }\n",
    "Grüße aus Köln, naïve café — 我想在apple工作1314151天～ Привет, мир! こんにちは世界 한국어 🚀🦙✅ 😶\u200d🌫️",
    "3 33 333 3333 33333 3.14159 1,000,000 2024-05-06 v1.2.3 1e-9",
    "a  b   c    d\n\n\n  \n \t \t\t x   \r\n\r\n   y     ",
    "HELLOworld helloWORLD ÉCOLE école Ωmega x'S X'LL",
    "     leading spaces and trailing      ",
    "中文字符混合English单词和数字123以及标点。！？",
]
CHAT = "<|im_start|>user\nWhat is a kluge?<|im_end|>\n<|im_start|>assistant\nA clever hack.<|im_end|>\n"


# ---------------------------------------------------------------- the rank file, from SmolLM2's merges

@pytest.fixture(scope="module")
def smol_merges(smollm_gguf) -> list[tuple[bytes, bytes]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    r = gguf.GGUFReader(str(smollm_gguf))
    merges = r.fields["tokenizer.ggml.merges"].contents()
    dec = {c: b for b, c in bytes_to_unicode().items()}
    out = []
    for m in merges:
        a, b = m.split(" ")
        out.append((bytes(dec[c] for c in a), bytes(dec[c] for c in b)))
    return out


@pytest.fixture(scope="module")
def ranks(smol_merges) -> dict[bytes, int]:
    """256 single bytes (ranks 0..255), then each merge's new token in merge order."""
    out = {bytes([b]): b for b in range(256)}
    for a, b in smol_merges:
        out.setdefault(a + b, len(out))
    assert len(out) > 49000
    return out


def rank_file(ranks: dict[bytes, int]) -> str:
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())


def test_recovered_merges_are_smollm_merges(ranks, smol_merges, tmp_path):
    """The merges recovered from the ranks are SmolLM2's own merges (those that made a new token)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from quantkit.formats.tiktoken_vocab import read_ranks, recover_merges, token_text
    p = tmp_path / "qwen.tiktoken"
    p.write_text(rank_file(ranks))
    got = read_ranks(p)
    assert got == ranks and list(got) == list(ranks)
    enc = bytes_to_unicode()
    to_str = lambda b: "".join(enc[x] for x in b)  # noqa: E731
    assert all(token_text(t) == to_str(t) for t in list(ranks)[:2000])
    seen, want = set(), []
    for a, b in smol_merges:
        if a + b not in seen:
            seen.add(a + b)
            want.append(f"{to_str(a)} {to_str(b)}")
    assert recover_merges(got, p, strict=True) == want


# ---------------------------------------------------------------- model directories

def qwen_dir(root: Path, ranks) -> Path:
    from test_remote_families import qwen_ckpt
    d = qwen_ckpt(root / "qwen", vocab=151936, hidden=32, heads=2, layers=1, mlp=32)
    (d / "qwen.tiktoken").write_text(rank_file(ranks))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}))
    return d


def kimi_dir(root: Path, ranks) -> Path:
    from test_deepseek import make_tiny_deepseek
    n = len(ranks)
    vocab = (n + 256 + 255) // 256 * 256
    d = make_tiny_deepseek("v3_plain_rope", root / "kimi", vocab=vocab)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(bos_token_id=n, eos_token_id=n + 1)  # Kimi-K2's config.json: [BOS] / [EOS]
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tiktoken.model").write_text(rank_file(ranks))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(n + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                              "single_word": False, "special": True}
                                 for i, t in enumerate(KIMI_NAMED)},
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "additional_special_tokens": KIMI_NAMED[2:], "tokenizer_class": "TikTokenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "chat_template": "{% for m in messages %}<|im_{{ m['role'] }}|>{{ m['content'] }}<|im_end|>{% endfor %}"}))
    return d


def oracle(kind: str, ranks) -> tiktoken.Encoding:
    if kind == "qwen":
        specials = {t: QWEN_START + i for i, t in enumerate(QWEN_SPECIAL)}
        return tiktoken.Encoding("qwen", pat_str=QWEN_PAT, mergeable_ranks=ranks, special_tokens=specials)
    n = len(ranks)
    specials = {t: n + i for i, t in enumerate(KIMI_NAMED)}
    specials.update({f"<|reserved_token_{i}|>": i for i in range(n + len(KIMI_NAMED), n + 256)})
    return tiktoken.Encoding("kimi", pat_str=KIMI_PAT, mergeable_ranks=ranks, special_tokens=specials)


def texts(jargon_text: str) -> list[str]:
    return TEXTS + [jargon_text[10_000:30_000]]


@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["qwen", "kimi"])
def test_gguf_and_calibration_tokenize_like_tiktoken(kind, ranks, jargon_text, tmp_path):
    """tiktoken == llama.cpp on quantkit's GGUF == quantkit's calibration tokenizer, for every text."""
    from oracles.llamacpp_tok import load_vocab
    from quantkit.calibration.data import token_stream
    from quantkit.export import convert_to_gguf
    from quantkit.families import load

    d = (qwen_dir if kind == "qwen" else kimi_dir)(tmp_path, ranks)
    enc = oracle(kind, ranks)
    g = load(d)
    out = tmp_path / f"{kind}.gguf"
    convert_to_gguf(g, out, q="f32", progress=False)
    kv = {n: f.contents() for n, f in gguf.GGUFReader(str(out)).fields.items() if n.startswith("tokenizer.")}
    assert kv["tokenizer.ggml.model"] == "gpt2"
    assert kv["tokenizer.ggml.pre"] == {"qwen": "qwen2", "kimi": "kimi-k2"}[kind]
    docs = texts(jargon_text) + [CHAT if kind == "qwen" else CHAT.replace("<|im_start|>", "<|im_user|>")]
    want = [enc.encode(t, allowed_special="all") for t in docs]
    assert sum(map(len, want)) > 4000
    with load_vocab(out) as v:
        for t, w in zip(docs, want):
            assert v.tokenize(t, add_special=False, parse_special=True) == w, t[:60]
            assert v.detokenize(w) == t
    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    ids, bos = token_stream(g, calib)
    sep = kv["tokenizer.ggml.eos_token_id"]
    joined = [i for k, w in enumerate(want) for i in ([sep] if k else []) + w]
    assert bos is None and ids == joined
    from quantkit.eval.tokens import encode  # perplexity's tokenizer
    assert encode(g, docs[2]) == (want[2], None)


@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["qwen", "kimi"])
def test_tokenizer_metadata_matches_llamacpp_converter(kind, ranks, tmp_path, llamacpp_src):
    """tokenizer.* metadata of quantkit's GGUF == llama.cpp's converter's on the same directory."""
    from quantkit.export import convert_to_gguf
    from quantkit.families import load
    d = (qwen_dir if kind == "qwen" else kimi_dir)(tmp_path, ranks)
    (d / ("tokenization_qwen.py" if kind == "qwen" else "tokenization_kimi.py")).write_text(STAND_IN[kind])
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    convert_to_gguf(load(d), ours, q="f32", progress=False)
    run_converter(llamacpp_src, d, theirs, {"qwen": "qwen2", "kimi": "kimi-k2"}[kind])
    ka, kb = ({n: f.contents() for n, f in gguf.GGUFReader(str(p)).fields.items() if n.startswith("tokenizer.")}
              for p in (ours, theirs))
    assert sorted(ka) == sorted(kb)
    for k in kb:
        assert ka[k] == kb[k], k


# ---------------------------------------------------------------- the converter with stand-in remote code

_STAND_IN_COMMON = '''
import base64
import tiktoken
from transformers import PreTrainedTokenizer


def _load(path):
    out = {}
    for line in open(path, "rb").read().splitlines():
        if line:
            t, r = line.split()
            out[base64.b64decode(t)] = int(r)
    return out
'''

STAND_IN = {
    "qwen": _STAND_IN_COMMON + f'''
PAT = {QWEN_PAT!r}
SPECIAL = {QWEN_SPECIAL!r}


class QWenTokenizer(PreTrainedTokenizer):
    vocab_files_names = {{"vocab_file": "qwen.tiktoken"}}

    def __init__(self, vocab_file, **kw):
        self.mergeable_ranks = _load(vocab_file)
        self.special_tokens = {{t: {QWEN_START} + i for i, t in enumerate(SPECIAL)}}
        self.tokenizer = tiktoken.Encoding("Qwen", pat_str=PAT, mergeable_ranks=self.mergeable_ranks,
                                           special_tokens=self.special_tokens)
        super().__init__(**kw)

    def get_vocab(self):
        return self.mergeable_ranks

    @property
    def vocab_size(self):
        return self.tokenizer.n_vocab
''',
    "kimi": _STAND_IN_COMMON + f'''
PAT = {KIMI_PAT!r}


class TikTokenTokenizer(PreTrainedTokenizer):
    vocab_files_names = {{"vocab_file": "tiktoken.model"}}

    def __init__(self, vocab_file, added_tokens_decoder=None, **kw):
        ranks = _load(vocab_file)
        names = {{int(i): (t.content if hasattr(t, "content") else t["content"])
                 for i, t in (added_tokens_decoder or {{}}).items()}}
        n = len(ranks)
        self.special_tokens = {{names.get(i, f"<|reserved_token_{{i}}|>"): i for i in range(n, n + 256)}}
        self.model = tiktoken.Encoding("kimi", pat_str=PAT, mergeable_ranks=ranks, special_tokens=self.special_tokens)
        super().__init__(added_tokens_decoder=added_tokens_decoder, **kw)

    def get_vocab(self):
        return {{**self.model._mergeable_ranks, **self.special_tokens}}

    @property
    def vocab_size(self):
        return self.model.n_vocab
''',
}

def run_converter(src: Path, d: Path, out: Path, pre: str) -> None:
    """convert_hf_to_gguf.py on d, its check-string hash lookup replaced by the released tokenizer's name.
    transformers' bytes_to_unicode gets a cache (the converter calls it once per token: minutes otherwise)."""
    script = (
        "import functools, runpy, sys\n"
        "import transformers.convert_slow_tokenizer as cst\n"
        "cst.bytes_to_unicode = functools.lru_cache(None)(cst.bytes_to_unicode)\n"
        f"sys.path.insert(0, {str(src)!r})\n"
        "from conversion import base\n"
        f"base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}\n"
        f"sys.argv = ['convert_hf_to_gguf.py', {str(d)!r}, '--outtype', 'f32', '--outfile', {str(out)!r}]\n"
        f"runpy.run_path({str(src / 'convert_hf_to_gguf.py')!r}, run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


# ---------------------------------------------------------------- bad input

def test_bad_rank_files(ranks, tmp_path):
    from quantkit.formats.gguf_tokenizer import tokenizer_kv
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["QWenLMHeadModel"], "vocab_size": 151936}))
    cases = [
        ("not base64 at all\n", "line 1 is not 'base64-token rank'"),
        ("QQ== 0\nQQ== 1\n", "line 2 repeats a token"),
        ("QQ== 0\n", "byte 0x00 has no token"),
        ("", "holds no tokens"),
    ]
    for text, msg in cases:
        (d / "qwen.tiktoken").write_text(text)
        with pytest.raises(BadInput) as e:
            tokenizer_kv(d, 151936)
        assert "qwen.tiktoken" in str(e.value) and msg in str(e.value) and "\n" not in str(e.value)
    (d / "qwen.tiktoken").write_text(rank_file(ranks))
    with pytest.raises(BadInput, match="does not fit config.json vocab_size 1000"):
        tokenizer_kv(d, 1000)
    big = dict(ranks)
    big[b"\xff\xfe\xfd"] = QWEN_START  # a rank where Qwen's <|endoftext|> goes
    (d / "qwen.tiktoken").write_text(rank_file(big))
    with pytest.raises(BadInput, match="collides with Qwen's special tokens"):
        tokenizer_kv(d, 151936)
    shutil.rmtree(d)


def test_qwen_v1_reads_qwen_tiktoken_even_with_tokenizer_json(ranks, tmp_path):
    """llama.cpp's converter reads Qwen v1 through its tiktoken tokenizer whatever else the folder holds."""
    from quantkit.formats.gguf_tokenizer import tokenizer_kv
    d = tmp_path / "q"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["QWenLMHeadModel"], "vocab_size": 151936}))
    (d / "qwen.tiktoken").write_text(rank_file(ranks))
    (d / "tokenizer.json").write_text("{}")
    kv = {k.key: k.value for k in tokenizer_kv(d, 151936)}
    assert kv["tokenizer.ggml.pre"] == "qwen2" and kv["tokenizer.ggml.tokens"][QWEN_START] == "<|endoftext|>"
    assert kv["tokenizer.ggml.tokens"][QWEN_START + 10] == "<|extra_7|>"
    assert kv["tokenizer.ggml.token_type"][QWEN_START + 10] == gguf.TokenType.CONTROL
    assert kv["tokenizer.ggml.token_type"][len(ranks)] == gguf.TokenType.UNUSED
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"],
            kv["tokenizer.ggml.unknown_token_id"]) == (QWEN_START,) * 3
