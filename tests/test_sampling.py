"""Sampling pinned to HF transformers 4.37's processors, for today's ``pyvl.generate`` and the engine's Sampler.

HF 4.37 in sample mode: ``RepetitionPenaltyLogitsProcessor`` (greedy too) on the ids generated so far, which start
with the BOS id HF seeds the output with when ``generate`` gets ``inputs_embeds``; then ``TemperatureLogitsWarper``
-> ``TopKLogitsWarper`` -> ``TopPLogitsWarper``; softmax; ``torch.multinomial``. The expected values below are worked
out by hand from those processors' code, not read back from ours.
"""

from __future__ import annotations

import pytest
import torch

from pyvl.generate import GenerationConfig, process_logits, select_tokens
from conftest import golden_cases, loaded_model

INF = float("inf")


def _today(scores: torch.Tensor, seen: list[list[int]], cfg: GenerationConfig, seed: int | None = None):
    """Today's decode loop: one config and one generator for the batch, ``seen`` = BOS + output so far."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    processed = process_logits(scores, torch.tensor(seen), cfg)
    return processed, select_tokens(processed, cfg, generator)


IMPLEMENTATIONS = {"generate": _today}


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
@pytest.mark.parametrize("top_k, kept", [
    (2, [1, 2]),        # the two largest
    (1, [1, 2]),        # HF removes scores < the k-th largest: a tie at the k-th is kept
    (3, [0, 1, 2]),
    (10, [0, 1, 2, 3]),  # top_k > vocab clamps to the vocab
    (0, [0, 1, 2, 3]),   # top_k = 0 disables it
])
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
    new_ids, scores = model.generate(ids, None, dict(max_new_tokens=2, repetition_penalty=penalty),
                                     output_scores=True)
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
    assert both[0].tolist() == stops_early["new_token_ids"][:at + 1] + [pad] * (7 - at)
    assert alone_a[0].tolist() == stops_early["new_token_ids"][:at + 1]
    assert both[1].tolist() == alone_b[0].tolist() == goes_on["new_token_ids"][:8]
    torch.testing.assert_close(both_scores[1], alone_b_scores[0], atol=1e-4, rtol=0)
