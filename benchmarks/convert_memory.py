"""Peak memory of converting a synthetic multi-GiB checkpoint: quantkit vs llama.cpp's convert_hf_to_gguf.py.

Writes a Llama-shaped checkpoint (random bf16, sharded) whose tensors total --gib GiB, converts it to GGUF
(f16 and q8_0) in child processes and prints peak RSS, the largest tensor, and the ratio to the peer.
With --moe the checkpoint is Mixtral-shaped (8 experts per layer, one HF tensor per expert, stacked into one
GGUF tensor per layer and projection); quantkit also writes a calibrated q4_k_m (--optimizer gptq on a few
calibration windows). The largest *stored* tensor is then one expert; the largest GGUF tensor is a stack.
With --deepseek the checkpoint is DeepSeek-V3-shaped (MLA, 3 dense layers then MoE layers of 256 routed experts
+ 1 shared, grouped sigmoid routing with e_score_correction_bias) and stored like the release: projections as
FP8 e4m3 with 128x128 block weight_scale_inv, the rest bf16/f32, in shards with model.safetensors.index.json.
With --limit-gib each conversion runs in its own cgroup v1 memory cgroup (memory and memory+swap limited;
needs root and /sys/fs/cgroup/memory); the table then adds the cgroup's peak charge (RSS + page cache) and
whether the run completed or was OOM-killed. The checkpoint is dropped from the page cache before each run so
that its reads are charged to the run.
    python benchmarks/convert_memory.py [--gib 4] [--moe | --deepseek] [--limit-gib 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
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


BLOCK = 128  # DeepSeek V3's weight_block_size


def _fp8_block(g, out_f: int, in_f: int):
    """A random [out_f, in_f] weight as the release stores it: float8_e4m3fn values and a float32 weight_scale_inv
    per 128x128 block (value = fp8 * scale; partial blocks at the edges, as kv_a_proj_with_mqa's 576 rows).
    The FP8 codes are a slice at a random offset of a pool of block-quantized normal weights (drawing every
    weight afresh made writing the checkpoint the slowest step); the scales are drawn per block."""
    import torch
    global _POOL
    if _POOL is None:
        w = torch.randn(4096, 8192, generator=g) * 0.02
        scale = w.view(32, BLOCK, 64, BLOCK).abs().amax(dim=(1, 3)) / 448.0
        _POOL = (w / scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)).to(torch.float8_e4m3fn).flatten()
        del w
    n = out_f * in_f
    off = int(torch.randint(0, _POOL.numel() - n + 1, (1,), generator=g))
    q = _POOL[off:off + n].view(out_f, in_f).clone()
    scale = (0.5 + torch.rand(-(-out_f // BLOCK), -(-in_f // BLOCK), generator=g)) * (0.08 / 448)
    return q, scale


_POOL = None


def make_deepseek(out: Path, gib: float) -> tuple[int, int]:
    """DeepSeek-V3-shaped checkpoint, narrowed (hidden 1024 instead of 7168) but with the release's expert count,
    routing and storage, so that a few GiB hold several MoE layers of 256 experts. Returns (stored bytes, largest
    stored tensor bytes)."""
    import torch
    from safetensors.torch import save_file
    hidden, vocab, heads = 1024, 49152, 16
    q_lora, kv_lora, nope, rope, v_dim = 384, 256, 64, 32, 64
    dense_ffn, moe_ffn, n_exp, dense_layers = 4096, 256, 256, 3
    attn = (q_lora * hidden + heads * (nope + rope) * q_lora + (kv_lora + rope) * hidden
            + heads * (nope + v_dim) * kv_lora + hidden * heads * v_dim)
    moe_layer = attn + 3 * hidden * moe_ffn * (n_exp + 1) + n_exp * hidden * 2  # fp8 bytes + bf16 router
    fixed = 2 * vocab * hidden * 2 + dense_layers * (attn + 3 * hidden * dense_ffn)
    layers = dense_layers + max(1, int((gib * 2**30 - fixed) // moe_layer))
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": hidden,
           "intermediate_size": dense_ffn, "moe_intermediate_size": moe_ffn, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": heads, "q_lora_rank": q_lora,
           "kv_lora_rank": kv_lora, "qk_nope_head_dim": nope, "qk_rope_head_dim": rope, "v_head_dim": v_dim,
           "n_routed_experts": n_exp, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8,
           "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid",
           "topk_method": "noaux_tc", "first_k_dense_replace": dense_layers, "moe_layer_freq": 1,
           "num_nextn_predict_layers": 0, "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "max_position_embeddings": 4096, "hidden_act": "silu", "tie_word_embeddings": False,
           "attention_bias": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
           "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [BLOCK, BLOCK]}}
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16)

    def fp8(sd, name, out_f, in_f):
        sd[name + ".weight"], sd[name + ".weight_scale_inv"] = _fp8_block(g, out_f, in_f)

    def mlp(sd, p, ffn):
        fp8(sd, p + "gate_proj", ffn, hidden)
        fp8(sd, p + "up_proj", ffn, hidden)
        fp8(sd, p + "down_proj", hidden, ffn)

    names, wm, total, largest, shard = [], {}, 0, 0, {}
    n_shards_est = "{n}"  # renamed below once the count is known

    def flush():
        nonlocal shard, total, largest
        if not shard:
            return
        name = f"model-{len(names) + 1:05d}-of-{n_shards_est}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        names.append(name)
        for t_name, t in shard.items():
            wm[t_name] = name
            total += t.numel() * t.element_size()
            largest = max(largest, t.numel() * t.element_size())
        shard = {}

    shard = {"model.embed_tokens.weight": r(vocab, hidden), "model.norm.weight": ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        fp8(shard, a + "q_a_proj", q_lora, hidden)
        shard[a + "q_a_layernorm.weight"] = ones(q_lora)
        fp8(shard, a + "q_b_proj", heads * (nope + rope), q_lora)
        fp8(shard, a + "kv_a_proj_with_mqa", kv_lora + rope, hidden)
        shard[a + "kv_a_layernorm.weight"] = ones(kv_lora)
        fp8(shard, a + "kv_b_proj", heads * (nope + v_dim), kv_lora)
        fp8(shard, a + "o_proj", hidden, heads * v_dim)
        shard[p + "input_layernorm.weight"] = ones(hidden)
        shard[p + "post_attention_layernorm.weight"] = ones(hidden)
        if i < dense_layers:
            mlp(shard, p + "mlp.", dense_ffn)
        else:
            shard[p + "mlp.gate.weight"] = r(n_exp, hidden)
            shard[p + "mlp.gate.e_score_correction_bias"] = torch.randn(n_exp, generator=g) * 0.01  # f32 as shipped
            mlp(shard, p + "mlp.shared_experts.", moe_ffn * 1)
            for e in range(n_exp):
                mlp(shard, f"{p}mlp.experts.{e}.", moe_ffn)
        if sum(t.numel() * t.element_size() for t in shard.values()) > 400 * 2**20:
            flush()
    shard["lm_head.weight"] = r(vocab, hidden)
    flush()
    n = f"{len(names):05d}"
    for k, old in enumerate(names):
        (out / old).rename(out / old.replace("{n}", n))
    wm = {t: f.replace("{n}", n) for t, f in wm.items()}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": wm}, indent=1))
    return total, largest


def _drop_page_cache(d: Path) -> None:
    """Evict d's files from the page cache (clean pages only: they were fsynced), so the next reader pays for them."""
    for f in d.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


CGROOT = Path("/sys/fs/cgroup/memory")


def run_measured(cmd: list[str], limit: int | None = None) -> dict:
    """Run cmd in a fresh child; seconds, peak RSS (wait4's rusage) and, under a limit, the peak charge of a
    cgroup v1 memory cgroup made for it (memory.max_usage_in_bytes: RSS + page cache + kernel memory charged to
    it), the largest anonymous charge seen by sampling its memory.stat every 0.2 s, and whether it was
    OOM-killed. The child enters its cgroup before exec'ing cmd."""
    cg = None
    if limit is not None:
        cg = CGROOT / f"qk-mem-{os.getpid()}-{time.monotonic_ns()}"
        cg.mkdir()
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        if (cg / "memory.memsw.limit_in_bytes").exists():  # no swapping out of the limit
            (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))
        cmd = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"] + cmd
    t = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    anon, done = [0], threading.Event()

    def sample():  # the cgroup's anonymous memory (memory.stat "rss"), the part page-cache reclaim cannot free
        while not done.wait(0.2):
            try:
                for line in (cg / "memory.stat").read_text().splitlines():
                    if line.startswith("rss "):
                        anon[0] = max(anon[0], int(line.split()[1]))
            except OSError:
                return
    th = threading.Thread(target=sample, daemon=True)
    if cg is not None:
        th.start()
    err = p.stderr.read().decode(errors="replace")  # drain while it runs (a full pipe would block the child)
    _, status, ru = os.wait4(p.pid, 0)
    done.set()
    if cg is not None:
        th.join()
    res = {"seconds": time.time() - t, "rss": ru.ru_maxrss * 1024, "status": status, "cg_peak": None,
           "anon_peak": anon[0] if cg is not None else None, "oom_kills": 0, "err": err[-3000:]}
    if cg is not None:
        res["cg_peak"] = int((cg / "memory.max_usage_in_bytes").read_text())
        oc = dict(line.split() for line in (cg / "memory.oom_control").read_text().splitlines())
        res["oom_kills"] = int(oc.get("oom_kill", 0))
        try:
            (cg / "memory.force_empty").write_text("0")
        except OSError:
            pass
        cg.rmdir()
    sig = os.WIFSIGNALED(status) and os.WTERMSIG(status)
    res["outcome"] = ("OOM-killed" if res["oom_kills"] or sig == 9 else
                      "completed" if status == 0 else f"failed ({'signal ' + str(sig) if sig else 'exit ' + str(os.WEXITSTATUS(status))})")
    return res


