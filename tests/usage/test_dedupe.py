"""The id memory's fast path past the exact ids decides and sets bits as the general rule does."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.usage import dedupe
from services.usage.dedupe import BLOOM_BITS, DEDUPE_S, IdGeneration, IdMemory, positions


def oracle_remember(memory: IdMemory, key: str, seq: int, stored_at: float, limit: int) -> bool:
    """The rule written plainly (the general path, one step at a time)."""
    current, previous = memory.current, memory.previous
    if key in current.ids or key in previous.ids:
        return False
    bits = positions(key)
    for bloom in (current.bloom, previous.bloom):
        if bloom and all(bloom[p >> 3] & (1 << (p & 7)) for p in bits):
            return False
    if stored_at - current.since >= DEDUPE_S:
        memory.previous = current
        memory.current = current = IdGeneration(since=stored_at)
    if len(current.ids) < limit:
        current.ids[key] = seq
        return True
    if not current.bloom:
        current.bloom = bytearray(BLOOM_BITS // 8)
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
