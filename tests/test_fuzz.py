"""Seeded fuzzing of everything quantkit reads: GGUF, safetensors, config.json, shard indexes, calibration
files and chat templates. Every mutated input must end in success or exit 2 with a one-line `error: ...`;
nothing may escape as a traceback, run past its time limit, or need more than a bounded address space
(tests/fuzz_worker.py runs the cases in batches under both limits). Some mutations are known to be wrong
(a path out of the folder, NaN weights, integers for floats): those must be refused, not accepted."""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from tiny_models import make_tiny

SEED = 1234
HERE = Path(__file__).resolve().parent
MUST_FAIL = "must-fail"  # case name tag: a success would be silent corruption or an escape


# ---------------------------------------------------------------- a GGUF encoder of our own (test side)

_SC = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
       VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}


def _s(b: str | bytes) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def _val(vt, v) -> bytes:
    """vt: a VT, or [ARRAY, element VT]."""
    if isinstance(vt, (list, tuple)):
        et = vt[1]
        body = b"".join(_s(x) if et == VT.STRING else struct.pack(_SC[et], x) for x in v)
        return struct.pack("<IIQ", VT.ARRAY, et, len(v)) + body
    if vt == VT.STRING:
        return struct.pack("<I", vt) + _s(v)
    return struct.pack("<I", vt) + struct.pack(_SC[vt], v)


def gguf_bytes(kv: list, infos: list, data: bytes, alignment: int = 32) -> bytes:
    """kv: [(key, vt, value) or (key, raw_bytes_of_type_and_value)], infos: [(name, dims, type, offset)]."""
    h = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kv))
    for item in kv:
        h += _s(item[0]) + (item[1] if len(item) == 2 else _val(item[1], item[2]))
    for name, dims, typ, off in infos:
        h += _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        h += struct.pack("<IQ", typ, off)
    h += b"\0" * (-len(h) % alignment)
    return h + data


def read_base_gguf(path: Path):
    """(kv, infos, data) of a well-formed file, through the gguf package's reader."""
    from gguf import GGUFReader
    r = GGUFReader(path)
    kv = []
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        t = f.types
        if t[0] == VT.ARRAY:
            vals = [bytes(f.parts[i]).decode() if t[1] == VT.STRING else f.parts[i].tolist()[0] for i in f.data]
            kv.append((f.name, [VT.ARRAY, t[1]], vals))
        elif t[0] == VT.STRING:
            kv.append((f.name, VT.STRING, bytes(f.parts[f.data[0]]).decode()))
        else:
            kv.append((f.name, t[0], f.parts[f.data[0]].tolist()[0]))
    start = min(int(t.data_offset) for t in r.tensors)
    infos = [(t.name, [int(x) for x in t.shape], int(t.tensor_type), int(t.data_offset) - start) for t in r.tensors]
    data = path.read_bytes()[start:]
    return kv, infos, data


# ---------------------------------------------------------------- the base inputs

@pytest.fixture(scope="module")
def bases(tmp_path_factory, smollm_tokenizer_dir):
    from quantkit.export import convert_to_gguf
    from quantkit.families import load
    root = tmp_path_factory.mktemp("fuzzbase")
    hf = make_tiny("llama_mha", root / "hf")  # vocab 256, 2 layers, F32
    g = load(hf)
    g.tokenizer.hf_dir = None
    toks = [f"t{i}" for i in range(256)]
    g.tokenizer.gguf_kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": toks,
                           "tokenizer.ggml.token_type": [1] * 256, "tokenizer.ggml.bos_token_id": 1}
    g.metadata["gguf_kv_types"] = {"tokenizer.ggml.tokens": [VT.ARRAY, VT.STRING],
                                   "tokenizer.ggml.token_type": [VT.ARRAY, VT.INT32],
                                   "tokenizer.ggml.bos_token_id": VT.UINT32}
    gguf = root / "base.gguf"
    convert_to_gguf(g, gguf, q="q8_0", progress=False)
    calib_model = make_tiny("llama_mha", root / "calib_model", vocab=49152, layers=1)
    for f in smollm_tokenizer_dir.iterdir():
        shutil.copy(f, calib_model / f.name)
    return {"hf": hf, "gguf": gguf, "calib_model": calib_model}


# ---------------------------------------------------------------- mutations

