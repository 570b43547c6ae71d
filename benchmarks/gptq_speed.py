"""GPTQ speed and memory on SmolLM2-135M: seconds per layer, total, peak RSS (resource.getrusage).

GPTQModel / llm-compressor are not compared side by side: gptqmodel is an sdist needing a compiled build,
and llm-compressor pins compressed-tensors 0.19 (this project uses 0.20) plus datasets/auto-round.

    python benchmarks/gptq_speed.py [--samples 16 --seqlen 256 --bits 4 --group-size 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from quantkit.calibration.data import load_calibration
from quantkit.families import load
from quantkit.quant.gptq_driver import GridOptions, quantize_graph
from quantkit.transforms import permute_dense

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--text", default=str(SHARED / "data" / "jargon-4.4.7.txt"))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--desc-act", action="store_true")
    ap.add_argument("--no-true-sequential", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    graph = permute_dense(load(args.model), seed=0)
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "calib.txt"
        p.write_text(text[: int(0.4 * len(text))], encoding="utf-8")
        samples = load_calibration(graph, p, args.samples, args.seqlen, seed=0)
    rss0 = peak_rss_mib()
    opts = GridOptions(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act,
                       true_sequential=not args.no_true_sequential)
    t0 = time.perf_counter()
    res = quantize_graph(graph, samples, opts, device=args.device, progress=False, keep=False)
    total = time.perf_counter() - t0
    rep = res.report
    per_layer = [lay["time_s"] for lay in rep["layers"]]
    gptq_s = sum(t["time_s"] for t in rep["tensors"].values())
    out = {
        "device": args.device, "torch_threads": torch.get_num_threads(), "samples": args.samples,
        "seqlen": args.seqlen, "tokens": args.samples * args.seqlen, "bits": args.bits,
        "group_size": args.group_size, "desc_act": args.desc_act, "true_sequential": opts.true_sequential,
        "total_s": total, "layer_s_mean": statistics.mean(per_layer), "layer_s_max": max(per_layer),
        "gptq_solve_s": gptq_s, "forward_and_hessian_s": sum(per_layer) - gptq_s,
        "peak_rss_mib": peak_rss_mib(), "rss_before_quant_mib": rss0,
    }
    if args.device.startswith("cuda"):
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    for k, v in out.items():
        print(f"{k:24s} {v:.3f}" if isinstance(v, float) else f"{k:24s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps({**out, "per_layer_s": per_layer}, indent=2))


if __name__ == "__main__":
    main()
