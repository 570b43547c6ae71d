"""HF tokenizer directory -> GGUF tokenizer metadata, reproducing llama.cpp's convert_hf_to_gguf.py.

Three vocab paths, chosen as llama.cpp's LlamaModel.set_vocab does: SentencePiece (`tokenizer.model`,
parsed here without the sentencepiece package), "llama_hf" (tokenizer.json BPE with byte fallback, e.g.
converted Llama-2 fast tokenizers) and byte-level BPE ("gpt2", with the pre-tokenizer named by hashing
the tokenization of a fixed check string). Special ids / add_bos / chat template follow gguf-py's
SpecialVocab. A directory with only a tiktoken rank file (Qwen v1 qwen.tiktoken, Kimi-K2 tiktoken.model) gets
the gpt2 vocabulary llama.cpp's converter builds from it (formats/tiktoken_vocab.py). Text is tokenized with the `tokenizers` library (not transformers).
"""

from __future__ import annotations

import json
import re
import struct
from hashlib import sha256
from pathlib import Path
from typing import Any, NamedTuple

import gguf
from gguf import GGUFValueType as VT

from ..errors import BadInput, QuantkitError
from .tiktoken_vocab import TIKTOKEN_FILES, gguf_tokens, read_tiktoken_vocab, tiktoken_file

TT = gguf.TokenType


class TokenizerKV(NamedTuple):
    key: str
    value: Any
    type: VT
    sub_type: VT | None = None  # element type for arrays


# llama.cpp convert_hf_to_gguf.py (pinned commit): the check string and the known hashes of
# sha256(str(token_ids)) -> tokenizer.ggml.pre. Later duplicates override earlier ones, as there.
CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'

PRE_BY_HASH: dict[str, str] = {
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",
    "cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267": "glm4",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
    "7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664": "hunyuan",
    "bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6": "hunyuan-dense",
    "e6ddf9c6686791c12d698d34c31ab9be1fea9af5a3d9a6909783ab382198ae1c": "hy_v4",
    "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6": "falcon-h1",
    "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86": "falcon-h1",
    "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896": "falcon-h1",
    "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b": "falcon-h1",
    "81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890": "kimi-k2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",
    "66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273": "grok-2",
    "b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df": "jina-v2-de",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7": "lfm2",
    "846deafc5b0fa786186fa4ae6c7b49903cf2f1d1895bdb80b9120d60be135252": "gemma4",
    "0a766d034107bc736a3f2dc4968fd62e54a3570f1454443e0c5a4cc6bd7941ed": "spark2_5",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "jina-v2-en",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7": "bert-bge-large",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1": "tiny_aya",
    "52df12b4c8d4176e7481aab4b6e8454d1fd0a210a04a574f6d4e067d10e23c3e": "cohere2moe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448": "jina-v1-en",
    "171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643": "jina-v2-es",
    "27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6": "jina-v2-de",
    "a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d": "jina-v5-nano",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "7967bfa498ade6b757b064f31e964dddbb80f8f9a4d68d4ba7998fcf281c531a": "jina-v2-code",
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a": "jais-2",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",
    "8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65": "roberta-bpe",
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",
    "96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224": "bailingmoe",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",
    "a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152": "modern-bert",
    "49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df": "afmoe",
    "9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206": "bailingmoe2",
    "53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e": "granite-docling",
    "f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95": "minimax-m2",
    "4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665": "kormo",
    "9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1": "youtu",
    "16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91": "solar-open",
    "6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f": "exaone-moe",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d": "joyai-llm",
    "e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869": "kanana2",
    "862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015": "f2llmv2",
    "62f6fb0a6fd5098caeabb19b07a5c1099cafc8b9c40eab6ea89ece4ec02fbc57": "sarvam-moe",
    "f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af": "talkie",
    "36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4": "minicpm5",
    "f241072145675bf8322086f115aebad05e9f869557a238bf2150a2a417d1bf60": "granite-embed-multi-97m",
    "789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669": "granite-embed-multi-311m",
    "9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d": "mellum2",
    "972da7b59cec44d1f0a490a86c96df53859e486e481563e5dddac155013d87ac": "laguna",
    "653660222fb704f61cbf2b618a8ae6502b7f8b20c980f9a5de07ed78e13319cd": "ufakzeka",
}