HOSTILE_SCALARS = [(VT.UINT32, 0), (VT.INT32, -1), (VT.UINT32, 2**31), (VT.UINT64, 2**63), (VT.UINT64, 2**64 - 1),
                   (VT.STRING, "12"), ([VT.ARRAY, VT.INT32], [4, 4]), (VT.FLOAT32, 1.5), (VT.BOOL, True),
                   (VT.FLOAT32, float("nan")), (VT.UINT32, 3), (VT.UINT32, 7), (VT.FLOAT64, -1e300), None]
GGUF_KEYS = ["llama.block_count", "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
             "llama.attention.head_count_kv", "llama.context_length", "llama.vocab_size",
             "llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.layer_norm_rms_epsilon",
             "llama.rope.freq_base", "general.alignment", "general.architecture", "tokenizer.ggml.tokens",
             "tokenizer.ggml.token_type", "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id",
             "llama.rope.scaling.type", "general.name"]


def _set(kv, key, vt_value):
    out = [x for x in kv if x[0] != key]
    if vt_value is not None:
        out.append((key, *vt_value))
    return out


def gguf_cases(rng: random.Random, base: Path, d: Path) -> list:
    kv, infos, data = read_base_gguf(base)
    files = []

    def add(name, blob, convert=False):
        p = d / f"{name}.gguf"
        p.write_bytes(blob)
        files.append((name, p, convert))

    for i in range(45):  # one hyperparameter / tokenizer key set to a hostile value
        key = rng.choice(GGUF_KEYS)
        v = rng.choice(HOSTILE_SCALARS)
        add(f"gguf-kv{i}", gguf_bytes(_set(kv, key, v), infos, data), convert=i % 3 == 0)
    for st in ("linear", "yarn"):  # scaling type without its factor
        add(f"gguf-rope-{st}-nofactor", gguf_bytes(_set(kv, "llama.rope.scaling.type", (VT.STRING, st)), infos, data))
    add("gguf-int-tokens", gguf_bytes(_set(kv, "tokenizer.ggml.tokens", ([VT.ARRAY, VT.INT32], list(range(256)))),
                                      infos, data))
    deep = struct.pack("<I", VT.ARRAY) + (struct.pack("<IQ", VT.ARRAY, 1)) * 5000 + struct.pack("<IQ", VT.UINT8, 0)
    add("gguf-nested-5000", gguf_bytes(kv + [("x.deep", deep)], infos, data))
    add("gguf-huge-array-count", gguf_bytes(kv + [("x.arr", struct.pack("<IIQ", VT.ARRAY, VT.UINT64, 2**60))],
                                            infos, data))
    add("gguf-huge-string", gguf_bytes(kv + [("x.s", struct.pack("<IQ", VT.STRING, 2**62))], infos, data))
    add("gguf-many-strings", gguf_bytes(kv + [("x.a", struct.pack("<IIQ", VT.ARRAY, VT.STRING, 2**40))], infos, data))
    add("gguf-block-count-2^31", gguf_bytes(_set(kv, "llama.block_count", (VT.UINT32, 2**31)), infos, data))

    def tensor_mut(i, fn):
        inf = [[n, list(dims), t, o] for n, dims, t, o in infos]
        fn(inf, rng.randrange(len(inf)))
        add(f"gguf-tensor{i}", gguf_bytes(kv, [tuple(x) for x in inf], data), convert=i % 2 == 0)

    muts = [
        lambda inf, j: inf[j][1].__setitem__(0, 0),
        lambda inf, j: inf[j].__setitem__(1, [2**32, 2**32]),
        lambda inf, j: inf[j][1].__setitem__(0, inf[j][1][0] + 1),
        lambda inf, j: inf[j].__setitem__(1, [1] * 9),
        lambda inf, j: inf[j].__setitem__(2, rng.choice([int(QT.F16), int(QT.Q4_0), 99, 1000, int(QT.F32)])),
        lambda inf, j: inf[j].__setitem__(3, inf[j][3] + 1),
        lambda inf, j: inf[j].__setitem__(3, inf[j - 1][3]),
        lambda inf, j: inf[j].__setitem__(3, 2**60),
        lambda inf, j: inf[j].__setitem__(3, len(data) - 32),
        lambda inf, j: inf[j].__setitem__(0, inf[j - 1][0]),
        lambda inf, j: inf[j].__setitem__(0, "blk.7.attn_q.weight"),
        lambda inf, j: inf.pop(j),
    ]
    for i in range(24):
        tensor_mut(i, muts[i % len(muts)])
    blob = gguf_bytes(kv, infos, data)
    header_len = len(blob) - len(data)
    tensor_infos_at = blob.index(_s(infos[0][0]) + struct.pack("<I", len(infos[0][1])))
    for i in range(20):  # a few random bytes of the header changed (every other time among the tensor infos)
        b = bytearray(blob)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(8 if i % 2 else tensor_infos_at, header_len)] = rng.randrange(256)
        add(f"gguf-flip{i}", bytes(b), convert=i % 4 == 0)
    for i in range(8):
        add(f"gguf-cut{i}", blob[:rng.randrange(8, len(blob))])
    # NaN in the data of an f32 (1-D norm) tensor and of a q8_0 block's scale
    for i, kind in enumerate((int(QT.F32), int(QT.Q8_0))):
        name, dims, typ, off = next(x for x in infos if x[2] == kind)
        b = bytearray(blob)
        b[header_len + off: header_len + off + 4] = b"\xff\xff\xff\xff"
        add(f"gguf-nan{i}-{MUST_FAIL}", bytes(b), convert=True)
    return files


