"""The jobs behind `convert --to safetensors --method rtn|gptq|awq`: options checked, calibrated, quantized,
written. They sit above the writers (export) and the drivers (recipes)."""

from __future__ import annotations

from ..errors import BadInput
from ..graph import Graph


def quantize_to_safetensors(graph: Graph, out, method: str, force: bool = False, progress: bool = True,
                            device: str = "cpu", **opts) -> dict:
    if method == "awq":
        from .awq import awq_to_safetensors
        return awq_to_safetensors(graph, out, force=force, progress=progress, device=device, **opts)
    if method in ("gptq", "rtn"):
        from .gptq import gptq_to_safetensors
        return gptq_to_safetensors(graph, out, method=method, force=force, progress=progress, device=device,
                                   **opts)
    raise BadInput(f"--method {method}: expected one of rtn, gptq, awq")
