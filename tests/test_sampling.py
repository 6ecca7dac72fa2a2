"""Sampling pinned to HF transformers 4.37's processors, for the HF oracle (tests/hf_sampling.py) and the engine's Sampler.

HF 4.37 in sample mode: ``RepetitionPenaltyLogitsProcessor`` (greedy too) on the ids generated so far, which start
with the BOS id HF seeds the output with when ``generate`` gets ``inputs_embeds``; then ``TemperatureLogitsWarper``
-> ``TopKLogitsWarper`` -> ``TopPLogitsWarper``; softmax; ``torch.multinomial``. The expected values below are worked
out by hand from those processors' code, not read back from ours.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from conftest import golden_cases, loaded_model
from hf_sampling import process_logits, select_tokens

from pyvl.engine.sampling import Sampler
from pyvl.generation_config import GenerationConfig

INF = float("inf")


def _today(scores: torch.Tensor, seen: list[list[int]], cfg: GenerationConfig, seed: int | None = None):
    """Today's decode loop: one config and one generator for the batch, ``seen`` = BOS + output so far."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    processed = process_logits(scores, torch.tensor(seen), cfg)
    return processed, select_tokens(processed, cfg, generator)


def _engine(scores: torch.Tensor, seen: list[list[int]], cfg: GenerationConfig, seed: int | None = None):
    """The engine's Sampler, one slot per row, the rows' masks seeded with the same ids."""
    sampler = Sampler(capacity=scores.shape[0], vocab_size=scores.shape[1], bos_id=seen[0][0])
    for slot, row in enumerate(seen):
        assert row[0] == sampler.bos_id
        sampler.activate(slot, replace(cfg, seed=seed), output_ids=row[1:])
    tokens, processed = sampler.sample(scores, range(scores.shape[0]))
    return processed, tokens


IMPLEMENTATIONS = {"generate": _today, "sampler": _engine}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def process(request):
    """process(scores [B, V], seen (BOS first, per row), cfg, seed) -> (processed scores, chosen tokens)."""
    return IMPLEMENTATIONS[request.param]


def _kept(scores: torch.Tensor) -> list[int]:
    return torch.isfinite(scores[0]).nonzero().flatten().tolist()


# ---- repetition penalty -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("do_sample", [False, True])
def test_repetition_penalty_divides_positive_and_multiplies_negative(process, do_sample):
    scores = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    cfg = GenerationConfig(repetition_penalty=2.0, do_sample=do_sample, top_k=0)
    out, _ = process(scores, [[0, 1, 1]], cfg, seed=0)  # a repeated id is penalised once
    assert out.tolist() == [[1.0, -2.0, 0.5, 0.0]]


def test_greedy_picks_the_argmax_of_the_penalised_scores(process):
    scores = torch.tensor([[2.0, 1.5, -3.0]])
    out, tokens = process(scores, [[0]], GenerationConfig(repetition_penalty=2.0), seed=None)
    assert out.tolist() == [[1.0, 1.5, -3.0]]
    assert tokens.tolist() == [1]


def test_greedy_ignores_the_warpers(process):
    scores = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    cfg = GenerationConfig(temperature=0.5, top_k=1, top_p=0.1)
    out, tokens = process(scores, [[3]], cfg, seed=None)
    assert out.tolist() == scores.tolist() and tokens.tolist() == [0]


# ---- top-k --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "top_k, kept",
    [
        (2, [1, 2]),  # the two largest
        (1, [1, 2]),  # HF removes scores < the k-th largest: a tie at the k-th is kept
        (3, [0, 1, 2]),
        (10, [0, 1, 2, 3]),  # top_k > vocab clamps to the vocab
        (0, [0, 1, 2, 3]),  # top_k = 0 disables it
    ],
)
def test_top_k(process, top_k, kept):
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    out, _ = process(scores, [[0]], GenerationConfig(do_sample=True, top_k=top_k), seed=0)
    assert _kept(out) == kept
    assert out[0, kept].tolist() == scores[0, kept].tolist()


