"""Block bookkeeping of the paged KV pool: free list, reference counts, chained prefix hashes, an LRU, tails.

No tensors here: the pool hands out block ids and the caller reads and writes the KV tensors
(``pyvl/kv_cache.py``). A block holds ``block_size`` consecutive tokens; token ``offset`` of block ``b`` lives at
slot ``b * block_size + offset``.

Content keys. Every token of a sequence has a key: a text token its id (an int), an image token
``ImageKey(digest, index)``, the image's digest and the token's index within that image's run, so two prompts
with the same token ids but different images never share a block.

Prefix hashing. A full block's hash is ``hash_block(parent, keys)`` with ``parent`` the previous block's hash, or
the pool's ``root_hash`` (which encodes the model identity, ``salt``) for the first block; equal hashes mean equal
keys at equal positions after an equal prefix, hence equal KV.

Tails. A sequence's partial last block may be registered as a tail under (parent hash, its keys), and every
registered full block is kept under (parent hash, its keys) too. A request whose next tokens after a matched
prefix share a first few keys with such a block reuses that many tokens by COPYING them out of it into a block of
its own (nothing is ever written into a block another sequence may read): so a follow-up question or the next
turn of a chat prefills exactly the tokens that differ, not whole blocks.

Block states (``check()`` verifies them), each block in exactly one:
  free     ref 0, no hash, no tail; allocation takes these first
  cached   ref 0, holds a hash or a tail: still matchable, kept in LRU order; allocation evicts the oldest
  in use   ref > 0 (it may hold a hash or a tail too)

Thread safety: none, by design. The scheduler calls the pool from the one engine thread; requests submitted
from other threads reach it through the scheduler's queue, never directly.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pyvl.errors import PromptError, PyvlError

__all__ = [
    "HASH_BYTES",
    "ImageKey",
    "ContentKey",
    "content_keys",
    "root_hash",
    "hash_block",
    "PoolExhausted",
    "TailMatch",
    "PrefixMatch",
    "BlockPool",
    "SequenceBlocks",
]

HASH_BYTES = 16


class ImageKey(NamedTuple):
    """The content key of an image token: which image (its digest) and which of its tokens."""

    digest: bytes
    index: int


ContentKey = int | ImageKey


def content_keys(
    token_ids: Sequence[int], image_spans: Sequence[tuple[int, int, bytes]] = ()
) -> tuple[ContentKey, ...]:
    """Keys of a token sequence; image_spans = [(start, length, digest)] mark each image's placeholder run."""
    keys: list[ContentKey] = [
        int(t) for t in (token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids)
    ]
    covered = 0  # end of the previous span: spans must not overlap
    for start, length, digest in sorted(image_spans, key=lambda span: span[0]):
        if not isinstance(digest, bytes) or not digest:
            raise PromptError(f"image span at {start}: digest must be non-empty bytes, got {digest!r}")
        if length < 1 or start < covered or start + length > len(keys):
            raise PromptError(
                f"image span (start={start}, length={length}) is empty, overlaps the previous span "
                f"(which ends at {covered}) or runs past the {len(keys)} tokens"
            )
        keys[start : start + length] = _image_keys(digest, length)
        covered = start + length
    return tuple(keys)


@functools.lru_cache(maxsize=256)
def _image_keys(digest: bytes, length: int) -> tuple[ImageKey, ...]:
    """The keys of an image's tokens, made once for the images asked about again and again."""
    return tuple(ImageKey(digest, i) for i in range(length))


def root_hash(salt: bytes | str, block_size: int) -> bytes:
    """The parent of every first block: two models (different salts) or block sizes never share a hash."""
    salt = salt.encode() if isinstance(salt, str) else bytes(salt)
    return hashlib.blake2b(
        b"pyvl.blocks.v1\0" + struct.pack("<q", block_size) + salt, digest_size=HASH_BYTES
    ).digest()


