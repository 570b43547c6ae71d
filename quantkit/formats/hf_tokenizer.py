"""GGUF tokenizer metadata -> HF tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json).

Covers "gpt2" (byte-level BPE) GGUF vocabularies: the pre-tokenizer is rebuilt from the regex list
llama.cpp (src/llama-vocab.cpp) uses for the GGUF's `tokenizer.ggml.pre`, as a Sequence of isolating
Splits followed by a regex-free ByteLevel, so the `tokenizers` library splits text as llama.cpp does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from ..errors import BadInput, QuantkitError
from .tiktoken_vocab import KIMI_K2_PATTERN

TT = gguf.TokenType
K = gguf.Keys.Tokenizer

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
# tokenizer.json originals of the patterns llama.cpp emulates with lookaheads (see its comments)
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp pre-tokenizer regex lists (applied in order, each match isolated) by tokenizer.ggml.pre
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]
_PRE_GROUPS: list[tuple[tuple[str, ...], list[str]]] = [
    (("default", ""), _DEFAULT),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
      "dbrx", "smaug-bpe"), [_LLAMA3]),
    (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"), [_QWEN2]),
    (("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"), [r"\p{N}", _GPT2]),
    (("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
      "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "exaone4", "mpt", "olmo", "jais", "trillion"),
     [_GPT2]),
    (("qwen35",), [_QWEN35]),
    (("tekken",), [_TEKKEN]),
    (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), [_GPT4O]),
    (("kimi-k2",), [KIMI_K2_PATTERN]),  # tokenization_kimi.py's regex (llama.cpp hand-codes the same split)
]
PRE_REGEXES: dict[str, list[str]] = {name: regs for names, regs in _PRE_GROUPS for name in names}
# pre types for which llama.cpp looks whole words up in the vocab before merging, and adds BOS by default
_LLAMA3_NAMES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                 "jina-v5-nano"}
_IGNORE_MERGES = _LLAMA3_NAMES | {"tekken"}
_ADD_BOS_DEFAULT = _LLAMA3_NAMES | {"tekken"}

_SPECIAL_KEYS = {"bos": K.BOS_ID, "eos": K.EOS_ID, "unk": K.UNK_ID, "sep": K.SEP_ID, "pad": K.PAD_ID,
                 "mask": K.MASK_ID}
_EXTRA_KEYS = {"eot": K.EOT_ID, "eom": K.EOM_ID}  # not HF-standard; read back by gguf_tokenizer


def _plain(v: Any) -> Any:
    """Accept either plain values or gguf ReaderFields."""
    return v.contents() if hasattr(v, "contents") and hasattr(v, "types") else v


def _token_at(tokens: list[str], kv: dict, key: str) -> str | None:
    tid = _plain(kv.get(key))
    if tid is None:
        return None
    if not isinstance(tid, int) or not 0 <= tid < len(tokens):
        raise BadInput(f"GGUF {key}={tid!r} is not a token id below {len(tokens)}")
    return tokens[tid]


def build_hf_tokenizer(gguf_kv: dict):
    """A `tokenizers.Tokenizer` equivalent to the GGUF's gpt2-model vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    model = _plain(gguf_kv.get(K.MODEL))
    if model != "gpt2":
        raise QuantkitError(f"GGUF {K.MODEL}={model!r}: only 'gpt2' (byte-level BPE) vocabularies convert to HF")
    tokens = list(_plain(gguf_kv.get(K.LIST)) or [])
    if not tokens:
        raise BadInput(f"GGUF has no {K.LIST}")
    types = list(_plain(gguf_kv.get(K.TOKEN_TYPE)) or [int(TT.NORMAL)] * len(tokens))
    if len(types) != len(tokens):
        raise BadInput(f"GGUF {K.TOKEN_TYPE} has {len(types)} entries, {K.LIST} has {len(tokens)}")
    pre = _plain(gguf_kv.get(K.PRE)) or "default"
    if pre not in PRE_REGEXES:
        raise QuantkitError(f"GGUF {K.PRE}={pre!r} has no HF pre-tokenizer here; supported: {sorted(PRE_REGEXES)}")
    merges = []
    for m in _plain(gguf_kv.get(K.MERGES)) or []:
        parts = m.split(" ")
        if len(parts) != 2:
            raise BadInput(f"GGUF {K.MERGES} entry {m!r} is not two space-separated parts")
        merges.append((parts[0], parts[1]))

    vocab: dict[str, int] = {}
    for i, (text, t) in enumerate(zip(tokens, types)):
        if t != TT.UNUSED:  # [PADi] fillers are absent ids in HF, as the converter created them
            vocab.setdefault(text, i)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_REGEXES[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()

    added = [AddedToken(tokens[i], special=t == TT.CONTROL, normalized=False)
             for i, t in enumerate(types) if t in (TT.CONTROL, TT.USER_DEFINED)]
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])
    for i, t in enumerate(types):
        if t in (TT.CONTROL, TT.USER_DEFINED) and tok.token_to_id(tokens[i]) != i:
            raise BadInput(f"GGUF token {i} {tokens[i]!r} is duplicated in {K.LIST}; cannot map it to one HF id")

    add_bos, add_eos = _add_flags(gguf_kv, pre)
    bos, eos = _token_at(tokens, gguf_kv, K.BOS_ID), _token_at(tokens, gguf_kv, K.EOS_ID)
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise BadInput(f"GGUF asks to add BOS/EOS but has no {K.BOS_ID}/{K.EOS_ID}")
    if add_bos or add_eos:
        pieces = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = pieces + [p.replace("$A", "$B").replace(":0", ":1") for p in pieces]
        specials = ([(bos, vocab[bos])] if add_bos else []) + ([(eos, vocab[eos])] if add_eos and eos != bos else [])
        tok.post_processor = processors.TemplateProcessing(single=" ".join(pieces), pair=" ".join(pair),
                                                           special_tokens=specials)
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _add_flags(gguf_kv: dict, pre: str) -> tuple[bool, bool]:
    """llama.cpp's effective add_bos/add_eos: the GGUF keys, else its per-pre defaults."""
    add_bos = _plain(gguf_kv.get(K.ADD_BOS))
    add_eos = _plain(gguf_kv.get(K.ADD_EOS))
    return (bool(add_bos) if add_bos is not None else pre in _ADD_BOS_DEFAULT,
            bool(add_eos) if add_eos is not None else False)