# ---- top-p --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_p, n_kept", [(0.75, 3), (0.5, 2), (0.25, 1), (1e-9, 1)])
def test_top_p_drops_a_token_that_sits_exactly_on_the_boundary(process, top_p, n_kept):
    """Four equal scores: probabilities exactly 0.25 and ascending cumulative sums exactly 0.25, 0.5, 0.75, 1.
    HF removes the sorted tokens whose cumulative probability is <= 1 - top_p, so at top_p = 0.75 the first token
    (cumulative 0.25 == 1 - 0.75) goes; at least one token always stays (at top_p=1e-9, 1 - top_p rounds to 1.0
    in float32, so even the last token's cumulative 1.0 is on the boundary)."""
    out, _ = process(torch.zeros(1, 4), [[0]], GenerationConfig(do_sample=True, top_k=0, top_p=top_p), seed=0)
    assert len(_kept(out)) == n_kept


@pytest.mark.parametrize("top_p, kept", [(0.9, [1, 2, 3]), (0.7, [2, 3]), (0.3, [3]), (1e-9, [3])])
def test_top_p_keeps_the_smallest_set_over_top_p(process, top_p, kept):
    # probabilities 0.032, 0.087, 0.237, 0.644: ascending cumulative 0.032, 0.119, 0.356, 1
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out, _ = process(scores, [[0]], GenerationConfig(do_sample=True, top_k=0, top_p=top_p), seed=0)
    assert _kept(out) == kept


def test_top_p_1_disables_it(process):
    """HF adds no TopPLogitsWarper at top_p=1.0, so a finite score whose probability underflows to 0 stays finite
    (a cut at cumulative <= 0 would drop it)."""
    scores = torch.tensor([[0.0, -200.0, 1.0]])
    out, _ = process(scores, [[0]], GenerationConfig(do_sample=True, top_k=0, top_p=1.0), seed=0)
    assert out.tolist() == scores.tolist()


# ---- temperature and the warpers' order ---------------------------------------------------------------------------
def test_temperature_comes_before_top_p(process):
    """At T=0.5 the scores [0, 1, 2, 3] become [0, 2, 4, 6]: probabilities 0.002, 0.016, 0.117, 0.865, so top_p=0.8
    keeps only token 3. Top-p on the unscaled scores (probabilities 0.032, 0.087, 0.237, 0.644) would keep 2 and 3."""
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    cfg = GenerationConfig(do_sample=True, temperature=0.5, top_k=0, top_p=0.8)
    out, tokens = process(scores, [[0]], cfg, seed=0)
    assert out.tolist() == [[-INF, -INF, -INF, 6.0]]
    assert tokens.tolist() == [3]


def test_temperature_scales_what_top_k_keeps(process):
    scores = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    cfg = GenerationConfig(do_sample=True, temperature=0.5, top_k=2)
    out, _ = process(scores, [[3]], cfg, seed=0)
    assert out.tolist() == [[4.0, -INF, 1.0, -INF]]


def test_penalty_comes_before_temperature_and_top_k(process):
    # penalised [1, -2, 0.5, 0]; /0.5 -> [2, -4, 1, 0]; top-2 keeps tokens 0 and 2
    scores = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    cfg = GenerationConfig(do_sample=True, repetition_penalty=2.0, temperature=0.5, top_k=2)
    out, _ = process(scores, [[0, 1]], cfg, seed=0)
    assert out.tolist() == [[2.0, -INF, 1.0, -INF]]


# ---- through model.generate (golden v15 checkpoint) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return loaded_model("v15")


def _penalised(x: torch.Tensor, penalty: float) -> torch.Tensor:
    return torch.where(x < 0, x * penalty, x / penalty)


