"""q5_k_m of the same F32 GGUF (permuted SmolLM2-135M) by quantkit and by llama.cpp, wall time and ratio.

quantkit: `quantkit convert F32.gguf --q q5_k_m` (the CLI's job, in-process) with torch on `--threads`
threads; llama.cpp: llama_model_quantize with nthread = the same count. With CUDA present, quantkit is
also timed with its tensors quantized on the GPU (the codec is pure torch and runs on the input's device).

    python benchmarks/kquant_speed.py [--q q5_k_m --threads 2]
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

from quantkit.export import FILE_TYPES, convert_to_gguf  # noqa: E402
from quantkit.families import load  # noqa: E402
from quantkit.pipeline import convert  # noqa: E402
from quantkit.transforms import permute_dense  # noqa: E402


def gpu_quantizer(name, w, qt, im):
    """The plain quantizer run on CUDA (what tensor_producer does, on the GPU); bytes come back to the CPU."""
    from quantkit.quant.ggml_types import quantize
    x = w.reshape(-1, w.shape[-1]).cuda()
    return quantize(x, qt, None if im is None else im.cuda()).cpu()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--q", default="q5_k_m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from oracles.llamacpp_model import quantize_file
    from gguf import GGUFReader
    res = {"q": args.q, "threads": args.threads}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        f32 = d / "f32.gguf"
        convert_to_gguf(permute_dense(load(args.model), seed=0), f32, q="f32", progress=False)
        from quantkit.quant import ggml_cpu
        res["quantkit_kernel_load_s"] = ggml_cpu.warm_up()  # as llama.cpp's library, loaded before timing
        t = time.perf_counter()
        quantize_file(f32, d / "llama.gguf", int(FILE_TYPES[args.q]), nthread=args.threads)
        res["llama_cpp_s"] = time.perf_counter() - t
        t = time.perf_counter()
        convert(f32, d / "ours.gguf", to="gguf", q=args.q, progress=False)
        res["quantkit_cpu_s"] = time.perf_counter() - t
        a = {x.name: x for x in GGUFReader(d / "ours.gguf").tensors}
        b = {x.name: x for x in GGUFReader(d / "llama.gguf").tensors}
        res["identical_bytes"] = all(bytes(a[k].data) == bytes(b[k].data) for k in b) and a.keys() == b.keys()
        if torch.cuda.is_available():
            g = load(f32)
            convert_to_gguf(g, d / "warm.gguf", q=args.q, progress=False, quantizer=gpu_quantizer)  # compile/warm up
            torch.cuda.synchronize()
            t = time.perf_counter()
            convert_to_gguf(g, d / "gpu.gguf", q=args.q, progress=False, quantizer=gpu_quantizer)
            torch.cuda.synchronize()
            res["quantkit_gpu_s"] = time.perf_counter() - t
            c = {x.name: x for x in GGUFReader(d / "gpu.gguf").tensors}
            res["gpu_identical_bytes"] = all(bytes(c[k].data) == bytes(b[k].data) for k in b)
    res["ratio_cpu"] = res["quantkit_cpu_s"] / res["llama_cpp_s"]
    print(f"{args.q} of the permuted SmolLM2-135M F32 GGUF, {args.threads} threads:")
    print(f"  llama.cpp (llama_model_quantize) {res['llama_cpp_s']:7.2f} s")
    print(f"  quantkit CPU kernels loaded before timing in {res['quantkit_kernel_load_s']:.2f} s "
          f"(numba cache; the first run on a machine compiles them)")
    print(f"  quantkit convert (CPU)           {res['quantkit_cpu_s']:7.2f} s   ratio {res['ratio_cpu']:.2f}x   "
          f"bytes identical: {res['identical_bytes']}")
    with_load = (res["quantkit_cpu_s"] + res["quantkit_kernel_load_s"]) / res["llama_cpp_s"]
    res["ratio_cpu_with_kernel_load"] = with_load
    print(f"  (with the one-time kernel load counted: ratio {with_load:.2f}x)")
    if "quantkit_gpu_s" in res:
        print(f"  quantkit convert (CUDA codec)    {res['quantkit_gpu_s']:7.2f} s   "
              f"bytes identical: {res['gpu_identical_bytes']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
