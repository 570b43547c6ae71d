"""Llama 4 text (Llama4ForCausalLM with Llama4TextConfig: Scout, Maverick's language model).

Layers: RMSNorm -> GQA attention, RMSNorm -> a dense SwiGLU (intermediate_size_mlp) or, on `moe_layers`
(every `interleave_moe_layer_step`-th layer), MoE: a router whose top-k logits (top-1 in the released models)
go through a sigmoid and scale the expert's INPUT, plus a shared expert (intermediate_size, like each expert).
HF stores the experts fused (feed_forward.experts.gate_up_proj [E, d, 2f], down_proj [E, f, d]): read as the
canonical stacked [E, f, d] / [E, d, f] tensors and written back fused.
Attention: RoPE on every layer but the `no_rope_layers` zeros (every fourth layer: NoPE), which instead scale
q by log1p(floor((p + 1) / floor_scale)) * attn_scale + 1 at position p (attn_temperature_tuning); the RoPE
layers attend within chunks of `attention_chunk_size` (layer_types "chunked_attention") and L2-normalise q/k
per head (use_qk_norm). HF rotates adjacent pairs (complex RoPE): q/k rows are reordered to the canonical
rotate-half layout on load and back on export (and GGUF holds HF's order, as llama.cpp's llama4 rotates pairs).
GGUF: llama.cpp's "llama4" fixes the chunk (8192), the temperature floor (8192) and scale (0.1), NoPE on
every fourth layer, q/k norm for every expert count but 128, MoE layers by interleave_moe_layer_step: configs
that differ are refused. A config without chunking is written with sliding_window 0 (llama.cpp: RoPE on every
layer, no chunks), so it must have no NoPE layer.
"""

from __future__ import annotations

from ..blocks import Attention, Branch, GatedMLP, LayerSpec, MoE, Norm
from ..errors import BadInput, UnsupportedArchitecture
from ..formats.gguf_arch import permute_qk, unpermute_qk
from ..graph import (ATTN_K, ATTN_NORM, ATTN_Q, FFN_DOWN_EXPS, FFN_DOWN_SHEXP, FFN_GATE_EXPS, FFN_GATE_SHEXP,
                     FFN_NORM, FFN_ROUTER, FFN_UP_EXPS, FFN_UP_SHEXP, HParams, blk)
from .base import ExpertModule, Family, by_layer, gguf_get, lazy, need, stack_experts
from .hf_decoder import cfg_get, decoder_config, decoder_hparams, decoder_name_map
from .hf_moe import refuse
from .registry import register

SHARED = {"gate_proj": FFN_GATE_SHEXP, "up_proj": FFN_UP_SHEXP, "down_proj": FFN_DOWN_SHEXP}
LLAMACPP_CHUNK = LLAMACPP_FLOOR = 8192  # what llama.cpp's llama4 uses whatever the file says
LLAMACPP_TEMP_SCALE = 0.1
NOPE_PERIOD = 4


def nope_layers(hp: HParams) -> list[int]:
    return hp.extra.get("nope_layers", [])


def chunked(hp: HParams, i: int) -> bool:
    return hp.extra.get("chunk") is not None and i in hp.extra.get("chunked_layers", [])