def test_generate_penalises_the_bos_id_at_step_0_and_not_the_prompt(model):
    ids = model.tokenizer.encode(model.build_query("Hello, who are you?"))
    bos = model.tokenizer.bos_id
    assert ids[0] == bos
    raw = model.logits(ids)[-1]
    penalty = 1.7
    new_ids, scores = model.generate(
        ids, None, dict(max_new_tokens=2, repetition_penalty=penalty), output_scores=True
    )
    want = raw.clone()
    want[bos] = _penalised(raw[bos], penalty)
    torch.testing.assert_close(scores[0, 0], want, atol=2e-5, rtol=0)
    assert abs(float(want[bos] - raw[bos])) > 1e-3  # the check can tell a penalised BOS from a raw one
    # step 1 penalises BOS and the step-0 token, nothing else
    step1_raw = model.logits(ids + new_ids[0, :1].tolist())[-1]
    penalised_ids = {bos, int(new_ids[0, 0])}
    want1 = step1_raw.clone()
    for i in penalised_ids:
        want1[i] = _penalised(step1_raw[i], penalty)
    torch.testing.assert_close(scores[0, 1], want1, atol=2e-5, rtol=0)


def test_a_row_that_stops_gets_pads_while_the_other_continues_as_alone(model):
    """text_only's golden answer reaches id 655 at step 4; text_unicode's 12 ids never contain it."""
    cases = golden_cases("v15")["cases"]
    stops_early, goes_on = cases["text_only"], cases["text_unicode"]
    stop_id = 655
    at = stops_early["new_token_ids"].index(stop_id)
    assert stop_id not in goes_on["new_token_ids"] and at < 7
    gen = dict(max_new_tokens=8, eos_token_id=[stop_id])
    ids_a = model.tokenizer.encode(model.build_query(stops_early["question"]))
    ids_b = model.tokenizer.encode(model.build_query(goes_on["question"]))
    both, both_scores = model.generate([ids_a, ids_b], None, gen, output_scores=True)
    alone_a = model.generate(ids_a, None, gen)
    alone_b, alone_b_scores = model.generate(ids_b, None, gen, output_scores=True)
    pad = model.tokenizer.pad_id
    assert pad != stop_id
    assert both.shape == (2, 8)
    assert both[0].tolist() == stops_early["new_token_ids"][: at + 1] + [pad] * (7 - at)
    assert alone_a[0].tolist() == stops_early["new_token_ids"][: at + 1]
    assert both[1].tolist() == alone_b[0].tolist() == goes_on["new_token_ids"][:8]
    torch.testing.assert_close(both_scores[1], alone_b_scores[0], atol=1e-4, rtol=0)


# ---- the Sampler against today's process_logits + select_tokens, row by row ---------------------------------------
VOCAB = 40
SETTINGS = [
    GenerationConfig(do_sample=d, temperature=t, top_k=k, top_p=p, repetition_penalty=r)
    for d, t, k, p, r in itertools.product(
        [False, True], [1.0, 0.7], [0, 5, VOCAB + 3], [1.0, 0.8], [1.0, 1.3]
    )
]


def _reference_row(steps: list[torch.Tensor], cfg: GenerationConfig, seed: int, bos: int):
    """Today's decode loop for one row, over the given logits [1, V] per step: (scores, tokens) per step."""
    generator = torch.Generator().manual_seed(seed)
    seen, out = torch.tensor([[bos]]), []
    for logits in steps:
        scores = process_logits(logits, seen, cfg)
        tokens = select_tokens(scores, cfg, generator)
        out.append((scores, tokens))
        seen = torch.cat([seen, tokens[:, None]], dim=1)
    return out


