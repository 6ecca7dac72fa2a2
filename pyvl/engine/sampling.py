"""Logits processing and token choice for a table of running sequences, on the device, as HF transformers 4.37.

Per step and row, in HF's order: repetition penalty on the ids in the row's mask (greedy rows too); then, for
sampled rows, temperature -> top-k -> top-p, softmax and a multinomial draw from the row's own generator; greedy
rows take the argmax of the penalised scores. A row's result is bit-for-bit what HF's processors give that row
alone (the oracle: tests/hf_sampling.py; tests/test_sampling.py checks it), so a seeded request gets the same
answer alone or batched with others. (HF draws a batch from one shared generator instead, so rows of a batched
seeded call differ from HF's; a single row does not.)

Rows are slots of a fixed-capacity table (capacity = the engine's max_num_seqs): settings live in tensors on the
device, a slot is activated when a request starts decoding and deactivated when it leaves, so shapes never change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..generation_config import GenerationConfig

__all__ = ["Sampler"]


class Sampler:
    """Sampling settings and repetition masks of ``capacity`` slots; ``sample`` processes a step's logits.

    Tensors (on ``device``, one entry per slot): ``do_sample`` bool, ``temperature`` / ``repetition_penalty``
    float32, ``kth_index`` int64 (the ascending-sort index of the top-k threshold: vocab - k, 0 when top-k is off),
    ``top_p_cut`` float32 (1 - top_p, or -1 when top-p is off), ``seen`` [capacity, vocab] bool (the BOS id plus
    the row's output so far, the ids HF's repetition penalty sees).
    """

    def __init__(self, capacity: int, vocab_size: int, bos_id: int, device: torch.device | str = "cpu"):
        self.capacity, self.vocab_size, self.bos_id = capacity, vocab_size, bos_id
        self.device = torch.device(device)
        self.do_sample = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self.temperature = torch.ones(capacity, device=self.device)
        self.repetition_penalty = torch.ones(capacity, device=self.device)
        self.kth_index = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self.top_p_cut = torch.full((capacity,), -1.0, device=self.device)
        self.seen = torch.zeros(capacity, vocab_size, dtype=torch.bool, device=self.device)
        self._generators: dict[int, torch.Generator] = {}  # sampled slots only
        self._active: set[int] = set()

    @property
    def active_slots(self) -> list[int]:
        return sorted(self._active)

    def generator(self, slot: int) -> torch.Generator | None:
        """The slot's random stream (None for a greedy row): pass it back to ``activate`` to resume a request."""
        return self._generators.get(slot)

    def activate(
        self,
        slot: int,
        params: GenerationConfig,
        output_ids: Iterable[int] = (),
        generator: torch.Generator | None = None,
    ) -> None:
        """Start a request in ``slot`` with the sampling fields of ``params`` (validated by GenerationConfig).
        ``output_ids`` (already generated, e.g. before a preemption) join the mask; ``generator`` continues a
        stream, else a sampled row gets a fresh one seeded with ``params.seed`` (a random seed when None, as
        today's ``generate``)."""
        if not 0 <= slot < self.capacity or slot in self._active:
            raise ValueError(
                f"slot {slot} is not a free slot of this sampler (capacity {self.capacity}, "
                f"active {self.active_slots})"
            )
        p = params
        self.do_sample[slot] = p.do_sample
        self.temperature[slot] = p.temperature
        self.repetition_penalty[slot] = p.repetition_penalty
        k = min(p.top_k, self.vocab_size) if p.top_k > 0 else self.vocab_size
        self.kth_index[slot] = self.vocab_size - k
        # 1 - top_p in Python floats, then float32: the comparison process_logits and HF make with a scalar
        self.top_p_cut[slot] = 1 - p.top_p if p.top_p < 1.0 else -1.0
        self.seen[slot] = False
        ids = torch.tensor([self.bos_id, *output_ids], dtype=torch.long, device=self.device)
        self.seen[slot, ids] = True
        if p.do_sample:
            if generator is None:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(p.seed if p.seed is not None else torch.seed())
            self._generators[slot] = generator
        self._active.add(slot)

    def deactivate(self, slot: int) -> None:
        """Free ``slot``. Its row is still computed by ``sample`` (with its last settings, drawing nothing) and
        must be ignored; ``activate`` sets every field again."""
        if slot not in self._active:
            raise ValueError(f"slot {slot} is not active (active {self.active_slots})")
        self._active.discard(slot)
        self._generators.pop(slot, None)

    def _divide(self, x: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
        # HF and process_logits divide by a Python float; on CUDA torch computes that as x * float32(1 / d), one
        # bit off a true division at times, so the same product keeps the rows bit-identical there.
        return x * divisor.reciprocal() if self.device.type == "cuda" else x / divisor

    def _rows(self, n: int, slots: Sequence[int]) -> torch.Tensor:
        """The slots of n logits rows (row i = slots[i]) as a device index; every one must be active."""
        if len(slots) != n:
            raise ValueError(f"{n} rows of logits but {len(slots)} slots")
        inactive = [s for s in slots if s not in self._active]
        if inactive:
            raise ValueError(f"slots {inactive} are not active (active {self.active_slots})")
        return torch.as_tensor(slots, dtype=torch.long, device=self.device)

    def process(self, logits: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        """Processed float32 scores [n, vocab] of the active ``slots`` (row i = slots[i]); the masks are not
        updated."""
        rows = self._rows(logits.shape[0], slots)
        scores = logits.float()
        penalty = self.repetition_penalty[rows, None]
        penalised = torch.where(scores < 0, scores * penalty, self._divide(scores, penalty))
        scores = torch.where(self.seen[rows], penalised, scores)
        if not self._generators:  # every row is greedy: the warpers would be computed for nothing
            return scores

        warped = self._divide(scores, self.temperature[rows, None])
        # One sort serves both warpers: top-k masks a prefix of the ascending order, so masking the sorted values
        # gives exactly the sorted values of the masked row that HF's top-p sorts again.
        ascending, order = torch.sort(warped, dim=-1, stable=True)
        kth = ascending.gather(1, self.kth_index[rows, None])
        warped = warped.masked_fill(warped < kth, float("-inf"))
        ascending = ascending.masked_fill(ascending < kth, float("-inf"))
        drop_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= self.top_p_cut[rows, None]
        drop_sorted[:, -1] = False  # min_tokens_to_keep = 1: the most likely token stays
        warped = warped.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
        return torch.where(self.do_sample[rows, None], warped, scores)

    def sample(self, logits: torch.Tensor, slots: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose the next token of each active slot of ``slots`` from its row of logits [n, vocab] (row i =
        slots[i]); returns (tokens [n] int64, processed scores [n, vocab] float32) and marks each chosen token in
        its slot's repetition mask.

        Host syncs: none, except inside ``torch.multinomial``, which checks each sampled row's probabilities with
        one ``.item()`` (so one sync per sampled row per step on CUDA; greedy-only steps have none).
        """
        row_slots = [int(s) for s in slots]
        scores = self.process(logits, row_slots)
        tokens = scores.argmax(dim=-1)
        sampled = [i for i, slot in enumerate(row_slots) if slot in self._generators]
        if sampled:
            probs = scores[sampled].softmax(dim=-1)
            # each row draws from its own stream, with the very call today's generate makes for one row
            draws = [
                torch.multinomial(probs[j : j + 1], 1, generator=self._generators[row_slots[i]])
                for j, i in enumerate(sampled)
            ]
            tokens[sampled] = torch.cat(draws).squeeze(1)
        self.seen[torch.tensor(row_slots, device=self.device), tokens] = True
        return tokens, scores
