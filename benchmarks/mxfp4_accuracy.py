"""MXFP4 scale-rule accuracy: weight MSE of the floor / ceil / best rules.

Reads the 2-D weights of a GGUF model (dequantized with the `gguf` package) plus synthetic
Gaussian and heavy-tailed (Student-t, 3 dof) matrices, quantizes each with every rule, and prints
the MSE relative to the tensor's mean square (lower is better) and the share of blocks where
"best" picked the ceil exponent.

Then (unless --no-ppl) the model-level comparison on the permuted SmolLM2 (quantkit.transforms.permute_dense:
the same function, but no weight block lines up with the Q4_1 grid the file was quantized on): every
quantizable layer weight fake-quantized (quantize -> dequantize, no imatrix) as MXFP4 floor, MXFP4 best,
Q4_0 (pure) and Q4_K_M (llama.cpp's mixture for the layer tensors, with its shape fallbacks); token_embd
is Q8_0 in every variant. Perplexity and KLD against the unquantized permuted model, all with
quantkit.eval.perplexity.perplexity.

    python benchmarks/mxfp4_accuracy.py [--gguf PATH] [--layers N] [--text PATH] [--ctx 512] [--chunks 3]
        [--variants mxfp4_floor mxfp4_best q4_0 q4_k_m] [--no-mse] [--no-ppl]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from quantkit.quant.mxfp4 import RULES, quantize_mxfp4, mxfp4_error

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DEFAULT_GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = SHARED / "data" / "jargon-4.4.7.txt"


def gguf_weights(path: Path, layers: int):
    import gguf

    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        if len(t.shape) != 2 or t.shape[0] % 32:
            continue
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= layers:
            continue
        rows = gguf.quants.dequantize(t.data, t.tensor_type)
        yield t.name, torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))


def synthetic():
    g = torch.Generator().manual_seed(0)
    yield "synthetic.gaussian", torch.randn(1024, 1024, generator=g)
    t = torch.distributions.StudentT(3.0).sample((1024, 1024))
    yield "synthetic.student_t3", t


def weight_mse(args) -> None:
    totals = {r: 0.0 for r in RULES}
    print(f"{'tensor':40s} " + " ".join(f"{r:>9s}" for r in RULES) + "  best->ceil")
    sources = [synthetic()]
    if args.gguf.exists():
        sources.append(gguf_weights(args.gguf, args.layers))
    n_real = 0
    for src in sources:
        for name, w in src:
            ms = float(w.square().mean(dtype=torch.float64))
            rel = {}
            exps = {}
            for r in RULES:
                c, e = quantize_mxfp4(w, rule=r, name=name)
                rel[r] = mxfp4_error(w, c, e) / ms
                exps[r] = e
            share = float((exps["best"] != exps["floor"]).float().mean())
            print(f"{name:40s} " + " ".join(f"{rel[r]:9.5f}" for r in RULES) + f"  {share:9.3f}")
            if not name.startswith("synthetic."):
                n_real += 1
                for r in RULES:
                    totals[r] += rel[r]
    if n_real:
        print(f"{'mean over ' + str(n_real) + ' model tensors':40s} " + " ".join(f"{totals[r] / n_real:9.5f}" for r in RULES))


# ---- model level: PPL / KLD of fake-quantized layer weights ----

def _fake(qtype, rule: str | None):
    """w -> dequantize(quantize(w)) for a ggml type (rule None) or MXFP4 with a scale rule."""
    from quantkit.quant import ggml_types
    from quantkit.quant.mxfp4 import dequantize_mxfp4

    def fn(w: torch.Tensor) -> torch.Tensor:
        w = w.float()
        if rule is not None:
            return dequantize_mxfp4(*quantize_mxfp4(w, rule=rule))
        return ggml_types.dequantize(ggml_types.quantize(w, qtype), qtype, w.shape[-1])
    return fn


VARIANTS = ("mxfp4_floor", "mxfp4_best", "q4_0", "q4_k_m")


def _variant_types(base, name: str) -> dict:
    """{tensor: (ggml type, mxfp4 rule or None)} for the quantizable layer weights; token_embd Q8_0."""
    from gguf import GGMLQuantizationType as T

    from quantkit.quant import mixtures
    shapes = {n: t.shape for n, t in base.tensors.items()}
    quantizable = {n for n, s in shapes.items() if mixtures.allows_quantization(n, s)}
    if name.startswith("mxfp4"):
        plan = {n: T.MXFP4 for n in quantizable}
    else:  # llama.cpp's choice incl. its shape fallbacks (576-wide rows cannot be Q4_K: Q5_0 instead)
        hp = base.hparams
        info = mixtures.ArchInfo(n_layer=hp.n_layers, n_head=hp.n_heads, n_head_kv=hp.n_kv_heads, arch=hp.arch)
        plan = mixtures.plan_tensor_types(shapes.items(), name, info, pure=(name == "q4_0"))
    out = {}
    for n in quantizable:
        t = plan[n]
        if n in ("token_embd.weight", "output.weight"):
            t = T.Q8_0
        out[n] = (t, name.split("_", 1)[1] if t == T.MXFP4 else None)
    return out


class _CachedBase:
    """The base model's logits per chunk, computed once and reused for every variant."""

    def __init__(self, model):
        self.model, self.cache = model, {}

    def __call__(self, ids):
        key = ids.numpy().tobytes()
        if key not in self.cache:
            self.cache[key] = self.model(ids)
        return self.cache[key]


