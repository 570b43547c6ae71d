"""The jobs behind the CLI commands, callable from Python: convert, perplexity, inspect.

`convert` takes the options a user gave (None or absent = not given): an option that does not apply to the
chosen output is an error naming why, an unknown one is an error with a suggestion."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import torch

from .errors import BadInput
from .families import load, mtp_summary, without_mtp
from .graph import Graph

log = logging.getLogger("quantkit")

REPORT_NAME = "quantkit_report.json"
# every convert option and its default when not given
CONVERT_DEFAULTS = dict(
    to="gguf", q=None, method="none", st_format=None, bits=4, group_size=128, sym=None, desc_act=False,
    static_groups=False, damp=None, keep_fp16=0.0, awq_fold=False, calib=None, calib_samples=128, calib_seqlen=512,
    seed=0, imatrix=None, optimizer="none", overrides=None, pure=False, device=None, moe_route_all=False,
    min_expert_tokens=16, resume=False, drop_mtp=False, awq_full_search=False, calib_dtype="auto")
FLAGS = {"st_format": "--format", "awq_fold": "--awq", "overrides": "--tensor-type"}
CALIB = ("calib", "calib_samples", "calib_seqlen", "seed", "moe_route_all", "min_expert_tokens", "calib_dtype")
GRID = ("bits", "group_size", "sym", "st_format")
WHAT_FOR = {  # why an option exists, for the "does not apply" error
    "calib": "calibration feeds --method gptq/awq, --awq and --optimizer gptq",
    "calib_samples": "calibration feeds --method gptq/awq, --awq and --optimizer gptq",
    "calib_seqlen": "calibration feeds --method gptq/awq, --awq and --optimizer gptq",
    "seed": "it picks calibration windows (--method gptq/awq, --awq, --optimizer gptq)",
    "calib_dtype": "it is the dtype of the calibration forwards (--method gptq/awq, --awq, --optimizer gptq)",
    "moe_route_all": "it routes calibration tokens (--method gptq/awq, --awq, --optimizer gptq)",
    "min_expert_tokens": "it picks RTN for experts calibration barely reaches (--method gptq/awq, --awq, "
                         "--optimizer gptq)",
    "bits": "it sets the integer grid of --to safetensors --method rtn/gptq/awq (GGUF types come from --q)",
    "group_size": "it sets the integer grid of --to safetensors --method rtn/gptq/awq (GGUF types come from --q)",
    "sym": "it sets the integer grid of --to safetensors --method rtn/gptq/awq",
    "st_format": "it picks the checkpoint layout of --to safetensors --method rtn/gptq/awq",
    "desc_act": "it is GPTQ act-order (--method gptq)", "static_groups": "it is GPTQ act-order (--method gptq)",
    "damp": "it is GPTQ's dampening (--method gptq, --optimizer gptq)",
    "keep_fp16": "it is AWQ's float16 side columns (--to safetensors --method awq)",
    "imatrix": "it weights GGUF quantization (--to gguf)", "overrides": "it sets GGUF tensor types (--to gguf)",
    "pure": "it applies to GGUF k-quant mixtures (--to gguf)", "optimizer": "it applies to --to gguf",
    "awq_fold": "it applies to --to gguf (use --method awq for safetensors)",
    "q": "with --method the grid comes from --bits/--group-size",
    "method": "it writes safetensors; for GGUF use --q (with --awq/--optimizer)",
    "awq_full_search": "it sets AWQ's scale search (--method awq, --awq)",
    "resume": "it keeps and resumes the finished layers of --method gptq and --optimizer gptq",
}


def flag(key: str) -> str:
    return FLAGS.get(key, "--" + key.replace("_", "-"))


def pick_device(device: str | None) -> str:
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BadInput(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if device != "cpu" and not device.startswith(("cuda", "mps", "xpu")):
            raise BadInput(f"--device {device}: expected cpu or cuda[:N]")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _applies(to: str, method: str, awq_fold: bool, optimizer: str) -> tuple[set[str], str]:
    """The options that mean something for this kind of output, and its name for error messages."""
    always = {"to", "device", "drop_mtp"}
    if to == "gguf":
        base = always | {"q", "imatrix", "overrides", "pure", "optimizer", "awq_fold"}
        if awq_fold:
            return base | set(CALIB) | {"awq_full_search"}, "--awq"
        if optimizer != "none":
            return base | set(CALIB) | {"damp", "resume"}, f"--optimizer {optimizer}"
        return base, "plain GGUF --q (no --awq/--optimizer)"
    if method == "none":
        return always | {"q", "method"}, "plain safetensors (no --method)"
    if method == "rtn":
        return always | {"method", *GRID}, "--method rtn (it needs no calibration)"
    if method == "gptq":
        return always | {"method", *GRID, *CALIB, "desc_act", "static_groups", "damp", "resume"}, "--method gptq"
    return always | {"method", *GRID, *CALIB, "keep_fp16", "awq_full_search"}, f"--method {method}"


def check_options(given: dict) -> dict:
    """Unknown or inapplicable options -> BadInput; returns every option with defaults filled in."""
    from .export import GGUF_QS, ST_QS, check_gguf_q, did_you_mean
    for k in given:
        if k not in CONVERT_DEFAULTS:
            raise BadInput(f"unknown option '{k}'{did_you_mean(k, CONVERT_DEFAULTS)} "
                           f"(options: {', '.join(CONVERT_DEFAULTS)})")
    # unset: None, no overrides, or an off switch (but --asym, sym=False, is a choice)
    given = {k: v for k, v in given.items()
             if v is not None and v != () and not (v is False and CONVERT_DEFAULTS[k] is False)}
    o = {**CONVERT_DEFAULTS, **given}
    if o["to"] not in ("gguf", "safetensors"):
        raise BadInput(f"--to {o['to']}: expected gguf or safetensors")
    if o["method"] not in ("none", "rtn", "gptq", "awq"):
        raise BadInput(f"--method {o['method']}: expected one of none, rtn, gptq, awq"
                       f"{did_you_mean(o['method'], ('rtn', 'gptq', 'awq'))}")
    if o["to"] == "gguf" and o.get("keep_fp16"):
        raise BadInput("--keep-fp16: GGUF cannot hold per-channel mixed precision (float16 side columns); "
                       "write --to safetensors --method awq --keep-fp16 instead")
    if o["to"] == "gguf" and o["method"] != "none":
        raise BadInput(f"--method {o['method']} writes safetensors; for GGUF use --q (with --awq/--optimizer)")
    ok, what = _applies(o["to"], o["method"], bool(o["awq_fold"]), o["optimizer"])
    for k in given:
        if k not in ok and not (k == "method" and given[k] == "none") and not (k == "optimizer" and given[k] == "none"):
            raise BadInput(f"{flag(k)} does not apply to {what}: {WHAT_FOR.get(k, 'not used here')}")
    if o["q"] is not None:
        q = str(o["q"]).lower()
        if o["to"] == "gguf":
            o["q"] = check_gguf_q(q)
        elif q not in ST_QS:
            hint = " (GGUF types need --to gguf)" if q in GGUF_QS else did_you_mean(q, ST_QS)
            raise BadInput(f"--q '{q}' is not a safetensors type{hint} (expected one of: {', '.join(ST_QS)})")
        else:
            o["q"] = q
    if o["calib"] is not None:
        from .calibration.data import as_calib
        o["calib"] = as_calib(o["calib"])
        if isinstance(o["calib"], Path) and not o["calib"].exists():
            raise BadInput(f"--calib {o['calib']}: no such file or directory")
    from .calibration.stream import calib_dtype_name
    calib_dtype_name(o["calib_dtype"], "cpu")  # a bad name is refused before any work (auto resolves later)
    if o["calib_samples"] <= 0 or o["calib_seqlen"] <= 0:
        raise BadInput("--calib-samples and --calib-seqlen must be positive")
    if o["imatrix"] is not None and not Path(o["imatrix"]).is_file():
        raise BadInput(f"--imatrix {o['imatrix']}: no such file")
    return o


# ---------------------------------------------------------------- output names

_QUANT_SUFFIX = re.compile(r"[-._](?:i?q\d\w*|f16|f32|bf16|mxfp4\w*|gguf)$", re.IGNORECASE)


def model_name(src) -> str:
    """The model's name for default output names: folder or hub repo name, a GGUF's stem less its type."""
    s = src.source if isinstance(src, Graph) else str(src)
    name = Path(s.rstrip("/\\")).name or "model"
    if name.lower().endswith(".gguf"):
        name = name[:-5]
        while _QUANT_SUFFIX.search(name):
            name = _QUANT_SUFFIX.sub("", name)
    return name or "model"


def default_output_name(src, o: dict) -> str:
    """llama.cpp / HF hub naming: <name>-Q4_K_M.gguf, <name>-gptq-w4g128, <name>-bf16."""
    name = model_name(src)
    if o["to"] == "gguf":
        return f"{name}-{(o['q'] or 'f16').upper()}.gguf"
    if o["method"] == "none":
        return f"{name}-{o['q'] or 'bf16'}"
    return f"{name}-{o['method']}-w{o['bits']}g{o['group_size']}"


def resolve_output(src, out, o: dict) -> Path:
    if out is None:
        return Path.cwd() / default_output_name(src, o)
    s = str(out)
    out = Path(out)
    if o["to"] == "gguf" and (out.is_dir() or s.endswith(("/", os.sep))):
        return out / default_output_name(src, o)  # -o dir/: the default file name inside it
    if o["to"] == "safetensors" and s.lower().endswith(".gguf"):
        raise BadInput(f"-o {s}: --to safetensors writes a directory; a .gguf name needs --to gguf")
    return out


# ---------------------------------------------------------------- convert

def convert(src, out=None, force: bool = False, progress: bool = True, dry_run: bool = False, report=None,
            **opts) -> dict:
    """Convert `src` (path, hub id or Graph) to GGUF or safetensors. `opts`: the CONVERT_DEFAULTS keys a user
    gave. Returns the run's summary (output, sizes, bits per weight, fallbacks, time, report path).
    `report` (GGUF): a JSON file for the run with every tensor's type, relative weight error and time."""
    t0 = time.perf_counter()
    o = check_options(opts)
    out = resolve_output(src, out, o)
    if report is not None and o["to"] != "gguf":
        raise BadInput(f"--report does not apply to --to safetensors: the output folder holds {REPORT_NAME}")
    from .calibration.dist import world
    if not dry_run and world().writer:  # under torchrun rank 0 writes (and checks) the output
        from .atomic import check_output
        inputs = [x for x in (src, o.get("calib"), o.get("imatrix")) if isinstance(x, (str, os.PathLike))]
        check_output(out, force, directory=o["to"] == "safetensors", inputs=inputs)  # before any work
    device = pick_device(o["device"])  # a missing CUDA is an error in every command
    if isinstance(src, Graph):
        graph = without_mtp(src) if o["drop_mtp"] else src
    else:
        graph = load(src, drop_mtp=o["drop_mtp"])
    log.debug("convert %s -> %s with %s on %s", graph.source, out,
              {k: str(v) for k, v in o.items() if v != CONVERT_DEFAULTS[k]}, device)
    if dry_run:
        return plan(graph, o, out)
    stats: dict | None = {} if report is not None else None
    result = _convert(graph, out, o, force, progress, device, stats)
    if result.get("output") is None:  # a torchrun rank that does not write
        return result
    result["time_s"] = time.perf_counter() - t0
    result.setdefault("source_bytes", 0)
    mtp = mtp_summary(graph)
    if mtp:
        result["mtp"] = mtp
    if report is not None:
        _write_report(Path(report), graph, o, result, stats)
        result["report"] = str(report)
    return result