# HF architectures llama.cpp converts with LlamaModel (its set_vocab order and quirks apply).
LLAMA_ARCHS = frozenset({
    "LLaMAForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
    "VLlama3ForCausalLM", "LlavaForConditionalGeneration", "VoxtralForConditionalGeneration",
    "IQuestCoderForCausalLM", "LlamaModel",
})

_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_ID_KEYS = {  # SpecialVocab types that have a GGUF key (cls has none, llama.cpp skips it)
    "bos": gguf.Keys.Tokenizer.BOS_ID, "eos": gguf.Keys.Tokenizer.EOS_ID, "unk": gguf.Keys.Tokenizer.UNK_ID,
    "sep": gguf.Keys.Tokenizer.SEP_ID, "pad": gguf.Keys.Tokenizer.PAD_ID, "mask": gguf.Keys.Tokenizer.MASK_ID,
    "eot": gguf.Keys.Tokenizer.EOT_ID, "eom": gguf.Keys.Tokenizer.EOM_ID,
    "prefix": gguf.Keys.Tokenizer.PREFIX_ID, "suffix": gguf.Keys.Tokenizer.SUFFIX_ID,
    "middle": gguf.Keys.Tokenizer.MIDDLE_ID,
}
_ADD_KEYS = {"bos": gguf.Keys.Tokenizer.ADD_BOS, "eos": gguf.Keys.Tokenizer.ADD_EOS, "sep": gguf.Keys.Tokenizer.ADD_SEP}
NORMALIZER_LOWERCASE = "tokenizer.ggml.normalizer.lowercase"
NORMALIZER_STRIP_ACCENTS = "tokenizer.ggml.normalizer.strip_accents"


# ---------------------------------------------------------------- helpers

def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    from ..checks import read_json
    return read_json(path)  # an object, or a one-line error naming the file


def looks_special(text: str) -> bool:
    """llama.cpp's does_token_look_special: added tokens some models forget to mark special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _load_hf_tokenizer(path: Path):
    try:
        from tokenizers import Tokenizer
    except ImportError as e:  # pragma: no cover - dependency missing
        raise QuantkitError("reading tokenizer.json needs the `tokenizers` package (pip install tokenizers)") from e
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise BadInput(f"{path}: the tokenizers library cannot load it ({e})") from e


def detect_bpe_pre(tokenizer) -> str:
    """tokenizer.ggml.pre for a `tokenizers.Tokenizer`, from the hash of its ids for CHKTXT (incl. post-processor)."""
    ids = tokenizer.encode(CHKTXT).ids
    chkhsh = sha256(str(list(ids)).encode()).hexdigest()
    pre = PRE_BY_HASH.get(chkhsh)
    if pre is None:
        raise QuantkitError(f"BPE pre-tokenizer not recognized (check-string hash {chkhsh}); llama.cpp "
                            "knows no 'tokenizer.ggml.pre' for this tokenizer.json")
    return pre


# ---------------------------------------------------------------- SentencePiece model proto

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field_number, wire_type, value) of one protobuf message; value is int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire == 1:
            val, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            val, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            val, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield field, wire, val


def parse_sentencepiece_model(data: bytes) -> list[tuple[str, float, int]]:
    """(piece, score, type) for each ModelProto.pieces entry (field 1: piece=1, score=2, type=3)."""
    pieces: list[tuple[str, float, int]] = []
    try:
        for field, wire, val in _fields(data):
            if field != 1 or wire != 2:
                continue
            piece, score, ptype = "", 0.0, 1  # proto defaults: type NORMAL
            for f, w, v in _fields(val):
                if f == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    ptype = v
            pieces.append((piece, score, ptype))
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"tokenizer.model: not a SentencePiece ModelProto ({e})") from e
    if not pieces:
        raise BadInput("tokenizer.model: no SentencePiece pieces found")
    return pieces


# sentencepiece piece type -> GGUF token type, as the converter maps IsUnknown/IsControl/IsUnused/IsByte
_SP_TYPE = {2: TT.UNKNOWN, 3: TT.CONTROL, 5: TT.UNUSED, 6: TT.BYTE}


def _spm_vocab(model_dir: Path, vocab_size: int | None):
    pieces = parse_sentencepiece_model((model_dir / "tokenizer.model").read_bytes())
    n = vocab_size or len(pieces)
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-10000.0] * n
    types = [int(TT.UNUSED)] * n
    for i, (piece, score, ptype) in enumerate(pieces[:n]):
        tokens[i], scores[i], types[i] = piece, score, int(_SP_TYPE.get(ptype, TT.NORMAL))
    added = _read_json(model_dir / "added_tokens.json") or {}
    for text, tid in added.items():
        if isinstance(tid, int) and 0 <= tid < n:
            tokens[tid], scores[tid], types[tid] = text, -1000.0, int(TT.USER_DEFINED)
    config = _read_json(model_dir / "tokenizer_config.json") or {}
    for sid, entry in (config.get("added_tokens_decoder") or {}).items():
        tid, text = int(sid), entry["content"]
        if tid >= n:
            continue
        if entry.get("special") or looks_special(text):
            types[tid] = int(TT.CONTROL)
        else:
            text = text.replace("\u2581", " ")  # llama.cpp wants user-defined tokens pre-normalized
            types[tid] = int(TT.USER_DEFINED)
        tokens[tid], scores[tid] = text, -1000.0
    return tokens, scores, types


# ---------------------------------------------------------------- tokenizer.json vocabularies

class _NotApplicable(Exception):
    pass


def _special_token_texts(model_dir: Path) -> list[str]:
    """transformers' all_special_tokens: named special tokens + additional_special_tokens."""
    texts: list[str] = []
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        cfg = _read_json(model_dir / name) or {}
        for key in [f"{t}_token" for t in _SPECIAL_TYPES] + ["additional_special_tokens"]:
            entry = cfg.get(key)
            for e in entry if isinstance(entry, list) else [entry]:
                text = e.get("content") if isinstance(e, dict) else e
                if isinstance(text, str) and text not in texts:
                    texts.append(text)
    return texts