_TEXT_KEY = struct.Struct("<cq")
_IMAGE_KEY = struct.Struct("<cII")  # tag, digest length, index: the length keeps the encoding unambiguous


def hash_block(parent: bytes, keys: Sequence[ContentKey]) -> bytes:
    """blake2b-128 of the parent hash and the block's content keys (remembered for recent blocks: a follow-up
    question re-hashes its whole cached prefix to find it)."""
    return _hash_block(parent, tuple(keys))


@functools.lru_cache(maxsize=8192)
def _hash_block(parent: bytes, keys: tuple[ContentKey, ...]) -> bytes:
    parts = [parent]
    for key in keys:
        if isinstance(key, ImageKey):
            parts.append(_IMAGE_KEY.pack(b"i", len(key.digest), key.index) + key.digest)
        else:
            parts.append(_TEXT_KEY.pack(b"t", key))
    return hashlib.blake2b(b"".join(parts), digest_size=HASH_BYTES).digest()


class PoolExhausted(RuntimeError):
    """An allocation needs more blocks than are free or evictable; nothing was allocated."""

    def __init__(self, needed: int, available: int, num_blocks: int):
        super().__init__(
            f"KV block pool exhausted: {needed} blocks needed, {available} available "
            f"(free or evictable) of {num_blocks}"
        )
        self.needed = needed
        self.available = available


@dataclass(frozen=True)
class TailMatch:
    """Copy the first ``num_tokens`` tokens of tail block ``block_id``; the match holds a reference on it."""

    block_id: int
    num_tokens: int

    def source_slots(self, block_size: int) -> range:
        return range(self.block_id * block_size, self.block_id * block_size + self.num_tokens)


