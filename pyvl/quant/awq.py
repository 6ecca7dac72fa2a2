"""The AWQ GEMM checkpoint format, and pyvl's layout of the same numbers.

AWQ GEMM (AutoAWQ ``WQLinear_GEMM``, LMDeploy ``auto_awq``, read by vLLM's ``awq`` method). A linear layer
y = x W^T + b, W [N outputs, K inputs], is stored as three tensors in place of its ``.weight``:

    key        dtype        shape       holds
    .qweight   I32          [K, N/8]    q[n, k]: word c of row k packs outputs 8c..8c+7
    .qzeros    I32          [K/G, N/8]  z[n, g], packed like qweight
    .scales    F16 (BF16)   [K/G, N]    s[n, g]
    (.bias     float        [N]         unchanged)

    W[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G]        q, z in 0..15, G = group_size (-1: G = K)

Inside a word the outputs are interleaved: bits 4i..4i+3 hold output 8c + AWQ_ORDER[i], AWQ_ORDER =
(0, 2, 4, 6, 1, 3, 5, 7), so output 8c + j sits at nibble AWQ_ORDER.index(j) = (0, 4, 1, 5, 2, 6, 3, 7)[j]
(AutoAWQ's AWQ_REVERSE_ORDER). Words are little-endian int32, so a word whose top nibble is >= 8 is negative.
config.json says so with ``quantization_config`` = {"quant_method": "awq", "bits": 4, "group_size": G,
"zero_point": true, "version": "gemm"} (see pyvl.config.AWQConfig). AutoAWQ writes clamped zeros (0..15) and
fp16 scales; LMDeploy writes the scales in the model's dtype. In an InternVL checkpoint only the InternLM2
decoder linears (wqkv, wo, w1, w3, w2) are quantized; the ViT, mlp1, embeddings, norms and output head stay
float. Sources (public): AutoAWQ ``awq/modules/linear/gemm.py`` (``WQLinear_GEMM``: shapes, packing loop),
``awq/utils/packing_utils.py`` (``AWQ_ORDER``, ``AWQ_REVERSE_ORDER``, ``dequantize_gemm``),
``awq/quantize/quantizer.py`` (``pseudo_quantize_tensor``); LMDeploy ``lmdeploy/lite/quantization/modules/
linear.py`` (``WeightOnlyQLinear.from_linear``, awq_layout: the same shapes and order).

pyvl's layout (what a loaded model holds; :func:`to_rows` converts each tensor as it is read):

    qweight    int32        [N, K/8]    row n, word c packs inputs 8c..8c+7, input 8c + j in bits 4j..4j+3
    qzeros     uint8        [N, K/G]
    scales     model dtype  [N, K/G]

Rows are outputs, as in a float weight, so InternLM2's wqkv regrouping and the w1/w3 stacking apply to the
three tensors unchanged, and so would a split of the rows (or of whole groups of inputs) across devices. The
nibbles run in input order, which is the order a kernel walks K in.
"""

from __future__ import annotations

import torch

__all__ = [
    "AWQ_ORDER",
    "QUANTIZED_LINEARS",
    "PACKED_KEYS",
    "pack_nibbles",
    "unpack_nibbles",
    "quantization_config",
    "checkpoint_shapes",
    "checkpoint_shape",
    "to_rows",
    "from_rows",
]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds output 8c + AWQ_ORDER[i]
NATURAL_ORDER = tuple(range(8))  # pyvl: nibble j holds input 8c + j
QUANTIZED_LINEARS = (
    "attention.wqkv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w3",
    "feed_forward.w2",
)
PACKED_KEYS = (".qweight", ".qzeros")  # int32 words in the checkpoint; .scales is a float tensor


def unpack_nibbles(words: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """int32 [..., C] -> uint8 [..., 8C], nibble i of word c becoming element 8c + order[i]."""
    octets = words.contiguous().view(torch.uint8).unflatten(-1, (-1, 4))  # (..., C, 4), little-endian bytes
    nibbles = torch.stack((octets & 0xF, octets >> 4), dim=-1).flatten(-2)  # (..., C, 8): nibble i at i
    if order != NATURAL_ORDER:
        nibbles = nibbles[..., [order.index(j) for j in range(8)]]  # element 8c + j is nibble order.index(j)
    return nibbles.flatten(-2)


def pack_nibbles(values: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """uint8 [..., 8C] of values 0..15 -> int32 [..., C], element 8c + order[i] into nibble i of word c."""
    nibbles = values.unflatten(-1, (-1, 8))  # (..., C, 8)
    if order != NATURAL_ORDER:
        nibbles = nibbles[..., list(order)]  # nibble i is element 8c + order[i]
    octets = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # (..., C, 4): nibbles 2b, 2b + 1 in byte b
    return octets.contiguous().view(torch.int32).squeeze(-1)  # little-endian bytes -> one int32 word


def quantization_config(group_size: int) -> dict:
    """The ``quantization_config`` entry of config.json that announces this format."""
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}


def checkpoint_shapes(
    prefix: str, out_features: int, in_features: int, group: int
) -> dict[str, tuple[int, ...]]:
    """The AWQ GEMM tensors of one linear ``prefix`` ([out, in] as a float weight) -> their file shapes."""
    return {
        f"{prefix}.qweight": (in_features, out_features // 8),
        f"{prefix}.qzeros": (in_features // group, out_features // 8),
        f"{prefix}.scales": (in_features // group, out_features),
    }


def checkpoint_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The file shape of a tensor the model holds in pyvl's layout (other tensors: their own shape)."""
    if name.endswith(".qweight"):  # [N, K/8] -> [K, N/8]
        return (shape[1] * 8, shape[0] // 8)
    if name.endswith(".qzeros"):  # [N, K/G] -> [K/G, N/8]
        return (shape[1], shape[0] // 8)
    if name.endswith(".scales"):  # [N, K/G] -> [K/G, N]
        return (shape[1], shape[0])
    return shape


def to_rows(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """One checkpoint tensor -> pyvl's layout (see the module docstring); other tensors pass through."""
    if name.endswith(".qweight"):  # [K, N/8] AWQ words -> q [K, N] -> [N, K] -> [N, K/8] words in input order
        return pack_nibbles(unpack_nibbles(tensor, AWQ_ORDER).t(), NATURAL_ORDER)
    if name.endswith(".qzeros"):  # [K/G, N/8] -> uint8 [N, K/G]
        return unpack_nibbles(tensor, AWQ_ORDER).t().contiguous()
    if name.endswith(".scales"):  # [K/G, N] -> [N, K/G]
        return tensor.t().contiguous()
    return tensor


def from_rows(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """pyvl's layout of one linear -> its AWQ GEMM tensors {"qweight", "qzeros", "scales"}, to be written."""
    return {
        "qweight": pack_nibbles(unpack_nibbles(qweight, NATURAL_ORDER).t(), AWQ_ORDER),
        "qzeros": pack_nibbles(qzeros.t(), AWQ_ORDER),
        "scales": scales.t().contiguous(),
    }
