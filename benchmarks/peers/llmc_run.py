"""llm-compressor side of benchmarks/calibrated_speed.py. Runs in the llm-compressor venv
(benchmarks/setup_peers.sh), never in the project's Python: it imports neither quantkit nor anything of this repo.

    <venv>/bin/python benchmarks/peers/llmc_run.py --model HF_DIR --tokens windows.pt --method gptq|awq \
        --bits 4 --group-size 64 --asym --damp 0.01 --out OUT_DIR

The calibration windows are the exact token windows quantkit uses (a LongTensor [n, seqlen] saved by
calibrated_speed.py from quantkit.calibration.data.load_calibration): no tokenization, no shuffling here.
Prints one line `PEER_RESULT {json}` with the phase times (import, load, oneshot, save).
"""

from __future__ import annotations

import argparse
import json
import time

T_START = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--method", choices=["gptq", "awq"], required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations (IntermediatesCache.pin_memory), which raises
        # "Cannot access accelerator device when none is available" on a CPU-only machine: pinning is a
        # host-to-GPU copy optimization, so without a GPU it is skipped.
        from llmcompressor.pipelines import cache as _cache
        _cache.IntermediatesCache.pin_memory = lambda self, *a, **k: None
    t_import = time.perf_counter()

    windows = torch.load(args.tokens)
    n, seqlen = windows.shape
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    t_load = time.perf_counter()

    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=not args.asym, strategy="group",
                               group_size=args.group_size)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if args.method == "gptq":
        # quantkit's GPTQ default: no act-order, damp 0.01, block 128
        recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"], actorder=None,
                               dampening_frac=args.damp, block_size=128)]
    else:
        from llmcompressor.modifiers.transform.awq import AWQModifier
        recipe = [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=seqlen, num_calibration_samples=n,
            shuffle_calibration_samples=False, pipeline="sequential")
    t_oneshot = time.perf_counter()

    model.save_pretrained(args.out, save_compressed=True)
    tok.save_pretrained(args.out)
    t_save = time.perf_counter()
    import llmcompressor
    print("PEER_RESULT " + json.dumps({
        "tool": "llm-compressor", "version": llmcompressor.__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "samples": int(n), "seqlen": int(seqlen),
        "phases_s": {"import": t_import - T_START, "load": t_load - t_import, "oneshot": t_oneshot - t_load,
                     "save": t_save - t_oneshot},
    }), flush=True)


if __name__ == "__main__":
    main()
