"""quantkit: load open-weight LLM checkpoints into one canonical graph, quantize, write GGUF/safetensors."""

from ._version import __version__  # noqa: F401
