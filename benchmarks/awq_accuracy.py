"""AWQ accuracy on a real model: perplexity and KLD vs the float model of RTN / AWQ / AWQ+keep-fp16 / GPTQ
at w4, and of a q4_k_m GGUF with and without `--awq` (measured by llama.cpp).

The model is SmolLM2-135M with its residual and FFN dimensions permuted (quantkit.transforms.permute_dense):
the same function, but its Q4_1-grid weights no longer line up with any quantization block. Calibration uses
windows from the first half of the text, evaluation chunks come from the second half (disjoint).
576 = 4.5 * 128, so the integer grid uses group 64 (AutoAWQ's layout holds whole groups only).

    python benchmarks/awq_accuracy.py [--calib-samples 4 --calib-seqlen 256 --chunks 3 --threads 1]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def dequantized(graph, linears: dict):
    """graph with each named weight replaced by fn() of its quantized form."""
    from quantkit.graph import LazyTensor
    t = dict(graph.tensors)
    for name, fn in linears.items():
        t[name] = LazyTensor(graph[name].shape, "F32", fn, source=name)
    return graph.with_tensors(t)


class Memo:
    """The base model's logits per chunk, computed once for every comparison."""

    def __init__(self, model):
        self.model, self.cache = model, {}

    def __call__(self, ids):
        k = tuple(ids.reshape(-1).tolist())
        if k not in self.cache:
            self.cache[k] = self.model(ids)
        return self.cache[k]


