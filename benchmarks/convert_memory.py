"""Peak memory of converting a synthetic multi-GiB checkpoint: quantkit vs llama.cpp's convert_hf_to_gguf.py.

Writes a Llama-shaped checkpoint (random bf16, sharded) whose tensors total --gib GiB, converts it to GGUF
(f16 and q8_0) in child processes and prints peak RSS, the largest tensor, and the ratio to the peer.
With --moe the checkpoint is Mixtral-shaped (8 experts per layer, one HF tensor per expert, stacked into one
GGUF tensor per layer and projection); quantkit also writes a calibrated q4_k_m (--optimizer gptq on a few
calibration windows). The largest *stored* tensor is then one expert; the largest GGUF tensor is a stack.
    python benchmarks/convert_memory.py [--gib 4] [--moe] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_checkpoint(out: Path, gib: float, moe: bool = False) -> tuple[int, int]:
    import torch
    from safetensors.torch import save_file
    hidden, ffn, vocab, heads, kv = 4096, 14336, 49152, 32, 8  # vocab: the SmolLM2 tokenizer we attach
    n_exp = 8 if moe else 1
    if moe:  # many layers of small experts, so that one layer is a small part of the model
        hidden, ffn, heads, kv = 2048, 1024, 16, 4
    per_layer = (2 * hidden * hidden + 2 * hidden * hidden // 4 + 3 * hidden * ffn * n_exp) * 2
    layers = max(1, int((gib * 2**30 - 2 * vocab * hidden * 2) // per_layer))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    if moe:
        cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=n_exp,
                   num_experts_per_tok=2, sliding_window=None)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    wm, total, largest = {}, 0, 0

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
    shards = [{"model.embed_tokens.weight": r(vocab, hidden), "lm_head.weight": r(vocab, hidden),
               "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        sd = {p + "self_attn.q_proj.weight": r(hidden, hidden), p + "self_attn.k_proj.weight": r(hidden // 4, hidden),
              p + "self_attn.v_proj.weight": r(hidden // 4, hidden), p + "self_attn.o_proj.weight": r(hidden, hidden),
              p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
              p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        if moe:
            sd[p + "block_sparse_moe.gate.weight"] = r(n_exp, hidden)
            for e in range(n_exp):
                q = f"{p}block_sparse_moe.experts.{e}."
                sd.update({q + "w1.weight": r(ffn, hidden), q + "w3.weight": r(ffn, hidden),
                           q + "w2.weight": r(hidden, ffn)})
        else:
            sd.update({p + "mlp.gate_proj.weight": r(ffn, hidden), p + "mlp.up_proj.weight": r(ffn, hidden),
                       p + "mlp.down_proj.weight": r(hidden, ffn)})
        shards.append(sd)
        del sd
    n = len(shards)
    for k, sd in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(sd, out / name, metadata={"format": "pt"})
        for t_name, t in sd.items():
            wm[t_name] = name
            total += t.numel() * 2
            largest = max(largest, t.numel() * 2)
        del sd
    shards.clear()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))
    return total, largest


def peak_rss_of(cmd: list[str]) -> tuple[float, int]:
    """Run cmd in a fresh child; return (seconds, peak RSS bytes) via wait4's rusage."""
    t = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    if status != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr.read().decode()[-2000:]}")
    return time.time() - t, ru.ru_maxrss * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--keep", type=Path, default=None)
    ap.add_argument("--moe", action="store_true", help="Mixtral-shaped checkpoint (8 experts per layer)")
    ap.add_argument("--make", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make:  # child: build the checkpoint (a child's peak RSS starts at its parent's, so the parent stays small)
        print(json.dumps(make_checkpoint(a.make, a.gib, a.moe)))
        return
    work = Path(tempfile.mkdtemp(prefix="qk-mem-"))
    try:
        src = work / "model"
        total, largest = json.loads(subprocess.run([sys.executable, __file__, "--gib", str(a.gib), "--make", str(src)]
                                                   + (["--moe"] if a.moe else []),
                                                   check=True, capture_output=True, text=True).stdout)
        # the tokenizer does not matter for memory; give both converters SmolLM2's
        shared = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        subprocess.run([sys.executable, "-c", "import sys; from quantkit.formats.hf_tokenizer import read_gguf_kv, "
                        "write_hf_tokenizer as w; w(read_gguf_kv(sys.argv[1]), sys.argv[2])", str(shared), str(src)],
                       check=True)
        rows = []
        for q in ("f16", "q8_0"):
            s, rss = peak_rss_of([sys.executable, "-m", "quantkit", "convert", str(src), "-o", str(work / f"qk-{q}.gguf"),
                                  "--q", q, "--no-progress"])
            rows.append(("quantkit", q, s, rss))
            (work / f"qk-{q}.gguf").unlink()
        if a.moe:  # calibrated GGUF streams layer by layer too
            calib = work / "calib.txt"
            text = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "jargon-4.4.7.txt").read_text()
            calib.write_text(text[:200_000])
            s, rss = peak_rss_of([sys.executable, "-m", "quantkit", "convert", str(src), "-o", str(work / "qk-opt.gguf"),
                                  "--q", "q4_k_m", "--optimizer", "gptq", "--calib", str(calib), "--calib-samples", "4",
                                  "--calib-seqlen", "64", "--no-progress"])
            rows.append(("quantkit --optimizer gptq", "q4_k_m", s, rss))
            (work / "qk-opt.gguf").unlink()
        conv = Path(os.environ.get("QK_LLAMACPP_SRC", "/tmp/quantkit-llamacpp-src/llama_cpp_python-0.3.36/vendor/llama.cpp")) / "convert_hf_to_gguf.py"
        if conv.exists():
            for q in ("f16", "q8_0"):
                s, rss = peak_rss_of([sys.executable, str(conv), str(src), "--outtype", q, "--outfile", str(work / f"l-{q}.gguf")])
                rows.append(("llama.cpp convert_hf_to_gguf", q, s, rss))
                (work / f"l-{q}.gguf").unlink()
        print(f"model: {total / 2**30:.2f} GiB in tensors, largest stored tensor {largest / 2**20:.0f} MiB"
              + (" (the embedding; one expert is 4 MiB, a stacked GGUF expert tensor 32 MiB)" if a.moe else ""))
        print(f"{'tool':32s} {'q':6s} {'seconds':>8s} {'peak RSS MiB':>13s} {'RSS/largest':>12s} {'RSS/model':>10s}")
        for tool, q, s, rss in rows:
            print(f"{tool:32s} {q:6s} {s:8.1f} {rss / 2**20:13.0f} {rss / largest:12.2f} {rss / total:10.3f}")
        peer = {q: rss for tool, q, s, rss in rows if tool.startswith("llama.cpp")}
        for tool, q, s, rss in rows:
            if tool == "quantkit" and q in peer:
                print(f"quantkit/llama.cpp peak RSS ratio ({q}): {rss / peer[q]:.2f}")
    finally:
        if a.keep:
            shutil.move(str(work), a.keep)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
