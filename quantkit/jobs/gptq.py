"""`quantkit convert --to safetensors --method gptq|rtn`: options checked before calibration, the GPTQ/RTN
driver (quant/gptq_driver.py), and the checkpoint written by the layout's writer."""

from __future__ import annotations

import logging

from ..errors import BadInput
from ..graph import Graph
from ..quant.gptq_driver import GridOptions, QuantResult, format_report, quantizable, quantize_layers

log = logging.getLogger("quantkit.gptq")


def gptq_to_safetensors(graph: Graph, out, method: str = "gptq", force: bool = False, progress: bool = True,
                        device: str = "cpu", st_format: str | None = None, bits: int = 4, group_size: int = 128,
                        sym: bool | None = None, desc_act: bool = False, static_groups: bool = False,
                        damp: float | None = None, calib=None, calib_samples: int = 128, calib_seqlen: int = 512,
                        seed: int = 0, keep_fp16: float = 0.0, true_sequential: bool = True,
                        min_expert_tokens: int = 16, moe_route_all: bool = False, resume: bool = False,
                        calib_dtype: str | None = None, **_unused) -> dict:
    """`quantkit convert --to safetensors --method gptq|rtn`: validate, calibrate, quantize, write.
    Every option is checked before calibration; the output directory appears only when all succeeded."""
    from pathlib import Path

    from ..calibration.stream import calib_dtype as torch_dtype
    from ..formats.quantized_writer import (REPORT_NAME, LayerPull, QuantizedPacker, check_layout,
                                            packed_shapes, quantization_config, write_quantized_checkpoint)
    if keep_fp16:
        raise BadInput(f"--keep-fp16 is an AWQ option; --method {method} keeps no channels in FP16")
    opts = GridOptions(method=method, bits=bits, group_size=group_size, sym=True if sym is None else sym,
                       desc_act=desc_act, static_groups=static_groups,
                       damp_percent=0.01 if damp is None else damp, true_sequential=true_sequential,
                       min_expert_tokens=min_expert_tokens, route_all=moe_route_all,
                       calib_dtype=torch_dtype(calib_dtype))
    opts.check()
    fmt = st_format or "gptq"
    if fmt not in ("gptq", "compressed-tensors"):
        raise BadInput(f"--format {fmt}: --method {method} writes 'gptq' or 'compressed-tensors'")
    check_layout(graph, fmt, opts.bits, opts.group_size, opts.desc_act, opts.static_groups)
    samples = None
    if method == "gptq":
        from ..calibration.data import load_calibration
        samples = load_calibration(graph, calib, calib_samples, calib_seqlen, seed)
    packer = QuantizedPacker(fmt, opts.sym, graph)
    # the writer pulls each layer from the driver as it reaches it: one layer's packed tensors in memory
    state = None
    if resume and method == "gptq":
        from ..calibration.checkpoint import ResumeState, resume_dir, resume_key
        state = ResumeState(resume_dir(out), resume_key(graph, samples, {**vars(opts), "format": fmt,
                                                                          "seed": seed, "method": method}))
    res = QuantResult()
    layers = quantize_layers(graph, samples, opts, device=device, progress=progress, keep=False, result=res,
                             resume=state)
    from ..calibration.dist import world
    if not world().writer:  # another rank writes: this one takes its part in the calibration only
        for _ in layers:
            pass
        return {"output": None}
    pull = LayerPull(layers, packer.add, quantizable(graph),
                     lambda o, i: packed_shapes(fmt, o, i, opts.bits, opts.group_size, opts.sym, opts.scale_dtype))

    def report() -> dict:  # complete once the driver ran to its end
        rep = res.report
        rep.update({"method": method, "format": fmt, "source": graph.source,
                    "calib": str(calib) if samples is not None else None, "seed": seed})
        log.debug("%s report:\n%s", method.upper(), format_report(rep))  # the full table: -v or the report file
        return rep
    qc = quantization_config(fmt, opts.bits, opts.group_size, opts.sym, opts.desc_act, opts.static_groups,
                             opts.damp_percent, opts.true_sequential, method, graph)
    out = write_quantized_checkpoint(graph, Path(out), packer.packed, qc, force=force, report=report,
                                     progress=progress, experts=packer.experts, pull=pull)
    if state is not None:  # the output is whole: the finished layers are no longer needed
        state.remove()
    out["report"] = str(Path(out["output"]) / REPORT_NAME)
    if method == "gptq":
        out["calib_dtype"] = str(opts.calib_dtype).replace("torch.", "")
    return out
