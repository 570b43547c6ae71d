"""compressed-tensors "pack-quantized" layout (int weight-only, e.g. W4A16 / W8A16) for vLLM
and transformers. Per linear layer `<prefix>.`:

    weight_packed      int32 [out, ceil(in*bits/32)]   codes, dense LSB-first along the input dim
    weight_scale       [out, n_groups]                 (fp16/bf16/fp32; dequant runs in this dtype)
    weight_zero_point  int32 [ceil(out*bits/32), n_groups]  asym only, packed along the output dim
    weight_shape       int64 [2] = (out, in)

compressed-tensors keeps levels signed (code - 2^(bits-1)) and adds the offset back when
packing, so the packed words hold our unsigned codes/zeros unchanged. Its group strategy
needs in % group_size == 0 and has no per-column g_idx (actorder "group" was removed), so
only contiguous groups are written; act-order with static groups is declared actorder "weight".
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.gptq_layout import pack_bits, unpack_bits
from quantkit.quant.grid import QuantizedLinear, contiguous_g_idx, n_groups_for

CT_BITS = (2, 3, 4, 8)
# compressed-tensors release this layout and config were checked against (informational field)
CT_VERSION = "0.20.1"
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_layout(ql: QuantizedLinear, name: str) -> None:
    if ql.bits not in CT_BITS:
        raise QuantkitError(f"{name}: {ql.bits}-bit is not supported for pack-quantized; expected one of {CT_BITS}")
    if ql.group_size != -1 and ql.in_features % ql.group_size:
        raise QuantkitError(
            f"{name}: in_features={ql.in_features} is not a multiple of group_size={ql.group_size}; "
            "compressed-tensors group quantization needs whole groups (use a dividing group_size or -1)"
        )
    if not ql.has_trivial_g_idx():
        raise QuantkitError(
            f"{name}: act-order regrouped the input columns (g_idx); compressed-tensors has no g_idx, "
            "quantize with static_groups=True or desc_act=False"
        )
    if ql.sym and not bool((ql.zeros == 2 ** (ql.bits - 1)).all()):
        raise QuantkitError(f"{name}: symmetric layer must have zero-point {2 ** (ql.bits - 1)} everywhere")
    if not ql.sym and (bool((ql.zeros < 0).any()) or bool((ql.zeros > 2**ql.bits - 1).any())):
        raise QuantkitError(f"{name}: zero-points outside [0, {2**ql.bits - 1}]")


def pack_compressed_tensors(
    ql: QuantizedLinear, scale_dtype: torch.dtype | None = None, name: str = "linear"
) -> dict[str, torch.Tensor]:
    """QuantizedLinear -> {weight_packed, weight_scale, [weight_zero_point], weight_shape[, bias]}."""
    _check_layout(ql, name)
    scale_dtype = scale_dtype or ql.scales.dtype
    if scale_dtype not in SCALE_DTYPES:
        raise QuantkitError(f"{name}: scale dtype {scale_dtype}; expected one of {SCALE_DTYPES}")
    scales = ql.scales.to(scale_dtype)
    if not torch.equal(scales.to(ql.scales.dtype), ql.scales):
        raise QuantkitError(
            f"{name}: scales are not exactly representable in {scale_dtype}; quantize with that scale_dtype"
        )
    out = {
        "weight_packed": pack_bits(ql.codes, ql.bits, dim=1),
        "weight_scale": scales.contiguous(),
        "weight_shape": torch.tensor([ql.out_features, ql.in_features], dtype=torch.int64),
    }
    if not ql.sym:
        out["weight_zero_point"] = pack_bits(ql.zeros, ql.bits, dim=0)
    if ql.bias is not None:
        out["bias"] = ql.bias
    return out


def unpack_compressed_tensors(
    tensors: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool, name: str = "linear"
) -> QuantizedLinear:
    """pack-quantized tensors -> QuantizedLinear (group_size -1 = channel strategy)."""
    for key in ("weight_packed", "weight_scale", "weight_shape") + (() if sym else ("weight_zero_point",)):
        if key not in tensors:
            raise QuantkitError(f"{name}: missing compressed-tensors tensor '{key}'")
    if bits not in CT_BITS:
        raise QuantkitError(f"{name}: {bits}-bit is not supported for pack-quantized; expected one of {CT_BITS}")
    packed, scales = tensors["weight_packed"], tensors["weight_scale"]
    out_f, in_f = (int(v) for v in tensors["weight_shape"].tolist())
    n_groups = n_groups_for(in_f, group_size)
    if packed.dtype != torch.int32 or packed.shape != (out_f, -(-in_f * bits // 32)):
        raise QuantkitError(
            f"{name}: weight_packed {packed.dtype} {tuple(packed.shape)} does not fit weight_shape ({out_f}, {in_f})"
        )
    if scales.shape != (out_f, n_groups):
        raise QuantkitError(f"{name}: weight_scale {tuple(scales.shape)}; expected ({out_f}, {n_groups})")
    codes = unpack_bits(packed, bits, in_f, dim=1).to(torch.uint8)
    if sym:
        zeros = torch.full((out_f, n_groups), 2 ** (bits - 1), dtype=torch.int32, device=packed.device)
    else:
        zp = tensors["weight_zero_point"]
        if zp.dtype != torch.int32 or zp.shape != (-(-out_f * bits // 32), n_groups):
            raise QuantkitError(
                f"{name}: weight_zero_point {zp.dtype} {tuple(zp.shape)} does not fit ({out_f}, {n_groups})"
            )
        zeros = unpack_bits(zp, bits, out_f, dim=0)
    return QuantizedLinear(
        codes=codes,
        scales=scales,
        zeros=zeros,
        g_idx=contiguous_g_idx(in_f, group_size, packed.device),
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=False,
        bias=tensors.get("bias"),
    )


def ct_quantization_config(
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool = False,
    ignore: list[str] | tuple[str, ...] = ("lm_head",),
    targets: list[str] | tuple[str, ...] = ("Linear",),
) -> dict:
    """config.json `quantization_config` for one weight-only int scheme, as compressed-tensors'
    ModelCompressor.update_config writes it (desc_act means act-order with static groups)."""
    if bits not in CT_BITS:
        raise QuantkitError(f"compressed-tensors bits={bits}; expected one of {CT_BITS}")
    if group_size != -1 and group_size <= 0:
        raise QuantkitError(f"compressed-tensors group_size={group_size}; expected > 0 or -1 (channel)")
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "group_size": None if group_size == -1 else group_size,
        "strategy": "channel" if group_size == -1 else "group",
        "dynamic": False,
    }
    if desc_act:
        weights["actorder"] = "weight"
    return {
        "version": CT_VERSION,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        "config_groups": {
            "group_0": {
                "targets": list(targets),
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
            }
        },
        "kv_cache_scheme": None,
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "moe_sparsity_config": None,
    }
