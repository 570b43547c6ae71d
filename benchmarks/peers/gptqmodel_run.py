"""GPTQModel side of benchmarks/calibrated_speed.py. Runs in the GPTQModel venv (benchmarks/setup_peers.sh).

    <venv>/bin/python benchmarks/peers/gptqmodel_run.py --model HF_DIR --tokens windows.pt --bits 4 \
        --group-size 64 --asym --damp 0.01 --out OUT_DIR

Fed the exact token windows quantkit uses (LongTensor [n, seqlen]). Prints `PEER_RESULT {json}`.
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
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    t_import = time.perf_counter()
    windows = torch.load(args.tokens)
    calib = [{"input_ids": w.unsqueeze(0), "attention_mask": torch.ones_like(w).unsqueeze(0)} for w in windows]
    # plain GPTQ as quantkit runs it: no act-order, no GPTQModel "act_group_aware" reordering
    cfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=not args.asym, desc_act=False,
                         act_group_aware=False, damp_percent=args.damp)
    try:
        model = GPTQModel.load(args.model, cfg, device="cpu", dtype=torch.float32)
    except TypeError:
        model = GPTQModel.load(args.model, cfg, device="cpu", torch_dtype=torch.float32)
    t_load = time.perf_counter()
    model.quantize(calib, batch_size=1)
    t_quant = time.perf_counter()
    model.save(args.out)
    t_save = time.perf_counter()
    import gptqmodel
    print("PEER_RESULT " + json.dumps({
        "tool": "GPTQModel", "version": gptqmodel.__version__, "threads": torch.get_num_threads(),
        "samples": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
        "phases_s": {"import": t_import - T_START, "load": t_load - t_import, "quantize": t_quant - t_load,
                     "save": t_save - t_quant},
    }), flush=True)


if __name__ == "__main__":
    main()
