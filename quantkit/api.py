"""The Python API: the CLI's commands as functions, with typed options.

    import quantkit
    m = quantkit.load("HuggingFaceTB/SmolLM2-135M-Instruct")      # HF folder, hub id or .gguf
    quantkit.convert(m, "m-Q4_K_M.gguf", q="q4_k_m")
    quantkit.quantize(m, "m-gptq", method="gptq", calib=["some text", ...], calib_samples=8)
    quantkit.load("m-Q4_K_M.gguf").perplexity("eval.txt", base=m)

Options are `ConvertOptions` fields, given as keywords or as a ConvertOptions; an unknown keyword is a
TypeError with a suggestion, an option that does not apply is a `BadInput` naming why (as on the CLI).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import BadInput
from .graph import Graph

PathLike = str | os.PathLike
Calibration = PathLike | Sequence[str] | Sequence[Sequence[int]] | Sequence[Sequence[dict]]


@dataclass
class ConvertOptions:
    """What `quantkit convert` takes, by the same names (flag --group-size -> group_size). None = default."""
    to: str = "gguf"                    # "gguf" | "safetensors"
    q: str | None = None                # GGUF type preset (q4_k_m ...) or safetensors dtype (bf16 ...)
    method: str = "none"                # safetensors: "rtn" | "gptq" | "awq"
    format: str | None = None           # safetensors layout: "gptq" | "awq" | "compressed-tensors"
    bits: int | None = None             # --method grid (default 4)
    group_size: int | None = None       # --method grid (default 128; -1 = per channel)
    sym: bool | None = None
    desc_act: bool = False
    static_groups: bool = False
    damp: float | None = None
    keep_fp16: float | None = None      # AWQ: percent of input channels kept in float16
    awq: bool = False                   # GGUF: AWQ scaling before k-quantization
    calib: Calibration | None = None    # a file/folder path, or a list of texts, chat conversations or token ids
    calib_samples: int | None = None
    calib_seqlen: int | None = None
    seed: int | None = None
    imatrix: PathLike | None = None
    optimizer: str = "none"             # GGUF: "gptq" = Hessian-aware k-quant rounding
    tensor_types: dict[str, str] | None = None  # GGUF: {regex: type}, like --tensor-type REGEX=TYPE
    pure: bool = False
    device: str | None = None
    moe_route_all: bool = False         # MoE calibration: every expert's statistics see every token
    min_expert_tokens: int | None = None  # MoE: experts calibration reaches less get RTN (default 16)
    drop_mtp: bool = False              # leave out MTP layers a family would keep (GLM-4.5's)
    awq_full_search: bool = False       # AWQ: every scale candidate on every sample (AutoAWQ's search; slower)
    calib_dtype: str | None = None      # calibration forwards: "float32" | "bfloat16" | "float16" | "auto" (default:
    #   bfloat16 on CUDA; on a CPU with bf16 dot products for a bf16/FP8 model; else float32); sums stay float32

    def pipeline_options(self) -> dict:
        """As pipeline.convert names them, only those set (so that unset options are never 'given')."""
        rename = {"format": "st_format", "awq": "awq_fold", "tensor_types": "overrides"}
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None or (v is False and f.name != "sym") or (f.name in ("to", "method", "optimizer")
                                                                  and v == f.default):
                continue
            if f.name == "tensor_types":
                v = list(v.items()) if isinstance(v, dict) else list(v)
            out[rename.get(f.name, f.name)] = v
        return out


def _options(options: ConvertOptions | None, kw: dict, fn: str) -> ConvertOptions:
    names = {f.name for f in dataclasses.fields(ConvertOptions)}
    for k in kw:
        if k not in names:
            from .export import did_you_mean
            raise TypeError(f"{fn}() got an unknown option '{k}'{did_you_mean(k, sorted(names))}")
    return dataclasses.replace(options or ConvertOptions(), **kw)


class Model:
    """A loaded model: the canonical graph (tensors read lazily) with inspection and evaluation."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._executor = None

    @property
    def source(self) -> str:
        return self.graph.source

    @property
    def architecture(self) -> str:
        return self.graph.hparams.arch

    @property
    def hparams(self) -> dict:
        return self.graph.hparams.to_dict()

    @property
    def tensors(self) -> dict[str, dict]:
        """name -> {"shape", "type", "bytes", "bpw"} (GGUF names; the stored type)."""
        return {r["name"]: {k: v for k, v in r.items() if k != "name"} for r in self.inspect()["tensors"]}

    def inspect(self) -> dict:
        from . import pipeline
        return pipeline.inspect(self.graph)

    def tokenize(self, text: str) -> list[int]:
        """Token ids as evaluation uses them (a leading BOS when the vocabulary adds one)."""
        from .eval.tokens import encode
        return encode(self.graph, text)[0]

    def logits(self, ids, device: str | None = None) -> torch.Tensor:
        """Logits [T, V] (or [B, T, V] for a batch) of quantkit's executor, float32."""
        from .pipeline import pick_device
        from .runtime import executor_for
        if self._executor is None or device is not None:
            self._executor = executor_for(self.graph, device=pick_device(device))
        t = torch.as_tensor(ids, dtype=torch.long)
        with torch.no_grad():
            out = self._executor(t[None] if t.dim() == 1 else t).float()
        return out[0] if t.dim() == 1 else out

    def perplexity(self, text, ctx: int = 512, chunks: int | None = None, base=None, tokenizer: str = "model",
                   save_base: PathLike | None = None, plot: PathLike | None = None, device: str | None = None,
                   progress: bool = False) -> dict:
        """PPL on `text` (a file path or the text itself); with `base` (a Model, path, hub id or .qkld) also KLD."""
        return perplexity(self, text, ctx=ctx, chunks=chunks, base=base, tokenizer=tokenizer, save_base=save_base,
                          plot=plot, device=device, progress=progress)

    def convert(self, output: PathLike | None = None, options: ConvertOptions | None = None, **kw) -> dict:
        return convert(self, output, options, **kw)

    def __repr__(self) -> str:
        hp = self.graph.hparams
        return f"Model({self.architecture}, {hp.n_layers} layers, hidden {hp.hidden_size}, from {self.source!r})"