@pytest.mark.parametrize(
    "cfg",
    SETTINGS,
    ids=lambda c: f"s{int(c.do_sample)}-t{c.temperature}-k{c.top_k}-p{c.top_p}-r{c.repetition_penalty}",
)
def test_sampler_rows_equal_todays_code_alone_and_batched(cfg):
    """Each setting alone (capacity 1) and in slot 2 of a 5-slot table next to rows of other settings and a free
    slot: bit-identical processed scores and tokens over 4 steps (the mask learns each chosen token)."""
    torch.manual_seed(SETTINGS.index(cfg))
    n_steps, bos, seed = 4, 3, 11
    logits = torch.randn(n_steps, 5, VOCAB) * 3
    logits[:, :, :4] += 4  # tokens worth repeating, so the penalty bites
    other = SETTINGS[(SETTINGS.index(cfg) + 9) % len(SETTINGS)]
    neighbours = {0: replace(SETTINGS[-1], seed=5), 1: replace(SETTINGS[7], seed=6), 4: other}
    want = {
        slot: _reference_row([logits[t, slot : slot + 1] for t in range(n_steps)], c, c.seed or seed, bos)
        for slot, c in {**neighbours, 2: cfg}.items()
    }
    alone = Sampler(1, VOCAB, bos)
    alone.activate(0, replace(cfg, seed=seed))
    batched = Sampler(5, VOCAB, bos)
    for slot, c in neighbours.items():
        batched.activate(slot, replace(c, seed=c.seed or seed))
    batched.activate(2, replace(cfg, seed=seed))  # slot 3 stays free
    for t in range(n_steps):
        tokens, scores = alone.sample(logits[t, 2:3], [0])
        assert torch.equal(scores, want[2][t][0]) and torch.equal(tokens, want[2][t][1])
        active = [4, 0, 2, 1]  # any order; slot 3 is not in the step
        tokens, scores = batched.sample(logits[t, active], active)
        for i, slot in enumerate(active):
            assert torch.equal(scores[i : i + 1], want[slot][t][0]), (t, slot)
            assert torch.equal(tokens[i : i + 1], want[slot][t][1]), (t, slot)


def test_a_fresh_slot_penalises_only_the_bos_id():
    sampler = Sampler(2, 6, bos_id=1)
    sampler.activate(1, GenerationConfig(repetition_penalty=2.0))
    _, scores = sampler.sample(torch.full((1, 6), 3.0), [1])
    assert scores[0].tolist() == [3.0, 1.5, 3.0, 3.0, 3.0, 3.0]
    assert sampler.seen[1].nonzero().flatten().tolist() == [0, 1]  # BOS, then the argmax chosen (id 0)


def test_a_reused_slot_forgets_the_previous_request():
    sampler = Sampler(1, 6, bos_id=1)
    sampler.activate(
        0, GenerationConfig(do_sample=True, top_k=2, repetition_penalty=3.0, seed=0), output_ids=[4, 5]
    )
    sampler.sample(torch.randn(1, 6), [0])
    sampler.deactivate(0)
    sampler.activate(0, GenerationConfig(repetition_penalty=2.0))
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    assert sampler.process(scores, [0]).tolist() == [[1.0, 1.0, 3.0, 4.0, 5.0, 6.0]]


def test_a_resumed_row_continues_its_random_stream():
    """A preempted request re-activated with its output and its generator draws what it would have drawn."""
    params = GenerationConfig(do_sample=True, temperature=1.5, top_k=0, repetition_penalty=1.2, seed=3)
    logits = torch.randn(6, 1, 50)
    straight = Sampler(1, 50, bos_id=1)
    straight.activate(0, params)
    want = [int(straight.sample(step, [0])[0]) for step in logits]
    resumed = Sampler(3, 50, bos_id=1)
    resumed.activate(0, params)
    got = [int(resumed.sample(step, [0])[0]) for step in logits[:3]]
    stream = resumed.generator(0)
    resumed.deactivate(0)
    resumed.activate(2, params, output_ids=got, generator=stream)
    got += [int(resumed.sample(step, [2])[0]) for step in logits[3:]]
    assert got == want and len(set(want)) > 1


def test_sampler_slot_misuse_is_refused():
    sampler = Sampler(2, 8, bos_id=1)
    sampler.activate(1, GenerationConfig())
    with pytest.raises(ValueError, match="not a free slot"):
        sampler.activate(1, GenerationConfig())
    with pytest.raises(ValueError, match="not a free slot"):
        sampler.activate(2, GenerationConfig())
    with pytest.raises(ValueError, match="not active"):
        sampler.deactivate(0)
    with pytest.raises(ValueError, match=r"slots \[0\] are not active \(active \[1\]\)"):
        sampler.sample(torch.zeros(1, 8), [0])
    with pytest.raises(ValueError, match="2 rows of logits but 1 slots"):
        sampler.sample(torch.zeros(2, 8), [1])
    assert sampler.active_slots == [1]
