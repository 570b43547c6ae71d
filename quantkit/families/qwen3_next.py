"""Qwen3-Next (Qwen3NextForCausalLM): a hybrid of Gated DeltaNet linear-attention layers and output-gated
softmax-attention layers (blocks/deltanet.py), each followed by an MoE with a sigmoid-gated shared expert.

Which layers are linear: config.json's `layer_types` ("linear_attention" / "full_attention"), else every
layer but each `full_attention_interval`-th. Every norm is RMSNorm with (1 + w) (HF stores w) except the
DeltaNet's gated output norm (plain w); attention has per-head (1 + w) q/k norms and partial rotary
(`partial_rotary_factor`, 0.25 by default, rotate-half). Experts are per-expert HF tensors as Qwen2-MoE's,
the shared expert's gate `mlp.shared_expert_gate` [1, d] -> canonical ffn_gate_inp_shexp [d].
Canonical DeltaNet tensors keep HF's layout: ssm_in = in_proj_qkvz (rows grouped per key head), ssm_ba =
in_proj_ba, ssm_conv1d [channels, kernel], ssm_dt.bias = dt_bias, ssm_a_log = A_log.
GGUF (llama.cpp arch "qwen3next", as its converter writes it): in_proj_qkvz split into attn_qkv (all q, all
k, all v rows) and attn_gate (z rows); ssm_a = -exp(A_log); norms but ssm_norm stored as 1 + w;
post_attention_layernorm -> post_attention_norm; ssm.* keys and attention.recurrent_layers. llama.cpp's
graph always renormalises the top-k weights, needs experts plus the shared expert in every layer, and takes
d_k = d_v from one key: other configs are refused. MTP tensors (mtp.*) are not read (llama.cpp's converter
keeps them only for its separate draft head).
"""

from __future__ import annotations

import logging

import torch

from ..blocks import Branch, GatedMLP, LayerSpec, MoE, Norm
from ..blocks.deltanet import (SSM_A_LOG, SSM_BA, SSM_CONV1D, SSM_DT, SSM_IN, SSM_NORM, SSM_OUT, GatedAttention,
                               GatedDeltaNet, delta_dims)
from ..errors import BadInput
from ..graph import (ATTN_K, ATTN_K_NORM, ATTN_NORM, ATTN_OUT, ATTN_Q, ATTN_Q_NORM, ATTN_V, FFN_GATE_INP_SHEXP,
                     FFN_NORM, HParams, LazyTensor, blk, parse_name)
from . import hf_moe
from .base import gguf_get, lazy, need
from .glm4moe import partial_rotary_factor
from .hf_decoder import cfg_get, decoder_config, decoder_hparams
from .registry import register

log = logging.getLogger("quantkit")

LAYOUT = hf_moe.ExpertLayout()
SHARED = "shared_expert_ffn_size"  # hp.extra keys
LINEAR = "linear_layers"
INTERVAL = "full_attention_interval"
DIMS = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
        "linear_conv_kernel_dim")
_SHEXP = {"gate_proj": "ffn_gate_shexp", "up_proj": "ffn_up_shexp", "down_proj": "ffn_down_shexp"}
_LINEAR_HF = {"in_proj_qkvz.weight": blk(0, SSM_IN), "in_proj_ba.weight": blk(0, SSM_BA),
              "dt_bias": blk(0, SSM_DT, "bias"), "A_log": blk(0, SSM_A_LOG), "norm.weight": blk(0, SSM_NORM),
              "out_proj.weight": blk(0, SSM_OUT)}
_ATTN_SUFFIXES = (ATTN_Q, ATTN_K, ATTN_V, ATTN_OUT, ATTN_Q_NORM, ATTN_K_NORM)
ATTN_QKV, ATTN_GATE = "attn_qkv", "attn_gate"  # llama.cpp's split of in_proj_qkvz


def linear_layers(cfg: dict, n: int) -> list[int]:
    types = cfg.get("layer_types")
    if types is None:
        every = int(cfg_get(cfg, INTERVAL, 4))
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)]
    if len(types) != n:
        raise BadInput(f"config.json: layer_types has {len(types)} entries for {n} layers")
    bad = sorted(set(types) - {"linear_attention", "full_attention"})
    if bad:
        raise BadInput(f"config.json: layer_types {bad} (expected linear_attention / full_attention)")
    return [i for i, t in enumerate(types) if t == "linear_attention"]


