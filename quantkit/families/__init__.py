"""Families (one registered class per file) and the single entry point `load(source)` -> canonical Graph
(HF dir, hub id, or GGUF)."""

from __future__ import annotations

import os
from pathlib import Path

from ..checks import check_hparams
from ..errors import BadInput, UnsupportedArchitecture
from ..graph import OUTPUT, Graph, LazyTensor, Tokenizer
from .base import Family
from .registry import expected_shapes, family_of, gguf_family, hf_architectures, register, validate

__all__ = ["Family", "mtp_summary", "without_mtp", "expected_shapes", "family_for", "family_of", "gguf_family", "hf_family", "load", "register",
           "supported_architectures", "validate"]


def supported_architectures() -> list[str]:
    return hf_architectures()


def family_for(cfg: dict, source: str) -> type[Family]:
    """The family of an HF config.json (by its `architectures`)."""
    from .registry import BY_HF
    archs = cfg.get("architectures") or []
    if not archs:
        raise BadInput(f"{source}: config.json has no 'architectures' entry")
    hf_architectures()  # imports every family module
    for a in archs:
        if a in BY_HF:
            return BY_HF[a]
    raise UnsupportedArchitecture(
        f"{source}: architecture '{archs[0]}' is not supported (supported: {', '.join(supported_architectures())})")


def read_config(model_dir: Path) -> dict:
    p = model_dir / "config.json"
    if not p.exists():
        raise BadInput(f"{model_dir}: no config.json (expected an HF model directory or a .gguf file)")
    from ..checks import check_hf_config, read_json
    return check_hf_config(read_json(p, expect=None), p)


def hf_tensor_sources(model_dir: Path, cfg: dict) -> dict[str, LazyTensor]:
    """HF tensor name -> lazy tensor. Quantized checkpoints (GPTQ/AWQ ...) go through their format's reader,
    which presents dequantized `X.weight` tensors under the plain HF names."""
    from ..formats import hf_quantized
    from ..formats.safetensors_io import open_checkpoint
    files = open_checkpoint(model_dir)
    qc = cfg.get("quantization_config")
    if qc:
        return hf_quantized.read(files, qc, str(model_dir))
    out = {}
    for name, (sf, key) in files.items():
        e = sf.entries[key]
        out[name] = LazyTensor(e.shape, e.dtype, lambda sf=sf, key=key: sf.tensor(key), source=f"{sf.path}:{key}",
                               nbytes=e.end - e.start)
    return out


def load_hf(model_dir: Path, drop_mtp: bool = False) -> Graph:
    cfg = read_config(model_dir)
    fam = family_for(cfg, str(model_dir))
    hp = fam.hparams_from_hf(cfg)
    if drop_mtp:
        hp.extra["drop_mtp"] = True
    src = hf_tensor_sources(model_dir, cfg)
    check_hparams(hp, model_dir / "config.json", src)
    tensors = fam.hf_tensors(hp, src, str(model_dir))
    if hp.tie_embeddings and OUTPUT in tensors:
        del tensors[OUTPUT]
    g = Graph(hp, tensors, Tokenizer(hf_dir=model_dir), source=str(model_dir), source_format="hf", hf_config=cfg,
              quantization=cfg.get("quantization_config"))
    validate(g)
    return g


# everything a checkpoint folder needs: weights, configs, tokenizer files (json, sentencepiece, tiktoken,
# merges/vocab txt) and chat templates kept outside tokenizer_config.json
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def resolve(source: str | os.PathLike) -> Path:
    p = Path(source)
    if p.exists():
        return p
    s = str(source)
    from .closed import closed_model
    closed = closed_model(s)
    if closed:  # an API-only model asked for by name: say so rather than fail on the hub
        raise BadInput(closed)
    if s.count("/") == 1 and not s.startswith((".", "/")) and not s.endswith(".gguf"):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(s, allow_patterns=HUB_PATTERNS))
        except Exception as e:  # offline with no cache, unknown repo, ...
            raise BadInput(hub_message(s, e)) from None
    raise BadInput(f"{s}: no such file or directory")


def hub_message(repo: str, e: Exception) -> str:
    """What went wrong fetching `repo` from the hub, and what to do about it."""
    name = type(e).__name__
    if name == "LocalEntryNotFoundError":
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        return (f"{repo}: not a local path, not in the hub cache, and {why}; download it on a connected machine "
                f"(huggingface-cli download {repo}) or pass a local model folder")
    if name == "GatedRepoError":
        return (f"{repo}: a gated model; accept its terms on https://huggingface.co/{repo} and log in "
                "(huggingface-cli login, or set HF_TOKEN)")
    if name == "RepositoryNotFoundError":
        return (f"{repo}: no such model on the Hugging Face hub (a private one needs huggingface-cli login or "
                "HF_TOKEN); or a local path that does not exist")
    if name == "RevisionNotFoundError":
        return f"{repo}: the requested revision does not exist on the hub"
    return f"{repo}: not a local path, and fetching it from the hub failed ({name}: {str(e).splitlines()[0][:200]})"


def load(source: str | os.PathLike, drop_mtp: bool = False) -> Graph:
    """An HF folder, hub id or GGUF file as a canonical Graph. drop_mtp: leave out MTP (next-token prediction)
    layers that the family would otherwise keep (GLM-4.5's, which llama.cpp names and runs as a draft)."""
    from ..formats.gguf_reader import is_gguf, load_gguf
    p = resolve(source)
    if p.is_file():
        if is_gguf(p) or p.suffix == ".gguf":
            return load_gguf(p, drop_mtp=drop_mtp)
        raise BadInput(f"{p}: not a GGUF file and not a model directory")
    return load_hf(p, drop_mtp=drop_mtp)


def without_mtp(graph: Graph) -> Graph:
    """The graph without the MTP layers it kept (tensors of blk.{n_layers}.. ; recorded as dropped)."""
    import dataclasses
    from ..graph import parse_name
    kept = graph.hparams.extra.get("mtp_layers", 0)
    if not kept:
        return graph
    hp = dataclasses.replace(graph.hparams, extra={**graph.hparams.extra, "mtp_layers": 0, "mtp_dropped": kept,
                                                   "mtp_reason": "--drop-mtp"})
    tensors = {n: t for n, t in graph.tensors.items() if (parse_name(n)[0] or 0) < hp.n_layers}
    return graph.with_tensors(tensors, hparams=hp)


def mtp_summary(graph: Graph) -> str | None:
    """One line on the source's MTP (next-token prediction) layers: kept or dropped, and why; None: none."""
    x = graph.hparams.extra
    n = graph.hparams.n_layers
    if x.get("mtp_layers"):
        k = x["mtp_layers"]
        return (f"{k} MTP layer{'s' if k != 1 else ''} kept (blk.{n}{'..' + str(n + k - 1) if k > 1 else ''}, "
                "llama.cpp's nextn tensors; --drop-mtp leaves them out)")
    if x.get("mtp_dropped"):
        k = x["mtp_dropped"]
        return f"{k} MTP layer{'s' if k != 1 else ''} dropped ({x.get('mtp_reason', 'not kept by this family')})"
    return None


def hf_family(graph: Graph) -> type[Family]:
    """The family that writes this graph as an HF checkpoint."""
    fam = family_of(graph.hparams.arch)
    if not fam.hf_architectures:
        raise UnsupportedArchitecture(f"architecture '{graph.hparams.arch}' cannot be written as HF safetensors")
    return fam