def _llama_hf_vocab(model_dir: Path, vocab_size: int):
    """llama.cpp's LlamaHfVocab: a Llama-2 style BPE+byte-fallback tokenizer.json without tokenizer.model."""
    tj = _read_json(model_dir / "tokenizer.json")
    if tj is None:
        raise _NotApplicable
    model = tj.get("model") or {}
    if model.get("type") == "BPE" and model.get("ignore_merges", False) and not model.get("byte_fallback", True):
        raise _NotApplicable  # Llama 3: byte-level BPE
    decoder_type = (tj.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or not model.get("byte_fallback", False) or decoder_type != "Sequence":
        raise _NotApplicable
    tok = _load_hf_tokenizer(model_dir / "tokenizer.json")
    n_base = tok.get_vocab_size(with_added_tokens=False)
    vocab = tok.get_vocab(with_added_tokens=True)
    reverse = {i: t for t, i in vocab.items()}
    added = sorted((i, a.content) for i, a in tok.get_added_tokens_decoder().items() if i >= n_base)
    special_ids = {vocab[t] for t in _special_token_texts(model_dir) if t in vocab}
    tokens, types = [], []
    for i in range(n_base):
        if i not in reverse:
            raise BadInput(f"{model_dir / 'tokenizer.json'}: token id {i} missing from the vocab")
        text = reverse[i]
        tokens.append(text)
        types.append(int(TT.BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text)
                          else TT.CONTROL if i in special_ids else TT.NORMAL))
    for i, text in added:
        tokens.append(text)
        types.append(int(TT.CONTROL if text in vocab and vocab[text] in special_ids else TT.USER_DEFINED))
    # llama.cpp writes exactly the tokenizer's size; pad to the embedding rows so the file loads
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(int(TT.UNUSED))
    return tokens, [-1000.0] * len(tokens), types


