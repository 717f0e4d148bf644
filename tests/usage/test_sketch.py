"""The log-bucket latency sketch: 1 % relative error, exact merges, msgpack round trips."""

from __future__ import annotations

import math

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from services.usage import sketch
from services.usage.sketch import RELATIVE_ACCURACY, Sketch

latencies = st.lists(
    st.one_of(
        st.floats(min_value=0.01, max_value=600_000, allow_nan=False),
        st.just(0.0),
    ),
    min_size=1,
    max_size=400,
)


def exact(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


def filled(values: list[float]) -> Sketch:
    result = Sketch(bins={})
    for value in values:
        sketch.add(result, value)
    return result


@given(latencies, st.sampled_from([0.0, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0]))
def test_quantiles_are_within_one_percent_of_the_exact_value(values: list[float], q: float) -> None:
    estimate = sketch.quantile(filled(values), q)
    truth = exact(values, q)
    assert estimate is not None
    if truth <= sketch.MIN_VALUE:
        assert estimate == 0.0
    else:
        assert abs(estimate - truth) <= RELATIVE_ACCURACY * truth * (1 + 1e-9)


@given(latencies, latencies)
def test_merging_two_sketches_equals_sketching_both_lists(a: list[float], b: list[float]) -> None:
    left = filled(a)
    sketch.merge_into(left, filled(b))
    assert left == filled(a + b)
    assert sketch.merged([filled(a), filled(b)]) == filled(a + b)


@given(latencies)
def test_sketch_survives_msgpack_unchanged(values: list[float]) -> None:
    original = filled(values)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(original), type=Sketch)
    assert decoded == original
    assert sketch.quantile(decoded, 0.95) == sketch.quantile(original, 0.95)


def test_empty_sketch_has_no_quantile() -> None:
    assert sketch.quantile(Sketch(bins={}), 0.5) is None


def test_bucket_count_is_bounded_by_collapsing_the_lowest() -> None:
    wide = Sketch(bins={})
    value = 1e-2
    while value < 1e30:
        sketch.add(wide, value)
        value *= sketch.GAMMA
    assert len(wide.bins) <= sketch.MAX_BUCKETS
    assert wide.count == sum(wide.bins.values()) + wide.zero
    top = sketch.quantile(wide, 1.0)
    assert top is not None and abs(top - value / sketch.GAMMA) <= 0.011 * top
