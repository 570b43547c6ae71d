"""Imports run one way through quantkit's layers (docs/architecture.md): every import, also the ones inside
functions, goes to the module's own layer or a lower one, and no import cycle exists among modules."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "quantkit"

# module (or package prefix) -> layer; the longest matching prefix wins
LAYERS = {
    "errors": 0, "graph": 0, "_version": 0, "threads": 0, "gemm": 0, "heap": 0,
    "atomic": 1, "checks": 1, "formats.gguf_parse": 1, "formats.safetensors_io": 1, "formats.gguf_writer": 1,
    "formats.gguf_tokenizer": 1, "formats.hf_tokenizer": 1, "formats.gguf_arch": 1, "formats.chat_template": 1,
    "formats.tiktoken_vocab": 1,
    "quant.grid": 2, "quant.block_layout": 2, "quant.kquants": 2, "quant.ggml_cpu": 2, "quant.ggml_legacy": 2, "quant.ggml_types": 2,
    "quant.mixtures": 2, "quant.cholesky": 2, "quant.mxfp4": 2, "kernels": 2,
    "formats.gptq_layout": 3, "formats.awq_layout": 3, "formats.compressed_tensors": 3, "formats.keep_fp16": 3,
    "formats.mxfp4_layouts": 3, "formats.hf_quantized": 3, "formats.fp8": 3, "formats.quantized_readers": 3,
    "runtime.rope": 4, "blocks": 4,
    "families": 5, "formats.gguf_reader": 5, "loader": 5,
    "runtime": 6, "transforms": 6, "eval.tokens": 6,
    "calibration": 7, "quant": 7, "eval": 7,
    "quant.plan": 7, "quant.awq_search": 7, "quant.gptq_driver": 8, "quant.awq_driver": 8, "quant.gguf_calibrated": 8,
    "export": 9, "formats.quantized_writer": 9, "formats.model_card": 9, "formats.mxfp4_writer": 9, "formats": 9, "report": 9,
    "jobs": 10, "pipeline": 10, "api": 10, "cli": 10, "__main__": 10, "": 10,
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def layer_of(mod: str) -> int:
    best = None
    for prefix, rank in LAYERS.items():
        if mod == prefix or mod.startswith(prefix + ".") or prefix == "":
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, rank)
    return best[1]


def imports_of(mod: str, path: Path, known: set[str]) -> set[str]:
    """quantkit modules `mod` imports (relative names), wherever the import statement stands."""
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if mod else []
    pkg = base if is_pkg else base[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = pkg[:len(pkg) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "quantkit":
                target = node.module.split(".")[1:]
            else:
                continue
            t = ".".join(target)
            for a in node.names:  # `from . import x` imports the submodule x when there is one
                sub = f"{t}.{a.name}" if t else a.name
                out.add(sub if sub in known else t)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "quantkit":
                    out.add(".".join(a.name.split(".")[1:]))
    return {m for m in out if m in known and m != mod}


def _graph():
    mods = _modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer():
    assert all(isinstance(layer_of(m), int) for m in _modules())


def test_no_upward_import():
    bad = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
           for m, deps in sorted(_graph().items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    g = _graph()
    # a package's __init__ that re-exports its submodules is not a cycle with them
    g = {m: {d for d in deps if not m.startswith(d + ".") and not (m == "" and d)} for m, deps in g.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2
    for m in sorted(g):
        if m not in state:
            visit(m)


def test_checker_sees_violations(tmp_path):
    """The checker itself: an upward import inside a function is found."""
    p = tmp_path / "graph.py"
    p.write_text("def f():\n    from .cli import main\n")
    assert imports_of("graph", p, {"graph", "cli"}) == {"cli"}
    assert layer_of("cli") > layer_of("graph")
