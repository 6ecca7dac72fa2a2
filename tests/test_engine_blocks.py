"""The block pool: prefix matching, allocation, eviction, duplicates, tails, and a randomized run under check()."""

from __future__ import annotations

import random

import pytest

from pyvl.engine.blocks import (
    BlockPool,
    ImageKey,
    PoolExhausted,
    SequenceBlocks,
    content_keys,
    hash_block,
    root_hash,
)
from pyvl.errors import PromptError, PyvlError

BS = 4


def run_sequence(pool: BlockPool, keys, finish: bool = True) -> SequenceBlocks:
    """Prefill keys from scratch (no matching), register its full blocks and, when finish, its tail, release."""
    seq = SequenceBlocks(pool)
    seq.append_slots(len(keys))
    seq.register_full_blocks(keys)
    if finish:
        seq.register_tail(keys)
        seq.release()
    return seq


def state(pool: BlockPool) -> tuple:
    return (
        pool.num_free,
        pool.num_cached,
        pool.num_in_use,
        tuple(pool.ref_count(b) for b in range(pool.num_blocks)),
        tuple(pool.hash_of(b) for b in range(pool.num_blocks)),
    )


def test_content_keys_mark_image_tokens_by_digest_and_index():
    keys = content_keys([1, 2, 9, 9, 9, 3, 9, 9], [(2, 3, b"A"), (6, 2, b"B")])
    assert keys == (
        1,
        2,
        ImageKey(b"A", 0),
        ImageKey(b"A", 1),
        ImageKey(b"A", 2),
        3,
        ImageKey(b"B", 0),
        ImageKey(b"B", 1),
    )
    assert content_keys([5, 6]) == (5, 6)


@pytest.mark.parametrize(
    "spans", [[(0, 3, b"A"), (2, 2, b"B")], [(3, 2, b"A")], [(0, 0, b"A")], [(0, 1, b"")], [(0, 1, "text")]]
)
def test_content_keys_reject_bad_spans(spans):
    with pytest.raises(PromptError):
        content_keys([1, 2, 3, 4], spans)


def test_hash_chain_depends_on_parent_salt_and_key_kind():
    block = (1, 2, 3, 4)
    root = root_hash("model-a", BS)
    assert hash_block(root, block) != hash_block(hash_block(root, (9, 9, 9, 9)), block)
    assert root != root_hash("model-b", BS) and root != root_hash("model-a", BS * 2)
    assert hash_block(root, (ImageKey(b"A", 1),)) != hash_block(root, (ImageKey(b"A", 2),))
    assert hash_block(root, (ImageKey(b"AB", 1),)) != hash_block(root, (ImageKey(b"A", 1),))
    assert len(hash_block(root, block)) == 16


def test_same_block_after_different_prefixes_never_matches():
    pool = BlockPool(8, BS)
    shared = [5, 6, 7, 8]
    run_sequence(pool, [1, 1, 1, 1] + shared)
    match = pool.match_prefix([2, 2, 2, 2] + shared)
    assert match.block_ids == () and match.num_tokens == 0


