"""quantkit: load open-weight LLM checkpoints into one canonical graph, quantize, write GGUF/safetensors.

The Python API (see README "Python API"): load, convert, quantize, perplexity, inspect, imatrix, ConvertOptions,
Model. Imported on first use, so that `import quantkit` stays light."""

from ._version import __version__  # noqa: F401

_API = ("ConvertOptions", "Model", "load", "convert", "quantize", "perplexity", "inspect", "imatrix")
__all__ = [*_API, "QuantkitError", "BadInput"]


def __getattr__(name):
    if name in _API:
        from . import api
        return getattr(api, name)
    if name in ("QuantkitError", "BadInput"):
        from . import errors
        return getattr(errors, name)
    raise AttributeError(f"module 'quantkit' has no attribute '{name}'")
