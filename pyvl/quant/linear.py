"""The 4-bit linear layer of an AWQ model, and the swap that gives an InternLM2 decoder its 4-bit linears.

``W4A16Linear`` holds its weight in pyvl's layout (:mod:`pyvl.quant.awq`): qweight int32 [N, K/8], qzeros
uint8 [N, K/G], scales [N, K/G] in the model's dtype, and an optional float bias [N]. Its forward is the op
table's ``w4a16_linear`` (the Triton kernel on CUDA, dequantize + linear in plain torch elsewhere). The names
mirror the checkpoint's keys, so the loader fills it like any module.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..ops import Ops
from .awq import QUANTIZED_LINEARS

__all__ = ["W4A16Linear", "use_w4a16_linears", "stacked_twin"]


class W4A16Linear(nn.Module):
    def __init__(
        self, in_features: int, out_features: int, group_size: int, bias: bool, ops: Ops, device=None
    ):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size

        def frozen(*shape, dtype=None):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.qweight = frozen(out_features, in_features // 8, dtype=torch.int32)
        self.qzeros = frozen(out_features, groups, dtype=torch.uint8)
        self.scales = frozen(out_features, groups)
        self.bias = frozen(out_features) if bias else None
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.w4a16_linear(x, self.qweight, self.qzeros, self.scales, self.bias)

    def extra_repr(self) -> str:
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, group_size={self.group_size}, bias={self.bias is not None}"


def stacked_twin(linear: nn.Module) -> nn.Module:
    """An empty twin of ``linear`` (an nn.Linear or a W4A16Linear) with twice its outputs, on the meta device:
    the fused w13 that a FeedForward's w1 and w3 are stacked into as they load."""
    if isinstance(linear, W4A16Linear):
        has_bias = linear.bias is not None
        return W4A16Linear(
            linear.in_features,
            2 * linear.out_features,
            linear.group_size,
            has_bias,
            linear.ops,
            device="meta",
        )
    return nn.Linear(linear.in_features, 2 * linear.out_features, bias=linear.bias is not None, device="meta")


def use_w4a16_linears(language_model: nn.Module, cfg: ModelConfig, ops: Ops) -> None:
    """Replace every decoder linear (wqkv, wo, w1, w3, w2) of an InternLM2ForCausalLM built from an AWQ
    ``cfg`` by an empty W4A16Linear of the same size on the meta device, ready for the loader."""
    for layer in language_model.model.layers:
        for path in QUANTIZED_LINEARS:
            parent_name, _, name = path.rpartition(".")
            parent = layer.get_submodule(parent_name)
            old = getattr(parent, name)
            group = cfg.quant.group(old.in_features)
            new = W4A16Linear(
                old.in_features, old.out_features, group, old.bias is not None, ops, device="meta"
            )
            setattr(parent, name, new)
