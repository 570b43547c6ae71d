"""Our GGUF header parser against the gguf package's reader (the oracle), and damaged headers."""

import pytest
from gguf import GGUFReader, GGUFValueType as VT, GGUFWriter

from quantkit.errors import BadInput
from quantkit.formats.gguf_parse import parse_gguf


def _same_as_gguf(path, skip=()):
    ours, ref = parse_gguf(path), GGUFReader(str(path))
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert {k: v for k, v in ours.fields.items() if k not in skip} == \
        {k: f.contents() for k, f in fields.items() if k not in skip}
    assert ours.types == {k: list(f.types) for k, f in fields.items()}
    assert [(t.name, t.shape, int(t.tensor_type), t.data_offset, t.n_bytes) for t in ours.tensors] == \
        [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
         for t in ref.tensors]


def test_real_model_header_equals_gguf_reader(smollm_gguf):
    _same_as_gguf(smollm_gguf)


def test_every_value_type_and_alignment(tmp_path):
    import numpy as np
    p = tmp_path / "all.gguf"
    w = GGUFWriter(str(p), "llama")
    w.add_custom_alignment(64)
    w.add_uint8("a.u8", 200), w.add_int8("a.i8", -5), w.add_uint16("a.u16", 60000), w.add_int16("a.i16", -300)
    w.add_uint32("a.u32", 4_000_000_000), w.add_int32("a.i32", -7), w.add_float32("a.f32", 0.25)
    w.add_uint64("a.u64", 2**63), w.add_int64("a.i64", -2**40), w.add_float64("a.f64", 1e-300)
    w.add_bool("a.bool", True), w.add_string("a.str", "héllo ✓")
    w.add_array("a.strs", ["", "x", "日本"]), w.add_array("a.ints", [1, -2, 3]), w.add_array("a.floats", [0.5, 2.0])
    w.add_array("a.nested", [[1, 2], [3]])
    w.add_tensor("t0", np.arange(96, dtype=np.float32).reshape(3, 32))
    w.add_tensor("t1", np.ones((2, 64), dtype=np.float16))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    _same_as_gguf(p, skip={"a.nested"})  # gguf's contents() flattens nested arrays
    g = parse_gguf(p)
    assert g.fields["a.nested"] == [[1, 2], [3]] and g.types["a.strs"] == [VT.ARRAY, VT.STRING]


def test_damaged_headers(tmp_path, smollm_gguf):
    data = smollm_gguf.read_bytes()[:3_000_000]
    for cut, what in ((20, "corrupt"), (100_000, "truncated"), (3_000_000, "truncated")):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut] if cut > 30 else data[:cut] + b"\0" * 8)
        with pytest.raises(BadInput, match=what):
            parse_gguf(p)
    p = tmp_path / "v9.gguf"
    p.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + data[8:1000])
    with pytest.raises(BadInput, match="version 9"):
        parse_gguf(p)
    p = tmp_path / "be.gguf"
    p.write_bytes(b"GGUF" + (3).to_bytes(4, "big") + data[8:1000])
    with pytest.raises(BadInput, match="big-endian"):
        parse_gguf(p)
