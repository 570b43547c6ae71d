"""quantkit command line. User mistakes print one line and exit 2; an interrupt exits 130 leaving no output."""

from __future__ import annotations

import json
import logging
import os
import sys
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """Convert, quantize and evaluate open-weight LLMs."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s: %(message)s",
                        stream=sys.stderr)
    threads = os.environ.get("QUANTKIT_THREADS")
    if threads:  # torch's CPU thread count (busy-waiting threads hurt on a shared, loaded machine)
        import torch
        torch.set_num_threads(max(1, int(threads)))


@cli.command()
@click.argument("src")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output file (gguf) or directory (safetensors).")
@click.option("--to", "to", type=click.Choice(["gguf", "safetensors"]), default="gguf", show_default=True)
@click.option("--q", "q", default=None, help="GGUF: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_k_s q4_k_m q5_k_s q5_k_m q6_k mxfp4 mxfp4_moe; safetensors: f32 f16 bf16 mxfp4.")
@click.option("--method", type=click.Choice(["none", "rtn", "gptq", "awq"]), default="none", show_default=True, help="Calibrated integer quantization (safetensors).")
@click.option("--format", "st_format", type=click.Choice(["gptq", "awq", "compressed-tensors"]), default=None, help="Safetensors layout for --method (default: the method's own).")
@click.option("--bits", type=int, default=4, show_default=True)
@click.option("--group-size", type=int, default=128, show_default=True, help="-1 = per output channel.")
@click.option("--sym/--asym", default=None, help="Symmetric grid (default: gptq sym, awq asym).")
@click.option("--desc-act", "--act-order", "desc_act", is_flag=True, help="GPTQ act-order.")
@click.option("--static-groups", is_flag=True, help="GPTQ act-order with groups fixed before reordering.")
@click.option("--damp", type=float, default=None, help="GPTQ damp_percent (default 0.01 for --method gptq, 0.003 for --optimizer gptq).")
@click.option("--keep-fp16", type=float, default=0.0, help="AWQ: keep this percent of salient input channels in FP16.")
@click.option("--awq", "awq_fold", is_flag=True, help="GGUF: AWQ-scale the weights (calibrated) before k-quantization.")
@click.option("--calib", type=click.Path(path_type=Path), default=None, help=".txt, .jsonl, .parquet or a local HF datasets folder.")
@click.option("--calib-samples", type=int, default=128, show_default=True)
@click.option("--calib-seqlen", type=int, default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--imatrix", type=click.Path(path_type=Path), default=None, help="GGUF importance matrix (llama.cpp format).")
@click.option("--optimizer", type=click.Choice(["none", "gptq"]), default="none", show_default=True, help="k-quants: Hessian-aware block rounding.")
@click.option("--moe-route-all", is_flag=True, help="MoE calibration: every expert's statistics see every token (forced routing; outputs still follow the router).")
@click.option("--min-expert-tokens", type=int, default=16, show_default=True, help="MoE: experts with fewer calibration tokens are quantized by RTN (named in the report).")
@click.option("--tensor-type", multiple=True, help="REGEX=TYPE override (repeatable).")
@click.option("--pure", is_flag=True, help="Every quantizable tensor gets the --q type (no mixture rules).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when present).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--no-progress", is_flag=True)
def convert(src, out, to, q, method, st_format, bits, group_size, sym, desc_act, static_groups, damp, keep_fp16,
            awq_fold, calib, calib_samples, calib_seqlen, seed, imatrix, optimizer, moe_route_all, min_expert_tokens,
            tensor_type, pure, device, force, as_json, no_progress):
    """Convert SRC (HF dir, hub id or .gguf) to GGUF or safetensors, optionally quantizing."""
    from . import pipeline
    result = pipeline.convert(
        src=src, out=out, to=to, q=q, method=method, st_format=st_format, bits=bits, group_size=group_size,
        sym=sym, desc_act=desc_act, static_groups=static_groups, damp=damp, keep_fp16=keep_fp16,
        awq_fold=awq_fold, calib=calib, calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed,
        imatrix=imatrix, optimizer=optimizer, overrides=_parse_overrides(tensor_type), pure=pure, device=device,
        force=force, progress=not no_progress, moe_route_all=moe_route_all, min_expert_tokens=min_expert_tokens)
    lines = [f"wrote {result['output']}"]
    if "bits_per_weight" in result:
        lines.append(f"  {result['tensors']} tensors, {result['bytes'] / 2**20:.1f} MiB, "
                     f"{result['bits_per_weight']:.3f} bits per weight")
    _emit(result, as_json, lines)


@cli.command()
@click.argument("model")
@click.option("--text", type=click.Path(path_type=Path), required=True, help="Plain-text file to evaluate on.")
@click.option("--ctx", type=int, default=512, show_default=True)
@click.option("--chunks", type=int, default=None, help="Evaluate only the first N chunks.")
@click.option("--base", default=None, help="Base model for KL divergence (HF dir, hub id or .gguf).")
@click.option("--device", default=None)
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-progress", is_flag=True)
def perplexity(model, text, ctx, chunks, base, device, as_json, no_progress):
    """Perplexity (llama-perplexity protocol) of MODEL, and KLD against --base."""
    from . import pipeline
    r = pipeline.perplexity(model, text, ctx=ctx, chunks=chunks, base=base, device=device,
                            progress=not no_progress)
    lines = [f"PPL = {r['ppl']:.4f} +/- {r['ppl_stderr']:.5f}  ({r['n_tokens']} tokens, {r['n_chunks']} chunks "
             f"of {r['n_ctx']})"]
    if base:
        lines += [f"base PPL          = {r['base_ppl']:.4f} +/- {r['base_ppl_stderr']:.5f}",
                  f"PPL(Q)/PPL(base)  = {r['ppl_ratio']:.5f}",
                  f"mean KLD          = {r['kld_mean']:.6f} +/- {r['kld_stderr']:.6f}",
                  f"median KLD        = {r['kld_median']:.6f}", f"99% KLD           = {r['kld_p99']:.6f}",
                  f"same top token    = {100 * r['top1_agreement']:.3f} %",
                  f"RMS delta p       = {100 * r['delta_p_rms']:.3f} %"]
    _emit(r, as_json, lines)


@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True)
def inspect(path, as_json):
    """Architecture, hyperparameters and tensor table of a model (HF dir or .gguf)."""
    from . import pipeline
    r = pipeline.inspect(path)
    lines = [f"architecture: {r['architecture']}  (source: {r['format']})"]
    lines += [f"  {k}: {v}" for k, v in r["hparams"].items() if v not in (None, False, 0, [], {}, "")]
    lines.append(f"{'tensor':44s} {'shape':>20s} {'type':>8s} {'MiB':>9s} {'bpw':>7s}")
    for t in r["tensors"]:
        lines.append(f"{t['name']:44s} {str(tuple(t['shape'])):>20s} {t['type']:>8s} "
                     f"{t['bytes'] / 2**20:9.3f} {t['bpw']:7.3f}")
    lines.append(f"total: {r['n_params'] / 1e6:.2f}M parameters, {r['bytes'] / 2**20:.1f} MiB, "
                 f"{r['bits_per_weight']:.3f} bits per weight")
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
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-progress", is_flag=True)
def imatrix(model, calib, out, ctx, chunks, fmt, process_output, moe_route_all, device, force, as_json, no_progress):
    """Importance matrix of MODEL over --calib text, as llama.cpp's llama-imatrix computes it."""
    from .atomic import atomic_output, check_output
    from .calibration import imatrix as imx
    from .families import load
    from .pipeline import pick_device
    check_output(out, force)
    for opt, v in (("--ctx", ctx), ("--chunks", chunks)):
        if v is not None and v <= 0:
            raise QuantkitError(f"{opt} {v}: must be positive")
    if not Path(calib).exists():
        raise QuantkitError(f"--calib {calib}: no such file or directory")
    im = imx.imatrix_from_calib(load(model), Path(calib), n_ctx=ctx, n_chunks=chunks, device=pick_device(device),
                                process_output=process_output, progress=not no_progress, route_all=moe_route_all)
    with atomic_output(out, force) as tmp:
        (imx.write_imatrix_gguf if fmt == "gguf" else imx.write_imatrix_dat)(im, tmp)
    r = {"output": str(out), "format": fmt, **imx.summary(im)}
    lines = [f"wrote {out}: {r['entries']} tensors, {r['chunk_count']} chunks of {r['chunk_size']} tokens"]
    if r["partial"]:
        lines.append(f"  partial data (experts that saw no token): {', '.join(r['partial'])}")
    _emit(r, as_json, lines)


def main(argv=None) -> None:
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except QuantkitError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