def st_header(path: Path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_bytes(header, data: bytes, length: int | None = None) -> bytes:
    hb = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(hb) if length is None else length) + hb + data


def hf_dir_with(base: Path, d: Path, name: str, files: dict) -> Path:
    """A copy of the HF dir (by symlinks) with some files replaced."""
    out = d / name
    out.mkdir()
    for f in base.iterdir():
        if f.name not in files:
            (out / f.name).symlink_to(f)
    for n, content in files.items():
        if content is not None:
            (out / n).write_bytes(content if isinstance(content, bytes) else content.encode())
    return out


def safetensors_cases(rng: random.Random, hf: Path, d: Path) -> list:
    header, data = st_header(hf / "model.safetensors")
    names = [k for k in header if k != "__metadata__"]
    out = []

    def add(name, blob, convert=False):
        out.append((name, hf_dir_with(hf, d, name, {"model.safetensors": blob}), convert))

    for i, top in enumerate(([], 5, "x", None, [header])):
        add(f"st-top{i}", st_bytes(top, data))
    entry_muts = [
        lambda e: e.__setitem__("dtype", "F99"), lambda e: e.__setitem__("dtype", 5),
        lambda e: e.__setitem__("shape", [-1, 64]), lambda e: e.__setitem__("shape", [2**40, 2**40]),
        lambda e: e.__setitem__("shape", ["64", 64]), lambda e: e.__setitem__("shape", [[64]]),
        lambda e: e.__setitem__("shape", [1] * 9), lambda e: e.__setitem__("shape", True),
        lambda e: e.__setitem__("data_offsets", e["data_offsets"][::-1]),
        lambda e: e.__setitem__("data_offsets", [-8, e["data_offsets"][1]]),
        lambda e: e.__setitem__("data_offsets", [0, 2**63]),
        lambda e: e.__setitem__("data_offsets", [e["data_offsets"][0], e["data_offsets"][1] - 2]),
        lambda e: e.__setitem__("data_offsets", [1.5, 2]), lambda e: e.__setitem__("data_offsets", "x"),
        lambda e: e.pop("dtype"), lambda e: e.clear(),
    ]
    for i, m in enumerate(entry_muts):
        h = json.loads(json.dumps(header))
        m(h[rng.choice(names)])
        add(f"st-entry{i}", st_bytes(h, data), convert=i % 2 == 0)
    for i in range(3):  # two tensors overlapping
        h = json.loads(json.dumps(header))
        a, b = rng.sample([n for n in names if h[n]["data_offsets"][1] - h[n]["data_offsets"][0] >= 256], 2)
        ln = h[a]["data_offsets"][1] - h[a]["data_offsets"][0]
        s = h[b]["data_offsets"][0]
        h[a]["data_offsets"] = [s, s + ln] if h[b]["data_offsets"][1] - s >= ln else h[a]["data_offsets"]
        add(f"st-overlap{i}", st_bytes(h, data))
    for i, m in enumerate((["x"], {"a": [1]}, 5)):
        h = dict(header)
        h["__metadata__"] = m
        add(f"st-meta{i}", st_bytes(h, data))
    hb = json.dumps(header).encode()
    for i, ln in enumerate((0, 2**63, len(hb) + 1, len(hb) - 1, 2**27)):
        add(f"st-len{i}", st_bytes(hb, data, ln))
    for i in range(10):
        b = bytearray(hb)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        add(f"st-flip{i}", st_bytes(bytes(b), data))
    add("st-deep", st_bytes(b"[" * 200000, data))
    # floats re-labelled as I32 (same size), NaN and a value beyond f16's range in a weight
    w = next(n for n in names if "mlp.up_proj" in n)
    h = json.loads(json.dumps(header))
    h[w]["dtype"] = "I32"
    add(f"st-int-weight-{MUST_FAIL}", st_bytes(h, data), convert=True)
    s = header[w]["data_offsets"][0] + 4 * 7
    for i, v in enumerate((float("nan"), float("inf"), 1e6)):
        dd = bytearray(data)
        dd[s:s + 4] = struct.pack("<f", v)
        add(f"st-value{i}-{MUST_FAIL}", st_bytes(header, bytes(dd)), convert=True)
    return out


