"""llama-perplexity's protocol (non-overlapping chunks of n_ctx, BOS on each chunk when the vocab adds one,
second half of each chunk scored) and its KL-divergence statistics against a base model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..errors import BadInput


@dataclass
class Chunk:
    index: int
    ids: torch.Tensor  # [n_ctx] model input (first token replaced by BOS when the vocab adds one)
    targets: torch.Tensor  # [n_ctx - 1 - first] the tokens scored
    first: int


def chunks(tokens: list[int], n_ctx: int = 512, n_chunks: int | None = None, bos_id: int | None = None
           ) -> Iterable[Chunk]:
    if n_ctx < 4:
        raise BadInput(f"--ctx {n_ctx}: must be at least 4")
    n_max = len(tokens) // n_ctx
    if n_max == 0:
        raise BadInput(f"text has {len(tokens)} tokens, fewer than one context of {n_ctx} (use a longer --text "
                       f"or a smaller --ctx)")
    n = n_max if n_chunks is None or n_chunks <= 0 else min(n_chunks, n_max)
    first = n_ctx // 2
    t = torch.tensor(tokens, dtype=torch.long)
    for i in range(n):
        ids = t[i * n_ctx:(i + 1) * n_ctx].clone()
        targets = ids[first + 1:].clone()
        if bos_id is not None:
            ids[0] = bos_id
        yield Chunk(i, ids, targets, first)


def chunk_logprobs(model: Callable, c: Chunk) -> torch.Tensor:
    """log-softmax of the logits that predict the scored tokens: [n_ctx - 1 - first, V] float32. `model` is an
    executor, or a saved base (eval.saved_base) that gives them back."""
    if hasattr(model, "chunk_logprobs"):
        return model.chunk_logprobs(c)
    logits = model(c.ids[None])[0].float()
    return torch.log_softmax(logits[c.first:-1], dim=-1)


def _finish_ppl(nll: torch.Tensor) -> dict:
    n = nll.numel()
    mean = nll.double().mean().item()
    ppl = math.exp(mean)
    var = (nll.double().pow(2).mean().item() - mean * mean)
    err = math.sqrt(var / (n - 1)) * ppl if n > 1 and var > 0 else 0.0
    return {"ppl": ppl, "ppl_stderr": err, "n_tokens": n}


def perplexity(model: Callable, tokens: list[int], n_ctx: int = 512, n_chunks: int | None = None,
               bos_id: int | None = None, base: Callable | None = None,
               progress: Callable[[int, int], None] | None = None,
               on_base: Callable[[Chunk, torch.Tensor], None] | None = None,
               on_model: Callable[[Chunk, torch.Tensor], None] | None = None, keep_kld: bool = False) -> dict:
    """PPL (and with `base`, KLD statistics of model vs base) over the same chunks. on_base / on_model receive
    each chunk's log-probs (to save them). `n_chunks` None or 0: every whole chunk of the text.
    keep_kld: also return every token's KLD as "_kld_values"."""
    cs = list(chunks(tokens, n_ctx, n_chunks, bos_id))
    nll, nll_b, kld, dp, same = [], [], [], [], []
    for c in cs:
        lp = chunk_logprobs(model, c)
        if on_model is not None:
            on_model(c, lp)
        tgt = c.targets[:, None]
        nll.append(-lp.gather(1, tgt)[:, 0])
        if base is not None:
            lpb = chunk_logprobs(base, c)
            if on_base is not None:
                on_base(c, lpb)
            nll_b.append(-lpb.gather(1, tgt)[:, 0])
            pb = lpb.exp()
            kld.append((pb * (lpb - lp)).sum(-1).clamp_min(0))
            dp.append(lp.gather(1, tgt)[:, 0].exp() - lpb.gather(1, tgt)[:, 0].exp())
            same.append(lp.argmax(-1) == lpb.argmax(-1))
        if progress:
            progress(c.index + 1, len(cs))
    nll_t = torch.cat(nll)
    out = _finish_ppl(nll_t)
    out.update({"n_ctx": n_ctx, "n_chunks": len(cs)})
    per_chunk = [{"ppl": math.exp(x.double().mean().item())} for x in nll]
    out["per_chunk"] = per_chunk
    if base is not None:
        nb = torch.cat(nll_b)
        k = torch.cat(kld).double()
        d = torch.cat(dp).double()
        b = _finish_ppl(nb)
        log_ratio = (nll_t.double() - nb.double())
        for pc, xb, kc in zip(per_chunk, nll_b, kld):
            pc["base_ppl"] = math.exp(xb.double().mean().item())
            pc["kld_mean"] = kc.double().mean().item()
        if keep_kld:  # every token's KLD, for plots (a tensor: not part of the JSON result)
            out["_kld_values"] = k.float()
        n = k.numel()
        out.update({
            "base_ppl": b["ppl"], "base_ppl_stderr": b["ppl_stderr"],
            "ppl_ratio": math.exp(log_ratio.mean().item()),
            "ln_ppl_ratio": log_ratio.mean().item(),
            "kld_mean": k.mean().item(),
            "kld_stderr": (k.std().item() / math.sqrt(n)) if n > 1 else 0.0,
            "kld_median": k.median().item(),
            "kld_p99": torch.quantile(k.float(), 0.99).item(),
            "kld_p90": torch.quantile(k.float(), 0.90).item(),
            "kld_max": k.max().item(),
            "top1_agreement": torch.cat(same).double().mean().item(),
            "delta_p_mean": d.mean().item(),
            "delta_p_rms": d.pow(2).mean().sqrt().item(),
        })
    return out
