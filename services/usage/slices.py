"""Filtered and grouped usage: the view's cells added up (pure, like services.usage.queries).

A cell counts the calls of one combination of model, endpoint, user and tags in one day or
hour (services.usage.view.Cell). A filter keeps the cells it matches; `group_by` adds them up
by one of the four parts. The view holds a bounded number of cells (past the bound a new
combination is counted coarser, its user, tags, endpoint or model as `(other)`), so an
answer says how many calls of its range it could not tell apart (`Coverage`), rather than
quietly leaving them out or counting them in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from services.usage import sketch
from services.usage.contract import (
    Coverage,
    Filters,
    GroupBy,
    StatsParams,
    TimeseriesParams,
)
from services.usage.prices import base_model
from services.usage.sketch import Sketch
from services.usage.view import (
    NO_ENDPOINT,
    OTHER,
    OTHER_TAGS,
    Agg,
    CellKey,
    Day,
    Hour,
    day_breakdowns,
    merge_agg,
)

# Series a grouped answer draws on their own (the largest by cost, then by calls); the other
# keys are added up under `(other)`, so an answer stays small whatever the cardinality.
GROUP_LIMIT = 10
A = TypeVar("A", bound=Agg)
NONE_KEY = "(none)"


@dataclass(frozen=True)
class Slice:
    """The filters of a request (None: any)."""

    user_id: str | None = None
    model: str | None = None
    endpoint: str | None = None
    tag: str | None = None

    @property
    def everything(self) -> bool:
        return (
            self.user_id is None
            and self.model is None
            and (self.endpoint is None and self.tag is None)
        )

    def only(self, *names: str) -> bool:
        """Whether no filter outside `names` is set."""
        return all(getattr(self, name) is None for name in _PARTS if name not in names)

    def filters(self) -> Filters:
        return Filters(user_id=self.user_id, model=self.model, endpoint=self.endpoint, tag=self.tag)

    def model_matches(self, model: str) -> bool:
        wanted = self.model
        return wanted is None or model == wanted or base_model(model) == wanted

    def matches(self, key: CellKey) -> bool:
        """Whether every call of the cell `key` is one the filters ask for."""
        model, endpoint, user, tags = key
        return (
            self.model_matches(model)
            and (self.endpoint is None or endpoint == self.endpoint)
            and (self.user_id is None or user == self.user_id)
            and (self.tag is None or self.tag in tags)
        )

    def blurred(self, key: CellKey) -> bool:
        """Whether the cell `key` may hold calls the filters ask for but no longer tells them
        apart (a part a filter reads is `(other)`)."""
        model, endpoint, user, tags = key
        if self.model is not None and model == OTHER:
            return True
        if self.endpoint is not None and endpoint == OTHER:
            return True
        if self.user_id is not None and user == OTHER:
            return True
        return self.tag is not None and tags == OTHER_TAGS


_PARTS = ("user_id", "model", "endpoint", "tag")


def slice_of(params: StatsParams | TimeseriesParams) -> Slice:
    """The filters of stats or timeseries parameters."""
    return Slice(
        user_id=params.user_id, model=params.model, endpoint=params.endpoint, tag=params.tag
    )


@dataclass
class Tally:
    """The calls of some cells a filter could not tell apart."""

    unattributed: int = 0
    # Calls of days or hours whose cells are no longer kept (older than CELL_DAYS).
    uncelled: int = 0


def tally(
    cells: Mapping[CellKey, A], wanted: Slice, counted: Tally, into: Agg, held: int | None
) -> list[tuple[CellKey, A]]:
    """Add the cells `wanted` matches into `into`; the matching cells with their keys.

    Counts in `counted` the calls a filter could not tell apart and, given `held` (the calls
    of the day the cells are of), those no cell holds any more (a day past CELL_DAYS)."""
    matched = []
    in_cells = 0
    everything = wanted.everything
    for key, cell in cells.items():
        in_cells += cell.requests
        if everything or wanted.matches(key):
            merge_agg(into, cell)
            matched.append((key, cell))
        elif wanted.blurred(key):
            counted.unattributed += cell.requests
    if held is not None and in_cells < held:
        counted.uncelled += held - in_cells
    return matched


def group_keys(key: CellKey, group_by: GroupBy) -> tuple[str, ...]:
    """The groups a cell's calls count in: one, or one per tag (a call with two tags counts in
    both, so tag groups may add up to more than the total)."""
    model, endpoint, user, tags = key
    if group_by == "model":
        return (model,)
    if group_by == "endpoint":
        return (endpoint,)
    if group_by == "user_id":
        return (user or NONE_KEY,)
    if tags == OTHER_TAGS:
        return (OTHER,)
    return tags or (NONE_KEY,)


def latency_sketch(days: Iterable[Day], wanted: Slice) -> Sketch | None:
    """The response times of the calls `wanted` asks for, where the view keeps them: every
    call, one model (its dated names too) or one endpoint; None for any other filter."""
    chosen: list[Sketch] = []
    if wanted.everything:
        chosen = [day.latency for day in days]
    elif wanted.only("model"):
        chosen = [
            found
            for day in days
            for name, found in day.latency_by_model.items()
            if wanted.model_matches(name)
        ]
    elif wanted.only("endpoint"):
        endpoint = wanted.endpoint
        chosen = [
            found
            for day in days
            if (found := day.latency_by_endpoint.get(endpoint or NO_ENDPOINT)) is not None
        ]
    else:
        return None
    return sketch.merged(chosen)


def coverage(wanted: Slice, counted: Tally, *, percentiles_kept: bool, days_kept: int) -> Coverage:
    """What a filtered answer could not tell apart, in sentences."""
    notes: list[str] = []
    if counted.unattributed:
        notes.append(
            f"{counted.unattributed} calls of the range are counted under (other) for a part "
            "this filter reads (more combinations of model, endpoint, user and tags than a day "
            "or hour keeps apart); they may include calls the filter asks for"
        )
    if counted.uncelled:
        notes.append(
            f"{counted.uncelled} calls of the range are on days whose calls by model, endpoint, "
            f"user and tags are no longer kept (only the newest {days_kept} days keep them)"
        )
    if not percentiles_kept:
        notes.append(
            "response-time percentiles are kept for every call, per model and per endpoint "
            "(by day): not for this filter, so they are null"
        )
    unattributed = counted.unattributed + counted.uncelled
    return Coverage(exact=not notes, unattributed_calls=unattributed, notes=notes)


@dataclass
class Split:
    """A sliced time series before it is shaped: per bucket the filtered total and its
    latencies (None: not kept for this slice), and per group the same."""

    totals: list[Agg]
    latencies: list[Sketch | None]
    groups: dict[str, tuple[list[Agg], list[Sketch | None]]]
    other_keys: int
    counted: Tally


def split(
    buckets: list[Hour | None] | list[Day | None],
    daily: bool,
    wanted: Slice,
    group_by: GroupBy | None,
) -> Split:
    """Add up the cells of every bucket (hours or days, None where nothing was counted) that
    `wanted` matches, and by `group_by` (the GROUP_LIMIT largest keys by cost, then calls;
    the rest under `(other)`)."""
    counted = Tally()
    totals: list[Agg] = []
    latencies: list[Sketch | None] = []
    # Per group, only the buckets it has calls in: a group_by=user_id over 30 days may
    # meet thousands of users, most of them in a few buckets.
    by_key: dict[str, dict[int, Agg]] = {}
    everything = wanted.everything
    for index, held in enumerate(buckets):
        point = Agg()
        totals.append(point)
        if held is None:
            latencies.append(Sketch(bins={}) if _latency_kept(daily, wanted) else None)
            continue
        by_kept_breakdowns = group_by in ("model", "endpoint") and everything
        if by_kept_breakdowns and isinstance(held, Day) and not held.cells:
            # A day past CELL_DAYS: its kept breakdowns still split every call of it.
            merge_agg(point, held.total)
            parts = day_breakdowns(held)
            for group, agg in (
                parts.by_model if group_by == "model" else parts.by_endpoint
            ).items():
                _add_to_group(by_key, group, index, agg)
        else:
            _add_cells(held, index, wanted, group_by, point, by_key, counted)
        if isinstance(held, Day):
            latencies.append(latency_sketch([held], wanted))
        else:
            latencies.append(held.latency if everything else None)
    groups: dict[str, tuple[list[Agg], list[Sketch | None]]] = {}
    other_keys = 0
    if group_by is not None:
        named = [name for name in by_key if name != OTHER]
        ranked = sorted(named, key=lambda name: _rank(by_key[name].values(), name))
        kept, rest = ranked[:GROUP_LIMIT], ranked[GROUP_LIMIT:]
        size = len(buckets)
        for name in kept:
            latencies_of = _group_latencies(buckets, daily, group_by, name, wanted)
            groups[name] = (_dense(by_key[name], size), latencies_of)
        merged_rest = [by_key[name] for name in rest]
        if OTHER in by_key:
            merged_rest.append(by_key[OTHER])
        if merged_rest:
            other = [Agg() for _ in range(size)]
            for per_bucket in merged_rest:
                for index, agg in per_bucket.items():
                    merge_agg(other[index], agg)
            groups[OTHER] = (other, [None] * size)
        other_keys = len(rest)
    return Split(totals, latencies, groups, other_keys, counted)


def _add_cells(
    held: Hour | Day,
    index: int,
    wanted: Slice,
    group_by: GroupBy | None,
    point: Agg,
    by_key: dict[str, dict[int, Agg]],
    counted: Tally,
) -> None:
    """Add the cells of one bucket that `wanted` matches into `point` and their groups."""
    # An hour's total is its cells; a day past CELL_DAYS has a total and no cells.
    calls = held.total.requests if isinstance(held, Day) else None
    for key, cell in tally(held.cells, wanted, counted, point, calls):
        if group_by is not None:
            for group in group_keys(key, group_by):
                _add_to_group(by_key, group, index, cell)


def _add_to_group(by_key: dict[str, dict[int, Agg]], group: str, index: int, agg: Agg) -> None:
    per_bucket = by_key.get(group)
    if per_bucket is None:
        per_bucket = by_key[group] = {}
    into = per_bucket.get(index)
    if into is None:
        into = per_bucket[index] = Agg()
    merge_agg(into, agg)


def _dense(per_bucket: dict[int, Agg], size: int) -> list[Agg]:
    return [per_bucket.get(index) or Agg() for index in range(size)]


def _rank(aggs: Iterable[Agg], name: str) -> tuple[float, int, str]:
    """Largest cost first, then most calls, then by name (a stable order for ties)."""
    cost = 0.0
    requests = 0
    for agg in aggs:
        cost += agg.cost_usd
        requests += agg.requests
    return (-cost, -requests, name)


def _latency_kept(daily: bool, wanted: Slice) -> bool:
    """Whether an empty bucket's (zero) latencies are known: where a full one's would be."""
    return wanted.everything or daily and (wanted.only("model") or wanted.only("endpoint"))


def _group_latencies(
    buckets: list[Hour | None] | list[Day | None],
    daily: bool,
    group_by: GroupBy,
    key: str,
    wanted: Slice,
) -> list[Sketch | None]:
    """A group's latencies per bucket: kept by day for a model or an endpoint (under no
    other filter than that same part); None elsewhere."""
    part = "model" if group_by == "model" else "endpoint" if group_by == "endpoint" else None
    if part is None or not daily or not wanted.only(part) or key == OTHER:
        return [None] * len(buckets)
    found: list[Sketch | None] = []
    for held in buckets:
        if not isinstance(held, Day):
            found.append(Sketch(bins={}))
        else:
            per_key = held.latency_by_model if part == "model" else held.latency_by_endpoint
            found.append(per_key.get(key) or Sketch(bins={}))
    return found
