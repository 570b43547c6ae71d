"""Family registry and the single entry point `load(source)` -> canonical Graph (HF dir, hub id, or GGUF)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType

from ..errors import BadInput, UnsupportedArchitecture
from ..graph import OUTPUT, Graph, LazyTensor, Tokenizer
from . import gpt_oss, llama, qwen

FAMILIES: list[ModuleType] = [llama, qwen, gpt_oss]
REGISTRY: dict[str, ModuleType] = {a: m for m in FAMILIES for a in m.HF_ARCHITECTURES}
# tensors HF checkpoints may carry that the graph derives or does not use
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def register(module: ModuleType) -> None:
    """Families added later (MoE, MLA ...) register themselves here."""
    FAMILIES.append(module)
    for a in module.HF_ARCHITECTURES:
        REGISTRY[a] = module


def supported_architectures() -> list[str]:
    return sorted(REGISTRY)


def family_for(cfg: dict, source: str) -> ModuleType:
    archs = cfg.get("architectures") or []
    if not archs:
        raise BadInput(f"{source}: config.json has no 'architectures' entry")
    for a in archs:
        if a in REGISTRY:
            return REGISTRY[a]
    raise UnsupportedArchitecture(
        f"{source}: architecture '{archs[0]}' is not supported (supported: {', '.join(supported_architectures())})")


def read_config(model_dir: Path) -> dict:
    p = model_dir / "config.json"
    if not p.exists():
        raise BadInput(f"{model_dir}: no config.json (expected an HF model directory or a .gguf file)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise BadInput(f"{p}: not valid JSON ({e})") from None


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


def load_hf(model_dir: Path) -> Graph:
    cfg = read_config(model_dir)
    fam = family_for(cfg, str(model_dir))
    hp = fam.hparams(cfg)
    src = hf_tensor_sources(model_dir, cfg)
    if hasattr(fam, "tensors"):  # families whose layout is not a 1:1 rename (stacked experts ...)
        tensors = fam.tensors(hp, src, str(model_dir))
    else:
        tensors = {}
        for hf, canon in fam.name_map(hp).items():
            if hf not in src:
                raise BadInput(f"{model_dir}: tensor '{hf}' is missing from the checkpoint")
            tensors[canon] = src[hf]
    if hp.tie_embeddings and OUTPUT in tensors:
        del tensors[OUTPUT]
    g = Graph(hp, tensors, Tokenizer(hf_dir=model_dir), source=str(model_dir), source_format="hf", hf_config=cfg,
              quantization=cfg.get("quantization_config"))
    (fam.validate if hasattr(fam, "validate") else Graph.validate)(g)
    return g


# everything a checkpoint folder needs: weights, configs, tokenizer files (json, sentencepiece, tiktoken,
# merges/vocab txt) and chat templates kept outside tokenizer_config.json
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def resolve(source: str | os.PathLike) -> Path:
    p = Path(source)
    if p.exists():
        return p
    s = str(source)
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


def load(source: str | os.PathLike) -> Graph:
    from ..formats.gguf_reader import is_gguf, load_gguf
    p = resolve(source)
    if p.is_file():
        if is_gguf(p) or p.suffix == ".gguf":
            return load_gguf(p)
        raise BadInput(f"{p}: not a GGUF file and not a model directory")
    return load_hf(p)


def hf_family(graph: Graph) -> ModuleType:
    """The family module that writes this graph as HF (by canonical arch)."""
    for m in FAMILIES:
        if hasattr(m, "hf_config"):
            try:
                cfg = m.hf_config(graph.hparams)
            except Exception:
                continue
            if cfg.get("architectures", [None])[0] in m.HF_ARCHITECTURES and \
                    m.hparams(cfg).arch == graph.hparams.arch:
                return m
    raise UnsupportedArchitecture(f"architecture '{graph.hparams.arch}' cannot be written as HF safetensors")