def model_level(args) -> None:
    import time

    from gguf import GGML_QUANT_SIZES

    from quantkit.eval.perplexity import perplexity
    from quantkit.eval.tokens import encode
    from quantkit.families import load
    from quantkit.graph import LazyTensor
    from quantkit.runtime import executor_for
    from quantkit.transforms import permute_dense

    perm = permute_dense(load(args.gguf), seed=0)
    # materialize the permuted weights once (each variant reads them again)
    dense = {n: t.load().float() for n, t in perm.tensors.items()}
    base = perm.with_tensors({n: LazyTensor(w.shape, "F32", lambda w=w: w, source=n) for n, w in dense.items()})
    ids, bos = encode(base, args.text.read_text(encoding="utf-8", errors="replace"))
    base_model = _CachedBase(executor_for(base))
    print(f"\npermuted {Path(args.gguf).name}: ctx {args.ctx}, {args.chunks} chunks, token_embd Q8_0 in all variants")
    print(f"{'variant':14s} {'layer bpw':>9s} {'PPL':>9s} {'base PPL':>9s} {'ln ratio':>9s} {'KLD':>9s} "
          f"{'KLD p99':>9s} {'top1':>7s} {'secs':>6s}")
    for name in args.variants:
        t0 = time.time()
        plan = _variant_types(base, name)
        tensors = dict(base.tensors)
        bits = n_el = 0
        for n, (qt, rule) in plan.items():
            w = dense[n]
            tensors[n] = LazyTensor(w.shape, "F32", lambda w=w, f=_fake(qt, rule): f(w), source=n)
            if n != "token_embd.weight":
                blk, size = GGML_QUANT_SIZES[qt]
                bits += 8 * size * w.numel() // blk
                n_el += w.numel()
        r = perplexity(executor_for(base.with_tensors(tensors)), ids, n_ctx=args.ctx, n_chunks=args.chunks,
                       bos_id=bos, base=base_model)
        print(f"{name:14s} {bits / n_el:9.3f} {r['ppl']:9.4f} {r['base_ppl']:9.4f} {r['ln_ppl_ratio']:9.5f} "
              f"{r['kld_mean']:9.5f} {r['kld_p99']:9.5f} {r['top1_agreement']:7.4f} {time.time() - t0:6.0f}",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--layers", type=int, default=4, help="weight MSE: only blk.0..N-1 of the GGUF (plus non-block tensors)")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--no-ppl", action="store_true", help="weight MSE only")
    ap.add_argument("--no-mse", action="store_true", help="model level only")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = ap.parse_args()
    torch.manual_seed(0)
    if not args.no_mse:
        weight_mse(args)
    if not args.no_ppl and args.gguf.exists() and args.text.exists():
        torch.set_grad_enabled(False)
        model_level(args)


if __name__ == "__main__":
    main()
