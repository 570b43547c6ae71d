"""Where family classes register themselves (`@register`) and are found: by canonical architecture, by HF
architecture name and by GGUF architecture name."""

from __future__ import annotations

from ..errors import UnsupportedArchitecture
from ..graph import Graph

BY_ARCH: dict[str, type] = {}
BY_HF: dict[str, type] = {}
BY_GGUF: dict[str, type] = {}


def register(cls):
    if cls.arch in BY_ARCH:
        raise ValueError(f"family {cls.arch!r} registered twice ({BY_ARCH[cls.arch].__name__}, {cls.__name__})")
    BY_ARCH[cls.arch] = cls
    for a in cls.hf_architectures:
        BY_HF[a] = cls
    if cls.gguf_arch and cls.gguf_reader:
        BY_GGUF[cls.gguf_arch] = cls
    return cls


def family_of(arch: str):
    """The family class of a canonical architecture (HParams.arch)."""
    _discover()
    try:
        return BY_ARCH[arch]
    except KeyError:
        raise UnsupportedArchitecture(
            f"architecture '{arch}' is not supported (supported: {', '.join(sorted(BY_ARCH))})") from None


def expected_shapes(hp) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of these hyperparameters' family, with its shape (from the family's blocks)."""
    return family_of(hp.arch).expected_shapes(hp)


def validate(graph) -> None:
    graph.validate(expected_shapes(graph.hparams))


def layer_projections(graph: Graph, i: int) -> tuple[str, ...]:
    """Layer i's projections (2-D linears, then stacked experts) as its family's blocks declare them."""
    spec = family_of(graph.hparams.arch).layer(graph.hparams, i)
    return spec.linears() + spec.expert_linears()


def quantizable(graph: Graph) -> dict[str, tuple[int, ...]]:
    """Canonical weight names GPTQ/RTN/AWQ quantize -> shape (embeddings, norms, router, lm_head stay)."""
    out = {}
    for i in range(graph.hparams.n_layers):
        for s in layer_projections(graph, i):
            n = f"blk.{i}.{s}.weight"
            if n in graph:
                out[n] = graph[n].shape
    return out


def gguf_family(gguf_arch: str | None, path: str):
    _discover()
    if gguf_arch not in BY_GGUF:
        raise UnsupportedArchitecture(
            f"{path}: GGUF architecture '{gguf_arch}' is not supported (supported: {', '.join(sorted(BY_GGUF))})")
    return BY_GGUF[gguf_arch]


def hf_architectures() -> list[str]:
    _discover()
    return sorted(BY_HF)


_DONE = False


def _discover() -> None:
    """Import every module of the families package once (each registers its classes)."""
    global _DONE
    if _DONE:
        return
    _DONE = True
    import importlib
    import pkgutil

    from .. import families
    for m in pkgutil.iter_modules(families.__path__):
        importlib.import_module(f"{families.__name__}.{m.name}")