CONFIG_VALUES = [0, -1, "64", [64], 10**9, True, None, 2**40, 1.5, {}]
CONFIG_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "tie_word_embeddings", "architectures", "hidden_act", "rope_scaling", "rope_parameters"]
ROPES = [{"rope_type": "linear"}, {"rope_type": "llama3", "factor": 8.0}, ["linear", 2.0],
         {"rope_type": "yarn", "factor": "x"}, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
         {"type": "dynamic", "factor": 2.0}, {"rope_type": "linear", "factor": -2}]


def config_cases(rng: random.Random, hf: Path, d: Path) -> list:
    cfg = json.loads((hf / "config.json").read_text())
    out = []

    def add(name, content, convert=False):
        out.append((name, hf_dir_with(hf, d, name, {"config.json": content}), convert))

    for i in range(30):
        c = dict(cfg)
        c[rng.choice(CONFIG_KEYS)] = rng.choice(CONFIG_VALUES)
        add(f"cfg{i}", json.dumps(c), convert=i % 3 == 0)
    for i, r in enumerate(ROPES):
        c = dict(cfg)
        c["rope_scaling"] = r
        add(f"cfg-rope{i}", json.dumps(c))
    c = dict(cfg)
    c["rope_parameters"] = [{"rope_type": "linear"}]
    c.pop("rope_scaling", None)
    add("cfg-rope-params-list", json.dumps(c))
    for i, blob in enumerate((json.dumps([cfg]), b"\x00\xff\xfe" * 50, b"", "[" * 100000, json.dumps(5))):
        add(f"cfg-top{i}", blob)
    return out


def index_cases(rng: random.Random, hf: Path, d: Path) -> list:
    header, _ = st_header(hf / "model.safetensors")
    wm = {k: "model.safetensors" for k in header if k != "__metadata__"}
    k0 = next(iter(wm))
    variants = [
        {"weight_map": list(wm)}, {"weight_map": {**wm, k0: 5}}, {"weight_map": "x"}, {}, [wm], 5,
        {"weight_map": {**wm, k0: "../../../../etc/passwd"}, MUST_FAIL: 1},
        {"weight_map": {**wm, k0: "/etc/passwd"}, MUST_FAIL: 1},
        {"weight_map": {**wm, k0: "sub/../../model.safetensors"}, MUST_FAIL: 1},
        {"weight_map": {**wm, k0: "model-00002-of-00002.safetensors"}},
        {"weight_map": {**wm, "extra.weight": "model.safetensors"}},
        {"weight_map": {**wm, k0: ""}}, {"weight_map": {**wm, k0: "."}},
    ]
    out = []
    for i, v in enumerate(variants):
        tag = f"-{MUST_FAIL}" if isinstance(v, dict) and v.pop(MUST_FAIL, None) else ""
        out.append((f"index{i}{tag}", hf_dir_with(hf, d, f"index{i}{tag}",
                                                  {"model.safetensors.index.json": json.dumps(v)}), False))
    for i, blob in enumerate((b"\xff" * 64, "[" * 100000, "")):
        out.append((f"index-raw{i}", hf_dir_with(hf, d, f"index-raw{i}", {"model.safetensors.index.json": blob}),
                    False))
    return out