def llamacpp_stats(path: Path, chunks: list[list[int]], base_lp: list[np.ndarray]) -> dict:
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from oracles.llamacpp_model import LlamaModel
    nll, kld, lps = [], [], []
    with LlamaModel(path, n_ctx=len(chunks[0])) as m:
        for k, ids in enumerate(chunks):
            first = len(ids) // 2
            lg = m.logits(ids)[first:-1].astype(np.float64)
            lp = lg - (lg.max(1, keepdims=True) + np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1, keepdims=True)))
            tgt = np.asarray(ids[first + 1:])
            nll.append(-lp[np.arange(len(tgt)), tgt])
            if base_lp:
                pb = np.exp(base_lp[k])
                kld.append((pb * (base_lp[k] - lp)).sum(1))
            lps.append(lp)
    out = {"ppl": math.exp(np.concatenate(nll).mean()), "lp": lps}
    if kld:
        out["kld_mean"] = float(np.concatenate(kld).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--text", type=Path, default=SHARED / "data" / "jargon-4.4.7.txt")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers (smoke runs)")
    ap.add_argument("--no-gptq", action="store_true")
    ap.add_argument("--no-gguf", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from quantkit.eval.perplexity import perplexity
    from quantkit.eval.tokens import encode
    from quantkit.families import load
    from quantkit.quant.awq import AWQConfig, quantize_linear, quantized_graph, run_awq
    from quantkit.runtime import executor_for
    from quantkit.transforms import permute_dense

    t_start = time.time()
    g = permute_dense(load(args.gguf), seed=0)
    if args.layers:
        import dataclasses
        g = g.with_tensors({n: t for n, t in g.tensors.items()
                            if not n.startswith("blk.") or int(n.split(".")[1]) < args.layers},
                           hparams=dataclasses.replace(g.hparams, n_layers=args.layers))
    ids, bos = encode(g, args.text.read_text(encoding="utf-8", errors="replace"))
    half = len(ids) // 2
    T = args.calib_seqlen
    samples = [torch.tensor(ids[k * T:(k + 1) * T]) for k in range(args.calib_samples)]
    assert args.calib_samples * T <= half
    evals = ids[half:]
    gs = args.group_size
    base = Memo(executor_for(g))
    rows = []

    def evaluate(label, graph, extra=""):
        t = time.time()
        r = perplexity(executor_for(graph), evals, n_ctx=args.ctx, n_chunks=args.chunks, bos_id=bos, base=base)
        rows.append((label, r["ppl"], r["kld_mean"], r["top1_agreement"], extra))
        print(f"  {label}: ppl {r['ppl']:.3f} kld {r['kld_mean']:.5f} ({time.time() - t:.0f}s)", flush=True)
        return r

    r0 = perplexity(base, evals, n_ctx=args.ctx, n_chunks=args.chunks, bos_id=bos)
    rows.append(("float (base)", r0["ppl"], 0.0, 1.0, ""))
    print(f"base ppl {r0['ppl']:.3f} over {r0['n_tokens']} tokens", flush=True)

    rtn = {}
    for i in range(g.hparams.n_layers):
        for s in LINEARS:
            n = f"blk.{i}.{s}.weight"
            rtn[n] = (lambda n=n: quantize_linear(g[n].load().float(), 4, gs, False).dequantize())
    evaluate(f"RTN w4 g{gs} asym", dequantized(g, rtn))

    cfg = AWQConfig(bits=4, group_size=gs)
    variants = {"awq": cfg}
    for p in (0.1, 1.0, 3.0):
        variants[f"keep{p}"] = AWQConfig(bits=4, group_size=gs, keep_fp16=p)
    t = time.time()
    res = run_awq(g, samples, cfg, progress=False, variants=variants)
    t_awq = time.time() - t
    print(f"AWQ search + {len(variants)} quantizations: {t_awq:.0f}s", flush=True)
    evaluate(f"AWQ w4 g{gs}", quantized_graph(g, res["awq"]), f"{t_awq:.0f}s calib")
    for p in (0.1, 1.0, 3.0):
        evaluate(f"AWQ w4 g{gs} + keep-fp16 {p}%", quantized_graph(g, res[f"keep{p}"]))

    if not args.no_gptq:
        from quantkit.quant.gptq_driver import GridOptions, quantize_graph
        t = time.time()
        q = quantize_graph(g, samples, GridOptions(method="gptq", bits=4, group_size=gs, sym=False),
                           progress=False)
        t_gptq = time.time() - t
        evaluate(f"GPTQ w4 g{gs} asym", dequantized(g, {n: ql.dequantize for n, ql in q.linears.items()}),
                 f"{t_gptq:.0f}s calib")

    gg_rows = []
    if not args.no_gguf:
        from quantkit.export import convert_to_gguf
        from quantkit.quant.gguf_calibrated import awq_gguf_kwargs
        chunks = []
        for k in range(args.chunks):
            c = list(evals[k * args.ctx:(k + 1) * args.ctx])
            if bos is not None:
                c[0] = bos
            chunks.append(c)
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            convert_to_gguf(g, d / "f16.gguf", q="f16", progress=False)
            b = llamacpp_stats(d / "f16.gguf", chunks, [])
            gg_rows.append(("f16 GGUF (base)", b["ppl"], 0.0, ""))
            convert_to_gguf(g, d / "q4km.gguf", q="q4_k_m", progress=False)
            r = llamacpp_stats(d / "q4km.gguf", chunks, b["lp"])
            gg_rows.append(("q4_k_m", r["ppl"], r["kld_mean"], ""))
            t = time.time()
            kw = awq_gguf_kwargs(g, "q4_k_m", samples=samples, progress=False)
            t_g = time.time() - t
            convert_to_gguf(g, d / "q4km_awq.gguf", q="q4_k_m", progress=False, **kw)
            r = llamacpp_stats(d / "q4km_awq.gguf", chunks, b["lp"])
            gg_rows.append(("q4_k_m --awq", r["ppl"], r["kld_mean"], f"{t_g:.0f}s calib"))

    n_cal = args.calib_samples * T
    print(f"\nSmolLM2-135M (permuted), calibration {args.calib_samples}x{T} = {n_cal} tokens (first half of "
          f"{args.text.name}), eval {args.chunks} x {args.ctx} ctx (second half), torch executor:")
    print(f"{'model':34s} {'PPL':>9s} {'KLD':>9s} {'top1':>7s}  note")
    for label, ppl, kld, top1, note in rows:
        print(f"{label:34s} {ppl:9.3f} {kld:9.5f} {top1:7.3f}  {note}")
    if gg_rows:
        print("\nGGUF, logits from llama.cpp (KLD vs the f16 GGUF):")
        print(f"{'model':34s} {'PPL':>9s} {'KLD':>9s}  note")
        for label, ppl, kld, note in gg_rows:
            print(f"{label:34s} {ppl:9.3f} {kld:9.5f}  {note}")
    print(f"\ntotal {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
