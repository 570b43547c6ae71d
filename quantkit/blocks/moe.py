"""Mixture-of-experts blocks: a router over stacked experts [E, out, in], optional shared expert.

Routers: "softmax" (softmax over all experts, top-k, optionally renormalised: Mixtral, Qwen-MoE, OLMoE),
"topk_softmax" (top-k of the logits, softmax over those k: gpt-oss) and "sigmoid" (sigmoid scores; an optional
selection bias `exp_probs_b` shifts which experts are picked, not their weights: DeepSeek V3). Group-limited
routing (n_group / topk_group) first keeps the topk_group best expert groups, each group scored by its best
expert ("max": DeepSeek V2's group_limited_greedy) or its best two ("top2": V3); `scale` multiplies the
routed weights (routed_scaling_factor); `weight_input` applies each routed weight to the expert's input instead
of its output (Llama 4). Experts: SwiGLU, or gpt-oss's clamped
SwiGLU with biases. A shared expert runs on every token, optionally scaled by sigmoid(x . g) (Qwen2-MoE).

Calibration sees experts through the module's `expert_hook(e, tokens)`, called with each expert's routed
tokens (all tokens, for every expert, when `route_all` is set: forced routing for statistics only, the
output still follows the router); `hidden(e, x)` gives an expert's down-projection input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import (FFN_DOWN_EXPS, FFN_DOWN_SHEXP, FFN_GATE_EXPS, FFN_GATE_INP_SHEXP, FFN_GATE_SHEXP, FFN_ROUTER,
                     FFN_UP_EXPS, FFN_UP_SHEXP, HParams)
from ..gemm import linear
from ..threads import few_rows
from .base import Block, ScaleGroup
from .ffn import activation, glu_name

ROUTERS = ("softmax", "topk_softmax", "sigmoid")
EXP_PROBS_B = "exp_probs_b"  # the sigmoid router's selection bias [E] (HF e_score_correction_bias)
EXPERT_ACTS = ("silu", "swiglu_oai")


class MoE(Block):
    attr = "mlp"

    def __init__(self, router: str = "softmax", norm_topk: bool | None = None, router_bias: bool = False,
                 expert_bias: bool = False, act: str = "silu", shared_size: int = 0, shared_gate: bool = False,
                 select_bias: bool = False, n_group: int = 1, topk_group: int = 1, group_score: str = "top2",
                 scale: float = 1.0, weight_input: bool = False):
        if router not in ROUTERS or act not in EXPERT_ACTS or group_score not in ("max", "top2"):
            raise ValueError(f"MoE router {router!r} / act {act!r} / group score {group_score!r}")
        self.router, self.norm_topk, self.router_bias, self.expert_bias = router, norm_topk, router_bias, expert_bias
        self.act, self.shared_size, self.shared_gate = act, shared_size, shared_gate
        self.select_bias, self.n_group, self.topk_group = select_bias, n_group, topk_group
        self.group_score, self.scale, self.weight_input = group_score, scale, weight_input

    def tensors(self, hp: HParams, layer: int):
        e, f, d = hp.n_experts, hp.expert_ffn_size or hp.ffn_size, hp.hidden_size
        s = {f"{FFN_ROUTER}.weight": (e, d), f"{FFN_GATE_EXPS}.weight": (e, f, d),
             f"{FFN_UP_EXPS}.weight": (e, f, d), f"{FFN_DOWN_EXPS}.weight": (e, d, f)}
        if self.router_bias:
            s[f"{FFN_ROUTER}.bias"] = (e,)
        if self.select_bias:
            s[f"{EXP_PROBS_B}.bias"] = (e,)
        if self.expert_bias:
            s.update({f"{FFN_GATE_EXPS}.bias": (e, f), f"{FFN_UP_EXPS}.bias": (e, f), f"{FFN_DOWN_EXPS}.bias": (e, d)})
        if self.shared_size:
            fs = self.shared_size
            s.update({f"{FFN_GATE_SHEXP}.weight": (fs, d), f"{FFN_UP_SHEXP}.weight": (fs, d),
                      f"{FFN_DOWN_SHEXP}.weight": (d, fs)})
            if self.shared_gate:
                s[f"{FFN_GATE_INP_SHEXP}.weight"] = (d,)
        return s

    def linears(self):
        return (FFN_GATE_SHEXP, FFN_UP_SHEXP, FFN_DOWN_SHEXP) if self.shared_size else ()

    def expert_linears(self):
        return (FFN_GATE_EXPS, FFN_UP_EXPS, FFN_DOWN_EXPS)

    def input_groups(self):
        return ((FFN_GATE_SHEXP, FFN_UP_SHEXP), (FFN_DOWN_SHEXP,)) if self.shared_size else ()

    def scale_groups(self, hp, layer, prev_norm):
        groups = []
        if prev_norm is not None:  # the norm feeds the router, every expert's gate/up and the shared expert
            lin = (FFN_GATE_EXPS, FFN_UP_EXPS) + ((FFN_GATE_SHEXP, FFN_UP_SHEXP) if self.shared_size else ())
            groups.append(ScaleGroup(prev_norm, "norm", lin, self.attr, floats=self.float_inputs()))
        if self.act != "swiglu_oai":  # gpt-oss clamps up and adds 1 to it: a row scale of up does not commute
            groups.append(ScaleGroup(FFN_UP_EXPS, "linear", (FFN_DOWN_EXPS,), "linear", per_expert=True))
        if self.shared_size:
            groups.append(ScaleGroup(FFN_UP_SHEXP, "linear", (FFN_DOWN_SHEXP,), "linear"))
        return groups

    def float_inputs(self) -> tuple[str, ...]:
        """Unquantized tensors that read the block input (AWQ folds the scale into their columns too)."""
        return (FFN_ROUTER,) + ((FFN_GATE_INP_SHEXP,) if self.shared_size and self.shared_gate else ())

    def build(self, hp, layer, get, has):
        return MoEModule(hp, self, get, has)

    def describe(self, hp, layer, rope=None):
        f = hp.expert_ffn_size or hp.ffn_size
        norm = hp.norm_topk_prob if self.norm_topk is None else self.norm_topk
        router = {"softmax": "softmax router", "topk_softmax": "softmax over the top-k",
                  "sigmoid": "sigmoid router"}[self.router]
        if self.router != "topk_softmax":
            router += ", top-k renormalised" if norm else ", top-k not renormalised"
        if self.router_bias:
            router += ", router bias"
        if self.select_bias:
            router += ", selection bias"
        if self.n_group > 1:
            router += f", top-{self.topk_group} of {self.n_group} expert groups"
        if self.scale != 1.0:
            router += f", routed weights ×{self.scale:g}"
        experts = "clamped SwiGLU" if self.act == "swiglu_oai" else glu_name(self.act)
        parts = [f"MoE ({hp.n_experts} experts, top-{hp.n_experts_used}, {router})",
                 f"{experts} experts (ffn {f}" + (", biases)" if self.expert_bias else ")")]
        if self.shared_size:
            parts.append(f"shared expert (ffn {self.shared_size}" + (", sigmoid gate)" if self.shared_gate else ")"))
        return {"block": "ffn", "kind": "moe", "experts": hp.n_experts, "top_k": hp.n_experts_used,
                "router": self.router, "norm_topk": bool(norm), "expert_ffn_size": f,
                "shared_expert": self.shared_size or None, "shared_gate": self.shared_gate, "text": ", ".join(parts)}


class MoEModule(nn.Module):
    def __init__(self, hp: HParams, spec: MoE, get, has):
        super().__init__()
        self.hp, self.spec = hp, spec
        self.n_experts, self.top_k = hp.n_experts, hp.n_experts_used
        self.norm_topk = hp.norm_topk_prob if spec.norm_topk is None else spec.norm_topk
        self.router = get(FFN_ROUTER, linear=True)
        self.select_bias = nn.Parameter(get(EXP_PROBS_B, "bias"), requires_grad=False) if spec.select_bias else None
        self.gate_exps = nn.Parameter(get(FFN_GATE_EXPS), requires_grad=False)
        self.up_exps = nn.Parameter(get(FFN_UP_EXPS), requires_grad=False)
        self.down_exps = nn.Parameter(get(FFN_DOWN_EXPS), requires_grad=False)
        self.gate_b = self.up_b = self.down_b = None
        if spec.expert_bias:
            self.gate_b = nn.Parameter(get(FFN_GATE_EXPS, "bias"), requires_grad=False)
            self.up_b = nn.Parameter(get(FFN_UP_EXPS, "bias"), requires_grad=False)
            self.down_b = nn.Parameter(get(FFN_DOWN_EXPS, "bias"), requires_grad=False)
        self.shexp = None
        if spec.shared_size:
            self.shexp_gate = get(FFN_GATE_SHEXP, linear=True)
            self.shexp_up = get(FFN_UP_SHEXP, linear=True)
            self.shexp_down = get(FFN_DOWN_SHEXP, linear=True)
            self.shexp_inp = nn.Parameter(get(FFN_GATE_INP_SHEXP), requires_grad=False) if spec.shared_gate \
                else None
        self.act = activation("silu")
        self.alpha = float(hp.extra.get("swiglu_alpha", 1.702))
        self.limit = float(hp.extra.get("swiglu_limit", 7.0))
        self.expert_hook = None
        self.route_all = False

    @property
    def stacked(self) -> dict[str, nn.Parameter]:
        return {FFN_GATE_EXPS: self.gate_exps, FFN_UP_EXPS: self.up_exps, FFN_DOWN_EXPS: self.down_exps}

    def stacked_bias(self) -> dict[str, nn.Parameter]:
        if self.gate_b is None:
            return {}
        return {FFN_GATE_EXPS: self.gate_b, FFN_UP_EXPS: self.up_b, FFN_DOWN_EXPS: self.down_b}

    def float_params(self) -> dict[str, torch.Tensor]:
        """Unquantized weights reading the block input (the router, the shared expert's gate vector)."""
        out = {FFN_ROUTER: self.router.weight}
        if self.spec.shared_size and self.shexp_inp is not None:
            out[FFN_GATE_INP_SHEXP] = self.shexp_inp
        return out

    def linears(self) -> dict[str, nn.Linear]:
        if not self.spec.shared_size:
            return {}
        return {FFN_GATE_SHEXP: self.shexp_gate, FFN_UP_SHEXP: self.shexp_up, FFN_DOWN_SHEXP: self.shexp_down}

    def hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's down-projection input for tokens x."""
        with few_rows(x):  # an expert may get a handful of tokens: the same bits at any thread count
            g, u = linear(x, self.gate_exps[e]), linear(x, self.up_exps[e])
        if self.gate_b is not None:
            g, u = g + self.gate_b[e], u + self.up_b[e]
        if self.spec.act == "swiglu_oai":  # gpt-oss: gate <= limit, -limit <= up <= limit
            g, u = g.clamp(max=self.limit), u.clamp(-self.limit, self.limit)
            return (u + 1) * g * torch.sigmoid(g * self.alpha)
        return self.act(g) * u

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(e, x)
        with few_rows(h):
            y = linear(h, self.down_exps[e])
        return y + self.down_b[e] if self.down_b is not None else y

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [N, k], expert ids [N, k])."""
        logits = self.router(x).float()
        spec = self.spec
        if spec.router == "topk_softmax":
            top, idx = logits.topk(self.top_k, dim=-1)
            return torch.softmax(top, dim=-1), idx
        if spec.router == "softmax" and spec.n_group <= 1 and not spec.select_bias and spec.scale == 1.0:
            w, idx = F.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
            if self.norm_topk:
                w = w / w.sum(-1, keepdim=True)
            return w, idx
        scores = torch.sigmoid(logits) if spec.router == "sigmoid" else F.softmax(logits, dim=-1)
        choice = scores + self.select_bias.float() if self.select_bias is not None else scores
        if spec.router == "sigmoid" and self.select_bias is None and spec.n_group <= 1:
            choice = logits  # as transformers' Llama 4: saturated sigmoids (logit > ~17) tie at 1.0 in float32
        if spec.n_group > 1:
            g = choice.view(-1, spec.n_group, self.n_experts // spec.n_group)
            gs = g.max(-1).values if spec.group_score == "max" else g.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(gs).scatter_(1, gs.topk(spec.topk_group, dim=-1).indices, 1.0).bool()
            choice = choice.masked_fill(~keep.repeat_interleave(self.n_experts // spec.n_group, dim=1),
                                        float("-inf"))
        idx = choice.topk(self.top_k, dim=-1).indices
        w = scores.gather(1, idx)
        if self.norm_topk:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * spec.scale, idx

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = self.route(x)
        out = torch.zeros_like(x)
        for e in range(self.n_experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            we = w[tok, slot, None].to(x.dtype)
            xe = x[tok] * we if self.spec.weight_input else x[tok]  # what the expert reads
            if self.expert_hook is not None and (self.route_all or tok.numel()):
                self.expert_hook(e, x if self.route_all else xe)
            if tok.numel() == 0:
                continue
            out.index_add_(0, tok, self.expert(e, xe) if self.spec.weight_input else self.expert(e, xe) * we)
        if self.spec.shared_size:
            sh = self.shexp_down(self.act(self.shexp_gate(x)) * self.shexp_up(x))
            if self.shexp_inp is not None:
                sh = sh * torch.sigmoid(x @ self.shexp_inp.to(x.dtype))[:, None]
            out = out + sh
        return out.reshape(shape)
