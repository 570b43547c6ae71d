"""Readers for quantized HF checkpoints: each presents dequantized `X.weight` lazy tensors under plain HF names.

Methods register a reader with `register(quant_method, fn)`; fn(files, quantization_config, source) -> dict.
"""

from __future__ import annotations

from typing import Callable

from ..errors import BadInput

READERS: dict[str, Callable] = {}


def register(method: str, fn: Callable) -> None:
    READERS[method] = fn


def read(files: dict, qc: dict, source: str) -> dict:
    method = qc.get("quant_method")
    _load_builtin()
    if method not in READERS:
        raise BadInput(f"{source}: quantization_config.quant_method '{method}' is not supported "
                       f"(supported: {', '.join(sorted(READERS)) or 'none'})")
    return READERS[method](files, qc, source)


def _load_builtin() -> None:
    # importing a layout module registers its reader
    import importlib
    for mod in ("gptq_layout", "awq_layout", "keep_fp16", "compressed_tensors", "mxfp4_layouts", "quantized_readers", "fp8"):
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as e:  # a layout module not present; real import errors propagate
            if e.name != f"{__package__}.{mod}":
                raise
