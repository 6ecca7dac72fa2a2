"""Which slice of which checkpoint tensor each tensor-parallel rank holds, from the config alone.

Splits (``split``): a dimension of n over N ranks gives the first n % N ranks one more (25 ViT heads on 2 ranks:
13 + 12), so no size needs to divide another. Per rank:

  InternViT   heads h: qkv rows of those heads in Q, K and V; q_norm/k_norm gains of those heads; proj columns
              (row-parallel, bias whole); MLP rows of fc1 (+ bias), columns of fc2 (bias whole).
  mlp1        replicated (a few % of the weights).
  InternLM2   query heads q; the KV heads they read (``kv_heads``); wqkv rows of those heads cut straight from the
              checkpoint's packed layout into [q | k | v]; wo columns; w1/w3 rows and w2 columns of its FFN slice;
              tok_embeddings and output rows of its vocabulary slice. Norms replicated.

KV heads: query head n reads KV head n // G. A rank whose query heads read KV heads unevenly (48/8 heads on 3
ranks: rank 0 has 6, 6 and 4 queries of KV heads 0, 1, 2) repeats each KV head so that every local KV head serves
the same number of query heads, g = gcd of the counts (2 here: KV heads 0, 0, 0, 1, 1, 1, 2, 2). The attention
ops then run unchanged (query head i reads local KV head i // g), at the cost of KV memory on such ranks; even
splits (V1-5 on 2, 4 or 8 ranks) repeat nothing.

A ``Slice`` says which rows (dim 0) or columns (dim 1) of a checkpoint tensor a rank keeps, as ranges read in
order and concatenated; the loader reads exactly those (``safe_open(...).get_slice``), never the whole tensor.

4-bit AWQ decoder linears (pyvl.quant.awq) are cut where their float weight [out, in] would be, translated to the
AWQ GEMM tensors, whose dims are [in, out]: a cut of outputs (wqkv, w1, w3) takes columns of qweight and qzeros
(8 outputs a word) and of scales; a cut of inputs (wo, w2) takes rows of qweight and rows of qzeros and scales
(one per group of G inputs). So output cuts must fall on multiples of 8 and input cuts on whole groups: the FFN
is split in whole groups (w2's inputs), and a head split that would cut wo's group raises a ConfigError.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from ..config import AWQConfig, LLMConfig, ModelConfig, VisionConfig
from ..errors import ConfigError
from ..shapes import expected_shapes

__all__ = ["split", "local_kv_heads", "Slice", "VisionShard", "LLMShard", "ShardPlan"]


def split(total: int, parts: int) -> list[range]:
    """[0, total) cut into ``parts`` contiguous ranges, the first ``total % parts`` one longer."""
    base, extra = divmod(total, parts)
    bounds = [0]
    for rank in range(parts):
        bounds.append(bounds[-1] + base + (rank < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def local_kv_heads(q_heads: range, group: int) -> tuple[int, ...]:
    """The KV head (global id) each local KV slot holds, for query heads ``q_heads`` of groups of ``group``:
    each KV head read, repeated so that every slot serves gcd(queries per KV head) query heads."""
    counts = Counter(n // group for n in q_heads)  # insertion order = KV head order
    g = math.gcd(*counts.values())
    return tuple(kv for kv, count in counts.items() for _ in range(count // g))


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Adjacent ranges joined, so that a contiguous cut is read in one piece."""
    merged: list[tuple[int, int]] = []
    for a, b in ranges:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return tuple(merged)


@dataclass(frozen=True)
class Slice:
    """Rows (dim 0) or columns (dim 1) of one checkpoint tensor, as ranges concatenated in order; dim None keeps
    the whole tensor."""

    dim: int | None = None
    ranges: tuple[tuple[int, int], ...] = ()

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(full)
        kept = sum(b - a for a, b in self.ranges)
        return tuple(kept if d == self.dim else n for d, n in enumerate(full))


def _rows(r: range, width: int = 1, offset: int = 0) -> Slice:
    return Slice(0, ((offset + r.start * width, offset + r.stop * width),))


def _cols(r: range, width: int = 1) -> Slice:
    return Slice(1, ((r.start * width, r.stop * width),))