TEMPLATES = ["{% for i in range(100000000) %}x{% endfor %}", "{{ 'A' * 3000000000 }}",
             "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "{{ messages[0].content.__class__.__mro__ }}",
             "{{ cycler.__init__.__globals__.os }}", "{% for m in messages %}{{ m.content ~ m.content }}{% endfor %}",
             "{{ raise_exception('no') }}", "{{ messages[5].content }}", "{% for x in 5 %}{% endfor %}",
             "{{ 'a'.ljust(3000000000) }}", "{{ 10 ** 100000000 }}", "{{ '{:3000000000}'.format(1) }}",
             "{% set ns = namespace(s='AAAA') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"]


def calib_cases(rng: random.Random, model: Path, text: str, d: Path) -> list:
    """(name, model dir, calib path)."""
    out = []

    def add(name, content, suffix, model_dir=model):
        p = d / f"{name}{suffix}"
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        out.append((name, model_dir, p))

    good = text[:4000]
    add("cal-txt-ok", good, ".txt")
    add("cal-txt-binary", bytes(rng.randrange(256) for _ in range(3000)), ".txt")
    add("cal-txt-empty", b"", ".txt")
    lines = [b"\x00\xff\x80garbage", b"[1, 2]", b'{"text": 5}', b'{"messages": "x"}', b'{"messages": [5]}',
             b'{"messages": [{"role": "user", "content": 5}]}',
             b'{"messages": [{"role": "user", "content": {"a": 1}}]}', b'{"messages": [{"content": "x"}]}',
             b"[" * 100000, b'{"text": "' + b"\xff\xfe" * 10 + b'"}']
    for i, ln in enumerate(lines):
        add(f"cal-jsonl{i}", json.dumps({"text": good}).encode() + b"\n" + ln + b"\n", ".jsonl")
    add("cal-jsonl-ok", "\n".join(json.dumps({"text": good[i:i + 500]}) for i in range(0, 4000, 500)), ".jsonl")
    add("cal-arrow-junk", bytes(rng.randrange(256) for _ in range(2000)), ".arrow")
    add("cal-arrow-magic", b"ARROW1\0\0" + bytes(rng.randrange(256) for _ in range(2000)), ".arrow")
    add("cal-arrow-stream", b"\xff\xff\xff\xff" + bytes(rng.randrange(256) for _ in range(2000)), ".arrow")
    add("cal-parquet-junk", b"PAR1" + bytes(rng.randrange(256) for _ in range(2000)) + b"PAR1", ".parquet")
    import pyarrow as pa
    ints = d / "cal-arrow-ints.arrow"
    with pa.OSFile(str(ints), "wb") as f, pa.ipc.new_stream(f, pa.schema([("text", pa.int64())])) as w:
        w.write_table(pa.table({"text": [1, 2, 3]}))
    out.append(("cal-arrow-ints", model, ints))
    states = [{"_data_files": [{"filename": "../../../../etc/passwd"}], MUST_FAIL: 1},
              {"_data_files": [{"filename": "/etc/passwd"}], MUST_FAIL: 1}, {"_data_files": "x"}, [1],
              {"_data_files": [{"filename": 5}]}, {"_data_files": [5]}, b"\xff\x00garbage"]
    for i, st in enumerate(states):
        tag = f"-{MUST_FAIL}" if isinstance(st, dict) and st.pop(MUST_FAIL, None) else ""
        folder = d / f"cal-state{i}{tag}"
        folder.mkdir()
        (folder / "state.json").write_bytes(st if isinstance(st, bytes) else json.dumps(st).encode())
        out.append((folder.name, model, folder))
    for i, dd in enumerate(({"splits": ["../.."]}, {"splits": "train"}, {"splits": [5]}, {"splits": ["."]}, [],
                            {"splits": ["train"]})):
        folder = d / f"cal-dd{i}"
        folder.mkdir()
        (folder / "dataset_dict.json").write_text(json.dumps(dd))
        out.append((folder.name, model, folder))
    chat = "\n".join(json.dumps({"messages": [{"role": "user", "content": good[i:i + 400]}]})
                     for i in range(0, 4000, 400))
    for i, t in enumerate(TEMPLATES):
        tc = json.loads((model / "tokenizer_config.json").read_text())
        tc["chat_template"] = t
        m = hf_dir_with(model, d, f"tmpl-model{i}", {"tokenizer_config.json": json.dumps(tc)})
        add(f"cal-template{i}", chat, ".jsonl", model_dir=m)
    return out


