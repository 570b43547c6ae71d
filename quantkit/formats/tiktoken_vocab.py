"""tiktoken BPE rank files -> GGUF "gpt2" (byte-level BPE) vocabularies, without running any remote code.

Kimi-K2 (`tiktoken.model`, tokenization_kimi.py) and Qwen v1 (`qwen.tiktoken`, tokenization_qwen.py) ship no
tokenizer.json: their vocabulary is a rank file, one `base64(token bytes) SPACE rank` per line, and their
remote code adds the pre-tokenizer regex and the special tokens. This module reads the rank file and rebuilds
what llama.cpp's convert_hf_to_gguf.py writes for them (QwenModel._set_vocab_qwen; DeepseekV2Model.set_vocab,
its "kimi-k2" branch):

- tokens: each token's bytes through GPT-2's bytes_to_unicode map (QwenModel.token_bytes_to_string);
- merges recovered from the ranks: a multi-byte token of rank r is the merge of the two parts that byte-level
  BPE over its bytes, using only ranks below r, stops at (QwenModel.bpe);
- special tokens as the remote code defines them: Qwen v1's <|endoftext|>, <|im_start|>, <|im_end|> and
  <|extra_0|> .. <|extra_204|> from id 151643; Kimi-K2's 256 reserved ids after the ranks, named by
  tokenizer_config.json's added_tokens_decoder, else <|reserved_token_{id}|>.

`tokenizer.ggml.pre` is fixed by the file name ("qwen2" for qwen.tiktoken, "kimi-k2" for tiktoken.model): the
converter finds the same names by hashing the released tokenizers' ids for its check string, which needs the
remote code; the regexes below are the remote code's own (llama.cpp splits "kimi-k2" with a hand-written
equivalent of KIMI_K2_PATTERN and "qwen2" with the same pattern as QWEN_PATTERN).
"""

from __future__ import annotations

import base64
import binascii
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from ..errors import BadInput

QWEN_FILE = "qwen.tiktoken"
KIMI_FILE = "tiktoken.model"
TIKTOKEN_FILES = (QWEN_FILE, KIMI_FILE)

# tokenization_qwen.py PAT_STR
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
# tokenization_kimi.py pat_str (also quoted in llama.cpp's unicode.cpp, unicode_regex_split_custom_kimi_k2)
KIMI_K2_PATTERN = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

QWEN_SPECIAL_START = 151643  # tokenization_qwen.py SPECIAL_START_ID
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205))
KIMI_RESERVED = 256  # tokenization_kimi.py num_reserved_special_tokens


class TiktokenVocab(NamedTuple):
    kind: str                      # "qwen" or "kimi"
    pre: str                       # tokenizer.ggml.pre
    pattern: str                   # the remote code's pre-tokenizer regex
    ranks: dict[bytes, int]        # the rank file, in file order
    specials: dict[str, int]       # special token text -> id
    merges: list[str]              # GGUF merges ("left right", byte-level strings), in rank-file order


@lru_cache(maxsize=1)
def byte_encoder() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to U+0100 onwards."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def token_text(b: bytes) -> str:
    enc = byte_encoder()
    return "".join(enc[x] for x in b)


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """A tiktoken rank file: {token bytes: rank} in file order; malformed lines are bad input naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None
    ranks: dict[bytes, int] = {}
    seen: set[int] = set()
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise BadInput(f"{path}: line {n} is not 'base64-token rank'")
        try:
            tok = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except (binascii.Error, ValueError):
            raise BadInput(f"{path}: line {n} is not 'base64-token rank'") from None
        if not tok or rank < 0:
            raise BadInput(f"{path}: line {n} has an empty token or a negative rank")
        if tok in ranks or rank in seen:
            raise BadInput(f"{path}: line {n} repeats a token or the rank {rank}")
        ranks[tok] = rank
        seen.add(rank)
    if not ranks:
        raise BadInput(f"{path}: holds no tokens")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise BadInput(f"{path}: byte 0x{missing[0]:02x} has no token ({len(missing)} of the 256 bytes missing); "
                       "byte-level BPE needs all of them")
    return ranks


def bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int | None = None) -> list[bytes]:
    """tiktoken's byte-pair merging of `token`: repeatedly join the adjacent pair whose concatenation has the
    lowest rank, stopping before ranks >= max_rank."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best = None
        best_rank = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None or (max_rank is not None and best_rank >= max_rank):
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def recover_merges(ranks: dict[bytes, int], path: Path, strict: bool) -> list[str]:
    """GGUF merges for a rank file, in its order. strict (Qwen, as the converter asserts): every multi-byte
    token must come from one merge; otherwise (Kimi-K2) such tokens get no merge, as there."""
    merges = []
    for tok, rank in ranks.items():
        if len(tok) == 1:
            continue
        parts = bpe_split(ranks, tok, max_rank=rank)
        if len(parts) != 2:
            if strict:
                raise BadInput(f"{path}: token of rank {rank} ({tok!r}) is not the merge of two lower-ranked "
                               f"tokens (BPE over its bytes stops at {len(parts)} parts)")
            continue
        merges.append(f"{token_text(parts[0])} {token_text(parts[1])}")
    return merges


