"""InternLM2 causal decoder (``language_model.`` keys): GQA attention with RoPE, SwiGLU FFN, RMSNorm.

Per layer (pre-norm):  x += wo(Attn(RoPE(q), RoPE(k), v));  x += w2(silu(w1 h) * w3 h), h = RMSNorm(x).
The checkpoint packs ``wqkv`` per KV group as [q_0 .. q_{G-1}, k, v] x n_kv; the loader regroups it
once into [all q | all k | all v] (``regroup_wqkv``) so the forward is a plain split.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LLMConfig
from ..kv_cache import PagedBatch
from ..ops import Ops
from ..quant.linear import stacked_twin
from .rope import RotaryTables

__all__ = ["InternLM2ForCausalLM", "regroup_wqkv"]


def regroup_wqkv(packed: torch.Tensor, cfg: LLMConfig) -> torch.Tensor:
    """[n_kv * (G+2) * D, ...] grouped rows -> [n_h*D (q) | n_kv*D (k) | n_kv*D (v), ...] planar rows.

    Query head n = h*G + g keeps its index, so query head n still reads KV head n // G.
    """
    n_kv, g, d = cfg.num_key_value_heads, cfg.num_kv_groups, cfg.head_dim
    grouped = packed.reshape(n_kv, g + 2, d, *packed.shape[1:])
    q = grouped[:, :g].reshape(n_kv * g * d, *packed.shape[1:])
    k = grouped[:, g].reshape(n_kv * d, *packed.shape[1:])
    v = grouped[:, g + 1].reshape(n_kv * d, *packed.shape[1:])
    return torch.cat([q, k, v], dim=0)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, ops: Ops):
        super().__init__()
        self.n_h, self.n_kv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, (self.n_h + 2 * self.n_kv) * self.d, bias=cfg.bias)
        self.wo = nn.Linear(self.n_h * self.d, cfg.hidden_size, bias=cfg.bias)
        self.ops = ops

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: PagedBatch, layer: int
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split([self.n_h * self.d, self.n_kv * self.d, self.n_kv * self.d], dim=-1)
        q = q.view(b, s, self.n_h, self.d).transpose(1, 2)  # (B, Hq, S, D)
        k = k.view(b, s, self.n_kv, self.d).transpose(1, 2)  # (B, Hkv, S, D)
        q, k = self.ops.apply_rotary(q, k, cos, sin)
        k_pool, v_pool = batch.cache.k[layer], batch.cache.v[layer]  # (blocks, Hkv, block_size, D)
        self.ops.store_kv(
            k.transpose(1, 2).reshape(b * s, self.n_kv, self.d),
            v.reshape(b * s, self.n_kv, self.d),
            k_pool,
            v_pool,
            batch.slot_mapping,
        )
        if batch.decode:  # one new token per row
            out = self.ops.paged_decode_attention(
                q[:, :, 0], k_pool, v_pool, batch.block_tables, batch.context_lens
            )
        else:  # one sequence: its last s positions
            out = self.ops.paged_prefill_attention(
                q[0].transpose(0, 1), k_pool, v_pool, batch.block_tables[0], batch.context_len
            )
        return self.wo(out.reshape(b, s, self.n_h * self.d))  # (B, Hq, D) / (S, Hq, D) are token-major


class FeedForward(nn.Module):
    """SwiGLU FFN. The checkpoint's w1 (gate) and w3 (up) are stacked into one [2I, H] GEMM, w13, as they are
    loaded (``load_gate_up``): one matmul instead of two, and never a second copy of them in memory."""

    def __init__(self, cfg: LLMConfig, ops: Ops):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.bias)  # gate
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.bias)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.bias)  # down
        self.ops = ops
        self.w13: nn.Linear | None = None
        self._loaded_halves: set[str] = set()  # "w1.weight", "w3.weight", ... written into w13 so far

    def load_gate_up(self, name: str, tensor: torch.Tensor) -> None:
        """Write a loaded ``w1.weight``/``w3.weight`` (or bias, or a 4-bit linear's ``qweight``/``qzeros``/
        ``scales``: their rows are outputs too) into its half of w13, allocated on the first."""
        if self.w13 is None:
            self.w13 = stacked_twin(self.w1)  # w1's kind (float or 4-bit), twice as tall
        which, attr = name.split(".")
        fused = getattr(self.w13, attr)
        if fused.is_meta:
            fused = nn.Parameter(
                torch.empty(
                    (2 * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device
                ),
                requires_grad=False,
            )
            setattr(self.w13, attr, fused)
        half = tensor.shape[0]
        (fused.data[:half] if which == "w1" else fused.data[half:]).copy_(tensor)
        self._loaded_halves.add(name)
        if len(self._loaded_halves) == 2 * len(list(self.w13.parameters())):
            del self.w1, self.w3  # every half is in: the separate layers are gone for good

    def fuse_gate_up(self) -> None:
        """Stack already-loaded w1/w3 into w13 (a model built with its weights, e.g. random benchmark weights)."""
        for which in ("w1", "w3"):
            for attr, param in list(getattr(self, which).named_parameters()):
                self.load_gate_up(f"{which}.{attr}", param.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # views of the fused output: silu_mul reads them strided
        return self.w2(self.ops.silu_mul(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, ops: Ops):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.attention = Attention(cfg, ops)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.feed_forward = FeedForward(cfg, ops)

    def forward(self, x, cos, sin, batch: PagedBatch, layer: int) -> torch.Tensor:
        attended = self.attention(self.attention_norm(x), cos, sin, batch, layer)
        normed, x = self.ffn_norm.ops.add_rms_norm(attended, x, self.ffn_norm.weight, self.ffn_norm.eps)
        return x + self.feed_forward(normed)


class InternLM2Model(nn.Module):
    def __init__(self, cfg: LLMConfig, ops: Ops):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)


class InternLM2ForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig, ops: Ops):
        super().__init__()
        self.cfg = cfg
        self.model = InternLM2Model(cfg, ops)
        if not cfg.tie_word_embeddings:
            self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryTables(cfg)

    def fuse_gate_up(self) -> None:
        """Stack every layer's w1/w3 into one GEMM (after the weights are loaded; the checkpoint keeps them apart)."""
        for layer in self.model.layers:
            layer.feed_forward.fuse_gate_up()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.tok_embeddings(input_ids)

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        batch: PagedBatch,
        rope_lengths: list[int] | None = None,
        return_hidden_states: bool = False,
    ):
        """Run S new tokens [B, S, H] at ``positions`` [B, S] through every layer, their K/V stored in ``batch``.

        rope_lengths: per row, the sequence length the original's rotary table is sized by (the whole prompt in
        a prefill, the current length in a decode step; default: the last position + 1), which matters only past
        max_position_embeddings with dynamic NTK. Returns the final-norm hidden states [B, S, H] (and, if
        asked, the per-layer inputs as in HF's ``hidden_states`` tuple: embeddings, then each layer's output,
        the last one after the final norm).
        """
        cos, sin = self.rotary.cos_sin_rows(positions, rope_lengths)
        x = embeds
        # Per-layer states are kept only when asked: at 10k tokens they are several GB.
        states = [x] if return_hidden_states else None
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, batch, i)
            if states is not None:
                states.append(x)
        x = self.model.norm(x)
        if states is not None:
            states[-1] = x
            return x, states
        return x

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.tok_embeddings.weight if self.cfg.tie_word_embeddings else self.output.weight
        return (hidden @ weight.t()).float()
