"""Logits processing and token choice for a table of running sequences, on the device, as HF transformers 4.37.

Per step and row, in HF's order: repetition penalty on the ids in the row's mask (greedy rows too); then, for
sampled rows, temperature -> top-k -> top-p, softmax and a multinomial draw from the row's own generator; greedy
rows take the argmax of the penalised scores. A row's result is bit-for-bit what HF's processors give that row
alone (the oracle: tests/hf_sampling.py; tests/test_sampling.py checks it), so a seeded request gets the same
answer alone or batched with others. (HF draws a batch from one shared generator instead, so rows of a batched
seeded call differ from HF's; a single row does not.)

OpenAI's processors come right after the repetition penalty, only while some active row uses them (so rows
without them are HF's exactly): ``scores - frequency * count - presence * (count > 0) + logit_bias``, ``count``
being the row's generated tokens (not the prompt, not HF's BOS). A row under a grammar (pyvl.engine.constraints)
then has the tokens its mask forbids set to -inf, before the warpers (so top-k and top-p choose among the allowed
tokens, as vLLM's grammar bitmask does). Its mask is one bit per token, written on the host into ``mask_host``
while the device runs the step's forward and applied here, so constrained and free rows sample in one batch.

Log-probabilities, for the rows that ask: ``log_softmax`` of the scores after the penalties, the bias and the
temperature (the distribution the row samples from), before top-k, top-p and the grammar mask, which only
restrict which tokens may be drawn; the chosen token's and the ``top_logprobs`` largest, gathered on the device and
read with the tokens in the step's one device-to-host transfer (:meth:`SampledStep.to_host`).

Rows are slots of a fixed-capacity table (capacity = the engine's max_num_seqs): settings live in tensors on the
device, a slot is activated when a request starts decoding and deactivated when it leaves, so shapes never change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..generation_config import GenerationConfig

__all__ = ["Sampler", "SampledStep", "TokenLogprobs"]

# A chosen token's log-probability and its row's top (token id, log-probability) pairs, most likely first.
TokenLogprobs = tuple[float, list[tuple[int, float]]]


class Sampler:
    """Sampling settings and repetition masks of ``capacity`` slots; ``sample`` processes a step's logits.

    Tensors (on ``device``, one entry per slot): ``do_sample`` bool, ``temperature`` / ``repetition_penalty``
    float32, ``kth_index`` int64 (the ascending-sort index of the top-k threshold: vocab - k, 0 when top-k is off),
    ``top_p_cut`` float32 (1 - top_p, or -1 when top-p is off), ``seen`` [capacity, vocab] bool (the BOS id plus
    the row's output so far, the ids HF's repetition penalty sees); OpenAI's ``counts`` [capacity, vocab] float32
    (each generated token's count), ``presence_penalty`` / ``frequency_penalty`` float32 and ``logit_bias``
    [capacity, vocab] float32; the grammar masks ``mask_host`` [capacity, ceil(vocab / 32)] int32 (bit t % 32 of
    word t // 32 allows token t; all ones for a free row), pinned on CUDA, and their device copy ``mask_bits``.
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
        self.counts = torch.zeros(capacity, vocab_size, device=self.device)
        self.presence_penalty = torch.zeros(capacity, device=self.device)
        self.frequency_penalty = torch.zeros(capacity, device=self.device)
        self.logit_bias = torch.zeros(capacity, vocab_size, device=self.device)
        words = -(-vocab_size // 32)
        pin = self.device.type == "cuda"
        self.mask_host = torch.full((capacity, words), -1, dtype=torch.int32, pin_memory=pin)
        self.mask_bits = self.mask_host.to(self.device)  # on the CPU: the host buffer itself
        token = torch.arange(vocab_size, device=self.device)
        self._word, self._bit = token // 32, (token % 32).int()
        self._generators: dict[int, torch.Generator] = {}  # sampled slots only
        self._active: set[int] = set()
        self._additive: set[int] = set()  # active slots with a presence/frequency penalty or a logit_bias
        self._masked: set[int] = set()  # active slots under a grammar
        self._logprobs: dict[int, int] = {}  # active slots that want logprobs -> their top_logprobs

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
        output = list(output_ids)
        ids = torch.tensor([self.bos_id, *output], dtype=torch.long, device=self.device)
        self.seen[slot, ids] = True
        self._activate_openai(slot, p, output)
        if p.do_sample:
            if generator is None:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(p.seed if p.seed is not None else torch.seed())
            self._generators[slot] = generator
        self._active.add(slot)

    def _activate_openai(self, slot: int, p: GenerationConfig, output_ids: list[int]) -> None:
        """The slot's OpenAI settings: penalties, bias, grammar mask, logprobs; counts from ``output_ids``."""
        self.presence_penalty[slot] = p.presence_penalty
        self.frequency_penalty[slot] = p.frequency_penalty
        self.logit_bias[slot] = 0.0
        if p.logit_bias:
            ids, bias = zip(*p.logit_bias)
            self.logit_bias[slot, list(ids)] = torch.tensor(bias, device=self.device)
        self.counts[slot] = 0.0
        if output_ids:
            self.counts[slot].index_add_(
                0,
                torch.tensor(output_ids, device=self.device),
                torch.ones(len(output_ids), device=self.device),
            )
        if p.presence_penalty or p.frequency_penalty or p.logit_bias:
            self._additive.add(slot)
        self.mask_host[slot] = -1
        if p.constrained:
            self._masked.add(slot)
        if p.logprobs:
            self._logprobs[slot] = p.top_logprobs

    def deactivate(self, slot: int) -> None:
        """Free ``slot``. Its row is still computed by ``sample`` (with its last settings, drawing nothing) and
        must be ignored; ``activate`` sets every field again."""
        if slot not in self._active:
            raise ValueError(f"slot {slot} is not active (active {self.active_slots})")
        for settings in (self._active, self._additive, self._masked):
            settings.discard(slot)
        self._generators.pop(slot, None)
        self._logprobs.pop(slot, None)

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
        """Processed float32 scores [n, vocab] of the active ``slots`` (row i = slots[i]), the scores the tokens
        are chosen from; the masks are not updated."""
        return self._process(logits, self._rows(logits.shape[0], slots))[1]

    def _process(self, logits: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distribution, scores) [n, vocab] float32: the distribution the logprobs describe (penalties, bias,
        temperature for sampled rows), and the scores the tokens are chosen from (then the mask, top-k, top-p)."""
        scores = logits.float()
        penalty = self.repetition_penalty[rows, None]
        penalised = torch.where(scores < 0, scores * penalty, self._divide(scores, penalty))
        scores = torch.where(self.seen[rows], penalised, scores)
        if self._additive:  # OpenAI's penalties over the generated tokens, then the bias
            counts = self.counts[rows]
            scores = (
                scores
                - counts * self.frequency_penalty[rows, None]
                - (counts > 0) * self.presence_penalty[rows, None]
                + self.logit_bias[rows]
            )
        distribution = scores
        if self._masked:  # before the warpers: top-k and top-p then choose among the allowed tokens
            scores = self._mask(scores, rows)
        if self._generators:  # some row samples (when every row is greedy the warpers would be wasted)
            sampled, temperature = self.do_sample[rows, None], self.temperature[rows, None]
            warped = self._divide(scores, temperature)
            unmasked = warped if scores is distribution else self._divide(distribution, temperature)
            distribution = torch.where(sampled, unmasked, distribution)
            scores = torch.where(sampled, self._truncate(warped, rows), scores)
        return distribution, scores

    def _truncate(self, warped: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Top-k then top-p, as HF's warpers. One sort serves both: top-k masks a prefix of the ascending order,
        so masking the sorted values gives exactly the sorted values of the masked row that HF's top-p sorts
        again."""
        ascending, order = torch.sort(warped, dim=-1, stable=True)
        kth = ascending.gather(1, self.kth_index[rows, None])
        warped = warped.masked_fill(warped < kth, float("-inf"))
        ascending = ascending.masked_fill(ascending < kth, float("-inf"))
        drop_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= self.top_p_cut[rows, None]
        drop_sorted[:, -1] = False  # min_tokens_to_keep = 1: the most likely token stays
        return warped.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))

    def _mask(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """-inf where a row's grammar mask forbids the token (free rows' masks allow all). A row whose mask
        allows nothing (its grammar failed; the engine ends it) keeps its scores, so that its draw cannot fail
        the batch."""
        if self.mask_bits is not self.mask_host:
            self.mask_bits.copy_(self.mask_host, non_blocking=True)
        allowed = (self.mask_bits[rows][:, self._word] >> self._bit) & 1 == 1
        return torch.where(
            allowed.any(dim=-1, keepdim=True), scores.masked_fill(~allowed, float("-inf")), scores
        )

    def sample(self, logits: torch.Tensor, slots: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose the next token of each active slot of ``slots`` from its row of logits [n, vocab] (row i =
        slots[i]); returns (tokens [n] int64, processed scores [n, vocab] float32) and marks each chosen token in
        its slot's masks. :meth:`step` also gives the logprobs of the rows that ask for them."""
        step = self.step(logits, slots)
        return step.tokens, step.scores

    def step(self, logits: torch.Tensor, slots: Sequence[int]) -> SampledStep:
        """:meth:`sample`, with the logprobs of the rows that ask, all still on the device.

        Host syncs: none, except inside ``torch.multinomial``, which checks each sampled row's probabilities with
        one ``.item()`` (so one sync per sampled row per step on CUDA; greedy-only steps have none).
        """
        row_slots = [int(s) for s in slots]
        rows = self._rows(logits.shape[0], row_slots)
        distribution, scores = self._process(logits, rows)
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
        self.seen[rows, tokens] = True
        if self._additive:
            self.counts[rows, tokens] += 1.0  # rows are distinct slots: no index repeats
        step = SampledStep(tokens, scores)
        asking = [i for i, slot in enumerate(row_slots) if slot in self._logprobs] if self._logprobs else []
        if asking:
            step.logprob_rows = asking
            step.top_k = [self._logprobs[row_slots[i]] for i in asking]
            index = torch.tensor(asking, device=self.device)
            logprobs = distribution[index].log_softmax(dim=-1)
            step.chosen = logprobs.gather(1, tokens[index, None]).squeeze(1)
            step.top = logprobs.topk(max(step.top_k), dim=-1) if max(step.top_k) else None
        return step


@dataclass
class SampledStep:
    """One sampling step's results on the device; :meth:`to_host` reads them in one transfer."""

    tokens: torch.Tensor  # [n] int64
    scores: torch.Tensor  # [n, vocab] float32, the processed scores
    logprob_rows: list[int] | None = None  # the rows that asked for logprobs
    top_k: list[int] | None = None  # their top_logprobs
    chosen: torch.Tensor | None = None  # [len(logprob_rows)] the chosen tokens' logprobs
    top: tuple[torch.Tensor, torch.Tensor] | None = None  # (values, ids) [len(logprob_rows), max(top_k)]

    def to_host(self) -> tuple[list[int], list[TokenLogprobs | None]]:
        """(token per row, logprobs per row or None): the host waits for the device here, once."""
        if self.logprob_rows is None:
            return self.tokens.tolist(), [None] * len(self.tokens)
        device = [self.tokens, self.chosen] + (list(self.top) if self.top is not None else [])
        if self.tokens.device.type == "cuda":  # copies queued behind the step, then one wait
            device = [t.to("cpu", non_blocking=True) for t in device]
            torch.cuda.current_stream(self.tokens.device).synchronize()
        tokens, chosen, *top = (t.tolist() for t in device)
        values, ids = top if top else ([[]] * len(chosen), [[]] * len(chosen))
        logprobs: list[TokenLogprobs | None] = [None] * len(tokens)
        for j, (i, k) in enumerate(zip(self.logprob_rows, self.top_k)):
            logprobs[i] = (chosen[j], list(zip(ids[j][:k], values[j][:k])))
        return tokens, logprobs
