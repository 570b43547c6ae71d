"""Benchmark quantkit's Triton dequant-matmul kernels on CUDA against torch bf16 and tinygemm int4.

    python benchmarks/kernels.py OUT_DIR [--formats ...] [--shapes 4096x4096 ...] [--ms 1 2 4 ...]

For each (N, K) and M: microseconds per call (median over CUDA-event timings of CUDA-graph replays,
each replay one pass over all weight copies), weight GB/s (packed bytes / time), and speedups over
torch bf16 F.linear and torch's int4 tinygemm (_weight_int4pack_mm, group 128) measured in the same
run. Weights (ours and the baselines') are cycled through enough copies to exceed the L2, so they
stream from HBM as in decoding. Also checks each format against the torch reference at M=1 and the
largest M. Writes OUT_DIR/kernels_bench.json and OUT_DIR/kernels_bench.md (rewritten after every
shape, so a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]
MS = [1, 2, 4, 8, 16, 32, 64, 128]
FORMATS = ["gptq4", "gptq4_act", "awq", "q4_0", "q8_0", "q4_k", "q5_k", "q6_k", "mxfp4", "mxfp4_hf"]
L2_BYTES = 50 * 2**20
STREAM_BYTES = 3 * L2_BYTES  # bytes touched per pass over the copies


def make_weight(fmt: str, n: int, k: int, dev: str, gen: torch.Generator):
    """A random but valid PackedWeight of the format (fp16 scales small, codes uniform)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

    from quantkit.kernels import PackedWeight

    def rint(lo, hi, shape, dtype):
        return torch.randint(lo, hi, shape, generator=gen, device=dev, dtype=torch.int64).to(dtype)

    def small_f16(shape):
        return (torch.rand(shape, generator=gen, device=dev) * 0.01 + 0.001).half()

    if fmt.startswith("gptq"):
        g = k // 128
        qw = rint(-2**31, 2**31, (k // 8, n), torch.int32)
        qz = rint(-2**31, 2**31, (g, n // 8), torch.int32)
        gidx = None
        if fmt == "gptq4_act":
            gidx = (torch.arange(k, device=dev) // 128)[torch.randperm(k, generator=gen, device=dev)].int()
        return PackedWeight.gptq(qw, qz, small_f16((g, n)), gidx, bits=4, group_size=128)
    if fmt == "awq":
        g = k // 128
        return PackedWeight.awq(rint(-2**31, 2**31, (k, n // 8), torch.int32),
                                rint(-2**31, 2**31, (g, n // 8), torch.int32), small_f16((g, n)), group_size=128)
    if fmt == "mxfp4_hf":
        return PackedWeight.mxfp4(rint(0, 256, (n, k // 32, 16), torch.uint8), rint(118, 130, (n, k // 32), torch.uint8))
    qt = {"q4_0": QT.Q4_0, "q8_0": QT.Q8_0, "q4_k": QT.Q4_K, "q5_k": QT.Q5_K, "q6_k": QT.Q6_K,
          "mxfp4": QT.MXFP4}[fmt]
    bs, ts = GGML_QUANT_SIZES[qt]
    data = rint(0, 256, (n, k // bs, ts), torch.uint8)
    f16_fields = {QT.Q4_0: (0,), QT.Q8_0: (0,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}.get(qt, ())
    for off in f16_fields:
        data[..., off:off + 2] = small_f16((n, k // bs)).view(torch.uint8).reshape(n, k // bs, 2)
    if qt == QT.MXFP4:
        data[..., 0] = rint(118, 130, (n, k // bs), torch.uint8)
    return PackedWeight.ggml(data.reshape(n, -1), qt, k)


def n_copies(nbytes: int) -> int:
    return max(2, math.ceil(STREAM_BYTES / max(nbytes, 1)))


def time_calls(fns, reps: int) -> tuple[float, str]:
    """Microseconds per call: CUDA graph of one pass over `fns`, replayed `reps` times, median."""
    for f in fns:  # warm up: compiles, autotunes, allocates
        f()
    torch.cuda.synchronize()
    calls = list(fns) * max(1, math.ceil(8 / len(fns)))
    mode = "graph"
    try:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in calls:
                f()
            torch.cuda.synchronize()
            with torch.cuda.graph(g, stream=s):
                for f in calls:
                    f()
        torch.cuda.current_stream().wait_stream(s)
        run = g.replay
    except Exception:  # noqa: BLE001 - some op refused capture: time eagerly instead
        mode = "eager"

        def run():
            for f in calls:
                f()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    return statistics.median(times), mode


def int4_tinygemm(n: int, k: int, dev: str, gen: torch.Generator):
    """(weight copies, call(x, i)) for torch's tinygemm int4 (group 128), or None with the reason."""
    try:
        w = torch.randint(0, 256, (n, k // 2), generator=gen, device=dev, dtype=torch.int64).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(w, 8)
        sz = torch.rand((k // 128, n, 2), generator=gen, device=dev).to(torch.bfloat16)
        nbytes = packed.numel() * packed.element_size() + sz.numel() * 2
        copies = [(packed.clone(), sz.clone()) for _ in range(n_copies(nbytes))]
        return copies, nbytes, None
    except Exception as e:  # noqa: BLE001 - the op's signature moves between torch versions
        return None, 0, f"{type(e).__name__}: {e}"


def bench_shape(n: int, k: int, ms, formats, reps: int, dev: str, results: list, deadline: float):
    from quantkit.kernels import dequantize, qlinear

    gen = torch.Generator(device=dev)
    gen.manual_seed(n * 31 + k)
    xs = {m: torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16) for m in ms}
    base = {}
    wb = torch.randn(n, k, device=dev, generator=gen).to(torch.bfloat16) * 0.02
    bf16_copies = [wb.clone() for _ in range(n_copies(wb.numel() * 2))]
    del wb
    for m in ms:
        fns = [lambda w=w, x=xs[m]: torch.nn.functional.linear(x, w) for w in bf16_copies]
        base[("bf16", m)] = time_calls(fns, reps)[0]
    del bf16_copies
    i4, i4_bytes, i4_err = int4_tinygemm(n, k, dev, gen)
    for m in ms:
        if i4 is None:
            base[("int4", m)] = None
            continue
        fns = [lambda p=p, s=s, x=xs[m]: torch.ops.aten._weight_int4pack_mm(x, p, 128, s) for p, s in i4]
        base[("int4", m)] = time_calls(fns, reps)[0]
    del i4
    torch.cuda.empty_cache()
    for fmt in formats:
        if time.time() > deadline:
            print(f"  time budget reached: skipping {fmt} and later formats of {n}x{k}", flush=True)
            break
        pw = make_weight(fmt, n, k, dev, gen)
        nbytes = pw.weight_bytes
        copies = [pw] + [make_weight(fmt, n, k, dev, gen) for _ in range(n_copies(nbytes) - 1)]
        # correctness on the real GPU shapes: kernels vs the torch reference (dequantize + matmul)
        w_ref = dequantize(pw)
        errs = {}
        for m in (ms[0], ms[-1]):
            y = qlinear(xs[m], pw).float()
            ref = xs[m].float() @ w_ref.T
            errs[m] = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        del w_ref
        for m in ms:
            fns = [lambda p=p, x=xs[m]: qlinear(x, p) for p in copies]
            us, mode = time_calls(fns, reps)
            row = dict(format=fmt, N=n, K=k, M=m, us=round(us, 2), weight_bytes=nbytes,
                       weight_gbps=round(nbytes / us / 1e3, 1), timing=mode,
                       bf16_us=round(base[("bf16", m)], 2),
                       speedup_vs_bf16=round(base[("bf16", m)] / us, 2),
                       int4_tinygemm_us=None if base[("int4", m)] is None else round(base[("int4", m)], 2),
                       speedup_vs_int4=None if base[("int4", m)] is None else round(base[("int4", m)] / us, 2),
                       int4_error=i4_err, max_rel_err=errs.get(m))
            results.append(row)
            print(f"  {fmt:9s} {n:6d}x{k:<6d} M={m:<4d} {us:9.2f} us {row['weight_gbps']:8.1f} GB/s "
                  f"x{row['speedup_vs_bf16']:<5} vs bf16  x{row['speedup_vs_int4']} vs int4"
                  + (f"  err {errs[m]:.2e}" if m in errs else ""), flush=True)
        del copies, pw
        torch.cuda.empty_cache()


def write(out: Path, results: list, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_bench.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    lines = [f"# quantkit kernel benchmark ({meta.get('device')})", "",
             "| format | N | K | M | us | weight GB/s | vs bf16 | vs int4 tinygemm | max rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        err = "" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        lines.append(f"| {r['format']} | {r['N']} | {r['K']} | {r['M']} | {r['us']} | {r['weight_gbps']} | "
                     f"{r['speedup_vs_bf16']} | {r['speedup_vs_int4']} | {err} |")
    (out / "kernels_bench.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="directory for kernels_bench.json / kernels_bench.md")
    ap.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in SHAPES], help="NxK")
    ap.add_argument("--ms", nargs="+", type=int, default=MS)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new formats after this long")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.",
              file=sys.stderr)
        return 2
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        assert all(len(s) == 2 and s[1] % 256 == 0 and s[0] % 8 == 0 for s in shapes)
    except (ValueError, AssertionError):
        print(f"--shapes: expected NxK with N % 8 == 0 and K % 256 == 0, got {args.shapes}", file=sys.stderr)
        return 2
    import triton

    deadline = time.time() + args.budget_s
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                l2_assumed_bytes=L2_BYTES, stream_bytes_per_pass=STREAM_BYTES, x_dtype="bfloat16", reps=args.reps)
    results: list = []
    for n, k in shapes:
        if time.time() > deadline:
            print(f"time budget reached before {n}x{k}", flush=True)
            break
        print(f"shape N={n} K={k}", flush=True)
        bench_shape(n, k, sorted(args.ms), args.formats, args.reps, "cuda", results, deadline)
        write(args.out, results, meta)
    write(args.out, results, meta)
    print(f"wrote {args.out / 'kernels_bench.json'} and kernels_bench.md ({len(results)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
