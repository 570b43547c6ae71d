"""Calibrated quantization at scale: quantkit's GPTQ / AWQ / imatrix against llm-compressor and llama-imatrix.

Every tool runs as a subprocess, one after another, through its command line (quantkit: `python -m quantkit`
with PYTHONPATH at the checkout given by --quantkit, default the repo this script lives in, so it measures
whatever code is current there). Each run's wall time and peak RSS come from `/usr/bin/time -v` (the largest
single process; resource.getrusage(RUSAGE_CHILDREN) where /usr/bin/time is missing), and a poller sums the RSS
of the whole process tree (torchrun's ranks together; shared library pages count once per process).

Model: the permuted SmolLM2-135M (`permute_dense(load(gguf), seed=0)`, as tests/conftest.py's `smollm_hf`)
written once as an F32 HF checkpoint, plus an F32 GGUF of it for the imatrix tools, under --cache.
Calibration text: the first 40 % of ../shared/data/jargon-4.4.7.txt; evaluation: the last 20 %.

  quantkit gptq    convert HF --to safetensors --method gptq --bits 4 --group-size 64 --asym --calib ...
  quantkit awq     convert HF --to safetensors --method awq  --bits 4 --group-size 64 --asym --calib ...
  quantkit imatrix imatrix F32.gguf --calib ... --ctx SEQLEN --chunks SAMPLES
  quantkit kgptq   convert HF --to gguf --q q4_k_m --optimizer gptq --calib ... (method key "kgptq"; its peer
                   is llama-imatrix: the calibration llama.cpp needs before its own q4_k_m)
  --procs N        the same three under `torchrun --nproc-per-node N -m quantkit ...` ("not available" when
                   the checkout has no multi-process mode or the run fails)
  llm-compressor   GPTQModifier / AWQModifier + QuantizationModifier, int4 group 64 asym, lm_head kept,
                   fed exactly quantkit's calibration windows (load_calibration(graph, calib, n, seqlen, 0),
                   saved as a .pt the peer script reads in its own venv)
  GPTQModel        the same windows, if benchmarks/setup_peers.sh could build it
  llama-imatrix    -c SEQLEN --chunks SAMPLES on the same text and F32 GGUF (imatrix tools take the first N
                   chunks of the text, both of them, not random windows)
  --calib-dtype D  also every quantkit method with `--calib-dtype D` (rows qk-<method>-<bf16|f16>); for bfloat16
                   llama-imatrix runs again on a BF16 GGUF of the model (row llama-imatrix-bf16), the peer of
                   quantkit's bf16 imatrix / kgptq rows (llama.cpp computes with bf16 weights there)

Accuracy: `quantkit perplexity OUT --text eval.txt --base base.qkld --json` (the F32 model's log-probs saved
once); llm-compressor's compressed-tensors output is read by quantkit too. An imatrix is scored by the Q4_K_M
GGUF that `quantkit convert F32.gguf --q q4_k_m --imatrix X` makes from it (same quantizer for both imatrices).
The table gives quantkit / peer ratios of wall time, peak RSS and KLD measured in the same run.

    bash benchmarks/setup_peers.sh                      # once: peers' venvs / llama-imatrix build
    python benchmarks/calibrated_speed.py --quick --procs 2 --json out.json
    python benchmarks/calibrated_speed.py --samples 128 --seqlen 512     # the full run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CACHE = Path(os.environ.get("QK_BENCH_CACHE", Path.home() / ".cache" / "quantkit-bench"))
TIME_BIN = "/usr/bin/time"
PEER_OF = {"gptq": "llmc-gptq", "awq": "llmc-awq", "imatrix": "llama-imatrix", "kgptq": "llama-imatrix"}
DTYPE_TAG = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ measuring one subprocess

def _children(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out.append(int(k))
            todo.append(int(k))
    return out


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeRSS(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants, sampled every `dt` seconds."""

    def __init__(self, pid: int, dt: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.dt, self.peak_kib, self.max_procs = pid, dt, 0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pids = [self.pid] + _children(self.pid)
            # /usr/bin/time itself is ~2 MiB: negligible
            self.peak_kib = max(self.peak_kib, sum(_rss_kib(p) for p in pids))
            self.max_procs = max(self.max_procs, len(pids))
            self._halt.wait(self.dt)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def measure(cmd: list[str], env: dict, logfile: Path, timeout: float | None = None, cwd: Path | None = None) -> dict:
    """Run cmd; wall s, peak RSS (largest process, /usr/bin/time -v), summed process-tree peak, rc, stdout."""
    use_time = os.access(TIME_BIN, os.X_OK)
    tfile = logfile.with_suffix(".time")
    full = [TIME_BIN, "-v", "-o", str(tfile)] + cmd if use_time else cmd
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as lf:
        lf.write("$ " + shlex.join(cmd) + "\n")
        lf.flush()
        before = __import__("resource").getrusage(__import__("resource").RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        # own process group: a timeout or an interrupted benchmark takes the whole tree down (torchrun's ranks,
        # the tool under /usr/bin/time), not just the first child
        # run in the log's folder unless told: `python -m quantkit` puts its working directory first on sys.path,
        # so started inside another checkout it would run that one instead of --quantkit's (PYTHONPATH)
        p = subprocess.Popen(full, env=env, stdout=subprocess.PIPE, stderr=lf, text=True,
                             cwd=cwd or logfile.parent, start_new_session=True)
        poll = TreeRSS(p.pid)
        poll.start()
        lines: list[str] = []

        def pump() -> None:  # stdout into the log as it comes (progress visible), and kept for parsing
            for line in p.stdout:
                lines.append(line)
                lf.write(line)
                lf.flush()
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            lines.append("\n[timed out]")
        finally:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        reader.join()
        out = "".join(lines)
        wall = time.perf_counter() - t0
        poll.stop()
        after = __import__("resource").getrusage(__import__("resource").RUSAGE_CHILDREN)
    res = {"cmd": shlex.join(cmd), "rc": p.returncode, "wall_s": wall, "tree_peak_rss_mib": poll.peak_kib / 1024,
           "procs": poll.max_procs, "stdout": out, "log": str(logfile)}
    if use_time and tfile.exists():
        t = tfile.read_text()
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", t)
        res["peak_rss_mib"] = int(m.group(1)) / 1024 if m else None
        for key, pat in (("user_s", r"User time \(seconds\): ([\d.]+)"), ("sys_s", r"System time \(seconds\): ([\d.]+)")):
            m = re.search(pat, t)
            res[key] = float(m.group(1)) if m else None
        m = re.search(r"Command exited with non-zero status (\d+)", t)
        if m and p.returncode == 0:
            res["rc"] = int(m.group(1))
    else:  # ru_maxrss of RUSAGE_CHILDREN is the max over all waited-for children so far: right when sequential
        res["peak_rss_mib"] = after.ru_maxrss / 1024 if after.ru_maxrss > before.ru_maxrss else None
        res["user_s"] = after.ru_utime - before.ru_utime
        res["sys_s"] = after.ru_stime - before.ru_stime
    return res


def tail(path: str | Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines()
                 if ln.strip() and not ln.startswith("WARNING: Location")]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-400:]


def last_json(text: str) -> dict | None:
    """The last JSON object printed on stdout, starting at a line start (--json output may follow other lines)."""
    dec = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"(?m)^\{", text)]
    for i in reversed(starts):
        try:
            obj, _ = dec.raw_decode(text[i:])
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