def load(source: PathLike | Graph | Model, drop_mtp: bool = False) -> Model:
    """An HF folder, hub id or .gguf as a Model (nothing but metadata is read yet). drop_mtp: leave out the
    MTP (next-token prediction) layers a family would keep (GLM-4.5's)."""
    from .families import load as load_graph
    from .families import without_mtp
    if isinstance(source, Model):
        return Model(without_mtp(source.graph)) if drop_mtp else source
    if isinstance(source, Graph):
        return Model(without_mtp(source) if drop_mtp else source)
    return Model(load_graph(source, drop_mtp=drop_mtp))


def _graph(model) -> Graph | str:
    if isinstance(model, Model):
        return model.graph
    return model


def convert(model, output: PathLike | None = None, options: ConvertOptions | None = None, *, force: bool = False,
            progress: bool = False, dry_run: bool = False,
            report: PathLike | None = None, **kw: Any) -> dict:
    """`quantkit convert`: write `model` (Model, path or hub id) as GGUF or safetensors. Without `output`, the
    default name (<model>-Q4_K_M.gguf ...) in the current directory. Returns the run's summary dict
    ("output", "bytes", "bits_per_weight", "fallbacks", "time_s", and "report" for calibrated methods);
    with dry_run=True the plan ("rows": type, size and bpw per tensor) and nothing is written. `report` (GGUF):
    a JSON file with every tensor's type, relative weight error and encode time."""
    from . import pipeline
    opts = _options(options, kw, "convert")
    return pipeline.convert(_graph(model), output, force=force, progress=progress, dry_run=dry_run, report=report,
                            **opts.pipeline_options())


def quantize(model, output: PathLike | None = None, options: ConvertOptions | None = None, *, force: bool = False,
             progress: bool = False, dry_run: bool = False,
             report: PathLike | None = None, **kw: Any) -> dict:
    """`convert` for quantized outputs: with `method` (rtn/gptq/awq) the output is safetensors unless `to`
    says otherwise."""
    opts = _options(options, kw, "quantize")
    if opts.method != "none" and "to" not in kw and (options is None or options.to == "gguf"):
        opts = dataclasses.replace(opts, to="safetensors")
    return convert(model, output, opts, force=force, progress=progress, dry_run=dry_run, report=report)


def perplexity(model, text, ctx: int = 512, chunks: int | None = None, base=None, tokenizer: str = "model",
               save_base: PathLike | None = None, plot: PathLike | None = None, device: str | None = None,
               progress: bool = False) -> dict:
    """`quantkit perplexity`: PPL (llama-perplexity protocol) and, with `base`, KLD statistics."""
    from . import pipeline
    return pipeline.perplexity(_graph(model), text, ctx=ctx, chunks=chunks, base=_graph(base), device=device,
                               progress=progress, tokenizer=tokenizer, save_base=save_base, plot=plot)


def inspect(model) -> dict:
    """`quantkit inspect`: architecture, hyperparameters, file type, tensor table (any GGUF, imatrix too)."""
    from . import pipeline
    return pipeline.inspect(_graph(model))


def imatrix(model, calib: Calibration, output: PathLike | None = None, ctx: int = 512, chunks: int | None = None,
            process_output: bool = False, device: str | None = None, progress: bool = False, force: bool = False,
            calib_dtype: str = "auto") -> dict:
    """`quantkit imatrix`: llama-imatrix's importance matrix over `calib`; written to `output` (GGUF, or .dat
    by suffix) when given. Returns its summary. calib_dtype: the forwards' dtype (auto: bfloat16 on CUDA;
    on the CPU bfloat16 for a model stored in bfloat16 or FP8 when the CPU has bf16 dot products, else float32)."""
    from .calibration import imatrix as imx
    from .calibration.data import as_calib
    from .calibration.stream import CALIB_DTYPES, calib_dtype_name
    from .pipeline import pick_device
    calib_dtype_name(calib_dtype, "cpu")  # a bad name is refused before any work
    g = load(model).graph
    if output is not None:
        from .atomic import check_output
        check_output(Path(output), force)
    dev = pick_device(device)
    dt = calib_dtype_name(calib_dtype, dev, g)
    t0 = time.perf_counter()
    im = imx.imatrix_from_calib(g, as_calib(calib), n_ctx=ctx, n_chunks=chunks, device=dev,
                                process_output=process_output, progress=progress, dtype=CALIB_DTYPES[dt])
    t1 = time.perf_counter()
    r = imx.summary(im)
    r["calib_dtype"] = dt
    if output is not None:
        from .atomic import atomic_output
        with atomic_output(Path(output), force) as tmp:
            (imx.write_imatrix_dat if str(output).endswith(".dat") else imx.write_imatrix_gguf)(im, tmp)
        r["output"] = str(output)
    r.update(imx.timing(im, t0, t1))
    return r


__all__ = ["ConvertOptions", "Model", "load", "convert", "quantize", "perplexity", "inspect", "imatrix", "BadInput"]
