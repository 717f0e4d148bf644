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
    bits: tuple[int, ...] | None = None
    if current.bloom or previous.bloom:
        bits = positions(key)
        if (current.bloom and _in_bloom(current.bloom, bits)) or (
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
