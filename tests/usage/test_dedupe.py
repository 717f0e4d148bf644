"""The id memory decides and sets bits as the plain rule does; its Bloom filter's layout is
fixed (snapshots hold it) and takes few new ids for retries."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.usage import dedupe
from services.usage.dedupe import (
    BLOCK_BYTES,
    BLOOM_BITS,
    BLOOM_MASK_BITS,
    DEDUPE_S,
    IdGeneration,
    IdMemory,
    locate,
)


def bit_positions(key: str) -> list[int]:
    """The key's bits as positions in the whole filter (bit b of a block's little-endian
    integer is bit b % 8 of its byte b // 8)."""
    offset, mask = locate(key)
    return [offset * 8 + b for b in range(BLOCK_BYTES * 8) if mask >> b & 1]


def oracle_remember(memory: IdMemory, key: str, seq: int, stored_at: float, limit: int) -> bool:
    """The rule written plainly (the general path, one step at a time)."""
    current, previous = memory.current, memory.previous
    if key in current.ids or key in previous.ids:
        return False
    bits = bit_positions(key)
    for bloom in (current.bloom, previous.bloom):
        if bloom and all(bloom[p >> 3] & (1 << (p & 7)) for p in bits):
            return False
    if stored_at - current.since >= DEDUPE_S:
        memory.previous = current
        memory.current = current = IdGeneration(since=stored_at)
    if len(current.ids) < limit:
        current.ids[key] = seq
        return True
    if not current.bloom:  # a filter holds its generation's exact ids as well
        current.bloom = bytearray(BLOOM_BITS // 8)
        for exact in current.ids:
            for p in bit_positions(exact):
                current.bloom[p >> 3] |= 1 << (p & 7)
    for p in bits:
        current.bloom[p >> 3] |= 1 << (p & 7)
    current.spilled += 1
    return True


@settings(max_examples=40, deadline=None)
@given(
    ids=st.lists(st.integers(0, 60), min_size=1, max_size=150),
    gaps=st.lists(st.sampled_from([0.0, 1.0, 3_600.0, DEDUPE_S / 2, DEDUPE_S]), max_size=150),
    limit=st.integers(1, 8),
)
def test_remember_matches_the_plain_rule(ids: list[int], gaps: list[float], limit: int) -> None:
    fast, plain = IdMemory(), IdMemory()
    at = 0.0
    for seq, ident in enumerate(ids, start=1):
        at += gaps[seq % len(gaps)] if gaps else 0.0
        key = f"req-{ident}"
        assert dedupe.remember(fast, key, seq, at, limit) == oracle_remember(
            plain, key, seq, at, limit
        )
        assert dedupe.has(fast, key)
    for mine, theirs in ((fast.current, plain.current), (fast.previous, plain.previous)):
        assert (mine.since, mine.ids, mine.spilled) == (theirs.since, theirs.ids, theirs.spilled)
        assert mine.bloom == theirs.bloom


def test_an_ids_bits_lie_in_one_block_of_the_filter() -> None:
    for i in range(2_000):
        bits = bit_positions(f"req-{i}")
        assert 2 <= len(bits) <= BLOOM_MASK_BITS
        assert len({p // (BLOCK_BYTES * 8) for p in bits}) == 1
        assert all(0 <= p < BLOOM_BITS for p in bits)


def test_the_filter_layout_is_the_one_snapshots_hold() -> None:
    """Snapshots keep the filter's bytes: a change of where an id's bits go must come with a
    new FOLD_VERSION (services/usage/view.py), which rebuilds views from the stream."""
    offset, mask = locate("req-1")
    assert offset == 5_027_200
    assert mask == int(
        "0x400000041000000000000000000000800000000000040000000400000000000000010000080420"
        "000000000000000000000",
        16,
    )


def test_a_filter_holding_a_busy_days_ids_takes_no_new_id_for_a_retry() -> None:
    """400,000 ids past the exact ones, then 100,000 new ids: all taken as new (at this
    load the rate of taking a new id for a retry is ~1e-11; a filter whose ids shared
    blocks or bits would take many)."""
    memory = IdMemory()
    for i in range(400_000):
        assert dedupe.remember(memory, f"old-{i}", i, 0.0, exact_limit=0)
    assert memory.current.spilled == 400_000
    taken_for_retries = sum(
        not dedupe.remember(memory, f"new-{i}", i, 0.0, exact_limit=0) for i in range(100_000)
    )
    assert taken_for_retries == 0
    assert all(dedupe.has(memory, f"old-{i}") for i in range(0, 400_000, 97))


def test_asking_before_remembering_decides_and_sets_alike() -> None:
    """HTTP ingest asks has() for each posted id before publishing it; the place has()
    found is kept for remember(), which must then decide and set exactly the same bits."""
    asked, plain = IdMemory(), IdMemory()
    dedupe._located.clear()
    for seq in range(1, 3_001):
        key = f"req-{seq % 2_500}"  # the last 500 are retries
        known = dedupe.has(asked, key)
        assert known == (seq > 2_500)
        assert dedupe.remember(asked, key, seq, 0.0, exact_limit=100) == (
            dedupe.remember(plain, key, seq, 0.0, exact_limit=100)
        )
    assert asked.current.bloom == plain.current.bloom
    assert asked.current.spilled == plain.current.spilled == 2_400
    assert not dedupe._located  # every place kept by has() was taken by remember()


def test_places_asked_for_and_never_remembered_stay_bounded() -> None:
    memory = IdMemory()
    for i in range(200):
        dedupe.remember(memory, f"held-{i}", i, 0.0, exact_limit=10)
    for i in range(dedupe._LOCATED_LIMIT + 500):
        assert not dedupe.has(memory, f"never-published-{i}")
    assert 0 < len(dedupe._located) <= dedupe._LOCATED_LIMIT


def test_asked_about_older_ids_only_generations_begun_before_are_looked_in() -> None:
    """HTTP ingest asks only about ids that may be older than JetStream's duplicate window:
    a generation begun since holds none of them and is not looked in."""
    for limit in (100, 0):  # exact ids, then every id in a filter
        memory = IdMemory()
        dedupe.remember(memory, "first-day", 1, DEDUPE_S, limit)  # each begins a generation
        dedupe.remember(memory, "second-day", 2, 2 * DEDUPE_S, limit)
        began = memory.current.since
        assert began == 2 * DEDUPE_S and memory.previous.since == DEDUPE_S
        # Both generations asked (the default, or a time after both began):
        assert dedupe.has(memory, "first-day") and dedupe.has(memory, "second-day")
        assert dedupe.has(memory, "second-day", older_than=began + 1)
        # The current generation begun at or after older_than: only the previous is asked.
        assert dedupe.has(memory, "first-day", older_than=began)
        assert not dedupe.has(memory, "second-day", older_than=began)
        # Both begun at or after it: nothing is asked.
        assert not dedupe.has(memory, "first-day", older_than=DEDUPE_S)
        assert not dedupe.has(memory, "never", older_than=began)
        # What has() located for remember() is the same place: remembering decides alike.
        assert not dedupe.remember(memory, "second-day", 3, began + 10, limit)
        assert dedupe.remember(memory, "third", 4, began + 10, limit)
        dedupe._located.clear()