def _packed(key: str, cut: Slice, group: int, world: int) -> dict[str, Slice]:
    """The cut of a float weight [out, in] (``key`` ends in .weight) -> the cuts of its AWQ GEMM tensors
    qweight [in, out/8], qzeros [in/G, out/8], scales [in/G, out]; ConfigError if it splits a word or a group."""
    prefix = key.removesuffix(".weight")
    unit, what = (8, "outputs, 8 to a packed word") if cut.dim == 0 else (group, f"inputs, groups of {group}")
    for a, b in cut.ranges:
        if a % unit or b % unit:
            raise ConfigError(
                f"tensor_parallel_size={world}: a rank's part of the 4-bit {prefix} would be {what.split(',')[0]} "
                f"{a}..{b}, not whole {what.split(', ')[1]}; 4-bit weights are split along whole groups "
                f"(quantization_config.group_size): use a size that splits the heads into whole groups"
            )
    ranges = lambda d: tuple((a // d, b // d) for a, b in cut.ranges)  # noqa: E731
    if cut.dim == 0:  # outputs: columns of all three
        return {
            f"{prefix}.qweight": Slice(1, ranges(8)),
            f"{prefix}.qzeros": Slice(1, ranges(8)),
            f"{prefix}.scales": Slice(1, cut.ranges),
        }
    return {  # inputs: rows of qweight, and rows of qzeros and scales (one per group)
        f"{prefix}.qweight": Slice(0, cut.ranges),
        f"{prefix}.qzeros": Slice(0, ranges(group)),
        f"{prefix}.scales": Slice(0, ranges(group)),
    }


@dataclass(frozen=True)
class VisionShard:
    heads: range
    mlp: range

    def slices(self, v: VisionConfig) -> dict[str, Slice]:
        c, d = v.hidden_size, v.head_dim
        # qkv rows: [Q | K | V], each C = heads x d wide: this rank's heads in each third
        qkv = Slice(
            0, tuple((part * c + self.heads.start * d, part * c + self.heads.stop * d) for part in range(3))
        )
        layer = {
            "attn.qkv.weight": qkv,
            "attn.qkv.bias": qkv,
            "attn.q_norm.weight": _rows(self.heads, d),
            "attn.k_norm.weight": _rows(self.heads, d),
            "attn.proj.weight": _cols(self.heads, d),
            "mlp.fc1.weight": _rows(self.mlp),
            "mlp.fc1.bias": _rows(self.mlp),
            "mlp.fc2.weight": _cols(self.mlp),
        }
        return {
            f"vision_model.encoder.layers.{n}.{k}": s
            for n in range(v.num_hidden_layers)
            for k, s in layer.items()
        }


@dataclass(frozen=True)
class LLMShard:
    q_heads: range
    kv_heads: tuple[int, ...]  # the global KV head of each local KV slot (see local_kv_heads)
    ffn: range
    vocab: range

    def wqkv_rows(self, m: LLMConfig) -> Slice:
        """This rank's [q | k | v] rows of the packed wqkv: KV head h's block is [q_0..q_{G-1}, k, v], d rows each."""
        g, d = m.num_kv_groups, m.head_dim
        block = lambda h: h * (g + 2) * d  # noqa: E731  first row of KV head h's block
        q = [(block(n // g) + (n % g) * d, block(n // g) + (n % g + 1) * d) for n in self.q_heads]
        k = [(block(h) + g * d, block(h) + (g + 1) * d) for h in self.kv_heads]
        v = [(block(h) + (g + 1) * d, block(h) + (g + 2) * d) for h in self.kv_heads]
        return Slice(0, _merge(q) + _merge(k) + _merge(v))

    def slices(self, m: LLMConfig, quant: AWQConfig | None = None, world: int = 1) -> dict[str, Slice]:
        wqkv = self.wqkv_rows(m)
        layer = {
            "attention.wqkv.weight": wqkv,
            "attention.wqkv.bias": wqkv,
            "attention.wo.weight": _cols(self.q_heads, m.head_dim),
            "feed_forward.w1.weight": _rows(self.ffn),
            "feed_forward.w1.bias": _rows(self.ffn),
            "feed_forward.w3.weight": _rows(self.ffn),
            "feed_forward.w3.bias": _rows(self.ffn),
            "feed_forward.w2.weight": _cols(self.ffn),
        }
        if quant is not None:  # the decoder linears' weights as AWQ GEMM tensors (biases stay float)
            inputs = {"attention.wo.weight": m.num_attention_heads * m.head_dim}
            inputs["feed_forward.w2.weight"] = m.intermediate_size  # the others read hidden_size inputs
            for k in [k for k in layer if k.endswith(".weight")]:
                layer |= _packed(k, layer.pop(k), quant.group(inputs.get(k, m.hidden_size)), world)
        out = {
            f"language_model.model.layers.{n}.{k}": s
            for n in range(m.num_hidden_layers)
            for k, s in layer.items()
        }
        out["language_model.model.tok_embeddings.weight"] = _rows(self.vocab)
        out["language_model.output.weight"] = _rows(self.vocab)
        return out


def _ffn_split(cfg: ModelConfig, world: int) -> list[range]:
    """The FFN's intermediate channels per rank: in whole groups of w2's inputs in a 4-bit model."""
    width = cfg.llm.intermediate_size
    unit = 1 if cfg.quant is None else cfg.quant.group(width)
    if cfg.quant is not None and width // unit < world:
        raise ConfigError(
            f"tensor_parallel_size={world}: the 4-bit FFN's {width} channels are {width // unit} group(s) of "
            f"{unit} (quantization_config.group_size {cfg.quant.group_size}), split in whole groups; use at "
            f"most {width // unit} ranks"
        )
    return [range(r.start * unit, r.stop * unit) for r in split(width // unit, world)]


def _llm_shard(cfg: ModelConfig, rank: int, world: int) -> LLMShard:
    m = cfg.llm
    q_heads = split(m.num_attention_heads, world)[rank]
    return LLMShard(
        q_heads,
        local_kv_heads(q_heads, m.num_kv_groups),
        _ffn_split(cfg, world)[rank],
        split(m.vocab_size, world)[rank],
    )


@dataclass(frozen=True)
class ShardPlan:
    """What rank ``rank`` of ``world`` holds. ``vocab_sizes`` (every rank's slice) lets the logits be gathered."""

    rank: int
    world: int
    vision: VisionShard
    llm: LLMShard
    vocab_sizes: tuple[int, ...]

    @classmethod
    def for_rank(cls, cfg: ModelConfig, rank: int, world: int) -> ShardPlan:
        """The plan of one rank; ConfigError when the model cannot be cut ``world`` ways (a rank without a head)."""
        v, m = cfg.vision, cfg.llm
        for what, heads in (("InternViT", v.num_attention_heads), ("InternLM2", m.num_attention_heads)):
            if world > heads:
                raise ConfigError(
                    f"tensor_parallel_size={world}: {what} has {heads} attention heads, and every rank needs at "
                    f"least one; use at most {min(v.num_attention_heads, m.num_attention_heads)} ranks"
                )
        vocab = split(m.vocab_size, world)
        if (
            cfg.quant is not None
        ):  # every rank's 4-bit cuts on whole words and groups, checked before any loads
            for other in range(world):
                _llm_shard(cfg, other, world).slices(m, cfg.quant, world)
        return cls(
            rank,
            world,
            VisionShard(split(v.num_attention_heads, world)[rank], split(v.intermediate_size, world)[rank]),
            _llm_shard(cfg, rank, world),
            tuple(len(r) for r in vocab),
        )

    def slices(self, cfg: ModelConfig) -> dict[str, Slice]:
        """Checkpoint key -> the slice this rank reads, for every key of the checkpoint (whole where replicated)."""
        cut = self.vision.slices(cfg.vision) | self.llm.slices(cfg.llm, cfg.quant, self.world)
        return {key: cut.get(key, Slice()) for key in expected_shapes(cfg)}

    def shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Checkpoint key -> the shape of what this rank holds of it."""
        full = expected_shapes(cfg)
        return {key: s.shape(full[key]) for key, s in self.slices(cfg).items()}

    def nbytes(self, cfg: ModelConfig, dtype: torch.dtype) -> int:
        """Bytes of weights this rank holds in ``dtype`` (a 4-bit model's packed tensors as it holds them)."""
        element = torch.empty((), dtype=dtype).element_size()
        held = {
            ".qweight": 4,
            ".qzeros": 8,
        }  # int32 words as read; 8 zero points a word, a byte each once loaded
        return sum(
            math.prod(shape) * held.get(key[key.rfind(".") :], element)
            for key, shape in self.shapes(cfg).items()
        )
