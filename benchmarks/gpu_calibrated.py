"""Calibrated quantization on CUDA: wall time, time per layer, phases and peak GPU memory of quantkit's GPTQ,
AWQ, `--optimizer gptq` and imatrix (issue #15's H200 item), in one process, run by run.

The model is made here, so nothing large travels to the device: a seeded random Llama (transformers'
LlamaForCausalLM, bf16) with Llama-3-8B's layer shapes by default (hidden 4096, FFN 14336, 32 heads, 8 KV heads)
and a few layers, plus a SentencePiece vocabulary trained on this repo's docs (GGUF outputs need one).
Calibration is random token windows passed as token ids (random weights make accuracy meaningless here; this
measures time and memory only -- accuracy on CUDA is the same code as on the CPU, where calibrated_speed.py
measures it against the peers).

    python benchmarks/gpu_calibrated.py OUT                       # 4 layers, 128 x 512, bf16 and f32
    python benchmarks/gpu_calibrated.py OUT --layers 2 --hidden 256 --ffn 512 --heads 4 --kv-heads 2 \
        --device cpu --samples 8 --seqlen 128                      # a CPU smoke run of the script

Writes OUT/gpu_calibrated.json and OUT/gpu_calibrated.md (rewritten after every run, so a run cut short
keeps its finished rows). `--budget-s` stops starting new runs once spent.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.calibrated_speed import _find  # noqa: E402  (reports nest their sections)

METHODS = ("gptq", "awq", "kgptq", "imatrix")


def make_model(d: Path, a) -> int:
    """The random Llama and its SentencePiece vocabulary; returns the vocabulary size."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    d.mkdir(parents=True, exist_ok=True)
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(p.read_text(errors="replace") for p in sorted((REPO / "docs").glob("*.md"))))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=a.vocab,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1,
                                   eos_id=2, unk_id=0, pad_id=-1, hard_vocab_limit=False, num_threads=1,
                                   minloglevel=2)
    (d / "tokenizer.vocab").unlink(missing_ok=True)
    n_vocab = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model")).get_piece_size()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=n_vocab,
                      max_position_embeddings=max(4096, a.seqlen), bos_token_id=1, eos_token_id=2,
                      rope_theta=500000.0)
    with torch.device(a.device if a.device.startswith("cuda") else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(d)
    del model
    return n_vocab


def one_run(method: str, dtype: str, model: Path, out: Path, docs, a) -> dict:
    import torch
    from quantkit import api
    cuda = a.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    common = dict(calib=docs, calib_samples=a.samples, calib_seqlen=a.seqlen, device=a.device, calib_dtype=dtype)
    if method == "imatrix":
        res = api.imatrix(str(model), docs, out / f"{method}-{dtype}.imatrix.gguf", ctx=a.seqlen, chunks=a.samples,
                          device=a.device, force=True, calib_dtype=dtype)
    elif method == "kgptq":
        res = api.convert(str(model), out / f"{method}-{dtype}.gguf",
                          api.ConvertOptions(to="gguf", q="q4_k_m", optimizer="gptq", **common), force=True)
    else:
        res = api.convert(str(model), out / f"{method}-{dtype}",
                          api.ConvertOptions(to="safetensors", method=method, bits=4, group_size=128, **common),
                          force=True)
    if cuda:
        torch.cuda.synchronize()
    row = {"method": method, "calib_dtype": dtype, "wall_s": time.perf_counter() - t0,
           "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
    rep = res.get("report")
    if isinstance(rep, (str, Path)) and Path(rep).exists():
        rep = json.loads(Path(rep).read_text())
    src = rep if isinstance(rep, dict) else res
    layers = _find(src, "layers")
    if isinstance(layers, list) and layers and isinstance(layers[0], dict) and "time_s" in layers[0]:
        row["layer_s"] = [round(float(x["time_s"]), 3) for x in layers]
    ph = _find(src, "phase_times") or _find(res, "phase_times")
    if isinstance(ph, dict):
        row["phases_s"] = {k: float(v) for k, v in ph.items() if isinstance(v, (int, float))}
    return row


def table(rows: list[dict], a) -> str:
    lines = [f"{a.layers} layers (hidden {a.hidden}, FFN {a.ffn}, heads {a.heads}/{a.kv_heads}), {a.samples} x "
             f"{a.seqlen} calibration tokens, device {a.device}",
             "| run | calib dtype | wall s | s/layer (mean, max) | peak GPU MiB | phases (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['calib_dtype']} | failed | | | {r['error'][:120]} |")
            continue
        per = r.get("layer_s")
        lay = f"{sum(per) / len(per):.2f}, {max(per):.2f}" if per else f"{r['wall_s'] / a.layers:.2f} (wall / layers)"
        mem = f"{r['peak_gpu_mib']:.0f}" if r.get("peak_gpu_mib") is not None else "-"
        ph = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in (r.get("phases_s") or {}).items())
        lines.append(f"| {r['method']} | {r['calib_dtype']} | {r['wall_s']:.1f} | {lay} | {mem} | {ph} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000, help="SentencePiece vocabulary asked for (the docs bound it)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=420.0)
    a = ap.parse_args()
    t_start = time.monotonic()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    n_vocab = make_model(model, a)
    rng = random.Random(0)
    docs = [[rng.randrange(3, n_vocab) for _ in range(a.seqlen)] for _ in range(a.samples + 8)]
    import torch
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
            "args": vars(a), "vocab": n_vocab}
    rows: list[dict] = []
    for dtype in [d.strip() for d in a.dtypes.split(",") if d.strip()]:
        for m in [m.strip() for m in a.methods.split(",") if m.strip()]:
            if time.monotonic() - t_start > a.budget_s:
                print(f"budget spent: {m} {dtype} not started", flush=True)
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {m} calib-dtype {dtype}", flush=True)
            try:
                rows.append(one_run(m, dtype, model, out, docs, a))
            except Exception as e:  # a failed run is a row; the others still run
                rows.append({"method": m, "calib_dtype": dtype, "error": f"{type(e).__name__}: {e}"})
            print(table(rows[-1:], a).splitlines()[-1], flush=True)
            (out / "gpu_calibrated.json").write_text(json.dumps({"machine": info, "runs": rows}, indent=2))
            (out / "gpu_calibrated.md").write_text(info["date"] + f", {info['device_name']}, torch {info['torch']}\n"
                                                   + table(rows, a) + "\n")
    print((out / "gpu_calibrated.md").read_text())


if __name__ == "__main__":
    main()
