"""Rotary position tables for InternLM2: rotate-half RoPE with theta and dynamic-NTK or linear scaling.

inv_freq_i = base^(-2i/D), i < D/2; cos/sin vectors are [cos(p*inv_freq), cos(p*inv_freq)] (halves duplicated).
Dynamic NTK: when the sequence length L seen by a forward (cached + new tokens) exceeds
max_position_embeddings M, base' = base * (f*L/M - (f - 1)) ^ (D / (D - 2)).

The original keeps this in module state: the table of the longest sequence seen so far is reused by later,
shorter calls (fixture ``stale_rope_text_after_long_image``). pyvl derives the base from the current call's
length only, which equals the original on a freshly loaded model and never leaks between calls.
"""

from __future__ import annotations

import torch

from ..config import LLMConfig

__all__ = ["RotaryTables"]


class RotaryTables:
    MAX_DYNAMIC_BASES = 64  # decoding past M makes a new base every step: keep only the latest ones

    def __init__(self, cfg: LLMConfig):
        self.dim = cfg.head_dim
        self.base = cfg.rope_theta
        self.max_positions = cfg.max_position_embeddings
        self.scaling = cfg.rope_scaling_type
        self.factor = cfg.rope_scaling_factor
        # The configured base's table, one per device, is never dropped: captured CUDA graphs read it.
        self._static: dict[str, torch.Tensor] = {}
        self._dynamic: dict[tuple[float, str], torch.Tensor] = {}  # bases past M, bounded

    def base_for_length(self, seq_len: int) -> float:
        if self.scaling == "dynamic" and seq_len > self.max_positions:
            f = self.factor
            return self.base * ((f * seq_len / self.max_positions) - (f - 1)) ** (self.dim / (self.dim - 2))
        return self.base

    def _table(self, base: float, device: torch.device) -> torch.Tensor:
        # Same float32 expression as the original, so the tables agree bit for bit.
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def inv_freq(self, seq_len: int, device: torch.device) -> torch.Tensor:
        base = self.base_for_length(seq_len)
        if base == self.base:
            table = self._static.get(str(device))
            if table is None:
                table = self._static[str(device)] = self._table(base, device)
            return table
        key = (base, str(device))
        table = self._dynamic.get(key)
        if table is None:
            if len(self._dynamic) >= self.MAX_DYNAMIC_BASES:
                self._dynamic.pop(next(iter(self._dynamic)))  # the oldest
            table = self._dynamic[key] = self._table(base, device)
        return table

    def cos_sin_rows(
        self, positions: torch.Tensor, seq_lens: list[int] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_sin of rows [B, S] whose sequences have lengths ``seq_lens`` (default: last position + 1 each).
        Rows share one table unless dynamic NTK gives them different bases (past max_position_embeddings)."""
        if seq_lens is None:
            seq_lens = (positions[:, -1] + 1).tolist()
        bases = {self.base_for_length(n) for n in seq_lens}
        if len(bases) == 1:
            return self.cos_sin(positions, max(seq_lens))
        rows = [self.cos_sin(positions[i : i + 1], n) for i, n in enumerate(seq_lens)]
        return torch.cat([c for c, _ in rows]), torch.cat([s for _, s in rows])

    def cos_sin(self, positions: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin [B, S, D] at integer ``positions`` [B, S] for a forward of total length seq_len."""
        inv_freq = self.inv_freq(seq_len, positions.device)
        t = positions.float()
        if self.scaling == "linear":
            t = t / self.factor
        freqs = t[..., None] * inv_freq  # (B, S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()
