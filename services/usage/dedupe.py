"""The ids the usage fold remembers: a call id retried within 24 hours is counted once,
whatever the traffic, in bounded memory.

JetStream drops a repeated `Nats-Msg-Id` only within the usage stream's duplicate window
(24 hours, shared.streams); a producer retrying later, or a stream whose window an operator
shortened, stores the call again, and an import (`events import`) may bring ids stored
before. The fold remembers ids in two generations of at least DEDUPE_S each, by the
time the stream stored them (a replay rotates at the same events). A generation holds its
first EXACT_LIMIT ids exactly; past that, ids go into the generation's Bloom filter of
BLOOM_BITS bits, which never forgets an id (a retry is never counted twice) and, up to a
million more ids a day, takes fewer than one new id in ten million for a retry. When the
filter is made it takes the exact ids too, so from then on one read of the filter decides
for that generation (the exact ids stay for the spend log, which asks for an id's sequence).

The filter is blocked: an id's BLOOM_MASK_BITS bits all lie in one 64-byte block (a cache
line), set and tested as one 512-bit integer. A plain Bloom filter's seven bits anywhere in
8 MiB cost seven cache misses and seven Python steps each: ~4 us per id past the exact ones,
a fifth of what the usage service spends on a call (bench/profile_usage_fold.py). Blocking
raises the false-positive rate for a given number of bits, so it takes ten bits where the
plain filter took seven: at a million ids in a generation ~5.6e-8 (Poisson over blocks:
sum_j P(j; n/blocks) * (1 - (1 - 1/512)^(10 j))^10), under the plain filter's 9.4e-8.
"""

from __future__ import annotations

import math
from hashlib import blake2s

import msgspec
from xxhash import xxh3_64_intdigest

DEDUPE_S = 86_400.0
EXACT_LIMIT = 100_000
BLOOM_BITS = 1 << 26  # 8 MiB per generation, allocated only once a generation overflows
BLOCK_BYTES = 64
BLOCKS = BLOOM_BITS // 8 // BLOCK_BYTES  # 2**17: the low 17 bits of the id's digest
assert BLOCKS == 1 << 17  # locate() takes the digest's low 17 bits for the block
# An id's mask is one entry of each of three tables of 2**TABLE_INDEX_BITS masks (of 4, 3
# and 3 bits): a lookup and an OR per table instead of a shift and an OR per bit. Entries
# shared by two ids of a block (one chance in 4,096 a table) barely change the rate.
TABLE_INDEX_BITS = 12  # locate() takes three 12-bit slices of the digest above the block's
TABLE_MASK_BITS = (4, 3, 3)
BLOOM_MASK_BITS = sum(TABLE_MASK_BITS)  # at most: two entries may share a bit


class IdGeneration(msgspec.Struct, kw_only=True, array_like=True):
    """The ids first stored from `since` on (epoch seconds of the stream's timestamp)."""

    since: float = 0.0
    ids: dict[str, int] = {}
    bloom: bytearray = bytearray()
    spilled: int = 0


class IdMemory(msgspec.Struct, kw_only=True):
    """Two generations: an id leaves `previous` no sooner than DEDUPE_S after it was stored."""

    current: IdGeneration = msgspec.field(default_factory=IdGeneration)
    previous: IdGeneration = msgspec.field(default_factory=IdGeneration)


def _mask_tables() -> tuple[tuple[int, ...], ...]:
    """The tables of masks within a block (TABLE_MASK_BITS distinct bits each), the same in
    every process (they decide which bits a snapshot's filter holds): bits drawn from a
    fixed digest of the table and the index, the next unused one on a repeat."""
    tables = []
    for table, bits in enumerate(TABLE_MASK_BITS):
        masks = []
        for index in range(1 << TABLE_INDEX_BITS):
            seed = blake2s(f"stockpilot-bloom-{table}-{index}".encode()).digest()
            mask = 0
            for k in range(bits):
                bit = int.from_bytes(seed[2 * k : 2 * k + 2], "little") % 512
                while mask >> bit & 1:
                    bit = (bit + 1) % 512
                mask |= 1 << bit
            masks.append(mask)
        tables.append(tuple(masks))
    return tuple(tables)


_TABLES: tuple[tuple[int, ...], ...] = ()


