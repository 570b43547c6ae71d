"""README.md model card and engine config files beside safetensors outputs, as the hub and the engines expect:
method and options, calibration data with its digest, how to load it, and (once `quantkit perplexity` has
been run on it) the measured perplexity / KL divergence."""

from __future__ import annotations

import json
from pathlib import Path

from .._version import __version__

EVAL_START, EVAL_END = "<!-- quantkit:evaluation -->", "<!-- /quantkit:evaluation -->"


def _calib_line(calib) -> str | None:
    if not calib or calib == "None":
        return None
    p = Path(str(calib))
    if p.exists():
        from ..calibration.data import calib_digest
        return f"`{p.name}` (sha256 `{calib_digest(p)}`)"
    return f"`{calib}`"  # a Python list: its label carries the digest


def model_card(graph, title: str, options: dict, calib=None, samples: str | None = None,
               quantized: bool = True) -> str:
    """The card's text. options: what was chosen (method, bits ...), in display order."""
    src = Path(str(graph.source)).name
    rows = "\n".join(f"| {k} | `{v}` |" for k, v in options.items() if v is not None)
    lines = ["---", f"base_model: {src}", "library_name: transformers",
             f"tags: [quantkit{', ' + str(options.get('method')) if options.get('method') else ''}]", "---", "",
             f"# {title}", "", f"Written by quantkit {__version__} from `{graph.source}`"
             f" ({graph.hparams.arch}, {graph.hparams.n_layers} layers).", "", "## Quantization" if quantized
             else "## Conversion", "", "| option | value |", "|---|---|", rows, ""]
    cl = _calib_line(calib)
    if cl:
        lines += [f"Calibration data: {cl}" + (f", {samples}" if samples else "") + ".", ""]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", "",
              "## Evaluation", "", EVAL_START,
              "Not measured yet: `quantkit perplexity <this folder> --text eval.txt --base <original model>` "
              "fills this in.", EVAL_END, ""]
    return "\n".join(lines)


def write_card(out_dir: Path, text: str, engine_config: dict | None = None) -> None:
    """README.md, and quantize_config.json (the quantization_config as GPTQModel/AutoGPTQ, AutoRound and
    vLLM's loaders look for it beside the weights) when the output is quantized."""
    (Path(out_dir) / "README.md").write_text(text, encoding="utf-8")
    if engine_config is not None:
        (Path(out_dir) / "quantize_config.json").write_text(json.dumps(engine_config, indent=2))


def record_evaluation(model_dir: Path, r: dict) -> bool:
    """Put a perplexity run's numbers into a quantkit model card; False when the folder has none."""
    p = Path(model_dir) / "README.md"
    if not p.is_file():
        return False
    text = p.read_text(encoding="utf-8")
    if EVAL_START not in text or EVAL_END not in text:
        return False
    rows = [f"Text `{Path(str(r['text'])).name}`, {r['n_chunks']} chunks of {r['n_ctx']} tokens, tokenizer: "
            f"{r['tokenizer']}.", "", "| metric | value |", "|---|---|",
            f"| perplexity | {r['ppl']:.4f} ± {r['ppl_stderr']:.4f} |"]
    if r.get("base"):
        rows += [f"| base perplexity (`{Path(str(r['base'])).name}`) | {r['base_ppl']:.4f} |",
                 f"| PPL ratio | {r['ppl_ratio']:.5f} |", f"| mean KLD | {r['kld_mean']:.6f} |",
                 f"| 99% KLD | {r['kld_p99']:.6f} |", f"| same top token | {100 * r['top1_agreement']:.2f} % |"]
    head, rest = text.split(EVAL_START, 1)
    tail = rest.split(EVAL_END, 1)[1]
    p.write_text(head + EVAL_START + "\n" + "\n".join(rows) + "\n" + EVAL_END + tail, encoding="utf-8")
    return True