def write_hf_tokenizer(gguf_kv: dict, out_dir: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for a gpt2-model GGUF.

    gguf_kv maps GGUF metadata keys to plain values (str/int/bool/list) or gguf ReaderFields.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_hf_tokenizer(gguf_kv)
    tokens = list(_plain(gguf_kv[K.LIST]))
    types = list(_plain(gguf_kv.get(K.TOKEN_TYPE)) or [int(TT.NORMAL)] * len(tokens))
    pre = _plain(gguf_kv.get(K.PRE)) or "default"
    tok.save(str(out_dir / "tokenizer.json"))

    add_bos, add_eos = _add_flags(gguf_kv, pre)
    specials = {typ: text for typ, key in _SPECIAL_KEYS.items()
                if (text := _token_at(tokens, gguf_kv, key)) is not None}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": t == TT.CONTROL}
            for i, t in enumerate(types) if t in (TT.CONTROL, TT.USER_DEFINED)},
    }
    config.update({f"{typ}_token": text for typ, text in specials.items()})
    config.update({f"{typ}_token": text for typ, key in _EXTRA_KEYS.items()
                   if (text := _token_at(tokens, gguf_kv, key)) is not None})
    if (prefix := _plain(gguf_kv.get(K.ADD_PREFIX))) is not None:
        config["add_prefix_space"] = bool(prefix)
    if (template := _plain(gguf_kv.get(K.CHAT_TEMPLATE))) is not None:
        config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n",
                                                     encoding="utf-8")


def read_gguf_kv(path: str | Path) -> dict[str, Any]:
    """All metadata of a GGUF file as plain values (tensors are not read)."""
    from .gguf_parse import parse_gguf
    return dict(parse_gguf(Path(path)).fields)