def locate(key: str) -> tuple[int, int]:
    """The key's place in a Bloom filter: its block's byte offset and its bits there (a
    512-bit mask), from one stable 64-bit digest of its UTF-8 bytes (hash() differs between
    processes). XXH3 rather than hashlib's cheapest (blake2s): ~40 ns to an int instead of
    ~350 ns, and the filter needs an even spread, not a cryptographic digest (producers'
    ids are not secret, and either digest is public: neither keeps a crafted id out)."""
    global _TABLES
    if not _TABLES:  # built the first time a generation spills (~20 ms, ~1 MB)
        _TABLES = _mask_tables()
    n = xxh3_64_intdigest(key.encode())
    t0, t1, t2 = _TABLES
    mask = t0[(n >> 17) & 4095] | t1[(n >> 29) & 4095] | t2[(n >> 41) & 4095]
    return (n & (BLOCKS - 1)) * BLOCK_BYTES, mask


def _block(bloom: bytearray, offset: int) -> int:
    return int.from_bytes(bloom[offset : offset + BLOCK_BYTES], "little")


def _known(generation: IdGeneration, key: str, offset: int, mask: int) -> bool:
    """Whether `generation` holds `key`: a generation with a filter holds its exact ids in
    it too, so one block read answers, without a probe of its 100,000-id dict (a cache miss
    or two, as many as the block read, in a live service sharing its cores)."""
    bloom = generation.bloom
    if bloom:
        return _block(bloom, offset) & mask == mask
    return key in generation.ids


def _find(
    memory: IdMemory, key: str, older_than: float = math.inf
) -> tuple[bool, tuple[int, int] | None]:
    """Whether `key` was remembered, asking only the generations begun before `older_than`,
    and its place in a filter when either has one (so that remembering it does not locate
    it again)."""
    current, previous = memory.current, memory.previous
    if current.since >= older_than:  # begun since: it holds no id older than that
        current = _UNASKED
        if previous.since >= older_than:
            previous = _UNASKED
    if not current.bloom and not previous.bloom:
        return key in current.ids or key in previous.ids, None
    offset, mask = located = _located.pop(key, None) or locate(key)
    return _known(current, key, offset, mask) or _known(previous, key, offset, mask), located


# Stands for a generation not asked (_find): it holds nothing, and is never written.
_UNASKED = IdGeneration()


# Places found by has() for ids about to be published (HTTP ingest asks before it publishes),
# taken by remember() when it folds them: each posted id is located once, not twice. A memo
# of a pure function, so a fold decides alike with it or without; bounded for ids asked
# about and never stored (a publish that failed, a duplicate).
_located: dict[str, tuple[int, int]] = {}
_LOCATED_LIMIT = 10_000


def has(memory: IdMemory, key: str, older_than: float = math.inf) -> bool:
    """Whether `key` was remembered (within the last DEDUPE_S at least), asked only of the
    generations begun before `older_than` (epoch seconds of the stream's time): a caller
    that knows ids stored since then are refused elsewhere (JetStream's duplicate window)
    skips a generation holding nothing older, and its filter test."""
    known, located = _find(memory, key, older_than)
    if located is not None and not known:
        if len(_located) >= _LOCATED_LIMIT:
            _located.clear()
        _located[key] = located
    return known


def remember(
    memory: IdMemory, key: str, seq: int, stored_at: float, exact_limit: int = EXACT_LIMIT
) -> bool:
    """Remember `key` stored at `stored_at` (rotating a generation DEDUPE_S old); False when
    it was remembered already (a retry), True when it is new."""
    current, previous = memory.current, memory.previous
    bloom = current.bloom
    if bloom and stored_at - current.since < DEDUPE_S:
        # Past the exact ids with no rotation due: most ids of a busy day, every id of a
        # replay past the first EXACT_LIMIT. One block read decides for this generation.
        located = _located.pop(key, None) if _located else None
        offset, mask = located or locate(key)
        block = _block(bloom, offset)
        if block & mask == mask or _known(previous, key, offset, mask):
            return False
        bloom[offset : offset + BLOCK_BYTES] = (block | mask).to_bytes(BLOCK_BYTES, "little")
        current.spilled += 1
        return True
    known, located = _find(memory, key)
    if known:
        return False
    if stored_at - current.since >= DEDUPE_S:
        memory.previous = current
        memory.current = current = IdGeneration(since=stored_at)
    if len(current.ids) < exact_limit:
        current.ids[key] = seq
        return True
    if not current.bloom:
        current.bloom = _filter_of(current.ids)
    offset, mask = located or locate(key)
    _add(current.bloom, offset, mask)
    current.spilled += 1
    return True


def _filter_of(ids: dict[str, int]) -> bytearray:
    """A new filter holding `ids` (a generation's exact ids, when it first spills)."""
    bloom = bytearray(BLOOM_BITS // 8)
    for key in ids:
        _add(bloom, *locate(key))
    return bloom


def _add(bloom: bytearray, offset: int, mask: int) -> None:
    bloom[offset : offset + BLOCK_BYTES] = (_block(bloom, offset) | mask).to_bytes(
        BLOCK_BYTES, "little"
    )
