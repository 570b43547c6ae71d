"""quantkit command line. User mistakes print one line and exit 2; an interrupt exits 130 leaving no output."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from .errors import QuantkitError

log = logging.getLogger("quantkit")


def _emit(result: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        for line in lines:
            click.echo(line)


def _parse_overrides(items: tuple[str, ...]) -> list[tuple[str, str]]:
    out = []
    for it in items:
        if "=" not in it:
            raise QuantkitError(f"--tensor-type '{it}': expected REGEX=TYPE, e.g. 'ffn_down=q6_k'")
        pat, typ = it.rsplit("=", 1)
        out.append((pat, typ))
    return out


_QUIET = {"on": False}


def _set_verbosity(ctx, param, value):
    """-q/-v work before or after the subcommand: the last one given wins."""
    if value:
        ctx.meta["quantkit.verbosity"] = param.name
        _apply_verbosity(param.name)
    return value


def _apply_verbosity(v: str | None) -> None:
    _QUIET["on"] = v == "quiet"
    log.setLevel({"quiet": logging.WARNING, "verbose": logging.DEBUG}.get(v, logging.INFO))


def verbosity(f):
    f = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_verbosity,
                     help="Only warnings, errors and the result; no progress bars.")(f)
    return click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_set_verbosity,
                        help="Debug logging (per-tensor tables, plans, choices made).")(f)


def _progress(no_progress: bool) -> bool:
    return not (no_progress or _QUIET["on"])


def _given(ctx: click.Context, names) -> dict:
    """The options the user typed (not click's defaults), so that inapplicable ones can be refused."""
    from click.core import ParameterSource
    return {n: ctx.params[n] for n in names
            if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, None)}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@verbosity
