"""The ids the usage fold remembers: a call id retried within 24 hours is counted once,
whatever the traffic, in bounded memory.

JetStream drops a repeated `Nats-Msg-Id` only within the usage stream's duplicate window
(24 hours, shared.streams); a producer retrying later, or a stream whose window an operator
shortened, stores the call again, and an import (`events import`) may bring ids stored
before. The fold remembers ids in two generations of at least DEDUPE_S each, by the
time the stream stored them (a replay rotates at the same events). A generation holds its
first EXACT_LIMIT ids exactly; past that, ids go into the generation's Bloom filter of
BLOOM_BITS bits, which never forgets an id (a retry is never counted twice) and, up to a
million more ids a day, takes fewer than one new id in ten million for a retry.
"""

from __future__ import annotations

import hashlib

import msgspec

DEDUPE_S = 86_400.0
EXACT_LIMIT = 100_000
BLOOM_BITS = 1 << 26  # 8 MiB per generation, allocated only once a generation overflows
assert BLOOM_BITS == 1 << 26  # positions() takes 26 bits of the digest for each
BLOOM_HASHES = 7


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


_MASK = BLOOM_BITS - 1


def positions(key: str) -> tuple[int, ...]:
    """The key's BLOOM_HASHES bits in a Bloom filter: 26-bit slices of one stable digest
    (hash() differs between processes). Written out: a generator costs a microsecond."""
    n = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=24).digest(), "little")
    m = _MASK
    return (
        n & m, (n >> 26) & m, (n >> 52) & m, (n >> 78) & m,
        (n >> 104) & m, (n >> 130) & m, (n >> 156) & m,
    )  # fmt: skip


def _in_bloom(bloom: bytearray, bits: tuple[int, ...]) -> bool:
    for p in bits:
        if not bloom[p >> 3] & (1 << (p & 7)):
            return False
    return True


def has(memory: IdMemory, key: str) -> bool:
    """Whether `key` was remembered (within the last DEDUPE_S at least)."""
    current, previous = memory.current, memory.previous
    if key in current.ids or key in previous.ids:
        return True
    if not current.bloom and not previous.bloom:
        return False
    bits = positions(key)
    return bool(
        (current.bloom and _in_bloom(current.bloom, bits))
        or (previous.bloom and _in_bloom(previous.bloom, bits))
    )


def remember(
    memory: IdMemory, key: str, seq: int, stored_at: float, exact_limit: int = EXACT_LIMIT
) -> bool:
    """Remember `key` stored at `stored_at` (rotating a generation DEDUPE_S old); False when
    it was remembered already (a retry), True when it is new."""
    current, previous = memory.current, memory.previous
    if key in current.ids or key in previous.ids:
        return False
    bloom = current.bloom
    if bloom and stored_at - current.since < DEDUPE_S and len(current.ids) >= exact_limit:
        return _remember_spilled(current, previous.bloom, key)
    bits: tuple[int, ...] | None = None
    if bloom or previous.bloom:
        bits = positions(key)
        if (bloom and _in_bloom(bloom, bits)) or (
            previous.bloom and _in_bloom(previous.bloom, bits)
        ):
            return False
    if stored_at - current.since >= DEDUPE_S:
        memory.previous = current
        memory.current = current = IdGeneration(since=stored_at)
    if len(current.ids) < exact_limit:
        current.ids[key] = seq
        return True
    if not current.bloom:
        current.bloom = bytearray(BLOOM_BITS // 8)
    bloom = current.bloom
    for p in bits or positions(key):
        bloom[p >> 3] |= 1 << (p & 7)
    current.spilled += 1
    return True


def _remember_spilled(current: IdGeneration, previous: bytearray, key: str) -> bool:
    """`remember` in a generation past its exact ids (no rotation due): the same decision
    and the same bits as the general path, in the fewest steps. Most ids of a busy day
    (every id of a replay past the first EXACT_LIMIT) come here; the loops, the tuple and
    the separate membership test of the general path were a fifth of the fold's time."""
    n = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=24).digest(), "little")
    m = _MASK
    p0, p1, p2, p3 = n & m, (n >> 26) & m, (n >> 52) & m, (n >> 78) & m
    p4, p5, p6 = (n >> 104) & m, (n >> 130) & m, (n >> 156) & m
    if (
        previous
        and previous[p0 >> 3] & (1 << (p0 & 7))
        and previous[p1 >> 3] & (1 << (p1 & 7))
        and previous[p2 >> 3] & (1 << (p2 & 7))
        and previous[p3 >> 3] & (1 << (p3 & 7))
        and previous[p4 >> 3] & (1 << (p4 & 7))
        and previous[p5 >> 3] & (1 << (p5 & 7))
        and previous[p6 >> 3] & (1 << (p6 & 7))
    ):
        return False
    # Set the bits, noting whether one was unset: if none was, the id was in the filter
    # already (a retry) and setting them changed nothing.
    bloom = current.bloom
    new = 0
    for p in (p0, p1, p2, p3, p4, p5, p6):
        i = p >> 3
        old = bloom[i]
        bit = 1 << (p & 7)
        if not old & bit:
            bloom[i] = old | bit
            new = 1
    if not new:
        return False
    current.spilled += 1
    return True
