"""The model cut down to one rank's shards: the same modules, smaller, and a collective where each block needs one.

``shard_model`` works like gpt-fast's tp.py, on a model built on the meta device (before any weight exists):
column-parallel layers (ViT qkv and fc1, LLM wqkv and w1/w3) simply become smaller ``nn.Linear``s; row-parallel
ones (ViT proj and fc2, LLM wo and w2) become :class:`RowParallelLinear`, whose partial products are summed
across the ranks before the bias is added once; the head counts of each attention become the local ones. Per
block, that is one all-reduce after attention and one after the MLP, plus, in InternViT-6B, one per QK-norm
(:class:`SplitRMSNorm`). The LLM's vocabulary is split too: :class:`VocabParallelEmbedding` looks up only its
rows and sums, and :class:`VocabParallelInternLM2` gathers the logit slices so every rank returns the full row.
Parameter names stay the checkpoint's, so a rank loads its slices by name (pyvl.parallel.load). In a 4-bit AWQ
model the same decoder linears are W4A16Linear and :class:`RowParallelW4A16Linear`, holding whole groups.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AWQConfig, LLMConfig, ModelConfig
from ..models.llm import InternLM2ForCausalLM
from ..models.vlm import InternVLChatModel
from ..ops import Ops
from ..quant.linear import W4A16Linear
from .comm import Comm
from .plan import ShardPlan

__all__ = [
    "RowParallelLinear",
    "RowParallelW4A16Linear",
    "SplitRMSNorm",
    "VocabParallelEmbedding",
    "VocabParallelInternLM2",
    "shard_model",
]


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T, + b: this rank's input columns of a Linear; the bias, which every rank
    holds whole, is added once, after the sum."""

    def __init__(self, in_local: int, out_features: int, bias: bool, comm: Comm):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_local))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.comm.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class RowParallelW4A16Linear(W4A16Linear):
    """RowParallelLinear's 4-bit twin: this rank's whole groups of input columns, packed (pyvl.quant.awq)."""

    def __init__(self, in_local: int, out_features: int, group_size: int, bias: bool, ops: Ops, comm: Comm):
        super().__init__(in_local, out_features, group_size, bias, ops)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.comm.all_reduce(self.ops.w4a16_linear(x, self.qweight, self.qzeros, self.scales))
        return y if self.bias is None else y + self.bias


class SplitRMSNorm(nn.Module):
    """RMSNorm over a vector whose elements are spread over the ranks (InternViT-6B's QK-norm spans every head):
    the sum of squares of this rank's part, summed across the ranks, normalises it with this rank's gains.
    Statistics in float32, cast back before the gain, as pyvl.ops.reference.rms_norm."""

    def __init__(self, local_dim: int, full_dim: int, eps: float, comm: Comm):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(local_dim))
        self.full_dim, self.eps, self.comm = full_dim, eps, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        squares = self.comm.all_reduce(xf.pow(2).sum(-1, keepdim=True))
        return self.weight * (xf * torch.rsqrt(squares / self.full_dim + self.eps)).to(x.dtype)


class VocabParallelEmbedding(nn.Module):
    """Rows ``vocab`` of the embedding table: ids outside it give zeros here and their row on the rank that holds
    it, so the sum across the ranks is the plain lookup."""

    def __init__(self, vocab: range, dim: int, comm: Comm):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(len(vocab), dim))
        self.start, self.comm = vocab.start, comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.comm.all_reduce(rows.masked_fill(outside[..., None], 0.0))


class VocabParallelInternLM2(InternLM2ForCausalLM):
    """InternLM2 whose output head holds rows ``vocab_sizes[rank]`` of the vocabulary: the logit slices are
    gathered, so ``lm_head`` returns the full row on every rank (the sampler, on rank 0, needs all of it)."""

    def __init__(self, cfg: LLMConfig, ops: Ops, comm: Comm, vocab_sizes: tuple[int, ...]):
        super().__init__(cfg, ops)
        self.comm, self.vocab_sizes = comm, vocab_sizes

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather_last(super().lm_head(hidden), self.vocab_sizes)


def _shard_vision(model: InternVLChatModel, plan: ShardPlan, comm: Comm) -> None:
    v = model.cfg.vision
    c, heads, mlp = v.hidden_size, len(plan.vision.heads), len(plan.vision.mlp)
    width = heads * v.head_dim  # this rank's part of the C-wide Q (and K, V)
    for layer in model.vision_model.encoder.layers:
        attn = layer.attn
        attn.num_heads = heads
        attn.qkv = nn.Linear(c, 3 * width, bias=v.qkv_bias)
        if v.qk_normalization:
            attn.q_norm = SplitRMSNorm(width, c, v.layer_norm_eps, comm)
            attn.k_norm = SplitRMSNorm(width, c, v.layer_norm_eps, comm)
        attn.proj = RowParallelLinear(width, c, True, comm)
        layer.mlp.fc1 = nn.Linear(c, mlp)
        layer.mlp.fc2 = RowParallelLinear(mlp, c, True, comm)


def _decoder_linear(
    in_local: int,
    out_local: int,
    full_in: int,
    bias: bool,
    quant: AWQConfig | None,
    ops: Ops,
    comm: Comm | None,
) -> nn.Module:
    """A rank's part of a decoder linear: column-parallel (comm None) or row-parallel (summed across the ranks);
    float, or 4-bit in groups of the whole layer's group size (full_in inputs: the plan cuts on whole groups)."""
    if quant is None and comm is None:
        return nn.Linear(in_local, out_local, bias=bias)
    if quant is None:
        return RowParallelLinear(in_local, out_local, bias, comm)
    if comm is None:
        return W4A16Linear(in_local, out_local, quant.group(full_in), bias, ops)
    return RowParallelW4A16Linear(in_local, out_local, quant.group(full_in), bias, ops, comm)


def _shard_llm(
    lm: InternLM2ForCausalLM, plan: ShardPlan, quant: AWQConfig | None, ops: Ops, comm: Comm
) -> None:
    m, shard = lm.cfg, plan.llm
    h, d, n_q, n_kv, ffn = m.hidden_size, m.head_dim, len(shard.q_heads), len(shard.kv_heads), len(shard.ffn)
    linear = functools.partial(_decoder_linear, bias=m.bias, quant=quant, ops=ops)
    lm.model.tok_embeddings = VocabParallelEmbedding(shard.vocab, h, comm)
    if not m.tie_word_embeddings:
        lm.output = nn.Linear(h, len(shard.vocab), bias=False)
    for layer in lm.model.layers:
        attn, ffn_block = layer.attention, layer.feed_forward
        attn.n_h, attn.n_kv = n_q, n_kv
        attn.wqkv = linear(h, (n_q + 2 * n_kv) * d, h, comm=None)
        attn.wo = linear(n_q * d, h, m.num_attention_heads * d, comm=comm)
        ffn_block.w1 = linear(h, ffn, h, comm=None)
        ffn_block.w3 = linear(h, ffn, h, comm=None)
        ffn_block.w2 = linear(ffn, h, m.intermediate_size, comm=comm)


def shard_model(cfg: ModelConfig, ops: Ops, plan: ShardPlan, comm: Comm) -> InternVLChatModel:
    """This rank's model on the meta device: every parameter of the shape ``plan`` gives it, none allocated."""
    with torch.device("meta"):
        model = InternVLChatModel(cfg, ops)
        model.language_model = VocabParallelInternLM2(cfg.llm, ops, comm, plan.vocab_sizes)
        _shard_vision(model, plan, comm)
        _shard_llm(model.language_model, plan, cfg.quant, ops, comm)
    return model