def _write_report(path: Path, graph: Graph, o: dict, result: dict, stats: dict) -> None:
    import json

    from .atomic import atomic_output
    opts = {k: str(v) if isinstance(v, (Path, list)) else v for k, v in o.items() if v != CONVERT_DEFAULTS[k]}
    body = {"source": graph.source, "options": opts, "n_tensors": result["tensors"],
            **{k: v for k, v in result.items() if k not in ("types", "tensors")}, "tensors": stats}
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(json.dumps(body, indent=2, default=str))


def _calibrated(o: dict) -> bool:
    return o["method"] in ("gptq", "awq") if o["to"] == "safetensors" else o["optimizer"] != "none" or o["awq_fold"]


def _convert(graph: Graph, out: Path, o: dict, force: bool, progress: bool, device: str,
             stats: dict | None = None) -> dict:
    from . import export as conv
    from .calibration.dist import world
    from .calibration.stream import calib_dtype_name
    calib_opts = {k: o[k] for k in CALIB}
    calib_opts["calib_dtype"] = calib_dtype_name(o["calib_dtype"], device, graph)
    w = world()
    if w.active:
        if not _calibrated(o):
            raise BadInput("torchrun: only calibrated conversions (--method gptq/awq, --optimizer gptq, --awq) are "
                           "split across processes; run this one as a single process")
        progress = progress and w.writer
    if o["to"] == "gguf":
        q = o["q"] or "f16"
        im = None
        extra: dict = {}
        if o["imatrix"] is not None:
            from .calibration.imatrix import provenance_kv, read_imatrix
            im = read_imatrix(Path(o["imatrix"]), graph)
            extra["extra_kv"] = provenance_kv(Path(o["imatrix"]))
        if o["optimizer"] != "none" or o["awq_fold"]:
            if q not in ("f32", "f16", "bf16"):
                conv.load_kernels()  # before calibration, whose progress would otherwise include the compile
            from .quant.gguf_calibrated import calibrated_gguf_kwargs
            extra.update(calibrated_gguf_kwargs(graph, q=q, optimizer=o["optimizer"], imatrix=im, device=device,
                                                progress=progress, overrides=o["overrides"], pure=o["pure"],
                                                awq_fold=o["awq_fold"], damp=o["damp"], out=out,
                                                resume=o["resume"], awq_full_search=o["awq_full_search"],
                                                **calib_opts))
        drain = getattr(extra.get("quantizer"), "drain", None)
        if not w.writer:  # another rank writes: this one takes its part in the calibration only
            if drain is not None:
                drain()
            return {"output": None}
        r = conv.convert_to_gguf(graph, out, q=q, force=force, overrides=o["overrides"], pure=o["pure"],
                                 imatrix=im, progress=progress, stats=stats, **extra)
        phase_times = getattr(extra.get("quantizer"), "phase_times", None)
        if phase_times is not None:  # --optimizer gptq: its seconds per phase (benchmarks read them)
            r["phase_times"] = phase_times()
        if o["resume"]:  # the output is whole: the finished layers kept for --resume are no longer needed
            from .calibration.checkpoint import remove_state
            remove_state(out)
        if o["optimizer"] != "none" or o["awq_fold"]:
            r["calib_dtype"] = calib_opts["calib_dtype"]
        return r
    if o["method"] == "none":
        q = o["q"] or "bf16"
        if q == "mxfp4":
            from .formats.mxfp4_writer import convert_to_mxfp4_safetensors
            return convert_to_mxfp4_safetensors(graph, out, force=force, progress=progress)
        return conv.convert_to_safetensors(graph, out, dtype=q, force=force, progress=progress)
    from .jobs import quantize_to_safetensors
    r = quantize_to_safetensors(graph, out, method=o["method"], force=force, progress=progress, device=device,
                                st_format=o["st_format"], bits=o["bits"], group_size=o["group_size"], sym=o["sym"],
                                desc_act=o["desc_act"], static_groups=o["static_groups"], damp=o["damp"],
                                keep_fp16=o["keep_fp16"], resume=o["resume"],
                                awq_full_search=o["awq_full_search"], **calib_opts)
    if not w.writer:
        return r
    if o["method"] in ("gptq", "awq"):
        r["calib_dtype"] = calib_opts["calib_dtype"]
    r.setdefault("report", str(Path(r["output"]) / REPORT_NAME))
    r["source_bytes"] = conv.stored_bytes(graph)
    r["quality"] = quality_line(Path(r["report"]))
    return r


