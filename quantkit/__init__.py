"""quantkit: load open-weight LLM checkpoints into one canonical graph, quantize, write GGUF/safetensors."""

__version__ = "0.1.0"