@dataclass(frozen=True)
class PrefixMatch:
    """The cached full blocks of a prefix (referenced, in order, with their hashes) and the best tail, if any."""

    block_ids: tuple[int, ...]
    hashes: tuple[bytes, ...]
    num_full_tokens: int
    tail: TailMatch | None

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV the caller does not compute: the full blocks' plus the tail's (after copying)."""
        return self.num_full_tokens + (self.tail.num_tokens if self.tail else 0)


def _common_prefix_len(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class BlockPool:
    """Ids, ref counts, hashes and tails of ``num_blocks`` blocks of ``block_size`` tokens (see the module doc)."""

    def __init__(self, num_blocks: int, block_size: int, salt: bytes | str = b""):
        if num_blocks < 1 or block_size < 1:
            raise PyvlError(
                f"BlockPool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.root_hash = root_hash(salt, block_size)
        self._ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref-0 blocks with a hash or tail, oldest first
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._tail_of: dict[int, tuple[bytes, tuple[ContentKey, ...]]] = {}  # block -> (parent hash, keys)
        self._tails: dict[bytes, dict[int, tuple[ContentKey, ...]]] = {}  # parent hash -> {block: keys}
        # Full blocks by parent too, so a request that shares only their first tokens can copy those.
        self._children: dict[bytes, dict[int, tuple[ContentKey, ...]]] = {}  # parent hash -> {block: keys}
        self._parent_of: dict[int, bytes] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - len(self._free) - len(self._cached)

    @property
    def num_available(self) -> int:
        """Blocks an allocation can take: free ones plus cached ones it may evict."""
        return len(self._free) + len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def hash_of(self, block_id: int) -> bytes | None:
        return self._hash_of.get(block_id)

    def match_prefix(
        self, keys: Sequence[ContentKey], max_tokens: int | None = None, with_tail: bool = True
    ) -> PrefixMatch:
        """Reference the longest chain of cached full blocks starting ``keys`` and, with_tail, the tail sharing the
        most next keys, never covering more than ``max_tokens`` tokens (pass len(keys) - 1 so that the last token
        is computed and yields logits). Release the returned blocks (and the tail, once copied) when done."""
        limit = len(keys) if max_tokens is None else max(0, min(len(keys), max_tokens))
        size = self.block_size
        parent, blocks, hashes = self.root_hash, [], []
        for start in range(0, limit - size + 1, size):
            block_hash = hash_block(parent, keys[start : start + size])
            block = self._block_of.get(block_hash)
            if block is None:
                break
            blocks.append(block)
            hashes.append(block_hash)
            parent = block_hash
        tail = self._best_tail(parent, keys[len(blocks) * size : limit]) if with_tail else None
        for block in blocks + ([tail.block_id] if tail else []):
            self._acquire(block)
        return PrefixMatch(tuple(blocks), tuple(hashes), len(blocks) * size, tail)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks with ref 1: free ones first, then the least recently used cached ones (forgetting their
        hash or tail). Raises PoolExhausted, changing nothing, when fewer than n are available."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_available:
            raise PoolExhausted(n, self.num_available, self.num_blocks)
        blocks = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._cached.popitem(last=False)
                self._forget(block)
            self._ref[block] = 1
            blocks.append(block)
        return blocks

    def share(self, block_ids: Sequence[int]) -> None:
        """One more reference on each in-use block (another sequence now reads it too)."""
        for block in block_ids:
            self._require_in_use(block)
        for block in block_ids:
            self._ref[block] += 1

    def register_full(
        self, block_id: int, block_hash: bytes, parent: bytes | None = None, keys: Sequence[ContentKey] = ()
    ) -> int:
        """Mark an in-use block as full (all its tokens written) with hash ``block_hash``; return the block the
        caller holds from now on. If another block already holds that hash (two sequences computed the same
        block), that one is kept: the caller's reference moves to it, its own block is released (freed unless
        someone else holds it), and the caller must put the returned id in its block table. With its ``parent``
        hash and ``keys``, the block can also be matched by a request sharing only its first tokens (copied, like a
        tail)."""
        self._require_in_use(block_id)
        own = self._hash_of.get(block_id)
        if own is not None:
            if own != block_hash:
                raise ValueError(
                    f"block {block_id} already holds another hash: a full block's tokens never change"
                )
            return block_id
        if block_id in self._tail_of:  # a tail that filled up: the hash now describes it better
            self._drop_tail(block_id)
        canonical = self._block_of.get(block_hash)
        if canonical is None:
            self._hash_of[block_id] = block_hash
            self._block_of[block_hash] = block_id
            if parent is not None:
                self._children.setdefault(parent, {})[block_id] = tuple(keys)
                self._parent_of[block_id] = parent
            return block_id
        self._acquire(canonical)
        self.release([block_id])
        return canonical

    def register_tail(self, block_id: int, parent_hash: bytes, keys: Sequence[ContentKey]) -> bool:
        """Offer an in-use partial block whose first len(keys) tokens are written, after the chain ending in
        ``parent_hash``, for copying. Returns False (registering nothing) when a tail under the same parent already
        starts with these keys; tails that these keys extend are dropped instead."""
        self._require_in_use(block_id)
        keys = tuple(keys)
        if not 0 < len(keys) < self.block_size:
            raise ValueError(f"a tail holds 1..{self.block_size - 1} tokens, got {len(keys)}")
        if block_id in self._hash_of:
            raise ValueError(f"block {block_id} is a registered full block; it cannot also be a tail")
        if block_id in self._tail_of:
            self._drop_tail(block_id)
        siblings = self._tails.get(parent_hash, {})
        if any(other_keys[: len(keys)] == keys for other_keys in siblings.values()):
            return False
        for other in [b for b, other_keys in siblings.items() if keys[: len(other_keys)] == other_keys]:
            self._drop_tail(other)
            if self._ref[other] == 0:  # nothing left to match it by: cached -> free
                del self._cached[other]
                self._free.append(other)
        self._tails.setdefault(parent_hash, {})[block_id] = keys
        self._tail_of[block_id] = (parent_hash, keys)
        return True

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block, given in sequence order. At ref 0 a block with a hash or tail becomes
        cached, the last of the sequence as the least recently used (evicting the first block of a chain would
        make the rest unmatchable anyway); others become free."""
        for block, count in Counter(block_ids).items():
            if self._ref[block] < count:
                raise ValueError(
                    f"block {block} released {count} times but holds {self._ref[block]} references"
                )
        for block in reversed(block_ids):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._hash_of or block in self._tail_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def check(self) -> None:
        """Verify every invariant; raise RuntimeError naming the first one broken."""
        free, cached = set(self._free), set(self._cached)
        in_use = {b for b in range(self.num_blocks) if self._ref[b] > 0}
        _expect(len(free) == len(self._free), "a block is on the free list twice")
        _expect(
            not (free & cached)
            and not (free & in_use)
            and not (cached & in_use)
            and len(free) + len(cached) + len(in_use) == self.num_blocks,
            f"blocks not in exactly one state: free {sorted(free)}, cached {sorted(cached)}, "
            f"in use {sorted(in_use)}",
        )
        _expect(all(r >= 0 for r in self._ref), "a negative ref count")
        for block in free:
            _expect(
                block not in self._hash_of and block not in self._tail_of, f"free block {block} is matchable"
            )
        for block in cached:
            _expect(
                (block in self._hash_of) != (block in self._tail_of),
                f"cached block {block} holds neither or both of a hash and a tail",
            )
        _expect(
            len(self._hash_of) == len(self._block_of)
            and all(self._block_of.get(h) == b for b, h in self._hash_of.items()),
            "hash maps disagree",
        )
        _expect(
            sum(map(len, self._tails.values())) == len(self._tail_of)
            and all(self._tails.values())
            and all(self._tails[p][b] == keys for b, (p, keys) in self._tail_of.items()),
            "tail maps disagree",
        )
        _expect(
            all(self._children[p][b] is not None and b in self._hash_of for b, p in self._parent_of.items())
            and sum(map(len, self._children.values())) == len(self._parent_of),
            "child maps disagree",
        )
        for block, (_, keys) in self._tail_of.items():
            _expect(
                0 < len(keys) < self.block_size and block not in self._hash_of, f"bad tail on block {block}"
            )

    def _acquire(self, block: int) -> None:
        if self._ref[block] == 0:
            del self._cached[block]  # only cached blocks are ever matched or shared at ref 0
        self._ref[block] += 1

    def _require_in_use(self, block: int) -> None:
        if not 0 <= block < self.num_blocks or self._ref[block] == 0:
            raise ValueError(f"block {block} is not in use")

    def _best_tail(self, parent: bytes, next_keys: Sequence[ContentKey]) -> TailMatch | None:
        """The tail or full block after ``parent`` whose first keys agree longest with ``next_keys``."""
        best = None
        candidates = [*self._tails.get(parent, {}).items(), *self._children.get(parent, {}).items()]
        for block, keys in candidates:
            n = _common_prefix_len(keys, next_keys)
            if n > 0 and (best is None or n > best.num_tokens):
                best = TailMatch(block, n)
        return best

    def _forget(self, block: int) -> None:
        block_hash = self._hash_of.pop(block, None)
        if block_hash is not None:
            del self._block_of[block_hash]
        parent = self._parent_of.pop(block, None)
        if parent is not None:
            siblings = self._children[parent]
            del siblings[block]
            if not siblings:
                del self._children[parent]
        if block in self._tail_of:
            self._drop_tail(block)

    def _drop_tail(self, block: int) -> None:
        parent, _ = self._tail_of.pop(block)
        siblings = self._tails[parent]
        del siblings[block]
        if not siblings:
            del self._tails[parent]


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(f"BlockPool invariant broken: {message}")