def quality_line(report_path: Path) -> str | None:
    """One line from a method's report: how many tensors, mean and worst relative error, fallbacks."""
    import json
    try:
        rep = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return None
    errs = {}
    for name, t in (rep.get("tensors") or {}).items():
        items = t.get("experts") or [t]
        key = "output_rel_err" if all("output_rel_err" in x for x in items) else "weight_rel_err"
        vals = [x[key] for x in items if key in x]
        if vals:
            errs[name] = (key, max(vals))
    if not errs:
        return None
    worst = max(errs, key=lambda n: errs[n][1])
    kind = "output" if all(k == "output_rel_err" for k, _ in errs.values()) else "weight"
    mean = sum(v for _, v in errs.values()) / len(errs)
    fb = len(rep.get("fallbacks") or [])
    return (f"{str(rep.get('method', '')).upper()}: {len(errs)} tensors, relative {kind} error mean {mean:.2e}, "
            f"worst {errs[worst][1]:.2e} ({worst})" + (f", {fb} RTN fallbacks" if fb else ""))


def plan(graph: Graph, o: dict, out: Path) -> dict:
    """--dry-run: the type, size and bits per weight of every tensor, and what would be written; nothing is."""
    from gguf.constants import GGML_QUANT_SIZES

    from . import export as conv
    rows = []
    if o["to"] == "gguf":
        fam = conv.gguf_family(graph)
        fallbacks: list = []
        types = conv.plan_types(graph, o["q"] or "f16", o["overrides"], o["pure"],
                                has_imatrix=o["imatrix"] is not None, fallbacks=fallbacks)
        for n in conv.gguf_tensor_order(graph):
            t = graph.tensors[n]
            blk_, tb = GGML_QUANT_SIZES[types[n]]
            rows.append({"name": fam.gguf_tensor_name(n), "shape": list(t.shape),
                         "type": types[n].name, "bytes": t.numel // blk_ * tb})
        fb = conv.fallback_summary(fallbacks)
        hp = graph.hparams
        if hp.rope_scaling.kind in ("llama3", "freq_factors"):  # written beside the weights, as llama.cpp does
            n = hp.rotary_dim // 2 if hp.rope_scaling.kind == "llama3" else len(hp.rope_scaling.freq_factors)
            rows.insert(0, {"name": "rope_freqs.weight", "shape": [n], "type": "F32", "bytes": 4 * n})
    else:
        fb = []
        width = {"f32": 4, "f16": 2, "bf16": 2}
        q = o["q"] or "bf16"
        quant: dict = {}
        mx: set = set()
        if q == "mxfp4":
            from .formats.mxfp4_writer import mxfp4_names
            mx = mxfp4_names(graph)
        if o["method"] != "none":  # the layout checks the real run makes first
            from .quant.gptq_driver import quantizable
            if o["method"] == "awq":
                from .jobs.awq import check_awq_options
                from .quant.awq import AWQConfig
                check_awq_options(graph, AWQConfig(bits=o["bits"], group_size=o["group_size"], sym=bool(o["sym"]),
                                                   keep_fp16=float(o["keep_fp16"] or 0)), o["st_format"] or "awq")
            else:
                from .formats.quantized_writer import check_layout
                check_layout(graph, o["st_format"] or "gptq", o["bits"], o["group_size"], o["desc_act"],
                             o["static_groups"])
            quant = quantizable(graph)
            q = "f16"  # what the method writers store unquantized tensors in
        for n in conv.gguf_tensor_order(graph):
            t = graph.tensors[n]
            if n in quant:  # codes + one fp16 scale (and packed zero) per group
                gs = o["group_size"] if o["group_size"] != -1 else t.shape[-1]
                nb = t.numel * o["bits"] // 8 + (t.numel // gs) * (2 + o["bits"] / 8)
                rows.append({"name": n, "shape": list(t.shape), "type": f"int{o['bits']} g{o['group_size']}",
                             "bytes": int(nb)})
            elif n in mx:  # codes (4 bits) + one E8M0 scale byte per 32
                rows.append({"name": n, "shape": list(t.shape), "type": "mxfp4", "bytes": t.numel // 32 * 17})
            else:
                dt = q if q in width else "bf16"
                rows.append({"name": n, "shape": list(t.shape), "type": dt, "bytes": t.numel * width[dt]})
    total = sum(r["bytes"] for r in rows)
    n_params = sum(t.numel for t in graph.tensors.values())
    for r in rows:
        r["bpw"] = 8 * r["bytes"] / max(1, _numel(r["shape"]))
    return {"dry_run": True, "output": str(out), "tensors": len(rows), "rows": rows, "bytes": total,
            "source_bytes": conv.stored_bytes(graph), "bits_per_weight": 8 * total / max(n_params, 1),
            "type_counts": _counts(r["type"] for r in rows), "fallbacks": fb}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _counts(types) -> dict[str, int]:
    from collections import Counter
    return dict(Counter(types).most_common())


def summary_lines(r: dict) -> list[str]:
    """llama-quantize's closing lines: sizes, bits per weight, time, fallbacks (with why), report."""
    mib = 2**20
    lines = [("would write " if r.get("dry_run") else "wrote ") + r["output"]]
    size = f"{r['bytes'] / mib:.1f} MiB"
    if r.get("source_bytes"):
        size = f"source {r['source_bytes'] / mib:.1f} MiB -> {size}"
    if "bits_per_weight" in r:
        size += f", {r['bits_per_weight']:.3f} bits per weight"
    if "time_s" in r:
        size += f", {r['time_s']:.1f} s"
    lines.append(f"  {r['tensors']} tensors, {size}")
    counts = r.get("type_counts") or (_counts(r["types"].values()) if "types" in r else None)
    if counts:
        lines.append("  types: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for f in r.get("fallbacks") or []:
        lines.append(f"  {f['count']} tensor{'s' if f['count'] != 1 else ''} fell back {f['from']}->{f['to']} because {f['reason']}")
    q = r.get("quality")
    if q:
        lines.append("  " + q)
    if r.get("mtp"):
        lines.append("  " + r["mtp"])
    if r.get("report"):
        lines.append(f"  report: {r['report']}")
    return lines


# ---------------------------------------------------------------- perplexity

def _read_text(path: Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"--text {p}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"--text {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _tokenizer_graph(rule: str, g: Graph, gb: Graph | None) -> tuple[Graph, str]:
    """--tokenizer model|base|PATH -> the graph whose tokenizer encodes the text, and its description."""
    from .graph import Tokenizer
    if rule == "model":
        return g, f"model's own ({g.source})"
    if rule == "base":
        if gb is None:
            raise BadInput("--tokenizer base needs --base MODEL")
        return gb, f"base model's ({gb.source})"
    p = Path(rule)
    if not p.exists():
        raise BadInput(f"--tokenizer {rule}: expected model, base, or a tokenizer path (HF folder, "
                       "tokenizer.json or .gguf)")
    if p.is_dir() or p.name == "tokenizer.json":
        d = p if p.is_dir() else p.parent
        return Graph(g.hparams, {}, Tokenizer(hf_dir=d), source=str(d)), f"{d}"
    return load(p), f"{p}"


def perplexity(model, text, ctx: int = 512, chunks: int | None = None, base=None, device: str | None = None,
               progress: bool = True, tokenizer: str = "model", save_base=None, plot=None) -> dict:
    """PPL of `model` (path, hub id or Graph) on `text` (a file path, or the text itself when not a path), and
    KLD against `base` (a model or a saved .qkld). One tokenizer rule: the model's own unless `tokenizer` says
    base or a path; the result names it."""
    from tqdm import tqdm

    from .eval import saved_base
    from .eval.perplexity import perplexity as ppl
    from .eval.tokens import encode
    from .runtime import executor_for
    if chunks is not None and chunks < 0:
        raise BadInput(f"--chunks {chunks}: must be 0 (all) or positive")
    dev = pick_device(device)
    if isinstance(text, str) and not _is_path(text) and re.fullmatch(r"\S+\.\w{1,8}", text):
        raise BadInput(f"--text {text}: no such file")  # a missing file name, not text to score
    body = text if isinstance(text, str) and not _is_path(text) else _read_text(text)
    g = model if isinstance(model, Graph) else load(model)
    saved = saved_base.open_base(base) if saved_base.is_qkld(base) else None
    gb = None
    if base is not None and saved is None:
        gb = base if isinstance(base, Graph) else load(base)
        if gb.hparams.vocab_size != g.hparams.vocab_size:
            raise BadInput(f"--base {base}: vocabulary size {gb.hparams.vocab_size} differs from the model's "
                           f"{g.hparams.vocab_size}; KLD needs the same vocabulary")
    if saved is not None:
        if saved.n_vocab != g.hparams.vocab_size:
            raise BadInput(f"--base {base}: saved with a vocabulary of {saved.n_vocab}, the model has "
                           f"{g.hparams.vocab_size}")
        if tokenizer == "base":
            ids, bos, tok_desc = saved.tokens, saved.bos, f"base's, as saved in {base}"
        else:
            tg, tok_desc = _tokenizer_graph(tokenizer, g, None)
            ids, bos = encode(tg, body)
            saved.check_tokens(ids, ctx, chunks)
    else:
        tg, tok_desc = _tokenizer_graph(tokenizer, g, gb)
        ids, bos = encode(tg, body)
    log.debug("tokenizer: %s, %d tokens, device %s", tok_desc, len(ids), dev)
    m = executor_for(g, device=dev)
    mb = executor_for(gb, device=dev) if gb is not None else saved
    writer = None
    if save_base is not None:
        writer = saved_base.BaseWriter(Path(save_base), n_vocab=g.hparams.vocab_size, tokens=ids, bos=bos,
                                       n_ctx=ctx, source=str(gb.source if gb is not None else g.source))
    bar = tqdm(desc="perplexity", unit="chunk", disable=not progress)

    def tick(i, n):
        bar.total = n
        bar.update(1)
    try:
        r = ppl(m, ids, n_ctx=ctx, n_chunks=chunks, bos_id=bos, base=mb, progress=tick,
                on_base=writer.add if writer is not None else None,
                on_model=writer.add if writer is not None and mb is None else None, keep_kld=plot is not None)
        if writer is not None:
            writer.close()
            r["saved_base"] = str(save_base)
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
    kld = r.pop("_kld_values", None)
    r.update({"model": str(g.source),
              "base": None if base is None else (gb.source if gb is not None else str(base)),
              "text": str(text) if _is_path(text) else "<text>", "tokenizer": tok_desc})
    src = Path(str(g.source))
    if src.is_dir():
        from .formats.model_card import record_evaluation
        if record_evaluation(src, r):
            r["model_card"] = str(src / "README.md")
    if plot is not None:
        from .eval.plots import plot_kld
        plot_kld(r, kld, Path(plot))
        r["plot"] = str(plot)
    return r


def _is_path(x) -> bool:
    if isinstance(x, os.PathLike):
        return True
    return isinstance(x, str) and "\n" not in x and len(x) < 4096 and Path(x).exists()


# ---------------------------------------------------------------- inspect

def inspect(path) -> dict:
    """Architecture, hyperparameters, file type and the tensor table of a model (or of any GGUF, imatrix
    files included)."""
    from .formats.gguf_reader import is_gguf
    from .families import resolve
    p = resolve(path) if not isinstance(path, Graph) else None
    if p is not None and p.is_file() and is_gguf(p):
        from .formats.gguf_parse import parse_gguf
        kv = dict(parse_gguf(p).fields)
        if "general.architecture" not in kv:
            return _inspect_plain_gguf(p, kv)
    g = path if isinstance(path, Graph) else load(p)
    hp = g.hparams
    rows = []
    total_bytes = 0
    n_params = 0
    for name, t in g.tensors.items():
        typ = t.qtype or t.dtype
        nb = t.nbytes if t.nbytes is not None else t.numel * 4
        rows.append({"name": name, "shape": list(t.shape), "type": typ, "bytes": nb, "bpw": 8 * nb / max(t.numel, 1)})
        total_bytes += nb
        n_params += t.numel
    hpd = hp.to_dict()
    hpd["rope_scaling"] = {k: v for k, v in hpd["rope_scaling"].items() if v is not None}
    r = {"path": str(g.source if p is None else p), "format": g.source_format, "architecture": hp.arch, "hparams": hpd,
         "quantization": g.quantization, "tensors": rows, "n_params": n_params, "bytes": total_bytes,
         "bits_per_weight": 8 * total_bytes / max(n_params, 1), "type_counts": _counts(r["type"] for r in rows)}
    from .families.describe import describe
    r["structure"] = describe(g)  # the layers in words: attention / FFN kinds, grouped runs of equal layers
    ft = (g.quantization or {}).get("gguf_file_type") if isinstance(g.quantization, dict) else None
    if ft is not None:
        r["file_type"] = file_type_name(ft)
    elif isinstance(g.quantization, dict):
        r["file_type"] = g.quantization.get("quant_method") or g.quantization.get("format") or "quantized"
    return r


def file_type_name(ft: int) -> str:
    """general.file_type as llama.cpp names it (MOSTLY_Q4_K_M -> Q4_K_M)."""
    from gguf import LlamaFileType
    from .export import MXFP4_MOE_FTYPE
    if int(ft) == MXFP4_MOE_FTYPE:
        return "MXFP4_MOE"
    try:
        return LlamaFileType(int(ft)).name.replace("MOSTLY_", "").replace("ALL_", "")
    except ValueError:
        return f"unknown ({ft})"


def _inspect_plain_gguf(p: Path, kv: dict) -> dict:
    """A GGUF that is not a model (an imatrix, a LoRA without architecture ...): its keys and tensors."""
    from gguf import GGMLQuantizationType as QT
    from .formats.gguf_parse import parse_gguf
    rows = []
    for t in parse_gguf(p).tensors:
        shape = [int(x) for x in reversed(t.shape)]
        n = _numel(shape)
        rows.append({"name": t.name, "shape": shape, "type": QT(int(t.tensor_type)).name, "bytes": int(t.n_bytes),
                     "bpw": 8 * int(t.n_bytes) / max(n, 1)})
    kind = kv.get("general.type") or "gguf"
    meta = {k: v for k, v in kv.items() if not isinstance(v, (list, tuple)) or len(v) <= 8}
    return {"path": str(p), "format": "gguf", "architecture": None, "kind": kind, "metadata": meta,
            "hparams": {}, "tensors": rows, "n_params": sum(_numel(r["shape"]) for r in rows),
            "bytes": sum(r["bytes"] for r in rows),
            "bits_per_weight": 8 * sum(r["bytes"] for r in rows) / max(1, sum(_numel(r["shape"]) for r in rows)),
            "type_counts": _counts(r["type"] for r in rows)}
