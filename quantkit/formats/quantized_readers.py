"""Readers for quantized HF checkpoints (GPTQ layout, compressed-tensors pack-quantized and mxfp4-pack-quantized).

Each quantized module `P` (P.qweight ... or P.weight_packed ...) is presented as a lazy `P.weight`
[out, in] float32 tensor holding the exact dequantized values (codes - zero) * scale; every other tensor
passes through as stored. Importing this module registers both readers with formats.hf_quantized.
"""

from __future__ import annotations

import re

import torch

from ..errors import BadInput
from ..graph import LazyTensor
from .compressed_tensors import CT_BITS, unpack_compressed_tensors
from .gptq_layout import CHECKPOINT_FORMATS, GPTQ_BITS, unpack_gptq
from .hf_quantized import register

GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
CT_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def _lazy(files: dict, name: str) -> LazyTensor:
    sf, key = files[name]
    e = sf.entries[key]
    return LazyTensor(e.shape, e.dtype, lambda sf=sf, key=key: sf.tensor(key), source=f"{sf.path}:{key}",
                      nbytes=e.end - e.start)


def _size(files: dict, names: list[str]) -> int:
    return sum(files[n][0].entries[files[n][1]].end - files[n][0].entries[files[n][1]].start for n in names)


def _shape(files: dict, name: str) -> tuple[int, ...]:
    sf, key = files[name]
    return tuple(sf.entries[key].shape)


def _tensors(files: dict, p: str, keys) -> dict[str, torch.Tensor]:
    """Module `p`'s tensors among `keys` that the checkpoint holds."""
    return {k: files[f"{p}.{k}"][0].tensor(files[f"{p}.{k}"][1]) for k in keys if f"{p}.{k}" in files}


def _read_modules(files: dict, suffix: str, source: str, missing: str, module) -> dict[str, LazyTensor]:
    """Each module `p` holding `p{suffix}` as a lazy float32 `p.weight`, from `module(p)` = (shape, load, qtype,
    its tensors); the checkpoint's other tensors as stored."""
    out: dict[str, LazyTensor] = {}
    used = set()
    for name in files:
        if not name.endswith(suffix):
            continue
        p = name[: -len(suffix)]
        shape, load, qtype, parts = module(p)
        out[f"{p}.weight"] = LazyTensor(shape, "F32", load, qtype=qtype, source=f"{source}:{p}",
                                        nbytes=_size(files, parts))
        used.update(parts)
    return _with_unquantized(out, files, used, source, missing)