def _bpe_vocab(model_dir: Path, vocab_size: int):
    """llama.cpp's get_vocab_base for a byte-level BPE tokenizer.json -> (tokens, types, pre)."""
    path = model_dir / "tokenizer.json"
    tj = _read_json(path)
    mtype = (tj.get("model") or {}).get("type")
    if mtype != "BPE":
        raise QuantkitError(f"{path}: tokenizer model type {mtype!r} is not supported (expected 'BPE')")
    tok = _load_hf_tokenizer(path)
    vocab = tok.get_vocab(with_added_tokens=True)
    if vocab and max(vocab.values()) >= vocab_size:
        raise BadInput(f"{path}: token id {max(vocab.values())} does not fit vocab_size {vocab_size}")
    pre = detect_bpe_pre(tok)
    reverse = {i: t for t, i in vocab.items()}
    decoder = tok.get_added_tokens_decoder()
    added_by_text = {a.content: a for a in decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(TT.UNUSED))
            continue
        text = reverse[i]
        at = decoder.get(i) or added_by_text.get(text)
        if at is None:
            tokens.append(text)
            types.append(int(TT.NORMAL))
            continue
        if not at.normalized:  # llama.cpp stores added tokens pre-normalized: encode+decode round trip
            text = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
        if at.special or looks_special(text):
            types.append(int(TT.CONTROL))
        else:
            text = text.replace("\u2581", " ")
            types.append(int(TT.USER_DEFINED))
        tokens.append(text)
    return tokens, types, pre


# ---------------------------------------------------------------- SpecialVocab

def _merges(tj: dict | None, model_dir: Path) -> list[str]:
    merges = ((tj or {}).get("model") or {}).get("merges")
    if isinstance(merges, list) and merges:
        if isinstance(merges[0], str):
            return list(merges)
        if isinstance(merges[0], list) and len(merges[0]) == 2:
            # pair format (transformers >= 4.45): spaces inside a part become U+0120 as llama.cpp encodes them
            return [" ".join(p.replace(" ", "\u0120") for p in pair) for pair in merges]
        raise BadInput(f"{model_dir / 'tokenizer.json'}: unknown merges format")
    path = model_dir / "merges.txt"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].strip().startswith("#"):
        lines = lines[1:]
    out = []
    for line in lines:
        parts = line.strip().split(None, 3)
        if len(parts) == 2:
            out.append(f"{parts[0]} {parts[1]}")
    return out


def _normalizer_flags(norm: dict, flags: dict[str, bool]) -> None:
    kind = norm.get("type")
    if kind == "Lowercase":
        flags[NORMALIZER_LOWERCASE] = True
    elif kind == "StripAccents":
        flags[NORMALIZER_STRIP_ACCENTS] = True
    elif kind == "BertNormalizer":
        if "lowercase" in norm:
            flags[NORMALIZER_LOWERCASE] = norm["lowercase"]
        if "strip_accents" in norm:
            flags[NORMALIZER_STRIP_ACCENTS] = norm["strip_accents"]
    elif kind == "Sequence":
        for sub in norm.get("normalizers", []):
            _normalizer_flags(sub, flags)


def _template_specials(proc: dict, tc: dict | None, types: list[str], add: dict[str, bool], sp: dict) -> None:
    """SpecialVocab's crude TemplateProcessing reading: leading token -> add_bos, trailing -> add_eos (+eot)."""
    single, pair = proc.get("single", []), proc.get("pair", [])
    first = last = None
    if len(single) > 1:
        if first := single[0].get("SpecialToken", {}).get("id"):
            if not tc:
                sp["bos"] = first
            elif first not in (sp["bos"], sp["cls"]):
                if not sp["bos"]:
                    tc["bos_token"] = sp["bos"] = first
                if not sp["cls"]:
                    tc["cls_token"] = sp["cls"] = first
            add["bos"] = first in (sp["bos"], sp["cls"])
        if last := single[-1].get("SpecialToken", {}).get("id"):
            if not tc:
                sp["eos"] = last
            elif last != sp["eos"]:
                if "eot" not in types:
                    types.append("eot")
                    tc["eot_token"] = sp["eos"]
                elif "eom" not in types:
                    types.append("eom")
                    tc["eom_token"] = sp["eos"]
                tc["eos_token"] = sp["eos"] = last
            add["eos"] = last == sp["eos"]
    if not pair:
        return
    start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
    stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
    pair = pair[slice(start, stop)]
    if not pair:
        return
    a, b = pair[0].get("Sequence", {}).get("id"), pair[-1].get("Sequence", {}).get("id")
    if a == "A" and b == "B" and (mid := pair[1:-1]):
        add_sep = False
        if (entry := mid[0].get("SpecialToken", {}).get("id")) and entry in (sp["sep"], sp["eos"]) and not last:
            add_sep = True
        if len(mid) == 2 and (entry := mid[1].get("SpecialToken", {}).get("id")) and entry in (sp["sep"], sp["eos"]):
            add_sep = True
        add["sep"] = add_sep
        if add_sep and not sp["sep"] and tc:
            tc["sep_token"] = sp["eos"]