def imatrix_cases(rng: random.Random, base: Path, d: Path) -> list:
    """Importance matrices for the base GGUF, legacy .dat and GGUF, whole and damaged."""
    _, infos, _ = read_base_gguf(base)
    mats = [(n, dims[0]) for n, dims, _, _ in infos if n.startswith("blk.") and len(dims) == 2]
    dat = struct.pack("<i", len(mats))
    for n, ne0 in mats:
        dat += struct.pack("<i", len(n)) + n.encode() + struct.pack("<ii", 1, ne0)
        dat += np.asarray([rng.random() + 0.1 for _ in range(ne0)], dtype="<f4").tobytes()
    dat += struct.pack("<i", 1) + struct.pack("<i", 4) + b"test"
    out = []

    def add(name, blob, suffix=".dat"):
        p = d / f"{name}{suffix}"
        p.write_bytes(blob)
        out.append((name, p))

    add("imx-dat-ok", dat)
    for i in range(10):
        b = bytearray(dat)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        add(f"imx-dat-flip{i}", bytes(b))
    for i in range(4):
        add(f"imx-dat-cut{i}", dat[:rng.randrange(len(dat))])
    add("imx-dat-count", struct.pack("<i", 2**31 - 1) + dat[4:])
    nan = bytearray(dat)
    first_vals = 4 + 4 + len(mats[0][0]) + 8
    nan[first_vals:first_vals + 4] = struct.pack("<f", float("nan"))
    add(f"imx-dat-nan-{MUST_FAIL}", bytes(nan))
    kv = [("general.type", VT.STRING, "imatrix"), ("imatrix.chunk_count", VT.UINT32, 1),
          ("imatrix.chunk_size", VT.UINT32, 16), ("imatrix.datasets", [VT.ARRAY, VT.STRING], ["t"])]
    tinfo, data = [], b""
    for n, ne0 in mats:
        for suffix, shape, blob in ((".in_sum2", [ne0, 1], np.ones(ne0, "<f4").tobytes()),
                                    (".counts", [1, 1], np.ones(1, "<f4").tobytes())):
            tinfo.append((n + suffix, shape, int(QT.F32), len(data)))
            data += blob + b"\0" * (-len(blob) % 32)
    add("imx-gguf-ok", gguf_bytes(kv, tinfo, data), ".gguf")
    for i, (k, v) in enumerate((("imatrix.chunk_count", (VT.STRING, "x")), ("imatrix.datasets", (VT.UINT32, 5)),
                                ("general.type", (VT.STRING, "model")), ("imatrix.chunk_size", (VT.INT32, -4)))):
        add(f"imx-gguf-kv{i}", gguf_bytes(_set(kv, k, v), tinfo, data), ".gguf")
    add("imx-gguf-nocounts", gguf_bytes(kv, [t for t in tinfo if t[0].endswith(".in_sum2")], data), ".gguf")
    wrong = [(n, [s[0] * 2, 1] if n.endswith(".counts") else s, t, o) for n, s, t, o in tinfo]
    add("imx-gguf-counts-shape", gguf_bytes(kv, wrong, data), ".gguf")
    return out


JSON_VALUES = [None, 5, -1, "x", [], {}, True, [5], {"a": None}, 1e308]


def _json_paths(x, path=(), depth=0, out=None):
    """Paths to the nodes of a JSON tree, down to depth 3 (not into the vocabulary's 49k entries)."""
    out = [] if out is None else out
    if path:
        out.append(path)
    if depth < 3:
        items = x.items() if isinstance(x, dict) else enumerate(x[:3]) if isinstance(x, list) else ()
        for k, v in list(items)[:40]:
            _json_paths(v, path + (k,), depth + 1, out)
    return out


def tokenizer_cases(rng: random.Random, model: Path, d: Path) -> list:
    """(name, model dir) with tokenizer.json / tokenizer_config.json changed at one random node."""
    out = []
    for fname, n in (("tokenizer.json", 14), ("tokenizer_config.json", 8)):
        base = json.loads((model / fname).read_text())
        paths = _json_paths(base)
        for i in range(n):
            doc = json.loads(json.dumps(base))
            *parent, last = rng.choice(paths)
            node = doc
            for k in parent:
                node = node[k]
            node[last] = rng.choice(JSON_VALUES)
            name = f"tok-{fname.split('.')[0]}{i}"
            out.append((name, hf_dir_with(model, d, name, {fname: json.dumps(doc)})))
    for i, blob in enumerate((b"\xff\xfe", "[" * 100000, "[1, 2]")):
        out.append((f"tok-raw{i}", hf_dir_with(model, d, f"tok-raw{i}", {"tokenizer.json": blob})))
    return out


