"""HF transformers 4.37's logits processing and token choice for one batch with one config and one generator:
the oracle the engine's batched sampler (pyvl.engine.sampling) is pinned to, row by row.

Order per step (as HF ``generate``): repetition penalty on ``seen`` (greedy too), then, when sampling,
temperature -> top-k -> top-p, softmax and a multinomial draw.
"""

from __future__ import annotations

import torch

from pyvl.generation_config import GenerationConfig


def process_logits(scores: torch.Tensor, seen: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """HF's logits processors and warpers on float32 scores [B, V]; ``seen`` [B, T] are penalised ids."""
    scores = scores.clone()
    if cfg.repetition_penalty != 1.0:
        picked = scores.gather(1, seen)
        picked = torch.where(picked < 0, picked * cfg.repetition_penalty, picked / cfg.repetition_penalty)
        scores.scatter_(1, seen, picked)
    if not cfg.do_sample:
        return scores
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.top_k > 0:
        k = min(cfg.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - cfg.top_p)
        drop_sorted[..., -1:] = False  # always keep the most likely token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def select_tokens(
    scores: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    if not cfg.do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
