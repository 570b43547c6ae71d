"""Calibrated GGUF conversion: extra `convert_to_gguf` keyword arguments for `--awq` (and `--optimizer`).

`--awq`: AWQ's scale search runs on calibration data with, for each projection, a proxy of the integer grid
its planned GGUF type uses (bits, block size, symmetric or with a min), since running the k-quant search
itself inside the 20-point grid costs minutes per layer. The chosen scales are folded into the float weights
and norms (`transform`), which leaves the float model's function unchanged, and then the usual k-quant mixture
quantizes them. AWQ's clip step is not applied: it is tuned to one integer grid, and k-quants search their
own block scales. With an importance matrix its columns are rescaled by 1/s^2 to follow the scaled inputs.
"""

from __future__ import annotations

from gguf import GGMLQuantizationType as QT

import logging

from ..errors import BadInput
from ..graph import Graph

# ggml type -> (bits, block, symmetric) of the integer grid closest to it
PROXY = {
    QT.Q4_0: (4, 32, True), QT.Q4_1: (4, 32, False), QT.Q5_0: (5, 32, True), QT.Q5_1: (5, 32, False),
    QT.Q8_0: (8, 32, True), QT.Q2_K: (2, 16, False), QT.Q3_K: (3, 16, True), QT.Q4_K: (4, 32, False),
    QT.Q5_K: (5, 32, False), QT.Q6_K: (6, 16, True), QT.IQ4_NL: (4, 32, True), QT.IQ4_XS: (4, 32, True),
    QT.MXFP4: (4, 32, True),
}
FLOAT_PROXY = (8, 32, True)
log = logging.getLogger("quantkit")  # a float tensor has no grid to adapt to: a near-lossless stand-in


def calibrated_gguf_kwargs(graph: Graph, q: str, optimizer: str = "none", imatrix: dict | None = None,
                           device: str = "cpu", progress: bool = True, **opts) -> dict:
    if opts.get("keep_fp16"):
        raise BadInput("--keep-fp16: GGUF cannot hold per-channel mixed precision (float16 side columns); "
                       "write --to safetensors --method awq --keep-fp16 instead")
    if optimizer not in ("none", "gptq"):
        raise BadInput(f"--optimizer {optimizer}: no k-quant optimizer of that name in this build")
    if optimizer == "gptq":
        if opts.get("awq_fold"):
            raise BadInput("--optimizer gptq and --awq cannot be combined; choose one")
        from .kquant_gptq import gptq_gguf_kwargs
        return gptq_gguf_kwargs(graph, q, imatrix, device, progress, **opts)
    kw: dict = {}
    if opts.get("awq_fold"):
        kw.update(awq_gguf_kwargs(graph, q, imatrix, device, progress, **opts))
    return kw


def awq_gguf_kwargs(graph: Graph, q: str, imatrix: dict | None = None, device: str = "cpu", progress: bool = True,
                    calib=None, calib_samples: int = 128, calib_seqlen: int = 512, seed: int = 0,
                    overrides=None, pure: bool = False, samples=None, min_expert_tokens: int = 16,
                    moe_route_all: bool = False, awq_full_search: bool = False, calib_dtype: str | None = None,
                    **_unused) -> dict:
    """{"transform": fn} (and with an imatrix, a "quantizer" that rescales it) for convert_to_gguf.
    `samples` (token-id tensors) replace reading `calib` when given."""
    import torch

    from ..calibration.data import load_calibration
    from ..calibration.stream import calib_dtype as torch_dtype
    from .plan import plan_types
    from .awq import AWQConfig, check_awq_graph, fold_tensor, run_awq
    check_awq_graph(graph, "--awq")
    types = plan_types(graph, q.lower(), overrides, pure)

    def grid(name: str):
        return PROXY.get(types.get(name), FLOAT_PROXY)
    if samples is None:
        samples = load_calibration(graph, calib, calib_samples, calib_seqlen, seed)
    cfg = AWQConfig(grid=grid, clip=False, scale_dtype=torch.float32, min_expert_tokens=min_expert_tokens,
                    route_all=moe_route_all, search_fraction=1.0 if awq_full_search else AWQConfig.search_fraction,
                    calib_dtype=torch_dtype(calib_dtype))
    res = run_awq(graph, samples, cfg, device=device, progress=progress, quantize=False)
    for name, rows in res.experts.items():  # search-only run: experts under the minimum keep s = 1
        for r in rows:
            if r["tokens"] < cfg.min_expert_tokens:
                log.warning("--awq: %s expert %d saw %d calibration tokens (< %d): no scale search (s = 1)",
                            name, r["expert"], r["tokens"], cfg.min_expert_tokens)
    plan = res.fold_plan()

    def transform(name: str, w: torch.Tensor) -> torch.Tensor:
        return fold_tensor(w, *plan[name]) if name in plan else w
    kw = {"transform": transform}
    if imatrix:
        from .kquant_gptq import _plain
        from .plan import gguf_family
        fam, hp = gguf_family(graph), graph.hparams
        # a GGUF tensor split from a projection that reads its input (Qwen3-Next's attn_qkv) takes its scale
        src = {g: n for n in plan for g, _, _, same in fam.gguf_tensors(hp, n) or () if same}

        def quantizer(name, w, qt, im):
            col = plan.get(src.get(name, name), (None, None))[0]
            if im is not None and col is not None:  # [in] or per expert [E, in], like the scale
                im = im.float() / col.float().pow(2)
            return _plain(w, qt, im)
        kw["quantizer"] = quantizer
    return kw