def peak_rss_of(cmd: list[str]) -> tuple[float, int]:
    """Run cmd in a fresh child; return (seconds, peak RSS bytes) via wait4's rusage."""
    r = run_measured(cmd)
    if r["status"] != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r['err'][-2000:]}")
    return r["seconds"], r["rss"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--keep", type=Path, default=None)
    ap.add_argument("--moe", action="store_true", help="Mixtral-shaped checkpoint (8 experts per layer)")
    ap.add_argument("--deepseek", action="store_true",
                    help="DeepSeek-V3-shaped checkpoint (MLA, 256 experts per layer), FP8 128x128 block-scaled")
    ap.add_argument("--limit-gib", type=float, default=None,
                    help="run each conversion in a cgroup v1 memory cgroup with this limit (root)")
    ap.add_argument("--only", default="", help="comma list of runs to do: qk-f16,qk-q8_0,l-f16,l-q8_0 (default all)")
    ap.add_argument("--src", type=Path, default=None, help="reuse a checkpoint written by an earlier --keep run")
    ap.add_argument("--make", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make:  # child: build the checkpoint (a child's peak RSS starts at its parent's, so the parent stays small)
        made = make_deepseek(a.make, a.gib) if a.deepseek else make_checkpoint(a.make, a.gib, a.moe)
        print(json.dumps(made))
        return
    limit = None if a.limit_gib is None else int(a.limit_gib * 2**30)
    only = set(filter(None, a.only.split(",")))
    work = Path(tempfile.mkdtemp(prefix="qk-mem-"))
    try:
        src = work / "model"
        t0 = time.time()
        if a.src:
            src, total, largest = a.src, 0, 0
            for f in src.glob("*.safetensors"):
                with open(f, "rb") as fh:
                    hdr = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
                for k, v in hdr.items():
                    if k != "__metadata__":
                        n = v["data_offsets"][1] - v["data_offsets"][0]
                        total, largest = total + n, max(largest, n)
        else:
            total, largest = json.loads(subprocess.run(
                [sys.executable, __file__, "--gib", str(a.gib), "--make", str(src)] + (["--moe"] if a.moe else [])
                + (["--deepseek"] if a.deepseek else []), check=True, capture_output=True, text=True).stdout)
        print(f"checkpoint written in {time.time() - t0:.0f} s: {len(list(src.glob('*.safetensors')))} shards, "
              f"{total / 2**30:.2f} GiB", flush=True)
        # the tokenizer does not matter for memory; give both converters SmolLM2's
        shared = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        subprocess.run([sys.executable, "-c", "import sys; from quantkit.formats.hf_tokenizer import read_gguf_kv, "
                        "write_hf_tokenizer as w; w(read_gguf_kv(sys.argv[1]), sys.argv[2])", str(shared), str(src)],
                       check=True)
        rows = []

        def measure(tool, q, cmd, out):
            if limit is not None:
                _drop_page_cache(src)
            r = run_measured(cmd, limit)
            r["out_bytes"] = out.stat().st_size if out.exists() else 0
            rows.append((tool, q, r))
            print(f"{tool} {q}: {r['outcome']} in {r['seconds']:.0f} s, peak RSS {r['rss'] / 2**20:.0f} MiB"
                  + (f", cgroup peak {r['cg_peak'] / 2**20:.0f} MiB, anon peak (sampled) {r['anon_peak'] / 2**20:.0f} MiB"
                     if r["cg_peak"] is not None else ""), flush=True)
            if r["status"] != 0:
                print(r["err"][-2000:], flush=True)
                if limit is None:
                    raise SystemExit(f"failed: {' '.join(cmd)}")
            out.unlink(missing_ok=True)

        for q in ("f16", "q8_0"):
            if not only or f"qk-{q}" in only:
                out = work / f"qk-{q}.gguf"
                measure("quantkit", q, [sys.executable, "-m", "quantkit", "convert", str(src), "-o", str(out),
                                        "--q", q, "--no-progress"], out)
        if a.moe:  # calibrated GGUF streams layer by layer too
            calib = work / "calib.txt"
            text = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "jargon-4.4.7.txt").read_text()
            calib.write_text(text[:200_000])
            s, rss = peak_rss_of([sys.executable, "-m", "quantkit", "convert", str(src), "-o", str(work / "qk-opt.gguf"),
                                  "--q", "q4_k_m", "--optimizer", "gptq", "--calib", str(calib), "--calib-samples", "4",
                                  "--calib-seqlen", "64", "--no-progress"])
            rows.append(("quantkit --optimizer gptq", "q4_k_m", {"seconds": s, "rss": rss, "cg_peak": None,
                                                                 "outcome": "completed"}))
            (work / "qk-opt.gguf").unlink()
        conv = Path(os.environ.get("QK_LLAMACPP_SRC", "/tmp/quantkit-llamacpp-src/llama_cpp_python-0.3.36/vendor/llama.cpp")) / "convert_hf_to_gguf.py"
        if conv.exists():
            for q in ("f16", "q8_0"):
                if not only or f"l-{q}" in only:
                    out = work / f"l-{q}.gguf"
                    measure("llama.cpp convert_hf_to_gguf", q,
                            [sys.executable, str(conv), str(src), "--outtype", q, "--outfile", str(out)], out)
        note = ""
        if a.moe:
            note = " (the embedding; one expert is 4 MiB, a stacked GGUF expert tensor 32 MiB)"
        elif a.deepseek:
            note = " (the embedding / lm_head, bf16; one FP8 expert projection 0.25 MiB, a stacked GGUF expert tensor 64 Mi elements)"
        print(f"model: {total / 2**30:.2f} GiB in tensors, largest stored tensor {largest / 2**20:.0f} MiB" + note
              + (f"; memory limit {limit / 2**30:.2f} GiB (cgroup v1, memory+swap)" if limit else ""))
        cg = limit is not None
        print(f"{'tool':32s} {'q':6s} {'outcome':11s} {'seconds':>8s} {'peak RSS MiB':>13s}"
              + (f" {'cgroup peak MiB':>15s} {'anon peak MiB':>13s}" if cg else "") + f" {'RSS/largest':>12s} {'RSS/model':>10s} {'GGUF GiB':>9s}")
        for tool, q, r in rows:
            print(f"{tool:32s} {q:6s} {r['outcome']:11s} {r['seconds']:8.1f} {r['rss'] / 2**20:13.0f}"
                  + (f" {r['cg_peak'] / 2**20:15.0f} {r['anon_peak'] / 2**20:13.0f}" if cg and r["cg_peak"] is not None else "")
                  + f" {r['rss'] / largest:12.2f} {r['rss'] / total:10.3f} {r.get('out_bytes', 0) / 2**30:9.2f}")
        peer = {q: r for tool, q, r in rows if tool.startswith("llama.cpp")}
        for tool, q, r in rows:
            if tool == "quantkit" and q in peer:
                p = peer[q]
                print(f"quantkit/llama.cpp ({q}): peak RSS {r['rss'] / p['rss']:.2f}"
                      + (f", cgroup peak {r['cg_peak'] / p['cg_peak']:.2f}, anon peak {r['anon_peak'] / max(1, p['anon_peak']):.2f}"
                         if cg else "")
                      + f", seconds {r['seconds'] / p['seconds']:.2f}")
    finally:
        if a.keep:
            shutil.move(str(work), a.keep)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