@register
class Llama4(Family):
    arch = "llama4"
    hf_architectures = ("Llama4ForCausalLM",)
    hf_model_type = "llama4_text"
    gguf_arch = "llama4"
    gguf_permute_qk = True  # canonical rotate-half rows -> the adjacent pairs llama.cpp (and HF) rotate

    @classmethod
    def layer(cls, hp: HParams, i: int) -> LayerSpec:
        x = hp.extra
        rope = i not in nope_layers(hp)
        temp = (x["floor_scale"], x["attn_scale"]) if not rope and x.get("temperature_tuning") else None
        attn = Attention(bias=hp.attn_bias, out_bias=hp.attn_out_bias, rope=rope,
                         qk_norm="l2" if hp.qk_norm and rope else None,
                         chunk=x["chunk"] if chunked(hp, i) else None, temperature=temp)
        if hp.is_moe(i):
            ffn = MoE(router="sigmoid", norm_topk=False, shared_size=hp.expert_ffn_size, weight_input=True)
        else:
            ffn = GatedMLP(hp.act)
        return LayerSpec([Branch(attn, Norm(ATTN_NORM)), Branch(ffn, Norm(FFN_NORM))])

    # ------------------------------------------------------------------ HF
    @classmethod
    def hparams_from_hf(cls, cfg: dict) -> HParams:
        if "text_config" in cfg and "hidden_size" not in cfg:
            raise UnsupportedArchitecture("config.json: a Llama4ForConditionalGeneration config (text_config); "
                                          "only the text model (Llama4ForCausalLM) is supported")
        hp = decoder_hparams(cfg, cls.arch, qk_norm=bool(cfg_get(cfg, "use_qk_norm", True)), mlp_bias=False)
        n = hp.n_layers
        hp.head_dim = int(cfg_get(cfg, "head_dim", hp.hidden_size // hp.n_heads))
        hp.ffn_size = int(cfg_get(cfg, "intermediate_size_mlp", required=True))  # the dense layers'
        hp.n_experts = int(cfg_get(cfg, "num_local_experts", required=True))
        hp.n_experts_used = int(cfg_get(cfg, "num_experts_per_tok", 1))
        hp.expert_ffn_size = int(cfg_get(cfg, "intermediate_size", required=True))
        hp.n_shared_experts = 1
        hp.norm_topk_prob = False
        step = int(cfg_get(cfg, "interleave_moe_layer_step", 1))
        moe = cfg.get("moe_layers")
        hp.moe_layers = sorted(int(i) for i in moe) if moe is not None else list(range(step - 1, n, step))
        interval = int(cfg_get(cfg, "no_rope_layer_interval", NOPE_PERIOD))
        use_rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
        if len(use_rope) != n:
            raise BadInput(f"config.json: no_rope_layers has {len(use_rope)} entries for {n} layers")
        chunk = cfg.get("attention_chunk_size")
        types = cfg.get("layer_types") or ["chunked_attention" if r and chunk is not None else "full_attention"
                                           for r in use_rope]
        if len(types) != n:
            raise BadInput(f"config.json: layer_types has {len(types)} entries for {n} layers")
        hp.extra = {**hp.extra, "interleave_moe_layer_step": step,
                    "nope_layers": [i for i, r in enumerate(use_rope) if not r],
                    "chunk": int(chunk) if chunk is not None else None,
                    "chunked_layers": [i for i, t in enumerate(types) if t == "chunked_attention"],
                    "temperature_tuning": bool(cfg_get(cfg, "attn_temperature_tuning", True)),
                    "floor_scale": int(cfg_get(cfg, "floor_scale", LLAMACPP_FLOOR)),  # transformers: an int
                    "attn_scale": float(cfg_get(cfg, "attn_scale", LLAMACPP_TEMP_SCALE))}
        return hp

    @classmethod
    def hf_name_map(cls, hp: HParams) -> dict[str, str]:
        import dataclasses
        m = {}
        for h, c in decoder_name_map(dataclasses.replace(hp, qk_norm=False)).items():  # q/k norms: no weights
            m[h.replace(".mlp.", ".feed_forward.")] = c
        for i in range(hp.n_layers):
            if hp.is_moe(i):
                p = f"model.layers.{i}.feed_forward."
                for k in ("gate_proj", "up_proj", "down_proj"):
                    del m[f"{p}{k}.weight"]
                m[p + "router.weight"] = blk(i, FFN_ROUTER)
                m.update({f"{p}shared_expert.{h}.weight": blk(i, c) for h, c in SHARED.items()})
        return by_layer(m)

    @classmethod
    def hf_tensors(cls, hp, src, source):
        out = {}
        for h, c in cls.hf_name_map(hp).items():
            t = need(src, h, source)
            if c in {blk(i, s) for i in range(hp.n_layers) for s in (ATTN_Q, ATTN_K)}:
                heads = hp.n_heads if ".attn_q." in c else hp.n_kv_heads
                t = lazy(t, lambda w, h=heads: unpermute_qk(w, h), t.shape)  # pairs -> rotate-half
            out[c] = t
        e, f, d = hp.n_experts, hp.expert_ffn_size, hp.hidden_size
        for i in hp.moe_layers:
            p = f"model.layers.{i}.feed_forward.experts."
            if p + "gate_up_proj" not in src and p + "0.gate_proj.weight" in src:  # per expert: a quantized checkpoint
                for c, h, shape in ((FFN_GATE_EXPS, "gate_proj", (e, f, d)), (FFN_UP_EXPS, "up_proj", (e, f, d)),
                                    (FFN_DOWN_EXPS, "down_proj", (e, d, f))):
                    out[blk(i, c)] = stack_experts([need(src, f"{p}{x}.{h}.weight", source) for x in range(e)],
                                                   shape, source)
                continue
            gu, down = need(src, p + "gate_up_proj", source), need(src, p + "down_proj", source)
            if gu.shape != (e, d, 2 * f) or down.shape != (e, f, d):
                raise BadInput(f"{source}: layer {i} experts: gate_up_proj {gu.shape} / down_proj {down.shape}, "
                               f"expected {(e, d, 2 * f)} / {(e, f, d)}")
            out[blk(i, FFN_GATE_EXPS)] = lazy(gu, lambda w: w[:, :, :f].transpose(1, 2).contiguous(), (e, f, d))
            out[blk(i, FFN_UP_EXPS)] = lazy(gu, lambda w: w[:, :, f:].transpose(1, 2).contiguous(), (e, f, d))
            out[blk(i, FFN_DOWN_EXPS)] = lazy(down, lambda w: w.transpose(1, 2).contiguous(), (e, d, f))
        return out

    @classmethod
    def hf_export(cls, hp: HParams):
        import torch
        out = []
        for h, c in cls.hf_name_map(hp).items():
            if c.endswith((f".{ATTN_Q}.weight", f".{ATTN_K}.weight")):
                heads = hp.n_heads if f".{ATTN_Q}." in c else hp.n_kv_heads
                out.append((h, (c,), lambda w, h=heads: permute_qk(w, h)))
            else:
                out.append((h, (c,), None))
        for i in hp.moe_layers:
            p = f"model.layers.{i}.feed_forward.experts."
            out.append((p + "gate_up_proj", (blk(i, FFN_GATE_EXPS), blk(i, FFN_UP_EXPS)),
                        lambda g, u: torch.cat([g, u], dim=1).transpose(1, 2).contiguous()))
            out.append((p + "down_proj", (blk(i, FFN_DOWN_EXPS),), lambda w: w.transpose(1, 2).contiguous()))
        return out

    @classmethod
    def hf_quantized_experts(cls, hp: HParams, fmt: str):
        """HF keeps the experts fused (gate_up_proj [E, d, 2f]); quantized checkpoints hold one module per expert,
        `feed_forward.experts.{e}.gate_proj|up_proj|down_proj`, as llm-compressor unfuses them before quantizing
        (its SequentialLlama4TextMoe) and vLLM's Llama 4 loader maps them, for AWQ GEMM too (AutoAWQ's own llama4
        model instead concatenates all experts along the input of one linear; that layout is not written)."""
        projs = (("gate_proj", FFN_GATE_EXPS), ("up_proj", FFN_UP_EXPS), ("down_proj", FFN_DOWN_EXPS))
        return [ExpertModule(f"model.layers.{i}.feed_forward.experts.{e}.{h}", (blk(i, s),), e)
                for i in hp.moe_layers for e in range(hp.n_experts) for h, s in projs]

    @classmethod
    def hf_config(cls, hp: HParams) -> dict:
        x, n = hp.extra, hp.n_layers
        return decoder_config(
            hp, "Llama4ForCausalLM", "llama4_text", intermediate_size=hp.expert_ffn_size,
            intermediate_size_mlp=hp.ffn_size, num_local_experts=hp.n_experts,
            num_experts_per_tok=hp.n_experts_used, moe_layers=list(hp.moe_layers),
            interleave_moe_layer_step=x.get("interleave_moe_layer_step", 1), use_qk_norm=hp.qk_norm,
            no_rope_layers=[int(i not in nope_layers(hp)) for i in range(n)],
            attention_chunk_size=x.get("chunk"),
            layer_types=["chunked_attention" if chunked(hp, i) else "full_attention" for i in range(n)],
            attn_temperature_tuning=x.get("temperature_tuning", True), floor_scale=int(x["floor_scale"]),
            attn_scale=x.get("attn_scale"), attention_bias=hp.attn_bias)

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def gguf_kv(cls, hp: HParams):
        from gguf import GGUFValueType as VT
        x, a, n = hp.extra, cls.gguf_arch, hp.n_layers
        step = x.get("interleave_moe_layer_step", 1)
        nope = nope_layers(hp)
        problems = []
        if hp.moe_layers != list(range(step - 1, n, step)):
            problems.append(f"MoE layers {hp.moe_layers} (llama.cpp: every {step}-th layer)")
        if hp.qk_norm != (hp.n_experts != 128):
            problems.append(f"use_qk_norm={hp.qk_norm} with {hp.n_experts} experts (llama.cpp normalises q/k "
                            "for every expert count but 128)")
        if hp.attn_bias or hp.attn_out_bias:
            problems.append("attention biases (llama.cpp's llama4 graph has none)")
        if hp.rotary_dim != hp.head_dim:
            problems.append("partial rotary (llama.cpp's llama4 rotates the whole head)")
        if x.get("chunk") is None:
            if nope:
                problems.append(f"NoPE layers {nope} without chunked attention (llama.cpp then applies RoPE to "
                                "every layer)")
        else:
            if x["chunk"] != LLAMACPP_CHUNK:
                problems.append(f"attention_chunk_size {x['chunk']} (llama.cpp uses {LLAMACPP_CHUNK})")
            if nope != [i for i in range(n) if (i + 1) % NOPE_PERIOD == 0]:
                problems.append(f"NoPE layers {nope} (llama.cpp: every {NOPE_PERIOD}th layer)")
            if x.get("chunked_layers") != [i for i in range(n) if i not in nope]:
                problems.append(f"chunked layers {x.get('chunked_layers')} (llama.cpp: the RoPE layers)")
            if nope and not x.get("temperature_tuning", True):
                problems.append("attn_temperature_tuning=False (llama.cpp always tunes the NoPE layers)")
            if nope and x.get("temperature_tuning", True) and (x["floor_scale"], x["attn_scale"]) != \
                    (LLAMACPP_FLOOR, LLAMACPP_TEMP_SCALE):
                problems.append(f"floor_scale {x['floor_scale']:g} / attn_scale {x['attn_scale']:g} (llama.cpp "
                                f"uses {LLAMACPP_FLOOR} / {LLAMACPP_TEMP_SCALE})")
        refuse(a, problems)
        kv = super().gguf_kv(hp) + [(f"{a}.interleave_moe_layer_step", step, VT.UINT32)]
        if x.get("chunk") is None:
            kv.append((f"{a}.attention.sliding_window", 0, VT.UINT32))
        return kv

    @classmethod
    def hparams_from_gguf(cls, kv: dict, path: str, names: set[str]) -> HParams:
        a = kv["general.architecture"]
        hp = super().hparams_from_gguf(kv, path, names)
        n = hp.n_layers
        if not hp.n_experts:
            raise BadInput(f"{path}: GGUF metadata key '{a}.expert_count' is missing")
        step = int(gguf_get(kv, f"{a}.interleave_moe_layer_step", path))
        hp.moe_layers = list(range(step - 1, n, step)) if step > 0 else []
        hp.n_shared_experts, hp.norm_topk_prob = 1, False
        hp.qk_norm = hp.n_experts != 128  # what llama.cpp computes
        no_chunks = int(kv.get(f"{a}.attention.sliding_window", -1)) == 0
        if no_chunks:
            nope, chunked_layers = [], []
        else:
            pat = kv.get(f"{a}.attention.sliding_window_pattern")
            chunked_layers = ([i for i in range(n) if pat[i]] if isinstance(pat, (list, tuple))
                              else [i for i in range(n) if i % NOPE_PERIOD < NOPE_PERIOD - 1])
            nope = [i for i in range(n) if (i + 1) % NOPE_PERIOD == 0]
        hp.extra = {**hp.extra, "interleave_moe_layer_step": step, "nope_layers": nope,
                    "chunk": None if no_chunks else LLAMACPP_CHUNK, "chunked_layers": chunked_layers,
                    "temperature_tuning": True, "floor_scale": LLAMACPP_FLOOR,
                    "attn_scale": LLAMACPP_TEMP_SCALE}
        return hp
