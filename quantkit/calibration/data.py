"""Calibration text -> token windows for a model.

Sources: a `.txt` file (one document), `.jsonl` (a `text` string or a chat `messages` list per line),
`.parquet` / `.arrow` (a `text` or `messages` column), or a folder: a `datasets.save_to_disk` output
(state.json + arrow files, or a dataset_dict.json of splits; read with pyarrow, no `datasets` needed) or
any folder of such files. Chat messages are rendered with the model's own chat template (as transformers'
`apply_chat_template` does) and their special tokens become their ids.

Documents are tokenized one by one and joined into one stream with the EOS id between them (the BOS id
when the vocab has no EOS); the stream starts with BOS when the vocab adds one, as llama.cpp tokenizes.
Windows of `seqlen` tokens are disjoint slices of that stream; when the vocab adds a BOS each window's
first token is replaced by BOS (llama.cpp's perplexity/imatrix chunk rule). Too little text is an error
that says how many tokens there are and how many are needed: samples are never silently repeated.

There is no built-in dataset: quantkit ships none, so `calib=None` is an error asking for --calib.
From Python, `calib` may also be a list of strings, of chat conversations (lists of messages) or of token-id
lists (`CalibList`); those are documents like a file's records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInput, QuantkitError
from ..graph import Graph

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")


# ---------------------------------------------------------------- in-memory calibration

class CalibList(list):
    """Calibration documents given from Python. str() is a short label with a digest (reports, imatrix
    datasets), never the whole text."""

    @property
    def kind(self) -> str:
        x = self[0] if self else ""
        if isinstance(x, str):
            return "texts"
        if isinstance(x, dict) and isinstance(x.get("text"), str):
            return "texts"
        if isinstance(x, (list, tuple)) and x and all(isinstance(m, dict) for m in x):
            return "conversations"
        return "token lists"

    def __str__(self) -> str:
        return f"<{len(self)} {self.kind}, sha256 {calib_digest(self)[:16]}>"

    __repr__ = __str__


def as_calib(calib):
    """A path (str / PathLike) or a CalibList for anything list-like; None stays None."""
    if calib is None or isinstance(calib, CalibList):
        return calib
    if isinstance(calib, (list, tuple)):
        if not calib:
            raise BadInput("calib: the list is empty")
        return CalibList(calib)
    if isinstance(calib, str) and "\n" in calib:
        raise BadInput("calib: a string is read as a file path; pass a list of strings for text")
    return Path(calib)


def calib_digest(calib) -> str:
    """sha256 of the calibration source: file bytes (a folder's files in name order) or the list as JSON."""
    import hashlib
    h = hashlib.sha256()
    if isinstance(calib, list):
        h.update(json.dumps([list(map(int, x)) if _is_ids(x) else x for x in calib], sort_keys=True,
                            ensure_ascii=False).encode())
        return h.hexdigest()
    p = Path(calib)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p)).encode() if p.is_dir() else b"")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _is_ids(x) -> bool:
    if isinstance(x, torch.Tensor):
        return not x.is_floating_point()
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(v, int) for v in x)


def _list_docs(calib: CalibList, chat) -> list:
    """Each item as text, or as a list of token ids (kept as such)."""
    out = []
    for i, x in enumerate(calib):
        where = f"calib[{i}]"
        if isinstance(x, str):
            out.append(x)
        elif _is_ids(x):
            out.append([int(v) for v in (x.tolist() if isinstance(x, torch.Tensor) else x)])
        elif isinstance(x, dict):
            out.append(_record_doc(x, where, chat))
        elif isinstance(x, (list, tuple)) and all(isinstance(m, dict) for m in x):
            out.append(chat(list(x), where))
        else:
            raise BadInput(f"{where}: expected a string, a list of chat messages or a list of token ids, "
                           f"got {type(x).__name__}")
    return out


# ---------------------------------------------------------------- reading documents