# ------------------------------------------------------------------ the benchmark

class Bench:
    def __init__(self, args):
        self.a = args
        self.qk = Path(args.quantkit).resolve()
        self.cache = Path(args.cache).expanduser().resolve()
        self.work = Path(args.work).resolve() if args.work else \
            self.cache / "runs" / time.strftime("%Y%m%d-%H%M%S")
        self.work.mkdir(parents=True, exist_ok=True)
        self.py = args.python or sys.executable
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(self.qk) + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")
        if args.threads:
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "QUANTKIT_THREADS"):
                self.env[k] = str(args.threads)
        self.rows: dict[str, dict] = {}
        self.envs: dict[str, dict | None] = {}

    # ---------------- preparation (the project's Python, the quantkit checkout)
    def qk_cmd(self, *a) -> list[str]:
        return [self.py, "-m", "quantkit", *map(str, a)]

    def prep(self) -> None:
        a = self.a
        mdir = self.cache / "model" / (Path(a.model).stem + "-perm0")
        self.hf, self.gguf = mdir / "hf", mdir / "f32.gguf"
        if not (self.hf / ".done").exists():
            log(f"writing the permuted model (F32 HF) to {self.hf}")
            code = ("import sys; from quantkit.export import convert_to_safetensors; from quantkit.families import load; "
                    "from quantkit.transforms import permute_dense; "
                    "convert_to_safetensors(permute_dense(load(sys.argv[1]), seed=0), sys.argv[2], dtype='f32', "
                    "progress=False)")
            if self.hf.exists():
                shutil.rmtree(self.hf)
            mdir.mkdir(parents=True, exist_ok=True)  # quantkit writes into an existing folder only
            subprocess.run([self.py, "-c", code, a.model, str(self.hf)], env=self.env, check=True)
            (self.hf / ".done").write_text("")
        self.gguf_bf16 = mdir / "bf16.gguf"
        for path, q in ((self.gguf, "f32"), (self.gguf_bf16, "bf16" if "bfloat16" in a.calib_dtype else None)):
            if q and not path.exists():
                log(f"writing the {q.upper()} GGUF of it to {path}")
                tmp = path.with_suffix(".tmp.gguf")
                subprocess.run(self.qk_cmd("convert", self.hf, "--to", "gguf", "--q", q, "-o", tmp, "--force",
                                           "--no-progress", "-q"), env=self.env, check=True, stdout=subprocess.DEVNULL)
                tmp.rename(path)
        text = Path(a.text).read_text(encoding="utf-8", errors="replace")
        self.calib, self.eval = self.work / "calib.txt", self.work / "eval.txt"
        self.calib.write_text(text[: int(0.4 * len(text))], encoding="utf-8")
        self.eval.write_text(text[int(0.8 * len(text)):], encoding="utf-8")
        self.tokens = self.work / f"windows-{a.samples}x{a.seqlen}.pt"
        log(f"calibration windows {a.samples} x {a.seqlen} (quantkit's load_calibration, seed 0) -> {self.tokens}")
        code = ("import sys, torch; from pathlib import Path; from quantkit.families import load; "
                "from quantkit.calibration.data import load_calibration; "
                "w = load_calibration(load(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), seed=0); "
                "torch.save(torch.stack(w), sys.argv[5])")
        subprocess.run([self.py, "-c", code, str(self.hf), str(self.calib), str(a.samples), str(a.seqlen),
                        str(self.tokens)], env=self.env, check=True)
        self.base = None
        if not a.no_eval:
            self.base = self.work / "base.qkld"
            meta = self.work / "base.json"
            if a.reuse_base and self.base.exists() and meta.exists() and \
                    json.loads(meta.read_text()).get("n_chunks") == a.eval_chunks and \
                    json.loads(meta.read_text()).get("n_ctx") == a.eval_ctx:
                self.base_json = json.loads(meta.read_text())
                self.base_ppl = self.base_json.get("ppl")
                log(f"reusing {self.base} (--reuse-base)")
                return
            self.base.unlink(missing_ok=True)
            log(f"base log-probs of the F32 model on the evaluation text ({a.eval_chunks} x {a.eval_ctx})")
            r = measure(self.qk_cmd("perplexity", self.hf, "--text", self.eval, "--ctx", a.eval_ctx, "--chunks",
                                    a.eval_chunks, "--save-base", self.base, "--device", a.device, "--json",
                                    "--no-progress"), self.env, self.work / "logs" / "base-ppl.log")
            if r["rc"] != 0:
                raise SystemExit(f"base perplexity failed: {tail(r['log'])}")
            j = last_json(r["stdout"]) or {}
            self.base_ppl = j.get("ppl") or j.get("perplexity")
            self.base_json = j
            meta.write_text(json.dumps(j))

    # ---------------- runs
    def add(self, key: str, tool: str, method: str, mode: str, cmd: list[str] | None, out: Path | None,
            env: dict | None = None, skip: str | None = None, kind: str = "model", ready: Path | None = None,
            peer: str | None = None) -> None:
        # the environment stays out of the row (rows go to result.json): only what differs from the base env
        self.envs[key] = env
        self.rows[key] = {"key": key, "tool": tool, "method": method, "mode": mode, "cmd": cmd,
                          "out": str(out) if out else None, "skip": skip, "kind": kind,
                          "ready": str(ready) if ready else None, "peer_key": peer or PEER_OF.get(method),
                          "env_overrides": {k: v for k, v in (env or {}).items() if self.env.get(k) != v}}

    def quantkit_args(self, method: str, out: Path, dtype: str | None = None) -> list[str]:
        extra = ["--calib-dtype", dtype] if dtype else []
        return self._quantkit_args(method, out) + extra

    def _quantkit_args(self, method: str, out: Path) -> list[str]:
        a = self.a
        if method == "imatrix":
            return ["imatrix", str(self.gguf), "--calib", str(self.calib), "-o", str(out), "--ctx", str(a.seqlen),
                    "--chunks", str(a.samples), "--device", a.device, "--force", "--json", "--no-progress"]
        if method == "kgptq":  # GGUF q4_k_m with the Hessian-aware k-quant rounding
            return ["convert", str(self.hf), "--to", "gguf", "--q", "q4_k_m", "--optimizer", "gptq", "--calib",
                    str(self.calib), "--calib-samples", str(a.samples), "--calib-seqlen", str(a.seqlen), "--seed", "0",
                    "-o", str(out), "--device", a.device, "--force", "--json", "--no-progress"]
        return ["convert", str(self.hf), "--to", "safetensors", "--method", method, "--bits", str(a.bits),
                "--group-size", str(a.group_size), "--asym", "--calib", str(self.calib), "--calib-samples",
                str(a.samples), "--calib-seqlen", str(a.seqlen), "--seed", "0", "-o", str(out), "--device", a.device,
                "--force", "--json", "--no-progress"]

    def warm_up(self) -> None:
        """Each quantkit method once on 2 x 64 tokens, untimed: the checkout's compiled kernels (numba, cached per
        checkout) are built before the timed runs, as a user's are after the first run on a machine (a fresh
        checkout's first --optimizer gptq run spent ~11 s compiling)."""
        for m in dict.fromkeys(self.a.methods):
            out = self.work / "warm-up" / ("x.imatrix.gguf" if m == "imatrix" else "x.gguf" if m == "kgptq" else "x")
            out.parent.mkdir(exist_ok=True)
            small = ["--chunks", "2", "--ctx", "64"] if m == "imatrix" else \
                ["--calib-samples", "2", "--calib-seqlen", "64"]
            t = time.perf_counter()
            r = subprocess.run(self.qk_cmd(*self.quantkit_args(m, out), *small), env=self.env, capture_output=True,
                               text=True)
            log(f"warm-up {m}: {time.perf_counter() - t:.1f} s (exit {r.returncode})")
        shutil.rmtree(self.work / "warm-up", ignore_errors=True)

    def multiproc_support(self) -> str | None:
        """None when the checkout looks like it has a torch.distributed mode; else why not."""
        if not shutil.which("torchrun") and not self._torchrun_module():
            return "torchrun not found"
        pat = re.compile(r"init_process_group|LOCAL_RANK|WORLD_SIZE")
        for p in (self.qk / "quantkit").rglob("*.py"):
            try:
                if pat.search(p.read_text(errors="replace")):
                    return None
            except OSError:
                continue
        return f"quantkit at {self.qk} has no torch.distributed code (no init_process_group / WORLD_SIZE)"

    def _torchrun_module(self) -> bool:
        return subprocess.run([self.py, "-c", "import torch.distributed.run"], capture_output=True).returncode == 0

    def plan(self) -> None:
        a, w = self.a, self.work
        methods = a.methods
        for m in methods:
            out = w / {"imatrix": f"qk-{m}.imatrix.gguf", "kgptq": f"qk-{m}.gguf"}.get(m, f"qk-{m}")
            self.add(f"qk-{m}", "quantkit", m, "1 proc", self.qk_cmd(*self.quantkit_args(m, out)), out,
                     kind="imatrix" if m == "imatrix" else "model")
            for dt in a.calib_dtype:
                tag = DTYPE_TAG[dt]
                out = w / {"imatrix": f"qk-{m}-{tag}.imatrix.gguf", "kgptq": f"qk-{m}-{tag}.gguf"}.get(m, f"qk-{m}-{tag}")
                peer = "llama-imatrix-bf16" if dt == "bfloat16" and m in ("imatrix", "kgptq") else None
                self.add(f"qk-{m}-{tag}", "quantkit", m, f"1 proc, {tag}", self.qk_cmd(*self.quantkit_args(m, out, dt)),
                         out, kind="imatrix" if m == "imatrix" else "model", peer=peer)
        if a.procs > 1:
            why = self.multiproc_support()
            env = dict(self.env)
            env["OMP_NUM_THREADS"] = str(max(1, (a.threads or os.cpu_count() or 1) // a.procs))
            env["QUANTKIT_THREADS"] = env["OMP_NUM_THREADS"]
            launcher = [shutil.which("torchrun")] if shutil.which("torchrun") else [self.py, "-m", "torch.distributed.run"]
            for m in methods:
                out = w / {"imatrix": f"qk-{m}-np{a.procs}.imatrix.gguf",
                           "kgptq": f"qk-{m}-np{a.procs}.gguf"}.get(m, f"qk-{m}-np{a.procs}")
                cmd = launcher + ["--standalone", "--nproc-per-node", str(a.procs), "-m", "quantkit",
                                  *self.quantkit_args(m, out)]
                self.add(f"qk-{m}-np{a.procs}", "quantkit", m, f"torchrun {a.procs}", cmd, out, env=env, skip=why,
                         kind="imatrix" if m == "imatrix" else "model")
        peers = a.peers
        venvs = Path(a.peers_dir).expanduser() if a.peers_dir else self.cache
        if "llmcompressor" in peers:
            v = venvs / "venvs" / "llmcompressor"
            skip = None if (v / ".ok").exists() else f"no llm-compressor venv at {v} (run benchmarks/setup_peers.sh)"
            for m in [m for m in methods if m in ("gptq", "awq")]:
                out = w / f"llmc-{m}"
                cmd = [str(v / "bin" / "python"), str(HERE / "peers" / "llmc_run.py"), "--model", str(self.hf),
                       "--tokens", str(self.tokens), "--method", m, "--bits", str(a.bits), "--group-size",
                       str(a.group_size), "--asym", "--damp", "0.01", "--out", str(out)]
                self.add(f"llmc-{m}", "llm-compressor", m, "1 proc", cmd, out, skip=skip, ready=v / ".ok")
        if "gptqmodel" in peers and "gptq" in methods:
            v = venvs / "venvs" / "gptqmodel"
            skip = None if (v / ".ok").exists() else (
                f"GPTQModel not installed: {(v / '.failed').read_text().strip()}" if (v / ".failed").exists()
                else f"no GPTQModel venv at {v} (benchmarks/setup_peers.sh)")
            out = w / "gptqmodel-gptq"
            cmd = [str(v / "bin" / "python"), str(HERE / "peers" / "gptqmodel_run.py"), "--model", str(self.hf),
                   "--tokens", str(self.tokens), "--bits", str(a.bits), "--group-size", str(a.group_size),
                   "--asym", "--damp", "0.01", "--out", str(out)]
            self.add("gptqmodel-gptq", "GPTQModel", "gptq", "1 proc", cmd, out, skip=skip, ready=v / ".ok")
        if "llamacpp" in peers and ("imatrix" in methods or "kgptq" in methods):
            b = venvs / "llama.cpp" / "bin" / "llama-imatrix"
            skip = None if b.exists() else (
                f"llama-imatrix not built: {(venvs / 'llama.cpp' / '.failed').read_text().strip()}"
                if (venvs / "llama.cpp" / ".failed").exists() else f"no {b} (run benchmarks/setup_peers.sh)")
            out = w / "llama.imatrix.gguf"
            cmd = [str(b), "-m", str(self.gguf), "-f", str(self.calib), "-o", str(out), "-c", str(a.seqlen),
                   "--chunks", str(a.samples), "-t", str(a.threads or os.cpu_count()), "--no-ppl"]
            self.add("llama-imatrix", "llama.cpp", "imatrix", "1 proc", cmd, out, skip=skip, kind="imatrix",
                     ready=venvs / "llama.cpp" / ".ok")
            if "bfloat16" in a.calib_dtype:  # the same on BF16 weights: the peer of quantkit's bf16 rows
                out = w / "llama-bf16.imatrix.gguf"
                cmd = [cmd[0], "-m", str(self.gguf_bf16)] + cmd[3:5] + ["-o", str(out)] + cmd[7:]
                self.add("llama-imatrix-bf16", "llama.cpp", "imatrix", "1 proc, bf16 GGUF", cmd, out, skip=skip,
                         kind="imatrix", ready=venvs / "llama.cpp" / ".ok")
        # method by method (quantkit, quantkit multi-process, then its peers), so pairs finish together
        rank = {m: k for k, m in enumerate(methods)}  # llama-imatrix pairs with imatrix, else with kgptq
        rank.setdefault("imatrix", rank.get("kgptq", len(methods)))
        order = sorted(self.rows.values(), key=lambda r: rank[r["method"]])
        self.rows = {r["key"]: r for r in order if not self.a.only or r["key"] in self.a.only}

    def run_all(self, checkpoint=None) -> None:
        for key, r in self.rows.items():
            self.run_one(key, r)
            if not self.a.no_eval and r.get("status") == "ok":
                self.evaluate_one(key, r)
            if checkpoint:
                checkpoint()

    def run_one(self, key: str, r: dict) -> None:
        if r["skip"] and r.get("ready") and Path(r["ready"]).exists():
            r["skip"] = None  # the peer's setup finished while earlier runs ran
        if r["skip"]:
            log(f"{key}: skipped ({r['skip']})")
            r["status"] = "not available" if "-np" in key else "skipped"
            return
        log(f"{key}: {shlex.join(r['cmd'])[:300]}")
        res = measure(r["cmd"], self.envs.get(key) or self.env, self.work / "logs" / f"{key}.log", timeout=self.a.timeout)
        r.update({k: v for k, v in res.items() if k != "stdout"})
        if res["rc"] != 0:
            r["status"] = "not available" if "-np" in key else "failed"
            r["error"] = tail(res["log"])
            log(f"{key}: {r['status']} (exit {res['rc']}): {r['error']}")
            return
        r["status"] = "ok"
        r["result"] = last_json(res["stdout"]) if r["tool"] == "quantkit" else None
        m = re.search(r"^PEER_RESULT (.*)$", res["stdout"], re.M)
        if m:
            r["peer"] = json.loads(m.group(1))
        self.profile(r)
        log(f"{key}: {r['wall_s']:.1f} s, peak RSS {r.get('peak_rss_mib') or 0:.0f} MiB "
            f"(tree {r['tree_peak_rss_mib']:.0f} MiB)")

    def profile(self, r: dict) -> None:
        """Per-phase numbers: quantkit's report (per-layer times), the peer's own phase clock."""
        prof = {}
        if r["tool"] == "quantkit":  # a model dir's report, else (GGUF, imatrix file) the --json result
            rep_path = Path(r["out"]) / "quantkit_report.json"
            try:
                rep = json.loads(rep_path.read_text())
            except (OSError, ValueError):  # a GGUF or an imatrix file: its --json summary carries phase_times
                rep = r.get("result") if isinstance(r.get("result"), dict) else None
            if rep:
                q = rep.get("quant") or rep.get("calibration") or rep
                layers = _find(q, "layers")
                if isinstance(layers, list) and layers and isinstance(layers[0], dict) and "time_s" in layers[0]:
                    per = [float(x["time_s"]) for x in layers]
                    prof["layers"] = len(per)
                    prof["layer_s_mean"] = statistics.mean(per)
                    prof["layer_s_max"] = max(per)
                    prof["layers_s_sum"] = sum(per)
                tensors = _find(q, "tensors")
                if isinstance(tensors, dict):
                    ts = [float(t["time_s"]) for t in tensors.values() if isinstance(t, dict) and "time_s" in t]
                    if ts:
                        prof["tensor_solve_s_sum"] = sum(ts)
                        if "layers_s_sum" in prof:
                            prof["forward_stats_s"] = prof["layers_s_sum"] - sum(ts)
                tot = _find(q, "total_time_s")
                if isinstance(tot, (int, float)):
                    prof["quant_total_s"] = float(tot)
                ph = _find(q, "phase_times")  # quantkit's own clock per phase (forward, statistics, solve ...)
                if isinstance(ph, dict):
                    prof["phases_s"] = {k: float(v) for k, v in ph.items() if isinstance(v, (int, float))}
        if r.get("peer"):
            prof.update({f"peer_{k}_s": v for k, v in r["peer"].get("phases_s", {}).items()})
        if prof:
            r["profile"] = prof

    # ---------------- accuracy
    def evaluate_one(self, key: str, r: dict) -> None:
        a = self.a
        target = Path(r["out"])
        if r["kind"] == "imatrix":  # score the imatrix by the q4_k_m it makes (same quantizer for every imatrix)
            q = self.work / f"{key}-q4_k_m.gguf"
            res = measure(self.qk_cmd("convert", self.gguf, "--q", "q4_k_m", "--imatrix", target, "-o", q,
                                      "--force", "--no-progress", "-q"), self.env, self.work / "logs" / f"{key}-q4km.log")
            if res["rc"] != 0:
                r["eval_error"] = f"q4_k_m with this imatrix failed: {tail(res['log'])}"
                log(f"{key}: {r['eval_error']}")
                return
            r["eval_model"] = f"q4_k_m + imatrix ({res['wall_s']:.1f} s to quantize)"
            target = q
        res = measure(self.qk_cmd("perplexity", target, "--text", self.eval, "--ctx", a.eval_ctx, "--chunks",
                                  a.eval_chunks, "--base", self.base, "--tokenizer", self.hf, "--device", a.device,
                                  "--json", "--no-progress"), self.env, self.work / "logs" / f"{key}-ppl.log")
        j = last_json(res["stdout"]) if res["rc"] == 0 else None
        if not j:
            r["eval_error"] = tail(res["log"])
            log(f"{key}: perplexity failed: {r['eval_error']}")
            return
        r["eval"] = j
        r["ppl"], r["kld"] = _num(j, "ppl", "perplexity"), _num(j, "kld", "kld_mean", "mean_kld")
        r["top1"] = _num(j, "top1", "top_1", "same_top_p", "top1_agreement")
        log(f"{key}: PPL {r['ppl']} KLD {r['kld']}")

    def commit(self) -> str | None:
        r = subprocess.run(["git", "-C", str(self.qk), "describe", "--always", "--dirty"], capture_output=True, text=True)
        return r.stdout.strip() or None

    # ---------------- report
    def table(self) -> str:
        def f(x, fmt):
            return format(x, fmt) if isinstance(x, (int, float)) else "-"
        lines = ["| run | mode | wall s | CPU s | peak RSS MiB (tree) | PPL | KLD | wall ratio | CPU ratio | RSS ratio | "
                 "KLD ratio | note |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, r in self.rows.items():
            if isinstance(r.get("user_s"), (int, float)):
                r["cpu_s"] = r["user_s"] + (r.get("sys_s") or 0.0)
            ratio = ["-", "-", "-", "-"]
            peer = self.rows.get(r.get("peer_key") or "", {})
            if r["tool"] == "quantkit" and r.get("status") == "ok" and peer.get("status") == "ok":
                if isinstance(peer.get("user_s"), (int, float)):
                    peer["cpu_s"] = peer["user_s"] + (peer.get("sys_s") or 0.0)
                for i, (k, fmtc) in enumerate((("wall_s", ".2f"), ("cpu_s", ".2f"), ("peak_rss_mib", ".2f"),
                                               ("kld", ".2f"))):
                    if isinstance(r.get(k), (int, float)) and isinstance(peer.get(k), (int, float)) and peer[k]:
                        ratio[i] = format(r[k] / peer[k], fmtc)
            if r.get("status") == "ok":
                note = []
                p = r.get("profile", {})
                if "layer_s_mean" in p:
                    note.append(f"{p['layer_s_mean']:.2f} s/layer x {p['layers']}")
                if p.get("phases_s"):
                    note.append("phases " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}"
                                                       for k, v in p["phases_s"].items()))
                if "peer_oneshot_s" in p:
                    note.append(f"oneshot {p['peer_oneshot_s']:.1f} s")
                if r.get("eval_model"):
                    note.append(r["eval_model"])
                if r.get("eval_error"):
                    note.append("eval failed: " + r["eval_error"][:80])
                rss = f"{f(r.get('peak_rss_mib'), '.0f')} ({r['tree_peak_rss_mib']:.0f})"
                lines.append(f"| {r['tool']} {r['method']} | {r['mode']} | {r['wall_s']:.1f} | {f(r.get('cpu_s'), '.1f')} | "
                             f"{rss} | "
                             f"{f(r.get('ppl'), '.3f')} | {f(r.get('kld'), '.4f')} | {' | '.join(ratio)} | "
                             f"{'; '.join(note)} |")
            else:
                why = r.get("skip") or r.get("error") or ""
                lines.append(f"| {r['tool']} {r['method']} | {r['mode']} | {r.get('status')} | | | | | | | | | "
                             f"{why[:160]} |")
        return "\n".join(lines)


def _find(obj, key):
    """obj[key], or the first nested dict value under that key (reports nest their sections)."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            x = _find(v, key)
            if x is not None:
                return x
    return None


def _num(j: dict, *keys):
    for k in keys:
        v = _find(j, k)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, dict):
            for kk in ("mean", "value"):
                if isinstance(v.get(kk), (int, float)):
                    return float(v[kk])
    return None


def machine() -> dict:
    model = ""
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True,
                      text=True).stdout.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "nproc": os.cpu_count(), "cpu": model or platform.processor(), "loadavg_start": os.getloadavg(),
            "python": sys.version.split()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = REPO.parent / "shared"
    ap.add_argument("--quantkit", default=str(REPO), help="quantkit checkout to measure (PYTHONPATH); default this repo")
    ap.add_argument("--python", default=None, help="the project's Python (default: this interpreter)")
    ap.add_argument("--model", default=str(shared / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--text", default=str(shared / "data" / "jargon-4.4.7.txt"))
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="model files, runs (default %(default)s)")
    ap.add_argument("--peers-dir", default=None, help="setup_peers.sh's --dir (default: --cache)")
    ap.add_argument("--work", default=None, help="this run's folder (default CACHE/runs/<time>)")
    ap.add_argument("--samples", type=int, default=None, help="calibration windows (default 128; --quick 16)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="16 x 512 calibration, 4 evaluation chunks")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--methods", default="gptq,awq,imatrix")
    ap.add_argument("--peers", default="llmcompressor,gptqmodel,llamacpp")
    ap.add_argument("--procs", type=int, default=0, help="also run quantkit under torchrun --nproc-per-node N")
    ap.add_argument("--threads", type=int, default=0, help="OMP/QUANTKIT threads for every run (0: leave)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calib-dtype", default="", help="also run quantkit with these calibration dtypes (comma list "
                    "of bfloat16, float16, float32)")
    ap.add_argument("--eval-ctx", type=int, default=512)
    ap.add_argument("--eval-chunks", type=int, default=None, help="evaluation chunks (default 8; --quick 4)")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run")
    ap.add_argument("--only", default=None, help="run only these rows (comma list of keys: qk-gptq, qk-gptq-np2, "
                    "llmc-gptq, llmc-awq, gptqmodel-gptq, qk-imatrix, llama-imatrix, ...)")
    ap.add_argument("--reuse-base", action="store_true", help="reuse --work's base.qkld from an earlier run")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    a.samples = a.samples or (16 if a.quick else 128)
    a.eval_chunks = a.eval_chunks or (4 if a.quick else 8)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    a.peers = [p.strip() for p in a.peers.split(",") if p.strip()]
    a.calib_dtype = [d.strip() for d in a.calib_dtype.split(",") if d.strip()]
    bad = [d for d in a.calib_dtype if d not in DTYPE_TAG]
    if bad:
        ap.error(f"--calib-dtype {','.join(bad)}: expected bfloat16, float16 or float32")
    a.only = [k.strip() for k in a.only.split(",") if k.strip()] if a.only else None

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM unwinds: the running tool is killed too
    info = machine()
    b = Bench(a)
    log(f"quantkit {b.qk}, work {b.work}, {a.samples} x {a.seqlen} calibration tokens, load {info['loadavg_start']}")
    b.prep()
    b.plan()
    b.warm_up()

    def report(final: bool = False) -> str:
        info["loadavg_end"] = os.getloadavg()
        head = (f"{info['date']}  {info['cpu']}, {info['nproc']} cores, load avg {info['loadavg_start'][0]:.1f} -> "
                f"{info['loadavg_end'][0]:.1f}; {a.samples} x {a.seqlen} calibration tokens, w{a.bits} "
                f"g{a.group_size} asym; eval {a.eval_chunks} x {a.eval_ctx}"
                + (f", base PPL {b.base_ppl:.3f}" if getattr(b, "base_ppl", None) else "")
                + ("" if final else " (partial)"))
        text = head + "\n" + b.table()
        (b.work / "table.md").write_text(text + "\n")
        blob = json.dumps({"machine": info, "args": vars(a), "quantkit_commit": b.commit(), "work": str(b.work),
                           "base": getattr(b, "base_json", None), "runs": b.rows}, indent=2, default=str)
        (b.work / "result.json").write_text(blob)
        if a.json:
            Path(a.json).write_text(blob)
        return text

    b.run_all(checkpoint=report)
    print(report(final=True))
    log(f"wrote {b.work / 'table.md'}" + (f", {a.json}" if a.json else ""))

if __name__ == "__main__":
    main()
