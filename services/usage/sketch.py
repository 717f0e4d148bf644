"""A small mergeable quantile sketch (DDSketch-style log buckets) stored as plain ints.

Why not the `ddsketch` package: its sketch objects hold stores and mappings that msgspec
cannot serialise, and every view must snapshot with msgpack. This sketch is a msgspec Struct
of a dict of ints, so it snapshots, digests and merges like the rest of the view.

A value x > MIN_VALUE falls into bucket i = ceil(log_gamma(x)) with gamma = (1 + a) / (1 - a);
every value in bucket i lies in (gamma^(i-1), gamma^i], and the bucket's estimate
2 gamma^i / (gamma + 1) is within relative error `a` (RELATIVE_ACCURACY, 1 %) of each of them.
Values at or below MIN_VALUE are counted in `zero` and estimated as 0.
"""

from __future__ import annotations

import math

import msgspec

RELATIVE_ACCURACY = 0.01
GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_LOG_GAMMA = math.log(GAMMA)
# Latencies are milliseconds: a microsecond is as good as zero.
MIN_VALUE = 1e-3
# 0.001 ms .. 1e7 ms needs ~1150 buckets; past this bound the lowest buckets are collapsed
# (the DDSketch way: low quantiles lose accuracy first, high ones never).
MAX_BUCKETS = 2048


class Sketch(msgspec.Struct, kw_only=True, array_like=True):
    """Counts per log bucket, plus the values too small to bucket."""

    bins: dict[int, int] = {}
    zero: int = 0
    count: int = 0


def bucket_of(value: float) -> int:
    """The bucket index of a positive value above MIN_VALUE."""
    return math.ceil(math.log(value) / _LOG_GAMMA)


def estimate(index: int) -> float:
    """The value a bucket stands for (within RELATIVE_ACCURACY of anything in it)."""
    return 2.0 * GAMMA**index / (GAMMA + 1.0)


def add(sketch: Sketch, value: float, count: int = 1) -> None:
    """Count `value` (non-negative) `count` times."""
    add_at(sketch, index_of(value), count)


def index_of(value: float) -> int | None:
    """Where `value` is counted: its bucket, or None for the zero count.

    With `add_at`, lets one value go into several sketches for one logarithm.
    """
    # bucket_of's expression inline: one Python call less per latency folded.
    return None if value <= MIN_VALUE else math.ceil(math.log(value) / _LOG_GAMMA)


def add_at(sketch: Sketch, index: int | None, count: int = 1) -> None:
    """Count a value `count` times at `index` (from `index_of`)."""
    sketch.count += count
    if index is None:
        sketch.zero += count
        return
    bins = sketch.bins
    bins[index] = bins.get(index, 0) + count
    if len(bins) > MAX_BUCKETS:
        _collapse(bins)


def add_to_each(sketches: list[Sketch], index: int | None) -> None:
    """Count one value at `index` into each of `sketches`: add_at's body in one loop, as the
    usage fold counts every call's response time into four sketches (a call each was a
    measurable part of the fold)."""
    for sketch in sketches:
        sketch.count += 1
        if index is None:
            sketch.zero += 1
            continue
        bins = sketch.bins
        held = bins.get(index)
        if held is not None:
            bins[index] = held + 1
            continue
        bins[index] = 1
        if len(bins) > MAX_BUCKETS:
            _collapse(bins)


def _collapse(bins: dict[int, int]) -> None:
    keys = sorted(bins)
    excess = len(keys) - MAX_BUCKETS
    lowest = keys[excess]
    for key in keys[:excess]:
        bins[lowest] += bins.pop(key)


def merge_into(target: Sketch, other: Sketch) -> None:
    """Add every count of `other` to `target`."""
    target.count += other.count
    target.zero += other.zero
    bins = target.bins
    for index, count in other.bins.items():
        bins[index] = bins.get(index, 0) + count
    if len(bins) > MAX_BUCKETS:
        _collapse(bins)


def merged(sketches: list[Sketch]) -> Sketch:
    """A new sketch holding all of `sketches`."""
    result = Sketch(bins={})
    for sketch in sketches:
        merge_into(result, sketch)
    return result


def quantile(sketch: Sketch, q: float) -> float | None:
    """The value at rank floor(q * (count - 1)) (0-based) within 1 %; None when empty."""
    if sketch.count == 0:
        return None
    rank = math.floor(min(max(q, 0.0), 1.0) * (sketch.count - 1))
    if rank < sketch.zero:
        return 0.0
    seen = sketch.zero
    for index in sorted(sketch.bins):
        seen += sketch.bins[index]
        if seen > rank:
            return estimate(index)
    return estimate(max(sketch.bins))  # pragma: no cover - counts always add up