def _special_vocab(model_dir: Path, n_vocab: int | None, load_merges: bool,
                   types: tuple[str, ...] = _SPECIAL_TYPES, merges: list[str] | None = None,
                   if_none: dict[str, int] | None = None, fallback: dict[str, int] | None = None
                   ) -> list[TokenizerKV]:
    """gguf-py SpecialVocab(model_dir, ...) + add_to_gguf, as KV entries. merges: set as the converter assigns
    `special_vocab.merges`; if_none: ids set when no special id was found (Qwen v1's <|endoftext|> as bos/eos);
    fallback: ids set unless already found (its unk)."""
    types_l = list(types)
    ids: dict[str, int] = {}
    add: dict[str, bool] = {}
    flags: dict[str, bool] = {}

    def set_id(typ: str, tid: Any) -> None:
        if not isinstance(tid, int) or isinstance(tid, bool):
            return
        if tid < 0:
            raise BadInput(f"{model_dir}: invalid {typ} token id {tid}")
        if n_vocab is None or tid < n_vocab:
            ids.setdefault(typ, tid)

    tj = _read_json(model_dir / "tokenizer.json")
    tc = _read_json(model_dir / "tokenizer_config.json")
    file_merges = _merges(tj, model_dir) if load_merges else []
    added_tokens = []
    if tj:
        if norm := tj.get("normalizer"):
            _normalizer_flags(norm, flags)
        added_tokens = tj.get("added_tokens") or []
        sp = {k: (tc or {}).get(f"{k}_token") for k in ("bos", "cls", "eos", "sep")}
        if not sp["bos"] and sp["cls"] and tc:
            tc["bos_token"] = sp["bos"] = sp["cls"]
        if not sp["eos"] and sp["sep"] and tc:
            tc["eos_token"] = sp["eos"] = sp["sep"]
        if post := tj.get("post_processor"):
            for proc in post.get("processors", [post]):
                kind = proc.get("type")
                if kind == "ByteLevel":
                    add.setdefault("bos", False)
                    add.setdefault("eos", False)
                elif kind == "RobertaProcessing":
                    add.update(bos=True, eos=True, sep=True)
                    if not sp["cls"] and tc:
                        tc["cls_token"] = sp["cls"] = proc.get("cls", [sp["bos"]])[0]
                    if not sp["sep"] and tc:
                        tc["sep_token"] = sp["sep"] = proc.get("sep", [sp["eos"]])[0]
                elif kind == "TemplateProcessing":
                    _template_specials(proc, tc, types_l, add, sp)
    chat_template = None
    if tc:
        alt = None
        if (model_dir / "chat_template.jinja").is_file():
            alt = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
            extra = sorted((model_dir / "additional_chat_templates").glob("*.jinja"))
            if extra:
                alt = [{"name": "default", "template": alt}] + [
                    {"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
        elif (model_dir / "chat_template.json").is_file():
            alt = (_read_json(model_dir / "chat_template.json") or {}).get("chat_template")
        chat_template = tc.get("chat_template", alt)
        if not (chat_template is None or isinstance(chat_template, (str, list))):
            chat_template = None
        # extension: an explicit eot/eom_token in tokenizer_config (as write_hf_tokenizer emits) is honoured
        types_l += [t for t in ("eot", "eom") if t not in types_l and f"{t}_token" in tc]
        for typ in types_l:
            entry = tc.get(f"add_{typ}_token")
            if isinstance(entry, bool):
                add.setdefault(typ, entry)  # post_processor wins on mismatch
            entry = tc.get(f"{typ}_token")
            text = entry.get("content") if isinstance(entry, dict) else entry
            if isinstance(text, str):
                set_id(typ, next((a.get("id") for a in added_tokens if a.get("content") == text), None))
    config = _read_json(model_dir / "config.json")
    if isinstance(config, dict):
        for typ in types_l:
            tid = config.get(f"{typ}_token_id")
            if tid is None and isinstance(config.get("text_config"), dict):
                tid = config["text_config"].get(f"{typ}_token_id")
            set_id(typ, tid)

    merges = file_merges if merges is None else merges
    if if_none and not ids:
        for typ, tid in if_none.items():
            set_id(typ, tid)
    for typ, tid in (fallback or {}).items():
        set_id(typ, tid)
    kvs: list[TokenizerKV] = []
    if merges:
        kvs.append(TokenizerKV(gguf.Keys.Tokenizer.MERGES, merges, VT.ARRAY, VT.STRING))
    elif load_merges:
        raise BadInput(f"{model_dir}: BPE tokenizer has no merges (looked in tokenizer.json and merges.txt)")
    kvs += [TokenizerKV(_ID_KEYS[t], i, VT.UINT32) for t, i in ids.items() if t in _ID_KEYS]
    kvs += [TokenizerKV(_ADD_KEYS[t], v, VT.BOOL) for t, v in add.items() if t in _ADD_KEYS]
    kvs += _chat_template_kv(chat_template)
    kvs += [TokenizerKV(k, bool(v), VT.BOOL) for k, v in flags.items()]
    return kvs


def _chat_template_kv(template: Any) -> list[TokenizerKV]:
    if template is None:
        return []
    if isinstance(template, str):
        return [TokenizerKV(gguf.Keys.Tokenizer.CHAT_TEMPLATE, template, VT.STRING)]
    out, names = [], []
    for choice in template:
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in choice.get("name", ""))
        body = choice.get("template")
        if not name or body is None:
            continue
        if name == "default":
            out.append(TokenizerKV(gguf.Keys.Tokenizer.CHAT_TEMPLATE, body, VT.STRING))
        else:
            names.append(name)
            out.append(TokenizerKV(gguf.Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name), body, VT.STRING))
    if names:
        out.append(TokenizerKV(gguf.Keys.Tokenizer.CHAT_TEMPLATES, names, VT.ARRAY, VT.STRING))
    return out


