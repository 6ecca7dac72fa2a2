"""Shard plans (pyvl.parallel.plan), from configs alone: no process, no weights.

The head arithmetic against a direct per-head construction, the packed wqkv cut against the single-process
regrouping, every element of every tensor kept by exactly the ranks it should be, and the memory bound of the
issue (at TP=2 each rank holds at most 55% of the weights) at both released sizes.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import GOLDEN

from pyvl.bench.presets import preset_config
from pyvl.config import ModelConfig, load_config
from pyvl.demo import demo_config_dict
from pyvl.errors import ConfigError
from pyvl.models.llm import regroup_wqkv
from pyvl.parallel.plan import ShardPlan, local_kv_heads, split
from pyvl.shapes import expected_shapes

V15, MINI = (load_config(GOLDEN / v / "checkpoint") for v in ("v15", "mini"))


def heads_config(q: int, kv: int, vit_heads: int = 4, vocab: int = 1009) -> ModelConfig:
    """A tiny config with the given LLM query/KV heads (head_dim 8) and ViT heads (head_dim 8)."""
    d = demo_config_dict()
    d["vision_config"].update(hidden_size=8 * vit_heads, num_attention_heads=vit_heads)
    d["llm_config"].update(
        hidden_size=8 * q,
        num_attention_heads=q,
        num_key_value_heads=kv,
        vocab_size=vocab,
        intermediate_size=40,
    )
    d["hidden_size"] = 8 * q
    return ModelConfig.from_dict(d)


def test_split_gives_the_first_ranks_the_remainder():
    assert [len(r) for r in split(25, 2)] == [13, 12]
    assert [len(r) for r in split(4, 3)] == [2, 1, 1]
    assert [len(r) for r in split(92553, 4)] == [23139, 23138, 23138, 23138]
    for total, parts in ((25, 2), (16384, 3), (1009, 7), (6, 6)):
        ranges = split(total, parts)
        assert ranges[0].start == 0 and ranges[-1].stop == total
        assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))  # contiguous, in order
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


@pytest.mark.parametrize(
    "q_heads, group, expected",
    [
        (range(0, 24), 6, (0, 1, 2, 3)),  # V1-5 on 2 ranks: whole groups, nothing repeated
        (range(0, 16), 6, (0, 0, 0, 1, 1, 1, 2, 2)),  # V1-5 on 3 ranks, rank 0: 6 + 6 + 4 queries -> gcd 2
        (range(16, 32), 6, (2, 3, 3, 3, 4, 4, 4, 5)),  # rank 1: 2 + 6 + 6 + 2
        (range(2, 4), 3, (0, 1)),  # 6/2 heads on 3 ranks: rank 1 straddles two groups
        (range(0, 3), 2, (0, 0, 1)),  # 6/3 heads on 2 ranks: 2 + 1 -> gcd 1
        (range(5, 6), 8, (0,)),  # 16/2 heads on 16 ranks: a KV head replicated on 8 ranks
    ],
)
def test_local_kv_heads(q_heads, group, expected):
    kv = local_kv_heads(q_heads, group)
    assert kv == expected
    g = len(q_heads) // len(kv)  # every local KV slot serves g query heads ...
    assert len(q_heads) % len(kv) == 0
    for i, n in enumerate(
        q_heads
    ):  # ... and local query head i reads slot i // g, which holds KV head n // G
        assert kv[i // g] == n // group


def _rows_of(cut, full_rows: int) -> torch.Tensor:
    """The checkpoint row indices a row slice reads, in order."""
    index = torch.arange(full_rows)
    return torch.cat([index[a:b] for a, b in cut.ranges])


@pytest.mark.parametrize("q, kv", [(4, 2), (6, 2), (6, 3), (48, 8), (16, 8), (4, 1)])
def test_wqkv_cut_matches_the_regrouping_and_the_heads(q, kv):
    cfg = heads_config(q, kv, vit_heads=q)
    m, d = cfg.llm, cfg.llm.head_dim
    rows = (q + 2 * kv) * d
    packed_ids = torch.arange(rows)[:, None].float()
    # one rank: exactly regroup_wqkv's [all q | all k | all v]
    whole = ShardPlan.for_rank(cfg, 0, 1).llm.wqkv_rows(m)
    assert _rows_of(whole, rows).tolist() == regroup_wqkv(packed_ids, m)[:, 0].long().tolist()
    regrouped = regroup_wqkv(packed_ids, m)[:, 0].long()
    q_rows, k_rows, v_rows = regrouped[: q * d], regrouped[q * d : (q + kv) * d], regrouped[(q + kv) * d :]
    for world in range(2, q + 1):
        for rank in range(world):
            shard = ShardPlan.for_rank(cfg, rank, world).llm
            got = _rows_of(shard.wqkv_rows(m), rows)
            nq, nkv = len(shard.q_heads), len(shard.kv_heads)
            assert len(got) == (nq + 2 * nkv) * d
            want_q = torch.cat([q_rows[n * d : (n + 1) * d] for n in shard.q_heads])
            want_k = torch.cat([k_rows[h * d : (h + 1) * d] for h in shard.kv_heads])
            want_v = torch.cat([v_rows[h * d : (h + 1) * d] for h in shard.kv_heads])
            assert got.tolist() == torch.cat([want_q, want_k, want_v]).tolist()


def _kept(cfg: ModelConfig, world: int, key: str) -> torch.Tensor:
    """How many ranks keep each element of checkpoint tensor ``key``."""
    shape = expected_shapes(cfg)[key]
    count = torch.zeros(shape, dtype=torch.int32)
    for rank in range(world):
        cut = ShardPlan.for_rank(cfg, rank, world).slices(cfg)[key]
        if cut.dim is None:
            count += 1
            continue
        for a, b in cut.ranges:
            count[(slice(a, b),) if cut.dim == 0 else (slice(None), slice(a, b))] += 1
    return count


@pytest.mark.parametrize("cfg", [V15, MINI, heads_config(6, 2, vit_heads=5)], ids=["v15", "mini", "6-2"])
@pytest.mark.parametrize("world", [2, 3])
def test_every_sharded_element_is_kept_once(cfg, world):
    replicated_by_design = (
        "norm",
        "mlp1.",
        "vision_model.embeddings.",
        "ls1",
        "ls2",
        "proj.bias",
        "fc2.bias",
    )
    for key in expected_shapes(cfg):
        count = _kept(cfg, world, key)
        if "wqkv" in key:  # K/V rows are kept by every rank whose queries read them
            q_rows = cfg.llm.num_kv_groups * cfg.llm.head_dim
            assert (count > 0).all(), key
            blocks = count.reshape(cfg.llm.num_key_value_heads, -1, *count.shape[1:])
            assert (blocks[:, :q_rows] == 1).all(), key
        elif (
            any(part in key for part in replicated_by_design) and "q_norm" not in key and "k_norm" not in key
        ):
            assert (count == world).all(), key
        else:
            assert (count == 1).all(), key


@pytest.mark.parametrize("preset", ["internvl-chat-v1-5", "mini-internvl-chat-2b-v1-5"])
def test_at_tp2_each_rank_holds_at_most_55_percent_of_the_weights(preset):
    """At the released sizes. (The golden models are so small that their replicated vision embeddings, a few
    MB at V1-5 size, are a third of them: there a rank holds about 60%.)"""
    cfg = preset_config(preset)
    whole = ShardPlan.for_rank(cfg, 0, 1).nbytes(cfg, torch.bfloat16)
    assert whole == sum(math.prod(s) for s in expected_shapes(cfg).values()) * 2
    for rank in range(2):
        share = ShardPlan.for_rank(cfg, rank, 2).nbytes(cfg, torch.bfloat16) / whole
        assert share <= 0.55, f"rank {rank} holds {share:.1%}"


def test_a_model_cut_more_ways_than_it_has_heads_is_refused():
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=5: InternViT has 4 attention heads"):
        ShardPlan.for_rank(V15, 0, 5)
    with pytest.raises(ConfigError, match=r"InternViT has 3 attention heads.*at most 3 ranks"):
        ShardPlan.for_rank(MINI, 0, 4)
    with pytest.raises(ConfigError, match=r"InternLM2 has 6 attention heads.*at most 6 ranks"):
        ShardPlan.for_rank(heads_config(6, 2, vit_heads=8), 0, 7)
    ShardPlan.for_rank(V15, 3, 4)  # 4 ranks of 4 heads each: fine