@click.pass_context
def cli(ctx) -> None:
    """Convert, quantize and evaluate open-weight LLMs."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    _apply_verbosity(ctx.meta.get("quantkit.verbosity"))  # fresh for each invocation
    threads = os.environ.get("QUANTKIT_THREADS")
    if threads:  # torch's CPU thread count (busy-waiting threads hurt on a shared, loaded machine)
        import torch
        torch.set_num_threads(max(1, int(threads)))


def _q_help() -> str:
    from .export import GGUF_QS, ST_QS
    return f"GGUF: {' '.join(GGUF_QS)}; safetensors: {' '.join(ST_QS)}. Default f16 (GGUF), bf16 (safetensors)."


CONVERT_OPTS = ("to", "q", "method", "st_format", "bits", "group_size", "sym", "desc_act", "static_groups", "damp",
                "keep_fp16", "awq_fold", "calib", "calib_samples", "calib_seqlen", "seed", "imatrix", "optimizer",
                "tensor_type", "pure", "device", "moe_route_all", "min_expert_tokens", "resume", "drop_mtp", "awq_full_search",
                "calib_dtype")


@cli.command()
@click.argument("src")
@click.option("-o", "--output", "out", default=None, type=click.Path(path_type=Path),
              help="Output file (gguf; a folder = the default name inside it) or directory (safetensors). "
                   "Default: <model>-<Q>.gguf, <model>-<method>-w<bits>g<group>/ or <model>-<q>/ here.")
@click.option("--to", "to", type=click.Choice(["gguf", "safetensors"]), default="gguf", show_default=True)
@click.option("--q", "q", default=None, help=_q_help())
@click.option("--method", type=click.Choice(["none", "rtn", "gptq", "awq"]), default="none", show_default=True, help="Calibrated integer quantization (safetensors).")
@click.option("--format", "st_format", type=click.Choice(["gptq", "awq", "compressed-tensors"]), default=None, help="Safetensors layout for --method (default: the method's own).")
@click.option("--bits", type=int, default=4, show_default=True, help="--method rtn/gptq/awq only.")
@click.option("--group-size", type=int, default=128, show_default=True, help="-1 = per output channel. --method only.")
@click.option("--sym/--asym", default=None, help="Symmetric grid (default: gptq sym, awq asym).")
@click.option("--desc-act", "--act-order", "desc_act", is_flag=True, help="GPTQ act-order.")
@click.option("--static-groups", is_flag=True, help="GPTQ act-order with groups fixed before reordering.")
@click.option("--damp", type=float, default=None, help="GPTQ damp_percent (default 0.01 for --method gptq, 0.003 for --optimizer gptq).")
@click.option("--keep-fp16", type=float, default=0.0, help="AWQ: keep this percent of salient input channels in FP16.")
@click.option("--awq-full-search", is_flag=True, help="AWQ: evaluate every scale candidate on every calibration sample, as AutoAWQ does (default: all candidates on a quarter of the samples, the 3 best on all; about 2.5x less search).")
@click.option("--awq", "awq_fold", is_flag=True, help="GGUF: AWQ-scale the weights (calibrated) before k-quantization.")
@click.option("--calib", type=click.Path(path_type=Path), default=None, help=".txt, .jsonl, .parquet or a local HF datasets folder (--method gptq/awq, --awq, --optimizer gptq).")
@click.option("--calib-samples", type=int, default=128, show_default=True)
@click.option("--calib-seqlen", type=int, default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--calib-dtype", default="auto", show_default=True, help="Dtype of the calibration forwards: float32, bfloat16, float16 or auto (bfloat16 on CUDA; on the CPU bfloat16 for a model stored in bfloat16 or FP8 when the CPU has AVX512-BF16 or AMX, else float32). Sums and quantization stay float32 (on the CPU, bf16 inputs enter GPTQ's Hessians as bf16 products).")
@click.option("--imatrix", type=click.Path(path_type=Path), default=None, help="GGUF importance matrix (llama.cpp format).")
@click.option("--optimizer", type=click.Choice(["none", "gptq"]), default="none", show_default=True, help="k-quants: Hessian-aware block rounding.")
@click.option("--moe-route-all", is_flag=True, help="MoE calibration: every expert's statistics see every token (forced routing; outputs still follow the router).")
@click.option("--min-expert-tokens", type=int, default=16, show_default=True, help="MoE: experts with fewer calibration tokens are quantized by RTN (named in the report).")
@click.option("--drop-mtp", is_flag=True, help="Leave out MTP (next-token prediction) layers that would be kept (GLM-4.5's, which llama.cpp runs as a draft); the summary says either way.")
@click.option("--tensor-type", multiple=True, help="REGEX=TYPE override (repeatable).")
@click.option("--pure", is_flag=True, help="Every quantizable tensor gets the --q type (no mixture rules).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when present).")
@click.option("--resume", is_flag=True, help="--method gptq / --optimizer gptq: keep finished layers in OUT.quantkit-resume; run the same command again after an interruption to continue from the last finished layer.")
@click.option("--dry-run", is_flag=True, help="Print the plan (type, size, bits per weight of each tensor); write nothing.")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="GGUF: write the run's report (per-tensor type, relative error, time) as JSON here. Safetensors outputs hold quantkit_report.json.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--no-progress", is_flag=True)
@verbosity
@click.pass_context
def convert(ctx, src, out, dry_run, report, force, as_json, no_progress, **_):
    """Convert SRC (HF dir, hub id or .gguf) to GGUF or safetensors, optionally quantizing."""
    from . import heap, pipeline
    given = _given(ctx, CONVERT_OPTS)
    if given.get("calib") is not None:  # forwards: heap settings for their many large temporaries
        heap.keep_freed_blocks()
    if "tensor_type" in given:
        given["overrides"] = _parse_overrides(given.pop("tensor_type"))
    result = pipeline.convert(src, out, force=force, progress=_progress(no_progress), dry_run=dry_run,
                              report=report, **given)
    if result.get("output") is None:  # a torchrun rank that does not write: rank 0 reports
        return
    lines = pipeline.summary_lines(result)
    if dry_run:
        lines = [_table(result["rows"], ("name", "shape", "type", "MiB", "bpw")), *lines]
    elif _QUIET["on"]:
        lines = [result["output"]]
    _emit(result, as_json, lines)


def _table(rows: list[dict], cols) -> str:
    """Rows as aligned columns (widths from the data, numbers right-aligned)."""
    def cell(r, c):
        if c == "MiB":
            return f"{r['bytes'] / 2**20:.3f}"
        if c == "bpw":
            return f"{r['bpw']:.3f}"
        if c == "shape":
            return "x".join(str(x) for x in r["shape"])
        return str(r[c])
    cells = [[cell(r, c) for c in cols] for r in rows]
    w = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(cols)]
    right = [c in ("MiB", "bpw", "shape") for c in cols]
    out = ["  ".join(c.rjust(w[i]) if right[i] else c.ljust(w[i]) for i, c in enumerate(cols)).rstrip()]
    for x in cells:
        out.append("  ".join(v.rjust(w[i]) if right[i] else v.ljust(w[i]) for i, v in enumerate(x)).rstrip())
    return "\n".join(out)


@cli.command()
@click.argument("model")
@click.option("--text", type=click.Path(path_type=Path), required=True, help="Plain-text file to evaluate on.")
@click.option("--ctx", type=int, default=512, show_default=True)
@click.option("--chunks", type=int, default=None, help="Evaluate only the first N chunks (0 or unset: all).")
@click.option("--base", default=None, help="Base model for KL divergence (HF dir, hub id, .gguf, or a .qkld from --save-base).")
@click.option("--tokenizer", "tokenizer", default="model", show_default=True,
              help="Whose tokenizer encodes --text: model, base, or a path (HF folder, tokenizer.json, .gguf). "
                   "The same model scores the same with or without --base.")
@click.option("--save-base", type=click.Path(path_type=Path), default=None,
              help="Save the base's log-probs (the model's, without --base) to a .qkld file for later --base.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="PNG: KLD distribution and per-chunk PPL ratio (needs --base; pip install 'quantkit[plot]').")
@click.option("--device", default=None)
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-progress", is_flag=True)
@verbosity
def perplexity(model, text, ctx, chunks, base, tokenizer, save_base, plot, device, as_json, no_progress):
    """Perplexity (llama-perplexity protocol) of MODEL, and KLD against --base."""
    from . import heap, pipeline
    heap.keep_freed_blocks()
    r = pipeline.perplexity(model, text, ctx=ctx, chunks=chunks, base=base, device=device,
                            progress=_progress(no_progress), tokenizer=tokenizer, save_base=save_base, plot=plot)
    lines = [f"PPL = {r['ppl']:.4f} +/- {r['ppl_stderr']:.5f}  ({r['n_tokens']} tokens, {r['n_chunks']} chunks "
             f"of {r['n_ctx']})", f"tokenizer: {r['tokenizer']}"]
    if base:
        lines += [f"base PPL          = {r['base_ppl']:.4f} +/- {r['base_ppl_stderr']:.5f}",
                  f"PPL(Q)/PPL(base)  = {r['ppl_ratio']:.5f}",
                  f"mean KLD          = {r['kld_mean']:.6f} +/- {r['kld_stderr']:.6f}",
                  f"median KLD        = {r['kld_median']:.6f}", f"99% KLD           = {r['kld_p99']:.6f}",
                  f"same top token    = {100 * r['top1_agreement']:.3f} %",
                  f"RMS delta p       = {100 * r['delta_p_rms']:.3f} %"]
    for k, what in (("saved_base", "saved base log-probs"), ("plot", "plot"), ("model_card", "model card updated")):
        if r.get(k):
            lines.append(f"{what}: {r[k]}")
    if not as_json:
        r.pop("per_chunk", None)
    _emit(r, as_json, lines)


@cli.command()
@click.argument("path")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="PNG: bits per weight per layer and tensor kind (pip install 'quantkit[plot]').")
@click.option("--json", "as_json", is_flag=True)
@verbosity
def inspect(path, plot, as_json):
    """Architecture, hyperparameters and tensor table of a model (HF dir or .gguf, imatrix GGUFs too)."""
    from . import pipeline
    r = pipeline.inspect(path)
    if r["architecture"] is None:
        lines = [f"{r['path']}: GGUF of type '{r['kind']}'"]
        lines += [f"  {k}: {v}" for k, v in r["metadata"].items()]
    else:
        lines = [f"architecture: {r['architecture']}  (source: {r['format']}"
                 + (f", file type {r['file_type']})" if r.get("file_type") else ")")]
        if r.get("structure"):
            from .families.describe import describe_lines
            lines += describe_lines(r["structure"])
        lines += [f"  {k}: {v}" for k, v in r["hparams"].items() if v not in (None, False, 0, [], {}, "")]
    lines.append(_table(r["tensors"], ("name", "shape", "type", "MiB", "bpw")))
    lines.append("types: " + ", ".join(f"{k} {v}" for k, v in r["type_counts"].items()))
    lines.append(f"total: {r['n_params'] / 1e6:.2f}M parameters, {r['bytes'] / 2**20:.1f} MiB, "
                 f"{r['bits_per_weight']:.3f} bits per weight")
    if plot is not None:
        from .eval.plots import plot_bpw
        plot_bpw(r, plot)
        r["plot"] = str(plot)
        lines.append(f"plot: {plot}")
    _emit(r, as_json, lines)


@cli.command()
@click.argument("model")
@click.option("--calib", type=click.Path(path_type=Path), required=True, help=".txt, .jsonl, .parquet or a local HF datasets folder.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output imatrix file.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Chunk length (llama-imatrix -c).")
@click.option("--chunks", type=int, default=None, help="Use only the first N chunks.")
@click.option("--format", "fmt", type=click.Choice(["gguf", "dat"]), default="gguf", show_default=True, help="GGUF imatrix or llama.cpp's legacy .dat.")
@click.option("--process-output", is_flag=True, help="Also collect output.weight (llama-imatrix --process-output).")
@click.option("--moe-route-all", is_flag=True, help="MoE: every expert's statistics see every token (forced routing).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when present).")
@click.option("--calib-dtype", default="auto", show_default=True, help="Dtype of the forwards: float32, bfloat16, float16 or auto (bfloat16 on CUDA; on the CPU bfloat16 for a model stored in bfloat16 or FP8 when the CPU has AVX512-BF16 or AMX, else float32). The sums stay float32/float64.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-progress", is_flag=True)
@verbosity
def imatrix(model, calib, out, ctx, chunks, fmt, process_output, moe_route_all, device, calib_dtype, force, as_json,
            no_progress):
    """Importance matrix of MODEL over --calib text, as llama.cpp's llama-imatrix computes it."""
    from .atomic import atomic_output, check_output
    from .calibration import imatrix as imx
    from .families import load
    from .pipeline import pick_device
    from .calibration.dist import world
    from .calibration.stream import CALIB_DTYPES, calib_dtype_name
    from .heap import keep_freed_blocks
    keep_freed_blocks()
    calib_dtype_name(calib_dtype, "cpu")  # a bad name is refused before any work
    if world().writer:  # under torchrun rank 0 writes (and checks) the output
        check_output(out, force, directory=False, inputs=(model, calib))
    for opt, v in (("--ctx", ctx), ("--chunks", chunks)):
        if v is not None and v <= 0:
            raise QuantkitError(f"{opt} {v}: must be positive")
    if not Path(calib).exists():
        raise QuantkitError(f"--calib {calib}: no such file or directory")
    dev = pick_device(device)
    t0 = time.perf_counter()
    graph = load(model)
    dt = calib_dtype_name(calib_dtype, dev, graph)
    im = imx.imatrix_from_calib(graph, Path(calib), n_ctx=ctx, n_chunks=chunks, device=dev,
                                process_output=process_output, progress=_progress(no_progress) and world().writer,
                                route_all=moe_route_all, dtype=CALIB_DTYPES[dt])
    if not world().writer:  # under torchrun rank 0 writes
        return
    t1 = time.perf_counter()
    with atomic_output(out, force) as tmp:
        (imx.write_imatrix_gguf if fmt == "gguf" else imx.write_imatrix_dat)(im, tmp)
    r = {"output": str(out), "format": fmt, **imx.summary(im), "calib_dtype": dt, **imx.timing(im, t0, t1)}
    lines = [f"wrote {out}: {r['entries']} tensors, {r['chunk_count']} chunks of {r['chunk_size']} tokens"]
    if r["partial"]:
        lines.append(f"  partial data (experts that saw no token): {', '.join(r['partial'])}")
    _emit(r, as_json, lines)


def main(argv=None) -> None:
    from . import signals
    from .errors import os_error
    signals.install()
    try:
        from .calibration.dist import init_from_env
        init_from_env()  # under torchrun: join its process group (calibration.dist)
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort as e:  # click's wrapping of KeyboardInterrupt (and so of SIGTERM/SIGHUP)
        cause = e.__cause__ if isinstance(e.__cause__, KeyboardInterrupt) else KeyboardInterrupt()
        click.echo(signals.describe(cause), err=True)
        sys.exit(signals.exit_code(cause))
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except QuantkitError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP
        click.echo(signals.describe(e), err=True)
        sys.exit(signals.exit_code(e))
    except OSError as e:  # disk full, read-only, busy ...: name the path and the cause
        click.echo(f"error: {os_error(e)}", err=True)
        sys.exit(2)
    finally:  # output locks end with the command (also when main() runs in-process)
        from .atomic import unlock_all
        unlock_all()


if __name__ == "__main__":
    main()