def tiktoken_file(model_dir: Path) -> Path | None:
    for name in TIKTOKEN_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    return None


def _kimi_specials(model_dir: Path, n_base: int) -> dict[str, int]:
    from ..checks import read_json
    tc_path = model_dir / "tokenizer_config.json"
    names: dict[int, str] = {}
    if tc_path.is_file():
        decoder = (read_json(tc_path) or {}).get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise BadInput(f"{tc_path}: added_tokens_decoder is not an object")
        for key, entry in decoder.items():
            content = entry.get("content") if isinstance(entry, dict) else None
            try:
                tid = int(key)
            except ValueError:
                raise BadInput(f"{tc_path}: added_tokens_decoder key {key!r} is not a token id") from None
            if not isinstance(content, str):
                raise BadInput(f"{tc_path}: added_tokens_decoder[{key!r}] has no 'content' string")
            names[tid] = content
    specials: dict[str, int] = {}
    for i in range(n_base, n_base + KIMI_RESERVED):
        specials[names.get(i, f"<|reserved_token_{i}|>")] = i
    return specials


def _stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def read_tiktoken_vocab(model_dir: str | Path) -> TiktokenVocab:
    """The model directory's tiktoken vocabulary (qwen.tiktoken or tiktoken.model). Cached by the files'
    modification times and sizes: recovering the merges of a 160k-token file takes seconds."""
    model_dir = Path(model_dir).resolve()
    path = tiktoken_file(model_dir)
    if path is None:
        raise BadInput(f"{model_dir}: no {' or '.join(TIKTOKEN_FILES)}")
    return _read_cached(model_dir, path.name, _stamp(path), _stamp(model_dir / "tokenizer_config.json"))


@lru_cache(maxsize=4)
def _read_cached(model_dir: Path, name: str, stamp, tc_stamp) -> TiktokenVocab:
    path = model_dir / name
    ranks = read_ranks(path)
    top = max(ranks.values())
    if path.name == QWEN_FILE:
        if top >= QWEN_SPECIAL_START:
            raise BadInput(f"{path}: rank {top} collides with Qwen's special tokens, which start at id "
                           f"{QWEN_SPECIAL_START}")
        specials = {t: QWEN_SPECIAL_START + i for i, t in enumerate(QWEN_SPECIALS)}
        return TiktokenVocab("qwen", "qwen2", QWEN_PATTERN, ranks, specials, recover_merges(ranks, path, True))
    specials = _kimi_specials(model_dir, len(ranks))
    if top >= len(ranks):  # tokenization_kimi.py numbers the reserved tokens from len(ranks)
        raise BadInput(f"{path}: ranks are not 0..{len(ranks) - 1} (highest {top}); Kimi's reserved tokens "
                       "would collide with them")
    return TiktokenVocab("kimi", "kimi-k2", KIMI_K2_PATTERN, ranks, specials, recover_merges(ranks, path, False))


def gguf_tokens(vocab: TiktokenVocab, vocab_size: int, path: Path) -> tuple[list[str], list[int]]:
    """(tokens, token types) padded to vocab_size as the converter writes them: ranks NORMAL, specials CONTROL,
    missing ids "[PAD{i}]" UNUSED."""
    import gguf
    TT = gguf.TokenType
    top = max(max(vocab.ranks.values()), max(vocab.specials.values()))
    if top >= vocab_size:
        raise BadInput(f"{path}: token id {top} does not fit config.json vocab_size {vocab_size}")
    by_id = {r: token_text(t) for t, r in vocab.ranks.items()}
    special_ids = {i: t for t, i in vocab.specials.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in special_ids:
            tokens.append(special_ids[i])
            types.append(int(TT.CONTROL))
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(int(TT.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(TT.UNUSED))
    return tokens, types


def dumps_ranks(ranks: dict[bytes, int]) -> str:
    """A rank file's text (the inverse of read_ranks)."""
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())


__all__ = ["TiktokenVocab", "read_tiktoken_vocab", "read_ranks", "bpe_split", "recover_merges", "token_text",
           "gguf_tokens", "tiktoken_file", "dumps_ranks", "QWEN_PATTERN", "KIMI_K2_PATTERN"]
