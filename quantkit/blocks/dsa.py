"""DeepSeek Sparse Attention (DeepSeek V3.2): MLA whose causal mask is narrowed, per query, to the
`index_topk` keys a lightning indexer scores highest.

Indexer (as transformers' DeepseekV32Indexer; canonical names are llama.cpp's): q = attn_q_b(q_a_norm
output) [H_i, D_i], k = LayerNorm(attn_k(x)) [D_i] (one key per token), both rotated on their first
qk_rope dims (rotate-half); score[t, s] = sum_h proj(x_t)_h H_i^-0.5 relu(q_h . k_s D_i^-0.5); the top
`index_topk` causal keys are kept. With seq_len <= index_topk every causal key is kept (plain MLA).
attn_q_b and attn_k are linears (GPTQ / imatrix reach them, as DeepSeek's FP8 release quantizes them);
the head weights `proj` and the key norm stay float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import ATTN_OUT
from ..runtime.rope import apply_rope
from .mla import ATTN_KV_A_MQA, ATTN_KV_B, ATTN_Q_A, ATTN_Q_B, MLA, MLAModule

IDX_Q_B, IDX_K, IDX_K_NORM, IDX_PROJ = "indexer.attn_q_b", "indexer.attn_k", "indexer.k_norm", "indexer.proj"


def indexer_dims(hp) -> tuple[int, int, int]:
    x = hp.extra
    return int(x["index_n_heads"]), int(x["index_head_dim"]), int(x["index_topk"])


class IndexedMLA(MLA):
    def __init__(self):
        super().__init__(q_lora=True)  # the indexer reads the q_a_norm output

    def tensors(self, hp, layer):
        h, d, _ = indexer_dims(hp)
        qr = int(hp.extra["q_lora_rank"])
        return {**super().tensors(hp, layer), f"{IDX_Q_B}.weight": (h * d, qr), f"{IDX_K}.weight": (d, hp.hidden_size),
                f"{IDX_K_NORM}.weight": (d,), f"{IDX_K_NORM}.bias": (d,), f"{IDX_PROJ}.weight": (h, hp.hidden_size)}

    def linears(self):
        return (ATTN_Q_A, ATTN_KV_A_MQA, IDX_K, ATTN_Q_B, IDX_Q_B, ATTN_KV_B, ATTN_OUT)

    def input_groups(self):
        return ((ATTN_Q_A, ATTN_KV_A_MQA, IDX_K), (ATTN_Q_B, IDX_Q_B)) + super().input_groups()[2:]

    def scale_groups(self, hp, layer, prev_norm):
        return []  # the indexer's float head weights read the block input too: no norm folding here

    def build(self, hp, layer, get, has):
        return IndexedMLAModule(hp, self, get)


class IndexedMLAModule(MLAModule):
    def __init__(self, hp, spec, get):
        super().__init__(hp, spec, get)
        self.n_idx, self.d_idx, self.topk = indexer_dims(hp)
        self.idx_q = get(IDX_Q_B, linear=True)
        self.idx_k = get(IDX_K, linear=True)
        self.idx_norm_w = nn.Parameter(get(IDX_K_NORM), requires_grad=False)
        self.idx_norm_b = nn.Parameter(get(IDX_K_NORM, "bias"), requires_grad=False)
        self.idx_proj = nn.Parameter(get(IDX_PROJ), requires_grad=False)

    def linears(self):
        lin = super().linears()
        return {ATTN_Q_A: lin[ATTN_Q_A], ATTN_KV_A_MQA: lin[ATTN_KV_A_MQA], IDX_K: self.idx_k, ATTN_Q_B: lin[ATTN_Q_B],
                IDX_Q_B: self.idx_q, **{k: v for k, v in lin.items() if k not in (ATTN_Q_A, ATTN_KV_A_MQA, ATTN_Q_B)}}

    def keep(self, x, q_resid, cos, sin) -> torch.Tensor | None:
        """[B, 1, T, T] bool: the keys each query attends to (None: all causal keys)."""
        b, t, _ = x.shape
        if t <= self.topk:
            return None
        h, d, r = self.n_idx, self.d_idx, self.rope
        q = self.idx_q(q_resid).view(b, t, h, d).transpose(1, 2)
        k = F.layer_norm(self.idx_k(x), (d,), self.idx_norm_w, self.idx_norm_b, 1e-6)[:, None]
        q = torch.cat([apply_rope(q[..., :r], cos, sin), q[..., r:]], dim=-1)
        k = torch.cat([apply_rope(k[..., :r], cos, sin), k[..., r:]], dim=-1)
        scores = F.relu((q.float() @ k.float().transpose(-1, -2)) * d ** -0.5)  # [B, H, T, T]
        w = (x.to(self.idx_proj.dtype) @ self.idx_proj.T).float() * h ** -0.5  # [B, T, H]
        index = torch.einsum("bth,bhts->bts", w, scores)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        index = index.masked_fill(~causal, float("-inf"))
        chosen = torch.zeros(b, t, t, dtype=torch.bool, device=x.device)
        chosen.scatter_(-1, index.topk(self.topk, dim=-1).indices, True)
        return (chosen & causal)[:, None]

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        h = self.hp.n_heads
        q_resid = self.q_a_norm(self.q_a(x))
        q = self.q_b(q_resid).view(b, t, h, self.nope + self.rope).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a(x).split([self.kv_rank, self.rope], dim=-1)
        kv = self.kv_b(self.kv_a_norm(latent)).view(b, t, h, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q_pe = self._rope(q_pe, cos, sin)
        k_pe = self._rope(k_pe.view(b, 1, t, self.rope), cos, sin).expand(b, h, t, self.rope)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe], dim=-1)
        keep = self.keep(x, q_resid, cos, sin)
        if keep is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=self.scale)
        return self.o(y.transpose(1, 2).reshape(b, t, h * self.v_dim))
