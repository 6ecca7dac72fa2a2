"""The sampler's OpenAI processors, against step-by-step references written from OpenAI's definitions:
presence/frequency penalties and logit_bias, logprobs (which distribution they describe), grammar masks, and that
rows without them stay exactly HF's while batched with rows that have them."""

from __future__ import annotations

import torch
from hf_sampling import process_logits

from pyvl.engine.sampling import Sampler
from pyvl.generation_config import GenerationConfig

VOCAB = 11
BOS = 1


def _sampler(*configs: GenerationConfig, outputs=None) -> Sampler:
    sampler = Sampler(capacity=len(configs), vocab_size=VOCAB, bos_id=BOS)
    for slot, cfg in enumerate(configs):
        sampler.activate(slot, cfg, output_ids=(outputs or {}).get(slot, ()))
    return sampler


def _openai_reference(logits: torch.Tensor, generated: list[int], cfg: GenerationConfig) -> torch.Tensor:
    """OpenAI's formula on HF's repetition-penalised scores: mu[j] - c[j] * frequency - (c[j] > 0) * presence
    + bias[j], c[j] counting j among the generated tokens."""
    scores = process_logits(logits[None], torch.tensor([[BOS, *generated]]), GenerationConfig())[0].clone()
    for j in range(VOCAB):
        count = generated.count(j)
        scores[j] = scores[j] - count * cfg.frequency_penalty - (count > 0) * cfg.presence_penalty
    for token, bias in cfg.logit_bias or ():
        scores[token] += bias
    return scores


def test_presence_and_frequency_penalties_follow_openai_step_by_step():
    torch.manual_seed(0)
    cfg = GenerationConfig(presence_penalty=0.7, frequency_penalty=1.3, logit_bias={4: 2.5, 9: -1.0})
    sampler, generated = _sampler(cfg), []
    for _ in range(12):
        logits = torch.randn(VOCAB) * 3
        expected = _openai_reference(logits, generated, cfg)
        tokens, scores = sampler.sample(logits[None], [0])
        assert torch.equal(scores[0], expected), generated
        assert int(tokens[0]) == int(expected.argmax())
        generated.append(int(tokens[0]))
    assert len(set(generated)) > 1  # the penalties moved the choice around


def test_penalties_count_the_output_kept_across_a_preemption():
    cfg = GenerationConfig(frequency_penalty=0.5, presence_penalty=0.25)
    logits = torch.zeros(VOCAB)
    resumed = _sampler(cfg, outputs={0: [3, 3, 5]})
    _, scores = resumed.sample(logits[None], [0])
    assert torch.equal(scores[0], _openai_reference(logits, [3, 3, 5], cfg))


def test_logit_bias_forces_and_bans_tokens():
    logits = torch.arange(VOCAB, dtype=torch.float32)  # the last id is the most likely
    forced = _sampler(GenerationConfig(logit_bias={2: 100}))
    banned = _sampler(GenerationConfig(logit_bias={VOCAB - 1: -100}))
    for _ in range(3):
        assert forced.sample(logits[None], [0])[0].tolist() == [2]
        assert banned.sample(logits[None], [0])[0].tolist() == [VOCAB - 2]


def test_rows_without_openai_settings_stay_hf_exact_beside_rows_with_them():
    torch.manual_seed(1)
    plain = GenerationConfig(do_sample=True, temperature=0.7, top_k=4, repetition_penalty=1.2, seed=3)
    sampler = _sampler(plain, GenerationConfig(presence_penalty=2.0, logit_bias={0: 50}), outputs={0: [5]})
    logits = torch.randn(2, VOCAB)
    _, scores = sampler.sample(logits, [0, 1])
    assert torch.equal(scores[0], process_logits(logits[:1], torch.tensor([[BOS, 5]]), plain)[0])


def test_logprobs_describe_the_distribution_before_truncation():
    torch.manual_seed(2)
    logits = torch.randn(2, VOCAB) * 2
    greedy = GenerationConfig(logprobs=True, top_logprobs=3, frequency_penalty=1.0)
    sampled = GenerationConfig(
        do_sample=True, temperature=0.5, top_k=2, seed=0, logprobs=True, top_logprobs=5
    )
    sampler = _sampler(greedy, sampled, outputs={0: [7]})
    tokens, logprobs = sampler.step(logits, [0, 1]).to_host()
    expected_greedy = _openai_reference(logits[0], [7], greedy).log_softmax(-1)
    expected_sampled = (logits[1] / 0.5).log_softmax(-1)  # temperature, not the top-k truncation
    for row, expected, k in ((0, expected_greedy, 3), (1, expected_sampled, 5)):
        chosen, top = logprobs[row]
        assert abs(chosen - float(expected[tokens[row]])) < 1e-6
        values, ids = expected.topk(k)
        assert [i for i, _ in top] == ids.tolist()
        assert torch.allclose(torch.tensor([lp for _, lp in top]), values, atol=1e-6)
    assert torch.isinf(sampler.process(logits, [0, 1])[1]).sum() == VOCAB - 2  # while drawing from the top 2


def test_rows_that_do_not_ask_get_no_logprobs():
    sampler = _sampler(GenerationConfig(), GenerationConfig(logprobs=True))
    _, logprobs = sampler.step(torch.randn(2, VOCAB), [0, 1]).to_host()
    assert logprobs[0] is None and logprobs[1][1] == []


def _allow(sampler: Sampler, slot: int, tokens: list[int]) -> None:
    words = torch.zeros(sampler.mask_host.shape[1], dtype=torch.int64)
    for t in tokens:
        words[t // 32] |= 1 << (t % 32)
    sampler.mask_host[slot] = words.to(torch.int32)  # int64 -> int32 keeps the low 32 bits


def test_a_grammar_mask_limits_its_row_and_is_applied_before_top_k():
    constrained = GenerationConfig(do_sample=True, top_k=1, seed=0, regex="a")  # any constraint marks the row
    sampler = _sampler(constrained, GenerationConfig(), GenerationConfig(regex="b"))
    logits = torch.arange(VOCAB, dtype=torch.float32).repeat(3, 1)
    _allow(sampler, 0, [2, 5])
    _allow(sampler, 2, [])  # a grammar that allows nothing: its row keeps its scores, the batch does not fail
    for _ in range(3):
        tokens, scores = sampler.sample(logits, [0, 1, 2])
        assert tokens.tolist() == [5, VOCAB - 1, VOCAB - 1]  # top-k=1 among the allowed tokens
        assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [5]
        assert torch.isfinite(scores[1]).all() and torch.isfinite(scores[2]).all()


def test_a_slot_reused_by_a_free_request_has_no_mask_bias_or_logprobs_left():
    sampler = _sampler(
        GenerationConfig(regex="x", logit_bias={0: 100}, logprobs=True), GenerationConfig(regex="y")
    )
    _allow(sampler, 0, [0])
    _allow(sampler, 1, [3])  # a constrained neighbour keeps the masks in use
    sampler.deactivate(0)
    sampler.activate(0, GenerationConfig())
    logits = torch.arange(VOCAB, dtype=torch.float32).repeat(2, 1)
    tokens, logprobs = sampler.step(logits, [0, 1]).to_host()
    assert tokens == [VOCAB - 1, 3] and logprobs == [None, None]