# ---------------------------------------------------------------- the run

def run_worker(cases: list, tmp: Path, timeout: int = 900) -> list:
    cp, rp = tmp / "cases.json", tmp / "results.json"
    cp.write_text(json.dumps(cases))
    r = subprocess.run([sys.executable, str(HERE / "fuzz_worker.py"), str(cp), str(rp)], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"fuzz worker died (rc {r.returncode}): {r.stderr[-3000:]}"
    return json.loads(rp.read_text())


def test_fuzz_inputs(bases, tmp_path, jargon_text):
    rng = random.Random(SEED)
    d = tmp_path / "in"
    d.mkdir()
    o = tmp_path / "out"
    o.mkdir()
    cases = []
    model_inputs = (gguf_cases(rng, bases["gguf"], d) + safetensors_cases(rng, bases["hf"], d)
                    + config_cases(rng, bases["hf"], d) + index_cases(rng, bases["hf"], d))
    for name, p, convert in model_inputs:
        cases.append((name, ["inspect", str(p)]))
        if convert:
            to = ["--q", "f16"] if str(p).endswith(".gguf") else ["--to", "safetensors", "--q", "f16"]
            cases.append((name + "-convert", ["convert", str(p), "-o", str(o / (name + (
                ".gguf" if str(p).endswith(".gguf") else ""))), "--no-progress", *to]))
    for name, model, calib in calib_cases(rng, bases["calib_model"], jargon_text, d):
        cases.append((name, ["imatrix", str(model), "--calib", str(calib), "-o", str(o / f"{name}.imatrix"),
                             "--ctx", "16", "--chunks", "2", "--no-progress"]))
    imx = imatrix_cases(rng, bases["gguf"], d)
    for name, p in imx:
        cases.append((name, ["convert", str(bases["gguf"]), "-o", str(o / f"{name}.gguf"), "--q", "q4_0",
                             "--imatrix", str(p), "--no-progress"]))
    toks = tokenizer_cases(rng, bases["calib_model"], d)
    for name, model in toks:
        cases.append((name, ["convert", str(model), "-o", str(o / f"{name}.gguf"), "--q", "f16", "--no-progress"]))
    n_inputs = len(model_inputs) + len(toks) + len(imx) + sum(1 for c in cases if c[1][0] == "imatrix")
    assert n_inputs >= 150, n_inputs
    results = run_worker(cases, tmp_path)
    assert len(results) == len(cases)
    bad = []
    for r in results:
        lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
        if r["crash"]:
            bad.append(f"{r['name']}: escaped: {r['crash']}")
        elif r["rc"] not in (0, 2):
            bad.append(f"{r['name']}: exit {r['rc']}: {lines[-1:]}")
        elif r["rc"] == 2 and not (lines and lines[-1].startswith("error: ")):
            bad.append(f"{r['name']}: exit 2 without a one-line error: {lines[-3:]}")
        elif "Traceback" in r["stderr"]:
            bad.append(f"{r['name']}: traceback printed")
        elif MUST_FAIL in r["name"] and r["rc"] == 0 and (r["name"].endswith("-convert") or "cal-" in r["name"]
                                                          or "index" in r["name"] or "imx-" in r["name"]):
            bad.append(f"{r['name']}: accepted, but must be refused")
    assert not bad, "\n".join(bad)
    by = {r["name"]: r for r in results}
    # the escapes are refused because they lead outside, not for some other reason
    for n in ("index6-must-fail", "index7-must-fail", "cal-state0-must-fail", "cal-state1-must-fail"):
        assert "outside" in by[n]["stderr"], (n, by[n]["stderr"][-300:])
    errors = sum(r["rc"] == 2 for r in results)
    assert errors >= len(results) // 2 and sum(r["rc"] == 0 for r in results) >= 5, (errors, len(results))
    # nothing left beside the outputs: no partial files of failed runs
    assert not [p.name for p in o.iterdir() if ".partial-" in p.name or p.name.endswith(".quantkit-lock")]