def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"--calib {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _record_doc(rec: Any, where: str, chat) -> str:
    if isinstance(rec, dict):
        if isinstance(rec.get("text"), str):
            return rec["text"]
        if isinstance(rec.get("messages"), list):
            return chat(rec["messages"], where)
    raise BadInput(f"{where}: expected an object with a 'text' string or a 'messages' list")


def _read_jsonl(path: Path, chat) -> list[str]:
    from ..checks import parse_json
    docs = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = parse_json(line, f"--calib {path}: line {n}")
            docs.append(_record_doc(rec, f"--calib {path}: line {n}", chat))
    return docs


def _table_docs(table, where: str, chat) -> list[str]:
    cols = table.column_names
    if "text" in cols:
        docs = table.column("text").to_pylist()
        bad = next((i for i, d in enumerate(docs) if not isinstance(d, str)), None)
        if bad is not None:
            raise BadInput(f"{where}: row {bad}: 'text' is {type(docs[bad]).__name__}, expected a string")
        return docs
    if "messages" in cols:
        return [chat(m, f"{where}: row {i}") for i, m in enumerate(table.column("messages").to_pylist())]
    raise BadInput(f"{where}: no 'text' column (columns: {', '.join(cols) or 'none'})")


def _read_arrow(path: Path):
    import pyarrow as pa
    with open(path, "rb") as f:
        magic = f.read(8)
    # an IPC stream starts with a continuation marker (or a legacy length), a file with ARROW1
    if not (magic.startswith(b"ARROW1") or magic[:4] == b"\xff\xff\xff\xff"):
        raise BadInput(f"--calib {path}: not an Arrow file (no Arrow stream or file header)")
    try:
        with pa.memory_map(str(path)) as src:
            try:
                return pa.ipc.open_stream(src).read_all()  # datasets' cache/save_to_disk files are streams
            except pa.ArrowInvalid:
                pass
        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_file(src).read_all()
    except (pa.ArrowException, OSError) as e:
        raise BadInput(f"--calib {path}: not a readable Arrow file ({str(e)[:200]})") from None


def _read_file(path: Path, chat) -> list[str]:
    s = path.suffix.lower()
    if s == ".txt":
        return [_read_text(path)]
    if s == ".jsonl":
        return _read_jsonl(path, chat)
    if s == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(str(path))
        except (pa.ArrowException, OSError) as e:
            raise BadInput(f"--calib {path}: not a readable parquet file ({str(e)[:200]})") from None
        return _table_docs(table, f"--calib {path}", chat)
    if s == ".arrow":
        return _table_docs(_read_arrow(path), f"--calib {path}", chat)
    raise BadInput(f"--calib {path}: unsupported file type '{s}' (expected .txt, .jsonl, .parquet or .arrow)")


def _read_dir(path: Path, chat) -> list[str]:
    from ..checks import inside, read_json
    dd = path / "dataset_dict.json"
    if dd.is_file():  # DatasetDict.save_to_disk: one folder per split; calibrate on 'train' when present
        splits = read_json(dd, "--calib").get("splits") or []
        if not isinstance(splits, list) or not all(isinstance(x, str) for x in splits):
            raise BadInput(f"--calib {dd}: 'splits' must be a list of split names")
        if not splits:
            raise BadInput(f"--calib {dd}: lists no splits")
        split = inside(path, "train" if "train" in splits else splits[0], f"--calib {dd}")
        if not split.is_dir() or (split / "dataset_dict.json").exists():
            raise BadInput(f"--calib {dd}: split '{split.relative_to(path)}' is not a dataset folder beside it")
        return _read_dir(split, chat)
    state = path / "state.json"
    if state.is_file():  # Dataset.save_to_disk: arrow stream shards in state.json's order
        entries = read_json(state, "--calib").get("_data_files", [])
        if not isinstance(entries, list) or not all(isinstance(f, dict) for f in entries):
            raise BadInput(f"--calib {state}: '_data_files' must be a list of {{\"filename\": ...}} objects")
        files = [inside(path, f.get("filename"), f"--calib {state}") for f in entries]
        missing = [str(f) for f in files if not f.is_file()]
        if not files or missing:
            raise BadInput(f"--calib {path}: state.json names missing data files ({', '.join(missing) or 'none'})")
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise BadInput(f"--calib {path}: folder holds no .txt, .jsonl, .parquet or .arrow files")
    docs: list[str] = []
    for f in files:
        docs += _read_file(f, chat)
    return docs


