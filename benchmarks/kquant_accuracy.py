"""k-quant accuracy on SmolLM2-135M (permuted so its Q4_1 grid no longer lines up with any block grid).

For q4_k_m, q5_k_m and q6_k, five GGUFs of the same permuted F32 model are evaluated by one evaluator
(quantkit's executor + quantkit.eval.perplexity, base = the permuted F32 model) on the last 20% of the
Jargon text; calibration (imatrix and the optimizer's Hessians) uses the first 40%:
  llama.cpp          llama_model_quantize on the F32 GGUF
  llama.cpp+imatrix  llama_model_quantize cannot take an imatrix through the C API (a C++ map pointer), so
                     this is ggml_quantize_chunk with the imatrix, per tensor, on llama.cpp's type plan --
                     what llama-quantize does per tensor -- written into a GGUF by quantkit
  quantkit           `quantkit convert --q ...`
  quantkit+imatrix   the same with quantkit's imatrix (llama.cpp's imatrix algorithm)
  quantkit+gptq      --optimizer gptq (Hessian-aware block rounding, see quantkit/quant/kquant_gptq.py)
Goal: quantkit+gptq KLD <= 0.75x llama.cpp+imatrix at the same --q.

    python benchmarks/kquant_accuracy.py [--chunks 8 --samples 16 --seqlen 512 --imatrix-chunks 16 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "tests"))

from quantkit.calibration.data import load_calibration, token_stream  # noqa: E402
from quantkit.calibration.imatrix import chunk_tokens, compute_imatrix  # noqa: E402
from quantkit.export import FILE_TYPES, convert_to_gguf  # noqa: E402
from quantkit.eval.perplexity import perplexity  # noqa: E402
from quantkit.eval.tokens import encode  # noqa: E402
from quantkit.families import load  # noqa: E402
from quantkit.quant.kquant_gptq import gptq_gguf_kwargs  # noqa: E402
from quantkit.runtime import executor_for  # noqa: E402
from quantkit.transforms import permute_dense  # noqa: E402


class Cached:
    """The base model's logits per chunk, computed once for all comparisons."""

    def __init__(self, model):
        self.model, self.memo = model, {}

    def __call__(self, ids):
        k = tuple(ids.reshape(-1).tolist())
        if k not in self.memo:
            self.memo[k] = self.model(ids)
        return self.memo[k]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--text", default=str(SHARED / "data" / "jargon-4.4.7.txt"))
    ap.add_argument("--qs", default="q4_k_m,q5_k_m,q6_k")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--imatrix-chunks", type=int, default=16, help="512-token chunks for the imatrix")
    ap.add_argument("--samples", type=int, default=16, help="optimizer calibration windows (16 x 512 = the imatrix's tokens)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    from oracles import ggml_lib
    from oracles.llamacpp_model import quantize_file

    t0 = time.perf_counter()
    graph = permute_dense(load(args.model), seed=0)
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        calib = d / "calib.txt"
        calib.write_text(text[: int(0.4 * len(text))], encoding="utf-8")
        f32 = d / "f32.gguf"
        convert_to_gguf(graph, f32, q="f32", progress=False)
        ids_c, bos_c = token_stream(graph, calib)
        im = compute_imatrix(graph, chunk_tokens(ids_c, 512, args.imatrix_chunks, bos_c), device=args.device,
                             progress=False).means()
        samples = load_calibration(graph, calib, args.samples, args.seqlen, seed=0)
        print(f"imatrix ({args.imatrix_chunks} x 512 tokens) and calibration ready in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        ids, bos = encode(graph, text[int(0.8 * len(text)):])
        base = Cached(executor_for(graph, device=args.device))

        def evaluate(path):
            m = executor_for(load(path), device=args.device)
            r = perplexity(m, ids, n_ctx=args.ctx, n_chunks=args.chunks, bos_id=bos, base=base)
            return {k: r[k] for k in ("ppl", "ppl_stderr", "base_ppl", "kld_mean", "kld_p99", "top1_agreement")}

        def oracle_imatrix(name, w, qt, imv):  # ggml_quantize_chunk per tensor, as llama-quantize does
            x = w.reshape(-1, w.shape[-1]).float().numpy()
            return torch.from_numpy(ggml_lib.quantize(x, int(qt), None if imv is None else imv.float().numpy()))

        for q in args.qs.split(","):
            makers = {
                "llama.cpp": lambda p: quantize_file(f32, p, int(FILE_TYPES[q]), nthread=args.threads),
                "llama.cpp+imatrix": lambda p: convert_to_gguf(graph, p, q=q, imatrix=im, progress=False,
                                                               quantizer=oracle_imatrix),
                "quantkit": lambda p: convert_to_gguf(graph, p, q=q, progress=False),
                "quantkit+imatrix": lambda p: convert_to_gguf(graph, p, q=q, imatrix=im, progress=False),
                "quantkit+gptq": lambda p: convert_to_gguf(graph, p, q=q, progress=False, **gptq_gguf_kwargs(
                    graph, q, device=args.device, progress=False, samples=samples)),
            }
            for method, make in makers.items():
                p = d / f"{q}-{method}.gguf"
                t = time.perf_counter()
                make(p)
                qt = time.perf_counter() - t
                r = evaluate(p)
                r.update({"q": q, "method": method, "quant_time_s": qt})
                rows.append(r)
                p.unlink()
                print(f"{q:7s} {method:18s} PPL {r['ppl']:.4f} (ratio {r['ppl'] / r['base_ppl']:.4f})  "
                      f"KLD {r['kld_mean']:.5f}  top1 {100 * r['top1_agreement']:.2f}%  ({qt:.1f} s)", flush=True)
    print(f"base PPL {rows[0]['base_ppl']:.4f}; {args.chunks} chunks of {args.ctx}; llama.cpp+imatrix = "
          "ggml_quantize_chunk per tensor with the imatrix (llama_model_quantize takes no imatrix from Python)")
    summary = {}
    for q in args.qs.split(","):
        get = {r["method"]: r for r in rows if r["q"] == q}
        ratio = get["quantkit+gptq"]["kld_mean"] / get["llama.cpp+imatrix"]["kld_mean"]
        summary[q] = {"gptq_vs_llamacpp_imatrix_kld": ratio}
        print(f"{q}: KLD quantkit+gptq / llama.cpp+imatrix = {ratio:.3f} (goal <= 0.75)")
    out = {"rows": rows, "summary": summary, "args": vars(args), "total_s": time.perf_counter() - t0}
    print(f"total {out['total_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