def read_gptq(files: dict, qc: dict, source: str) -> dict[str, LazyTensor]:
    bits, group_size = qc.get("bits"), qc.get("group_size", -1)
    sym = bool(qc.get("sym", True))
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    if bits not in GPTQ_BITS:
        raise BadInput(f"{source}: quantization_config.bits={bits}; the GPTQ layout holds {GPTQ_BITS}")
    if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise BadInput(f"{source}: quantization_config.group_size={group_size}; expected > 0 or -1")
    if fmt not in CHECKPOINT_FORMATS:
        raise BadInput(f"{source}: GPTQ checkpoint_format '{fmt}' is not supported (expected {CHECKPOINT_FORMATS})")

    def module(p: str):
        parts = [f"{p}.{k}" for k in GPTQ_PARTS if f"{p}.{k}" in files]
        for k in ("qzeros", "scales"):
            if f"{p}.{k}" not in files:
                raise BadInput(f"{source}: GPTQ module '{p}' has qweight but no '{p}.{k}'")
        qw, sc = _shape(files, f"{p}.qweight"), _shape(files, f"{p}.scales")
        if len(qw) != 2 or len(sc) != 2:
            raise BadInput(f"{source}: GPTQ module '{p}': qweight {list(qw)} / scales {list(sc)} must be 2-D")

        def load():
            t = _tensors(files, p, GPTQ_PARTS)
            return unpack_gptq(t, bits, group_size, sym, fmt, name=f"{source}: {p}").dequantize(torch.float32)
        return (qw[1], qw[0] * 32 // bits), load, f"GPTQ-{bits}bit", parts
    return _read_modules(files, ".qweight", source, "'gptq' but no '*.qweight' tensors in the checkpoint", module)


def _ct_float_scheme(qc: dict) -> dict | None:
    """The weight scheme of a float-quantized (FP8) compressed-tensors config, else None."""
    for g in (qc.get("config_groups") or {}).values():
        if (g or {}).get("weights") and (g.get("format") or qc.get("format")) == "float-quantized":
            return g["weights"]
    return None


def _ct_scheme(qc: dict, source: str) -> list[tuple[list[str], dict]]:
    fmt = qc.get("format")
    groups = qc.get("config_groups") or {}
    schemes = []
    for gname, g in groups.items():
        w = (g or {}).get("weights")
        if not w:
            continue
        gfmt = g.get("format") or fmt
        if gfmt != "pack-quantized":
            raise BadInput(f"{source}: compressed-tensors format '{gfmt}' ({gname}) is not supported "
                           "(supported: pack-quantized, mxfp4-pack-quantized, float-quantized)")
        if w.get("type", "int") != "int" or w.get("num_bits") not in CT_BITS:
            raise BadInput(f"{source}: {gname}: weights {w.get('type')} {w.get('num_bits')}-bit; "
                           f"pack-quantized reads int {CT_BITS}")
        strategy = w.get("strategy")
        if strategy not in ("group", "channel"):
            raise BadInput(f"{source}: {gname}: weight strategy '{strategy}' is not supported (group, channel)")
        gs = int(w["group_size"]) if strategy == "group" else -1
        schemes.append((list(g.get("targets") or []), {"bits": int(w["num_bits"]), "group_size": gs,
                                                        "sym": bool(w.get("symmetric", True))}))
    if not schemes:
        raise BadInput(f"{source}: compressed-tensors quantization_config has no weight scheme in config_groups")
    return schemes


def _scheme_for(module: str, schemes, source: str) -> dict:
    if len(schemes) == 1:
        return schemes[0][1]
    for targets, s in schemes:  # explicit regex targets first, then class-name targets
        if any(t.startswith("re:") and re.match(t[3:], module) for t in targets) or module in targets:
            return s
    for targets, s in schemes:
        if "Linear" in targets:
            return s
    raise BadInput(f"{source}: no compressed-tensors config group targets module '{module}'")


def _read_ct_mxfp4(files: dict, source: str) -> dict[str, LazyTensor]:
    """mxfp4-pack-quantized modules (uint8 weight_packed [out, in/2] + E8M0 weight_scale [out, in/32]) as their
    exact values (every MXFP4 value of a normal scale is exact in float32)."""
    from ..quant.mxfp4 import dequantize_mxfp4
    from .mxfp4_layouts import from_compressed_tensors

    def module(p: str):
        if f"{p}.weight_scale" not in files:
            raise BadInput(f"{source}: MXFP4 module '{p}' has weight_packed but no weight_scale")
        shape = _shape(files, f"{p}.weight_packed")
        if len(shape) != 2:
            raise BadInput(f"{source}: MXFP4 module '{p}': weight_packed {list(shape)} must be 2-D")

        def load():
            t = _tensors(files, p, ("weight_packed", "weight_scale")).values()
            return dequantize_mxfp4(*from_compressed_tensors(*t, name=f"{source}: {p}"), dtype=torch.float32)
        return (shape[0], 2 * shape[1]), load, "CT-mxfp4", [f"{p}.weight_packed", f"{p}.weight_scale"]
    return _read_modules(files, ".weight_packed", source, "'compressed-tensors' but no '*.weight_packed' tensors",
                         module)


def read_compressed_tensors(files: dict, qc: dict, source: str) -> dict[str, LazyTensor]:
    float_scheme = _ct_float_scheme(qc)
    if float_scheme is not None:
        from .fp8 import read_ct_float
        return read_ct_float(files, float_scheme, source)
    fmts = {(g or {}).get("format") or qc.get("format") for g in (qc.get("config_groups") or {}).values()
            if (g or {}).get("weights")}
    if fmts == {"mxfp4-pack-quantized"}:
        return _read_ct_mxfp4(files, source)
    schemes = _ct_scheme(qc, source)

    def module(p: str):
        s = _scheme_for(p, schemes, source)
        parts = [f"{p}.{k}" for k in CT_PARTS if f"{p}.{k}" in files]
        if f"{p}.weight_shape" not in parts or f"{p}.weight_scale" not in parts:
            raise BadInput(f"{source}: compressed-tensors module '{p}' lacks weight_shape or weight_scale")
        out_f, in_f = (int(v) for v in _tensors(files, p, ("weight_shape",))["weight_shape"])

        def load():
            t = _tensors(files, p, CT_PARTS)
            ql = unpack_compressed_tensors(t, s["bits"], s["group_size"], s["sym"], name=f"{source}: {p}")
            if "weight_g_idx" in t:  # older act-order "group" checkpoints
                g = t["weight_g_idx"].to(torch.int32)
                if g.shape != (ql.in_features,) or int(g.min()) < 0 or int(g.max()) >= ql.n_groups:
                    raise BadInput(f"{source}: '{p}.weight_g_idx' does not fit [{ql.in_features}] groups")
                ql.g_idx = g
            return ql.dequantize(torch.float32)
        return (out_f, in_f), load, f"CT-int{s['bits']}", parts
    return _read_modules(files, ".weight_packed", source, "'compressed-tensors' but no '*.weight_packed' tensors",
                         module)


def _with_unquantized(out: dict, files: dict, used: set, source: str, missing: str) -> dict:
    """Add the checkpoint's plain tensors (embeddings, norms, lm_head) next to the dequantized modules."""
    if not used:
        raise BadInput(f"{source}: quant_method {missing}")
    for name in files:
        if name not in used:
            out[name] = _lazy(files, name)
    return out


register("gptq", read_gptq)
register("compressed-tensors", read_compressed_tensors)