# ---------------------------------------------------------------- chat template

def _hf_tokenizer_config(d: Path) -> dict:
    p = d / "tokenizer_config.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BadInput(f"{p}: not valid JSON ({e})") from None


def chat_template_and_specials(graph: Graph) -> tuple[str | None, dict[str, str]]:
    """The model's default chat template and its special-token strings (bos_token, eos_token ...)."""
    tok = graph.tokenizer
    if tok.gguf_kv is not None:
        kv = tok.gguf_kv
        tokens = list(kv.get("tokenizer.ggml.tokens") or [])
        specials = {}
        for name in ("bos", "eos", "unk", "pad", "sep", "cls", "mask"):
            i = kv.get(f"tokenizer.ggml.{'unknown' if name == 'unk' else name}_token_id"
                       if name != "pad" else "tokenizer.ggml.padding_token_id")
            if isinstance(i, int) and 0 <= i < len(tokens):
                specials[f"{name}_token"] = tokens[i]
        return kv.get("tokenizer.chat_template"), specials
    if tok.hf_dir is not None:
        d = Path(tok.hf_dir)
        tc = _hf_tokenizer_config(d)
        template = tc.get("chat_template")
        if isinstance(template, list):  # named templates: transformers uses 'default'
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template is None and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        specials = {}
        for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
            v = tc.get(k)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                specials[k] = v
        return template, specials
    return None, {}


def render_chat(template: str, messages: list, specials: dict[str, str], add_generation_prompt: bool = False
                ) -> str:
    """Render like transformers' apply_chat_template: sandboxed jinja2, trim/lstrip blocks, loop controls,
    `raise_exception`, a `tojson` that does not HTML-escape, and the special-token strings as variables."""
    from datetime import datetime

    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols

    from .template_limits import LimitedEnvironment, render_limited

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return render_limited(env.from_string(template), messages=messages, add_generation_prompt=add_generation_prompt,
                          **specials)


def _chat_renderer(graph: Graph):
    cache: dict = {}

    def chat(messages, where: str) -> str:
        if "t" not in cache:
            cache["t"] = chat_template_and_specials(graph)
        template, specials = cache["t"]
        if not template:
            raise BadInput(f"{where}: 'messages' needs a chat template, and {graph.source} has none "
                           f"(give plain 'text' records instead)")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content", ""), str)
                for m in messages):
            raise BadInput(f"{where}: 'messages' must be a list of objects with a 'role' and a 'content' string")
        from jinja2.exceptions import TemplateError
        try:
            return render_chat(template, messages, specials)
        except TemplateError as e:
            raise BadInput(f"{where}: the model's chat template failed: {str(e)[:200]}") from None
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, ArithmeticError, RecursionError,
                MemoryError) as e:  # the template is code from the model's files: its failures are bad input
            raise BadInput(f"{where}: the model's chat template failed ({e.__class__.__name__}: {str(e)[:200]})") \
                from None
    return chat


def read_documents(graph: Graph, calib: Path) -> list[str]:
    """The calibration source's documents as text (chat messages rendered with the model's template); token-id
    lists from Python stay lists."""
    if isinstance(calib, CalibList):
        return [d for d in _list_docs(calib, _chat_renderer(graph)) if len(d)]
    p = Path(calib)
    if not p.exists():
        raise BadInput(f"--calib {p}: no such file or directory")
    chat = _chat_renderer(graph)
    docs = _read_dir(p, chat) if p.is_dir() else _read_file(p, chat)
    docs = [d for d in docs if d]
    if not docs:
        raise BadInput(f"--calib {p}: holds no text")
    return docs