class SequenceBlocks:
    """One sequence's block table: its block ids in order, the tokens written so far, the hashes of its registered
    full blocks. Start it from a PrefixMatch to take over the match's full blocks (not its tail: copy the tail's
    tokens into ``append_slots(tail.num_tokens)``, then release the tail block)."""

    def __init__(self, pool: BlockPool, match: PrefixMatch | None = None):
        self.pool = pool
        self.block_ids: list[int] = list(match.block_ids) if match else []
        self.hashes: list[bytes] = list(match.hashes) if match else []
        self.num_tokens = match.num_full_tokens if match else 0

    def blocks_needed(self, n: int) -> int:
        """Fresh blocks that appending n tokens would allocate."""
        return max(0, -(-(self.num_tokens + n) // self.pool.block_size) - len(self.block_ids))

    def append_slots(self, n: int) -> list[int]:
        """Slots for the next n tokens, allocating blocks as needed; PoolExhausted leaves the sequence as it was."""
        missing = self.blocks_needed(n)
        if missing:
            self.block_ids += self.pool.allocate(missing)
        size = self.pool.block_size
        slots = [
            self.block_ids[p // size] * size + p % size for p in range(self.num_tokens, self.num_tokens + n)
        ]
        self.num_tokens += n
        return slots

    def fork(self) -> tuple[SequenceBlocks, list[int], list[int]]:
        """A second sequence holding the same tokens: the full blocks shared (one more reference each), the
        partial last block a fresh block of its own, into which the caller copies the K/V of slots ``src`` at
        ``dst`` (copy-on-write: nothing is ever written into a block another sequence reads). Returns (sequence,
        src, dst); PoolExhausted changes nothing."""
        size = self.pool.block_size
        full, partial = divmod(self.num_tokens, size)
        fresh = self.pool.allocate(1) if partial else []
        self.pool.share(self.block_ids[:full])
        child = SequenceBlocks(self.pool)
        child.block_ids = self.block_ids[:full] + fresh
        child.hashes = list(self.hashes)
        child.num_tokens = self.num_tokens
        src = [self.block_ids[full] * size + i for i in range(partial)]
        dst = [fresh[0] * size + i for i in range(partial)] if partial else []
        return child, src, dst

    def register_full_blocks(self, keys: Sequence[ContentKey], upto: int | None = None) -> int:
        """Hash and register the blocks filled since the last call; keys: the sequence's content keys (at least
        num_tokens of them). ``upto`` (default num_tokens): only tokens before it are written yet, so only blocks
        that end by then count. Returns how many were registered (a duplicate's table entry is replaced)."""
        upto = self.num_tokens if upto is None else min(upto, self.num_tokens)
        if len(keys) < upto:
            raise ValueError(f"{len(keys)} keys for a sequence of {upto} written tokens")
        size = self.pool.block_size
        parent = self.hashes[-1] if self.hashes else self.pool.root_hash
        first = len(self.hashes)
        for i in range(first, upto // size):
            block_keys = keys[i * size : (i + 1) * size]
            block_hash = hash_block(parent, block_keys)
            self.block_ids[i] = self.pool.register_full(self.block_ids[i], block_hash, parent, block_keys)
            self.hashes.append(block_hash)
            parent = block_hash
        return len(self.hashes) - first

    def register_tail(self, keys: Sequence[ContentKey]) -> bool:
        """Offer the partial last block as a tail (after register_full_blocks, typically when the sequence
        finishes). False when there is no partial block or an equal-or-longer tail already exists."""
        size = self.pool.block_size
        full = self.num_tokens // size
        if len(self.hashes) != full:
            raise ValueError(f"register the {full - len(self.hashes)} unregistered full blocks first")
        if self.num_tokens == full * size:
            return False
        parent = self.hashes[-1] if self.hashes else self.pool.root_hash
        return self.pool.register_tail(self.block_ids[full], parent, keys[full * size : self.num_tokens])

    def release(self) -> None:
        """Give every block back to the pool (finished, cancelled or preempted); the sequence is empty again."""
        self.pool.release(self.block_ids)
        self.block_ids, self.hashes, self.num_tokens = [], [], 0