def test_match_allocate_release_cycle():
    pool = BlockPool(8, BS, salt="m")
    keys = list(range(100, 110))  # 2 full blocks + 2 tokens
    first = SequenceBlocks(pool)
    slots = first.append_slots(len(keys))
    assert first.num_tokens == 10 and len(first.block_ids) == 3
    assert slots == [first.block_ids[p // BS] * BS + p % BS for p in range(10)]
    assert first.register_full_blocks(keys) == 2 and first.register_full_blocks(keys) == 0
    assert (pool.num_free, pool.num_cached, pool.num_in_use) == (5, 0, 3)
    first.release()
    pool.check()
    # the full blocks stay cached; the unregistered partial block went back to the free list
    assert (pool.num_free, pool.num_cached, pool.num_in_use) == (6, 2, 0)

    match = pool.match_prefix(keys + [1, 2, 3])
    assert match.num_full_tokens == 8 and match.tail is None
    assert all(pool.ref_count(b) == 1 for b in match.block_ids)
    second = SequenceBlocks(pool, match)
    again = pool.match_prefix(keys)  # a concurrent sharer
    assert again.block_ids == match.block_ids and all(pool.ref_count(b) == 2 for b in match.block_ids)
    second.append_slots(5)
    assert second.num_tokens == 13 and second.block_ids[:2] == list(match.block_ids)
    pool.check()
    second.release()
    pool.release(again.block_ids)
    pool.check()
    assert pool.num_in_use == 0 and pool.num_cached == 2


def test_max_tokens_caps_the_match():
    pool = BlockPool(8, BS)
    keys = list(range(8))
    run_sequence(pool, keys)
    capped = pool.match_prefix(keys, max_tokens=len(keys) - 1)
    # the last full block cannot be taken whole; its first 3 tokens are copied out of it instead
    assert (capped.num_full_tokens, capped.num_tokens) == (4, 7)
    assert pool.match_prefix(keys, max_tokens=0).num_tokens == 0
    assert pool.match_prefix(keys).num_tokens == 8


def test_a_full_block_sharing_only_its_first_tokens_is_copied_from():
    pool = BlockPool(8, BS)
    first = run_sequence(pool, list(range(12)), finish=False)
    match = pool.match_prefix([0, 1, 2, 3, 4, 5, 99, 98, 97])  # diverges inside the second block
    assert (match.num_full_tokens, match.tail.block_id, match.tail.num_tokens) == (4, first.block_ids[1], 2)
    assert pool.ref_count(first.block_ids[1]) == 2  # held while the caller copies, then released
    pool.release([*match.block_ids, match.tail.block_id])
    pool.check()


def test_eviction_takes_free_blocks_first_then_the_least_recently_used():
    pool = BlockPool(6, BS)
    old, new = list(range(8)), list(range(50, 58))
    run_sequence(pool, old)  # 2 cached blocks, released first
    run_sequence(pool, new)  # 2 cached blocks, released last
    assert (pool.num_free, pool.num_cached) == (2, 4)
    pool.allocate(2)  # the free ones: nothing evicted
    assert pool.match_prefix(old, with_tail=False).num_tokens == 8
    pool.release(pool.match_prefix(old).block_ids * 2)  # drop both matches' refs: old is now most recent
    taken = pool.allocate(1)
    # `new` was least recently used, and within a chain the last block goes first: its first block survives
    assert pool.match_prefix(new).num_tokens == 4
    assert pool.match_prefix(old).num_tokens == 8
    pool.check()
    assert len(taken) == 1


def test_pool_exhausted_changes_nothing():
    pool = BlockPool(4, BS)
    run_sequence(pool, list(range(8)))
    held = pool.allocate(1)
    before = state(pool)
    with pytest.raises(PoolExhausted) as info:
        pool.allocate(4)
    assert (info.value.needed, info.value.available) == (4, 3)
    assert "4 blocks needed, 3 available" in str(info.value)
    assert state(pool) == before
    seq = SequenceBlocks(pool)
    with pytest.raises(PoolExhausted):
        seq.append_slots(4 * BS)
    assert (seq.num_tokens, seq.block_ids) == (0, []) and state(pool) == before
    pool.check()
    assert pool.match_prefix(list(range(8))).num_tokens == 8 and held


def test_bad_arguments_are_refused():
    with pytest.raises(PyvlError):
        BlockPool(0, BS)
    pool = BlockPool(2, BS)
    block = pool.allocate(1)
    pool.release(block)
    with pytest.raises(ValueError):
        pool.release(block)  # already at ref 0
    with pytest.raises(ValueError):
        pool.register_full(block[0], b"h" * 16)  # not in use
    pool.check()


def test_duplicate_hash_keeps_one_block_and_moves_the_reference():
    pool = BlockPool(8, BS)
    keys = [7, 7, 7, 7]
    a, b = SequenceBlocks(pool), SequenceBlocks(pool)
    a.append_slots(4)
    b.append_slots(4)  # both computed the same block before either registered it
    own_b = b.block_ids[0]
    a.register_full_blocks(keys)
    b.register_full_blocks(keys)
    assert b.block_ids == a.block_ids and own_b != a.block_ids[0]
    assert pool.ref_count(a.block_ids[0]) == 2 and pool.ref_count(own_b) == 0
    assert pool.num_free == 7
    pool.check()
    block_hash = pool.hash_of(a.block_ids[0])
    assert pool.register_full(a.block_ids[0], block_hash) == a.block_ids[0]  # re-registering is a no-op
    with pytest.raises(ValueError):
        pool.register_full(a.block_ids[0], b"x" * 16)
    a.release()
    b.release()
    pool.check()
    assert (pool.num_cached, pool.num_free) == (1, 7)


def test_duplicate_of_a_cached_block_revives_it():
    pool = BlockPool(4, BS)
    keys = [3, 1, 4, 1]
    run_sequence(pool, keys)
    seq = SequenceBlocks(pool)  # prefilled without matching (say the match was skipped)
    seq.append_slots(4)
    seq.register_full_blocks(keys)
    assert pool.num_cached == 0 and pool.ref_count(seq.block_ids[0]) == 1
    assert pool.num_free == 3
    pool.check()


def test_tail_matches_by_longest_common_prefix_and_is_copied():
    pool = BlockPool(8, BS)
    history = [1, 2, 3, 4, 5, 6, 7]  # one full block + a 3-token tail
    run_sequence(pool, history)
    assert pool.num_cached == 2
    match = pool.match_prefix([1, 2, 3, 4, 5, 6, 9, 9])
    assert match.num_full_tokens == 4 and match.tail is not None and match.tail.num_tokens == 2
    assert match.num_tokens == 6
    tail = match.tail
    assert pool.ref_count(tail.block_id) == 1  # held while the caller copies
    seq = SequenceBlocks(pool, match)
    destination = seq.append_slots(tail.num_tokens)
    source = tail.source_slots(BS)
    assert list(source) == [tail.block_id * BS, tail.block_id * BS + 1]
    assert destination[0] // BS != tail.block_id  # copy-on-write: the tail block is never written
    pool.release([tail.block_id])
    pool.check()
    # a different continuation after the same full block picks the tail sharing the most keys
    assert pool.match_prefix([1, 2, 3, 4, 5, 6, 7]).tail.num_tokens == 3
    assert pool.match_prefix([1, 2, 3, 4, 8]).tail is None
    assert pool.match_prefix([1, 2, 3, 4, 5, 6, 7], with_tail=False).tail is None


def test_the_tail_sharing_the_most_keys_wins_among_siblings():
    pool = BlockPool(8, BS)
    run_sequence(pool, [1, 2, 3, 4, 5, 6, 1])
    run_sequence(pool, [1, 2, 3, 4, 5, 7])
    assert pool.num_cached == 3  # neither tail starts the other: both stay
    assert pool.match_prefix([1, 2, 3, 4, 5, 7, 0]).tail.num_tokens == 2
    assert pool.match_prefix([1, 2, 3, 4, 5, 6, 1, 0]).tail.num_tokens == 3


def test_tails_are_registered_once_and_longer_ones_replace_shorter():
    pool = BlockPool(8, BS)
    run_sequence(pool, [1, 2, 3, 4, 5, 6])
    match = pool.match_prefix([1, 2, 3, 4, 5, 6])
    short_tail = match.tail.block_id
    pool.release(list(match.block_ids) + [short_tail])
    covered = run_sequence(pool, [1, 2, 3, 4, 5], finish=False)
    assert covered.register_tail([1, 2, 3, 4, 5]) is False  # [5, 6] already offers [5]
    covered.release()
    assert pool.num_cached == 2
    longer = run_sequence(pool, [1, 2, 3, 4, 5, 6, 7], finish=False)
    assert longer.register_tail([1, 2, 3, 4, 5, 6, 7]) is True
    longer.release()
    pool.check()
    # the full block (longer's duplicate of it was freed) and the new tail; the dominated tail went free
    assert pool.num_cached == 2 and pool.num_free == 6
    tail = pool.match_prefix([1, 2, 3, 4, 5, 6, 7, 8]).tail
    assert tail.num_tokens == 3 and tail.block_id != short_tail


def test_tail_is_never_matched_after_eviction():
    pool = BlockPool(3, BS)
    run_sequence(pool, [1, 2, 3, 4, 5, 6])
    assert pool.num_cached == 2
    pool.allocate(pool.num_free + 2)  # evicts the tail (released last in chain order -> oldest) and the block
    pool.check()
    match = pool.match_prefix([1, 2, 3, 4, 5, 6])
    assert match.tail is None and match.num_tokens == 0


def test_a_filled_tail_becomes_a_full_block():
    pool = BlockPool(4, BS)
    seq = run_sequence(pool, [1, 2], finish=False)
    assert seq.register_tail([1, 2]) is True
    seq.append_slots(2)
    assert seq.register_full_blocks([1, 2, 3, 4]) == 1
    seq.release()
    pool.check()
    match = pool.match_prefix([1, 2, 3, 4, 5])
    assert match.num_full_tokens == 4 and match.tail is None


def test_identical_token_ids_with_different_images_share_no_block():
    pool = BlockPool(16, BS)
    ids = [1] + [9] * 8 + [2, 3, 4]  # an 8-token image run between text
    keys_a = content_keys(ids, [(1, 8, b"digest-a")])
    keys_b = content_keys(ids, [(1, 8, b"digest-b")])
    a = run_sequence(pool, keys_a, finish=False)
    match = pool.match_prefix(keys_b)
    assert (match.num_full_tokens, match.num_tokens) == (0, 1)  # only the leading text token, by copy
    pool.release([match.tail.block_id])
    b = run_sequence(pool, keys_b, finish=False)
    assert not set(a.block_ids) & set(b.block_ids) and not set(a.hashes) & set(b.hashes)
    assert pool.match_prefix(keys_a).num_full_tokens == 12
    pool.check()


def test_randomized_operations_keep_every_invariant_and_the_kv_contents():
    """Thousands of random requests, decode steps, finishes and preemptions. A fake KV (slot -> identity of the
    token's whole prefix) checks that every matched block and copied tail holds exactly the request's prefix."""
    rng = random.Random(1234)
    pool = BlockPool(24, BS, salt="random")
    kv: dict[int, int] = {}
    running: list[tuple[SequenceBlocks, list]] = []
    bases = [[rng.randrange(6) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    digests = [b"img-0", b"img-1"]
    seen = {"matched blocks": 0, "copied tails": 0, "exhausted": 0}

    def prefix_ids(keys):
        ids, last = [], 0
        for key in keys:
            last = hash((last, key))
            ids.append(last)
        return ids

    def write(seq, keys, slots):
        ids = prefix_ids(keys)
        for position, slot in zip(range(seq.num_tokens - len(slots), seq.num_tokens), slots):
            assert pool.ref_count(slot // BS) == 1, "wrote into a shared block"
            kv[slot] = ids[position]

    def new_request():
        keys = list(rng.choice(bases)) + [rng.randrange(6) for _ in range(rng.randrange(0, 8))]
        if rng.random() < 0.3:
            keys = list(content_keys(keys + [0] * 4, [(len(keys), 4, rng.choice(digests))]))
        expected = prefix_ids(keys)
        match = pool.match_prefix(keys, max_tokens=len(keys) - 1)
        seen["matched blocks"] += len(match.block_ids)
        seen["copied tails"] += match.tail is not None
        for i, block in enumerate(match.block_ids):
            assert [kv[block * BS + j] for j in range(BS)] == expected[i * BS : (i + 1) * BS]
        seq = SequenceBlocks(pool, match)
        try:
            if match.tail:
                destination = seq.append_slots(match.tail.num_tokens)
                source = list(match.tail.source_slots(BS))
                assert [kv[s] for s in source] == expected[seq.num_tokens - len(source) : seq.num_tokens]
                for s, d in zip(source, destination):
                    kv[d] = kv[s]
            rest = seq.append_slots(len(keys) - seq.num_tokens)
        except PoolExhausted:
            seen["exhausted"] += 1
            seq.release()
            return
        finally:
            if match.tail:
                pool.release([match.tail.block_id])
        write(seq, keys, rest)
        seq.register_full_blocks(keys)
        running.append((seq, keys))

    def decode():
        seq, keys = rng.choice(running)
        before = (list(seq.block_ids), seq.num_tokens)
        try:
            slots = seq.append_slots(1)
        except PoolExhausted:
            seen["exhausted"] += 1
            assert (seq.block_ids, seq.num_tokens) == before
            return
        keys.append(rng.randrange(6))
        write(seq, keys, slots)
        seq.register_full_blocks(keys)

    def finish(register: bool):
        seq, keys = running.pop(rng.randrange(len(running)))
        if register:
            seq.register_tail(keys)
        seq.release()

    for _ in range(3000):
        roll = rng.random()
        if not running or roll < 0.3:
            new_request()
        elif roll < 0.75:
            decode()
        else:
            finish(register=roll < 0.95)  # the rest are preempted: released without offering a tail
        pool.check()
        assert pool.num_free + pool.num_cached + pool.num_in_use == pool.num_blocks
        held: dict[int, int] = {}
        for seq, _ in running:
            for block in seq.block_ids:
                held[block] = held.get(block, 0) + 1
        assert all(pool.ref_count(b) == held.get(b, 0) for b in range(pool.num_blocks))
    while running:
        finish(register=True)
    pool.check()
    assert pool.num_in_use == 0
    assert min(seen.values()) > 50, seen  # the run did exercise sharing, tail copies and a full pool