# ---------------------------------------------------------------- tokens

def token_stream(graph: Graph, calib: Path | None) -> tuple[list[int], int | None]:
    """(all calibration tokens as one stream, the BOS id to put at each window start or None)."""
    from ..eval.tokens import ADD_BOS, BOS, _kv_and_tokenizer
    if calib is None:
        raise BadInput("--calib is required: quantkit bundles no calibration text; give a .txt, .jsonl or "
                       ".parquet file or a local datasets folder")
    calib = as_calib(calib)
    docs = read_documents(graph, calib)
    if all(isinstance(d, list) for d in docs):  # token ids need no tokenizer
        kv, tok = _kv_only(graph), None
    else:
        kv, tok = _kv_and_tokenizer(graph)
    add_bos = bool(kv.get(ADD_BOS, kv.get("tokenizer.ggml.model") == "llama"))
    bos = kv.get(BOS)
    bos = int(bos) if add_bos and bos is not None else None
    eos = kv.get("tokenizer.ggml.eos_token_id")
    sep = int(eos) if eos is not None else (int(kv[BOS]) if kv.get(BOS) is not None else None)
    ids: list[int] = [bos] if bos is not None else []
    texts = [d for d in docs if isinstance(d, str)]
    enc = iter(tok.encode_batch(texts, add_special_tokens=False) if texts else [])
    for k, d in enumerate(docs):
        if k and sep is not None:
            ids.append(sep)
        ids += d if isinstance(d, list) else next(enc).ids
    n_vocab = graph.hparams.vocab_size
    bad = next((t for t in ids if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise BadInput(f"calib: token id {bad} is outside the vocabulary (size {n_vocab})")
    return ids, bos


def _kv_only(graph: Graph) -> dict:
    tok = graph.tokenizer
    if tok.gguf_kv is not None:
        return tok.gguf_kv
    from ..formats.gguf_tokenizer import uses_tiktoken
    if tok.hf_dir is not None and ((Path(tok.hf_dir) / "tokenizer.json").exists() or uses_tiktoken(tok.hf_dir)):
        from ..formats.gguf_tokenizer import tokenizer_kv
        return {k.key: k.value for k in tokenizer_kv(tok.hf_dir, graph.hparams.vocab_size)}
    return {}


def load_calibration(graph: Graph, calib: Path | None, n_samples: int = 128, seqlen: int = 512, seed: int = 0
                     ) -> list[torch.LongTensor]:
    """n_samples disjoint windows [seqlen] of the calibration stream, chosen at random with `seed`."""
    if n_samples <= 0 or seqlen <= 0:
        raise QuantkitError(f"calibration needs positive sample count and length (got {n_samples} x {seqlen})")
    ids, bos = token_stream(graph, calib)
    need = n_samples * seqlen
    if len(ids) < need:
        raise BadInput(f"--calib {calib}: {len(ids)} tokens, but {n_samples} samples of {seqlen} tokens need "
                       f"{need}; give more text or lower --calib-samples/--calib-seqlen")
    stream = torch.tensor(ids, dtype=torch.long)
    slots = len(ids) // seqlen
    g = torch.Generator().manual_seed(int(seed))
    offset = int(torch.randint(0, len(ids) - slots * seqlen + 1, (1,), generator=g))
    chosen = torch.randperm(slots, generator=g)[:n_samples].sort().values
    out = []
    for s in chosen.tolist():
        w = stream[offset + s * seqlen: offset + (s + 1) * seqlen].clone()
        if bos is not None:
            w[0] = bos
        out.append(w)
    return out