# ---------------------------------------------------------------- public API

def _dedup(kvs: list[TokenizerKV]) -> list[TokenizerKV]:
    """Later entries override earlier ones (GGUFWriter semantics), keeping first-seen order."""
    out: dict[str, TokenizerKV] = {}
    for kv in kvs:
        out[kv.key] = kv
    return list(out.values())


def tokenizer_kv(model_dir: str | Path, vocab_size: int) -> list[TokenizerKV]:
    """GGUF `tokenizer.*` metadata for the HF model directory, as llama.cpp's converter would write it.

    vocab_size is the model's embedding row count (config.json vocab_size); the token list is padded to it.
    """
    model_dir = Path(model_dir)
    has_spm = (model_dir / "tokenizer.model").is_file()
    has_json = (model_dir / "tokenizer.json").is_file()
    if uses_tiktoken(model_dir):
        return _tiktoken_kv(model_dir, vocab_size)
    if not model_dir.is_dir() or not (has_spm or has_json):
        raise BadInput(f"{model_dir}: no usable tokenizer (looked for tokenizer.model and tokenizer.json, and "
                       f"for a tiktoken rank file: {', '.join(TIKTOKEN_FILES)})")
    config = _read_json(model_dir / "config.json") or {}
    archs = config.get("architectures") or []
    is_llama = bool(set(archs) & LLAMA_ARCHS)
    tc = _read_json(model_dir / "tokenizer_config.json") or {}
    K = gguf.Keys.Tokenizer

    kvs: list[TokenizerKV] = []
    if is_llama and isinstance(tc.get("add_prefix_space"), bool):
        kvs.append(TokenizerKV(K.ADD_PREFIX, tc["add_prefix_space"], VT.BOOL))
    vocab = None
    if has_spm:  # llama.cpp prefers tokenizer.model whenever the architecture uses SentencePiece
        tokens, scores, types = _spm_vocab(model_dir, vocab_size)
        vocab = ("llama", "default", tokens, scores, types)
    elif is_llama:
        try:
            tokens, scores, types = _llama_hf_vocab(model_dir, vocab_size)
            vocab = ("llama", "default", tokens, scores, types)
        except _NotApplicable:
            pass
    if vocab is not None:
        model, pre, tokens, scores, types = vocab
        kvs += [TokenizerKV(K.MODEL, model, VT.STRING), TokenizerKV(K.PRE, pre, VT.STRING),
                TokenizerKV(K.LIST, tokens, VT.ARRAY, VT.STRING),
                TokenizerKV(K.SCORES, scores, VT.ARRAY, VT.FLOAT32),
                TokenizerKV(K.TOKEN_TYPE, types, VT.ARRAY, VT.INT32)]
        kvs += _special_vocab(model_dir, len(tokens), load_merges=False)
    else:
        tokens, types, pre = _bpe_vocab(model_dir, vocab_size)
        kvs += [TokenizerKV(K.MODEL, "gpt2", VT.STRING), TokenizerKV(K.PRE, pre, VT.STRING),
                TokenizerKV(K.LIST, tokens, VT.ARRAY, VT.STRING),
                TokenizerKV(K.TOKEN_TYPE, types, VT.ARRAY, VT.INT32)]
        kvs += _special_vocab(model_dir, None, load_merges=True)
    if is_llama and vocab_size == 32016:  # CodeLlama infill tokens
        kvs += [TokenizerKV(_ID_KEYS[t], i, VT.UINT32)
                for t, i in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010))]
    if is_llama and vocab_size == 49152:  # llama.cpp's "granite small models" rule (also hits SmolLM)
        kvs.append(TokenizerKV(K.ADD_BOS, False, VT.BOOL))
    return _dedup(kvs)


