"""GPTQ vs RTN accuracy on SmolLM2-135M (permuted so its Q4_1 grid no longer lines up with ours).

Calibrates on the first part of the Jargon text, evaluates perplexity and KLD against the unquantized
(permuted) model on a disjoint last part. Goal: GPTQ w4g128 closes >= 50% of RTN's perplexity gap.

    python benchmarks/gptq_accuracy.py [--samples 32 --seqlen 256 --chunks 4 --configs w4g128,w4g-1,w8g128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from quantkit.calibration.data import load_calibration
from quantkit.eval.perplexity import perplexity
from quantkit.eval.tokens import encode
from quantkit.families import load
from quantkit.graph import LazyTensor
from quantkit.quant.gptq_driver import GridOptions, quantize_graph
from quantkit.runtime import executor_for
from quantkit.transforms import permute_dense

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def parse_config(c: str) -> tuple[int, int]:
    bits, gs = c[1:].split("g")
    return int(bits), int(gs)


def dequantized_graph(graph, res):
    t = dict(graph.tensors)
    for n, ql in res.linears.items():
        t[n] = LazyTensor(graph[n].shape, "F32", lambda ql=ql: ql.dequantize())
    return graph.with_tensors(t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--text", default=str(SHARED / "data" / "jargon-4.4.7.txt"))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--configs", default="w4g128,w4g-1,w8g128")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--desc-act", action="store_true", help="GPTQ with act-order")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    graph = permute_dense(load(args.model), seed=0)
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    calib_text, eval_text = text[: int(0.4 * len(text))], text[int(0.8 * len(text)):]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "calib.txt"
        p.write_text(calib_text, encoding="utf-8")
        samples = load_calibration(graph, p, args.samples, args.seqlen, seed=0)
    ids, bos = encode(graph, eval_text)
    base = executor_for(graph, device=args.device)

    def evaluate(g):
        m = executor_for(g, device=args.device)
        r = perplexity(m, ids, n_ctx=args.ctx, n_chunks=args.chunks, bos_id=bos, base=base)
        return {k: r[k] for k in ("ppl", "ppl_stderr", "base_ppl", "kld_mean", "kld_p99", "top1_agreement")}

    rows = []
    t0 = time.perf_counter()
    b = perplexity(base, ids, n_ctx=args.ctx, n_chunks=args.chunks, bos_id=bos)
    base_ppl = b["ppl"]
    print(f"base: PPL {base_ppl:.4f} ({b['n_tokens']} scored tokens, {args.chunks} chunks of {args.ctx})", flush=True)
    for c in args.configs.split(","):
        bits, gs = parse_config(c)
        for method in args.methods.split(","):
            t = time.perf_counter()
            res = quantize_graph(graph, samples if method == "gptq" else None,
                                 GridOptions(method=method, bits=bits, group_size=gs, damp_percent=args.damp,
                                             desc_act=args.desc_act and method == "gptq"), device=args.device,
                                 progress=False)
            qt = time.perf_counter() - t
            r = evaluate(dequantized_graph(graph, res))
            r.update({"config": c, "method": method, "quant_time_s": qt})
            rows.append(r)
            print(f"{c:8s} {method:5s} PPL {r['ppl']:.4f} +/- {r['ppl_stderr']:.4f}  KLD {r['kld_mean']:.5f}  "
                  f"top1 {100 * r['top1_agreement']:.2f}%  ({qt:.1f} s)", flush=True)
            del res
    summary = {}
    for c in args.configs.split(","):
        rtn = next((r for r in rows if r["config"] == c and r["method"] == "rtn"), None)
        gq = next((r for r in rows if r["config"] == c and r["method"] == "gptq"), None)
        if rtn is None or gq is None:
            continue
        gap_rtn, gap_gptq = rtn["ppl"] - base_ppl, gq["ppl"] - base_ppl
        summary[c] = {"gap_closed": 1 - gap_gptq / gap_rtn if gap_rtn > 0 else None,
                      "kld_ratio": gq["kld_mean"] / rtn["kld_mean"] if rtn["kld_mean"] > 0 else None}
        gc = summary[c]["gap_closed"]
        print(f"{c:8s} GPTQ closes {100 * gc:.1f}% of RTN's PPL gap; KLD ratio GPTQ/RTN "
              f"{summary[c]['kld_ratio']:.3f}" if gc is not None else f"{c}: RTN has no PPL gap")
    out = {"desc_act": args.desc_act, "damp": args.damp, "base_ppl": base_ppl, "rows": rows, "summary": summary, "samples": args.samples,
           "seqlen": args.seqlen, "ctx": args.ctx, "chunks": args.chunks, "total_s": time.perf_counter() - t0}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
