"""The jobs behind the CLI commands, callable from Python: convert, perplexity, inspect."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import BadInput
from .families import load

log = logging.getLogger("quantkit")


def pick_device(device: str | None) -> str:
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BadInput(f"--device {device}: CUDA is not available on this machine")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_calib_args(method: str, calib, calib_samples: int, calib_seqlen: int) -> None:
    if calib is not None and not Path(calib).exists():
        raise BadInput(f"--calib {calib}: no such file or directory")
    if calib_samples <= 0 or calib_seqlen <= 0:
        raise BadInput("--calib-samples and --calib-seqlen must be positive")


def convert(src, out: Path, to: str = "gguf", q: str | None = None, method: str = "none", force: bool = False,
            overrides=None, pure: bool = False, imatrix=None, optimizer: str = "none", progress: bool = True,
            device: str | None = None, **opts) -> dict:
    from . import convert as conv
    out = Path(out)
    from .atomic import check_output
    check_output(out, force, directory=to == "safetensors", inputs=(src, opts.get("calib"), imatrix))  # before any work
    _check_calib_args(method, opts.get("calib"), opts.get("calib_samples", 1), opts.get("calib_seqlen", 1))
    if to == "gguf" and opts.get("keep_fp16"):
        raise BadInput("--keep-fp16: GGUF cannot hold per-channel mixed precision (float16 side columns); "
                       "write --to safetensors --method awq --keep-fp16 instead")
    graph = load(src)
    if to == "gguf":
        q = (q or "f16").lower()
        if method not in ("none",):
            raise BadInput(f"--method {method} writes safetensors; for GGUF use --q (with --awq/--optimizer)")
        im = None
        if imatrix is not None:
            from .calibration.imatrix import read_imatrix
            im = read_imatrix(Path(imatrix), graph)
        extra = {}
        if optimizer != "none" or opts.get("awq_fold"):
            from .quant.gguf_calibrated import calibrated_gguf_kwargs
            extra = calibrated_gguf_kwargs(graph, q=q, optimizer=optimizer, imatrix=im, device=pick_device(device),
                                           progress=progress, overrides=overrides, pure=pure, **opts)
        return conv.convert_to_gguf(graph, out, q=q, force=force, overrides=overrides, pure=pure, imatrix=im,
                                    progress=progress, **extra)
    # safetensors
    if method == "none":
        q = (q or "bf16").lower()
        if q == "mxfp4":
            from .formats.mxfp4_writer import convert_to_mxfp4_safetensors
            return convert_to_mxfp4_safetensors(graph, out, force=force, progress=progress)
        return conv.convert_to_safetensors(graph, out, dtype=q, force=force, progress=progress)
    from .quant.calibrated import quantize_to_safetensors
    return quantize_to_safetensors(graph, out, method=method, force=force, progress=progress,
                                   device=pick_device(device), **opts)


def _read_text(path: Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"--text {p}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"--text {p}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def perplexity(model: str, text: Path, ctx: int = 512, chunks: int | None = None, base: str | None = None,
               device: str | None = None, progress: bool = True) -> dict:
    from tqdm import tqdm

    from .eval.perplexity import perplexity as ppl
    from .eval.tokens import encode
    from .runtime import executor_for
    dev = pick_device(device)
    body = _read_text(text)
    g = load(model)
    gb = load(base) if base else None
    if gb is not None and gb.hparams.vocab_size != g.hparams.vocab_size:
        raise BadInput(f"--base {base}: vocabulary size {gb.hparams.vocab_size} differs from the model's "
                       f"{g.hparams.vocab_size}; KLD needs the same vocabulary")
    ids, bos = encode(gb or g, body)
    m = executor_for(g, device=dev)
    mb = executor_for(gb, device=dev) if gb is not None else None
    bar = tqdm(desc="perplexity", unit="chunk", disable=not progress)

    def tick(i, n):
        bar.total = n
        bar.update(1)
    try:
        r = ppl(m, ids, n_ctx=ctx, n_chunks=chunks, bos_id=bos, base=mb, progress=tick)
    finally:
        bar.close()
    r.update({"model": str(model), "base": base, "text": str(text)})
    return r


def inspect(path: str) -> dict:
    g = load(path)
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
    return {"path": str(path), "format": g.source_format, "architecture": hp.arch, "hparams": hpd,
            "quantization": g.quantization, "tensors": rows, "n_params": n_params, "bytes": total_bytes,
            "bits_per_weight": 8 * total_bytes / max(n_params, 1)}