def qkvz_order(hp: HParams) -> torch.Tensor:
    """Row indices of in_proj_qkvz (HF: [q, k, v, z] per key head) in llama.cpp's order (all q, all k, all v,
    then all z)."""
    nk, nv, dk, dv, _ = delta_dims(hp)
    r = nv // nk
    per = 2 * dk + 2 * r * dv
    parts = []
    for off, size in ((0, dk), (dk, dk), (2 * dk, r * dv), (2 * dk + r * dv, r * dv)):
        parts += [g * per + off + torch.arange(size) for g in range(nk)]
    return torch.cat(parts)


def _join(qkv: torch.Tensor, gate: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    return torch.cat([qkv, gate.to(qkv.dtype)])[inv].contiguous()


def _is_plus_one_norm(name: str) -> bool:
    suffix = parse_name(name)[1]
    return suffix.endswith("norm") and suffix != SSM_NORM


@register
class Qwen3Next(hf_moe.PerExpertFamily):
    hf_layout = LAYOUT
    arch = "qwen3next"
    hf_architectures = ("Qwen3NextForCausalLM",)
    hf_model_type = "qwen3_next"
    gguf_arch = "qwen3next"
    gguf_renames = {FFN_NORM: "post_attention_norm"}
    gguf_plan_derived = True  # k-quant presets type attn_qkv / attn_gate as llama-quantize does

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        if i in hp.extra[LINEAR]:
            mixer = GatedDeltaNet()
        else:
            mixer = GatedAttention(bias=hp.attn_bias, out_bias=hp.attn_out_bias, qk_norm="head",
                                   qk_norm_kind="rms1p")
        ffn = MoE(shared_size=hp.extra[SHARED], shared_gate=True) if hp.is_moe(i) else GatedMLP(hp.act)
        return LayerSpec([Branch(mixer, Norm(ATTN_NORM, "rms1p")), Branch(ffn, Norm(FFN_NORM, "rms1p"))])

    # ------------------------------------------------------------------ HF
    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        hp = decoder_hparams(cfg, cls.arch, norm="rms1p", qk_norm=True, mlp_bias=False)
        partial = partial_rotary_factor(cfg, 0.25)
        rot = int(hp.head_dim * partial)
        hp.rope_dim = rot if rot != hp.head_dim else None
        hp.n_experts = int(cfg_get(cfg, "num_experts", 0))
        if hp.n_experts:
            hp.n_experts_used = int(cfg_get(cfg, "num_experts_per_tok", required=True))
            hp.expert_ffn_size = int(cfg_get(cfg, "moe_intermediate_size", required=True))
            hp.moe_layers = hf_moe.moe_layers(cfg, hp.n_layers)
        hp.norm_topk_prob = bool(cfg_get(cfg, "norm_topk_prob", True))
        hp.extra = {**hp.extra, SHARED: int(cfg_get(cfg, "shared_expert_intermediate_size", 0)),
                    LINEAR: linear_layers(cfg, hp.n_layers), INTERVAL: int(cfg_get(cfg, INTERVAL, 4)),
                    **{k: int(cfg_get(cfg, k, required=True)) for k in DIMS}}
        nk, nv = hp.extra["linear_num_key_heads"], hp.extra["linear_num_value_heads"]
        if nv % nk:
            raise BadInput(f"config.json: linear_num_value_heads {nv} is not a multiple of linear_num_key_heads {nk}")
        if hp.n_experts and not hp.extra[SHARED]:
            raise BadInput("config.json: shared_expert_intermediate_size is 0 (Qwen3-Next's MoE has a shared expert)")
        return hp

    @classmethod
    def hf_name_map(cls, hp: HParams) -> dict[str, str]:
        m = super().hf_name_map(hp)
        lin = set(hp.extra[LINEAR])
        m = {h: c for h, c in m.items() if not (parse_name(c)[0] in lin and parse_name(c)[1] in _ATTN_SUFFIXES)}
        for i in range(hp.n_layers):
            p = f"model.layers.{i}."
            if i in lin:
                for hf, c in _LINEAR_HF.items():
                    _, suffix, kind = parse_name(c)
                    m[f"{p}linear_attn.{hf}"] = blk(i, suffix, kind)
            if hp.is_moe(i):
                for hf, c in _SHEXP.items():
                    m[f"{p}mlp.shared_expert.{hf}.weight"] = blk(i, c)
        return m

    @classmethod
    def hf_tensors(cls, hp, src, source):
        out = super().hf_tensors(hp, src, source)
        mtp = sorted({n.split(".")[0] for n in src if n.startswith("mtp.")})
        if mtp:
            log.info("qwen3next: MTP tensors (mtp.*) not read: the decoder does not use them")
        conv_dim = delta_dims(hp)[0] * delta_dims(hp)[2] * 2 + delta_dims(hp)[1] * delta_dims(hp)[3]
        for i in range(hp.n_layers):
            if i in hp.extra[LINEAR]:
                out[blk(i, SSM_CONV1D)] = lazy(need(src, f"model.layers.{i}.linear_attn.conv1d.weight", source),
                                               lambda w: w.reshape(w.shape[0], -1),
                                               (conv_dim, hp.extra["linear_conv_kernel_dim"]))
            if hp.is_moe(i):
                out[blk(i, FFN_GATE_INP_SHEXP)] = lazy(need(src, f"model.layers.{i}.mlp.shared_expert_gate.weight",
                                                            source), lambda w: w.reshape(-1), (hp.hidden_size,))
        return out

    @classmethod
    def hf_export(cls, hp: HParams):
        out = super().hf_export(hp)
        for i in range(hp.n_layers):
            if i in hp.extra[LINEAR]:
                out.append((f"model.layers.{i}.linear_attn.conv1d.weight", (blk(i, SSM_CONV1D),),
                            lambda w: w.unsqueeze(1)))
            if hp.is_moe(i):
                out.append((f"model.layers.{i}.mlp.shared_expert_gate.weight", (blk(i, FFN_GATE_INP_SHEXP),),
                            lambda w: w.reshape(1, -1)))
        return out

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        x = hp.extra
        lin = set(x[LINEAR])
        cfg = decoder_config(
            hp, "Qwen3NextForCausalLM", "qwen3_next", num_experts=hp.n_experts,
            num_experts_per_tok=hp.n_experts_used, moe_intermediate_size=hp.expert_ffn_size,
            shared_expert_intermediate_size=x[SHARED], norm_topk_prob=hp.norm_topk_prob, decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(hp.n_layers) if not hp.is_moe(i)], attention_bias=hp.attn_bias,
            layer_types=["linear_attention" if i in lin else "full_attention" for i in range(hp.n_layers)],
            full_attention_interval=x[INTERVAL], partial_rotary_factor=hp.rotary_dim / hp.head_dim,
            **{k: x[k] for k in DIMS})
        if cfg.get("rope_scaling") is None:  # transformers 5 reads the partial factor from rope_parameters
            cfg.pop("rope_scaling", None)
            cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": hp.rope_theta,
                                      "partial_rotary_factor": hp.rotary_dim / hp.head_dim}
        return cfg

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def gguf_kv(cls, hp: HParams):
        from gguf import GGUFValueType as VT
        nk, nv, dk, dv, kern = delta_dims(hp)
        problems = []
        if not hp.norm_topk_prob:
            problems.append("norm_topk_prob=False (llama.cpp's qwen3next graph always renormalises the top-k "
                            "weights)")
        if not hp.n_experts or hp.moe_layers is not None:
            problems.append("dense layers (llama.cpp's qwen3next needs experts and a shared expert in every layer)")
        if dk != dv:
            problems.append(f"linear_key_head_dim {dk} != linear_value_head_dim {dv} (llama.cpp's qwen3next "
                            "takes both from ssm.state_size)")
        if hp.attn_bias or hp.attn_out_bias:
            problems.append("attention biases (llama.cpp's qwen3next graph adds none)")
        hf_moe.refuse(cls.gguf_arch, problems)
        if abs(hp.norm_eps - 1e-6) > 1e-12:
            log.warning("qwen3next: llama.cpp l2-normalises DeltaNet q/k with eps %g, transformers with 1e-6",
                        hp.norm_eps)
        a = cls.gguf_arch
        lin = set(hp.extra[LINEAR])
        return super().gguf_kv(hp) + [
            (f"{a}.expert_shared_feed_forward_length", hp.extra[SHARED], VT.UINT32),
            (f"{a}.ssm.conv_kernel", kern, VT.UINT32), (f"{a}.ssm.state_size", dk, VT.UINT32),
            (f"{a}.ssm.group_count", nk, VT.UINT32), (f"{a}.ssm.time_step_rank", nv, VT.UINT32),
            (f"{a}.ssm.inner_size", dv * nv, VT.UINT32),
            (f"{a}.attention.recurrent_layers", [i in lin for i in range(hp.n_layers)], [VT.ARRAY, VT.BOOL]),
            (f"{a}.full_attention_interval", hp.extra[INTERVAL], VT.UINT32),
        ]

    @classmethod
    def hparams_from_gguf(cls, kv: dict, path: str, names: set[str]) -> HParams:
        a = kv["general.architecture"]
        hp = super().hparams_from_gguf(kv, path, names)
        hp.norm, hp.qk_norm, hp.norm_topk_prob = "rms1p", True, True  # what llama.cpp computes
        dk = int(gguf_get(kv, f"{a}.ssm.state_size", path))
        nv = int(gguf_get(kv, f"{a}.ssm.time_step_rank", path))
        interval = int(kv.get(f"{a}.full_attention_interval", 4))
        rec = kv.get(f"{a}.attention.recurrent_layers")
        if rec is None:
            rec = [(i + 1) % interval != 0 for i in range(hp.n_layers)]
        elif len(rec) < hp.n_layers:
            raise BadInput(f"{path}: {a}.attention.recurrent_layers has {len(rec)} entries for {hp.n_layers} layers")
        hp.extra = {**hp.extra, SHARED: int(gguf_get(kv, f"{a}.expert_shared_feed_forward_length", path)),
                    LINEAR: [i for i in range(hp.n_layers) if rec[i]], INTERVAL: interval,
                    "linear_num_key_heads": int(gguf_get(kv, f"{a}.ssm.group_count", path)),
                    "linear_num_value_heads": nv, "linear_key_head_dim": dk,
                    "linear_value_head_dim": int(gguf_get(kv, f"{a}.ssm.inner_size", path)) // nv,
                    "linear_conv_kernel_dim": int(gguf_get(kv, f"{a}.ssm.conv_kernel", path))}
        return hp

    @classmethod
    def gguf_tensor_name(cls, name: str) -> str:
        i, suffix, _ = parse_name(name)
        if suffix == SSM_A_LOG:
            return f"blk.{i}.ssm_a"  # llama.cpp's name has no .weight
        return super().gguf_tensor_name(name)

    @classmethod
    def canonical_tensor_name(cls, name: str) -> str:
        if name.startswith("blk.") and name.endswith(".ssm_a"):
            return name[: -len("ssm_a")] + f"{SSM_A_LOG}.weight"
        return super().canonical_tensor_name(name)

    @classmethod
    def gguf_transform(cls, name):
        if parse_name(name)[1] == SSM_A_LOG:
            return lambda w: -torch.exp(w.float())
        return (lambda w: w.float() + 1.0) if _is_plus_one_norm(name) else None

    @classmethod
    def gguf_untransform(cls, name):
        if parse_name(name)[1] == SSM_A_LOG:
            return lambda w: torch.log(-w.float())
        return (lambda w: w.float() - 1.0) if _is_plus_one_norm(name) else None

    @classmethod
    def gguf_tensors(cls, hp: HParams, name: str):
        i, suffix, _ = parse_name(name)
        if suffix != SSM_IN:
            return None
        nk, nv, dk, dv, _ = delta_dims(hp)
        order, n_qkv = qkvz_order(hp), 2 * nk * dk + nv * dv
        return [(f"blk.{i}.{ATTN_QKV}.weight", (n_qkv, hp.hidden_size), lambda w: w[order[:n_qkv]].contiguous(), True),
                (f"blk.{i}.{ATTN_GATE}.weight", (nv * dv, hp.hidden_size), lambda w: w[order[n_qkv:]].contiguous(),
                 True)]

    @classmethod
    def from_gguf_tensors(cls, hp: HParams, tensors: dict[str, LazyTensor], path: str) -> dict[str, LazyTensor]:
        out = dict(tensors)
        inv = torch.argsort(qkvz_order(hp))
        for i in hp.extra[LINEAR]:
            qkv, gate = f"blk.{i}.{ATTN_QKV}.weight", f"blk.{i}.{ATTN_GATE}.weight"
            if qkv in out and gate in out:
                a, b = out.pop(qkv), out.pop(gate)
                out[blk(i, SSM_IN)] = LazyTensor((a.shape[0] + b.shape[0], a.shape[1]), a.dtype,
                                                 lambda a=a, b=b: _join(a.load(), b.load(), inv),
                                                 source=f"{a.source} + {b.source}")
            elif blk(i, SSM_IN) not in out:  # older files hold the fused ssm_in in HF order
                raise BadInput(f"{path}: qwen3next layer {i} has neither attn_qkv/attn_gate nor ssm_in")
        return out