def uses_tiktoken(model_dir: str | Path) -> bool:
    """Whether the directory's GGUF vocabulary comes from its tiktoken rank file: the only tokenizer file there,
    or Qwen v1 (QWenLMHeadModel), which llama.cpp's converter always reads through qwen.tiktoken."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or tiktoken_file(model_dir) is None:
        return False
    if not ((model_dir / "tokenizer.model").is_file() or (model_dir / "tokenizer.json").is_file()):
        return True
    config = _read_json(model_dir / "config.json")
    archs = config.get("architectures") if isinstance(config, dict) else None
    return (model_dir / "qwen.tiktoken").is_file() and isinstance(archs, list) and "QWenLMHeadModel" in archs


def _tiktoken_kv(model_dir: Path, vocab_size: int) -> list[TokenizerKV]:
    """A tiktoken rank file (Qwen v1 qwen.tiktoken, Kimi-K2 tiktoken.model) as llama.cpp's converter writes it."""
    K = gguf.Keys.Tokenizer
    vocab = read_tiktoken_vocab(model_dir)
    path = tiktoken_file(model_dir)
    tokens, types = gguf_tokens(vocab, vocab_size, path)
    kvs = [TokenizerKV(K.MODEL, "gpt2", VT.STRING), TokenizerKV(K.PRE, vocab.pre, VT.STRING),
           TokenizerKV(K.LIST, tokens, VT.ARRAY, VT.STRING), TokenizerKV(K.TOKEN_TYPE, types, VT.ARRAY, VT.INT32)]
    if vocab.kind == "qwen":  # _set_vocab_qwen: <|endoftext|> is bos/eos when nothing else names them, and unk
        eot = vocab.specials["<|endoftext|>"]
        kvs += _special_vocab(model_dir, None, load_merges=False, merges=vocab.merges,
                              if_none={"bos": eot, "eos": eot}, fallback={"unk": eot})
    else:  # DeepseekV2Model.set_vocab, kimi-k2: merges written before SpecialVocab(load_merges=False)
        kvs.append(TokenizerKV(K.MERGES, vocab.merges, VT.ARRAY, VT.STRING))
        kvs += _special_vocab(model_dir, None, load_merges=False)
    return _dedup(kvs)


def add_tokenizer_kv(writer: gguf.GGUFWriter, kvs: list[TokenizerKV]) -> None:
    for kv in kvs:
        writer.add_key_value(kv.key, kv.value, kv.type, kv.sub_type)
