"""A projection: a stream folded into a view by a pure function, plus what the runtime tracks.

The fold, `apply(view, event, seq) -> alerts`, is pure: its only inputs are the view, the
event and the stream sequence it was stored at, and it returns the alerts the event fired
(usually none). Alerts never pass through fields of the persisted view: a snapshot holds
state, not what the last event happened to cross. Everything about NATS lives in
`shared.runtime`; this module is what both the runtime and the replay tooling fold with.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

import msgspec
import zstandard

from shared.events import Alert, AwareDatetime, admission_problem
from shared.streams import StreamSpec


class View(msgspec.Struct, kw_only=True):
    """Base of every projection view: `last_seq` is the last stream sequence folded in."""

    last_seq: int = 0


V = TypeVar("V", bound=View)
E = TypeVar("E")


class FoldError(Exception):
    """An event that decoded but cannot be applied (it is dead-lettered with this reason)."""


NOTHING_FIRED: Sequence[Alert] = ()
"""What a fold returns for an event that fired no alert (most of them): no allocation."""


@dataclass
class Projection(Generic[V, E]):
    """How to fold one stream (optionally a subset of its subjects) into a view."""

    name: str
    stream: StreamSpec
    view_type: type[V]
    decode: Callable[[bytes], E]
    # Folds the event stored at `seq` into the view, in place, and returns the alerts it
    # fired. The sequence is the fold's only way to learn where it stands (a lock's fencing
    # token, the sequence an id was first stored at); `view.last_seq` is set after it.
    apply: Callable[[V, E, int], Sequence[Alert]]
    filter_subject: str | None = None
    # The fold's identity, stored with every snapshot: a snapshot folded by another version
    # of the fold (its meaning or the view's layout changed; bump `version` then) or under
    # another configuration (`fingerprint`, a digest of the settings the fold reads, see
    # fold_fingerprint) is discarded and the view rebuilt from the stream's first event.
    version: str = "1"
    fingerprint: str = ""
    view: V = field(init=False)

    def __post_init__(self) -> None:
        self.view = self.view_type()

    @property
    def subject(self) -> str:
        """The subject filter the consumer uses."""
        return self.filter_subject or self.stream.subjects[0]

    def admit(
        self, data: bytes, subject: str | bytes | None = None, stored_ns: int | None = None
    ) -> E:
        """Decode one stored message and check it may be folded; raises on a dead letter.

        `subject` and `stored_ns` (the stream's timestamp of the message) come from the
        message's JetStream metadata, so the live service and a replay decide alike.
        """
        event = self.decode(data)
        problem = admission_problem(event, subject, stored_ns)
        if problem is not None:
            raise FoldError(problem)
        return event

    def fold(
        self,
        seq: int,
        data: bytes,
        subject: str | bytes | None = None,
        stored_ns: int | None = None,
    ) -> Sequence[Alert]:
        """Decode, check and apply one stored message: the alerts it fired; raises on a
        message to dead-letter."""
        event = self.admit(data, subject, stored_ns)
        fired = self.apply(self.view, event, seq)
        self.view.last_seq = seq
        return fired

    def reset(self) -> None:
        """Back to the empty view (before a full rebuild)."""
        self.view = self.view_type()


def fold_fingerprint(*config: object) -> str:
    """A digest of the fold configuration `config` (msgspec-encodable values: settings,
    structs of them) for Projection.fingerprint."""
    return hashlib.sha256(msgspec.json.encode(config)).hexdigest()[:16]


def view_digest(view: View) -> str:
    """A fingerprint of a view's whole state: equal digests mean equal projections."""
    return hashlib.sha256(_envelope_encoder.encode(view)).hexdigest()


class SnapshotEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """What is stored for a snapshot: the view's msgpack bytes and where it stands."""

    format: int
    projection: str
    last_seq: int
    taken_at: AwareDatetime
    view: bytes
    # The fold's identity when the snapshot was taken (Projection.version / .fingerprint).
    # Snapshots from before these fields decode with "" and are rebuilt once.
    version: str = ""
    fingerprint: str = ""


class SnapshotMismatch(ValueError):
    """A snapshot folded by another fold version or under another fold configuration."""


SNAPSHOT_FORMAT = 1
_envelope_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(SnapshotEnvelope)


def encode_snapshot(projection: Projection[V, E], taken_at: datetime) -> bytes:
    """The projection's view, compressed, with its `last_seq`."""
    envelope = SnapshotEnvelope(
        format=SNAPSHOT_FORMAT,
        projection=projection.name,
        last_seq=projection.view.last_seq,
        taken_at=taken_at,
        view=_envelope_encoder.encode(projection.view),
        version=projection.version,
        fingerprint=projection.fingerprint,
    )
    # zstd rather than zlib: the usage view past 100,000 ids a day is ~10 MB, most of it a
    # Bloom filter that compresses slowly; zlib's fastest level took ~150 ms of the loop for
    # it, ~9 % of the usage service's CPU under HTTP ingest (py-spy), zstd's ~40 ms, and
    # smaller (3.1 MB against 3.5 MB). A compressor a call: they are not to be shared
    # between threads.
    return zstandard.ZstdCompressor(level=1).compress(_envelope_encoder.encode(envelope))


_ZSTD_FRAME = b"\x28\xb5\x2f\xfd"


def decompress_snapshot(data: bytes) -> bytes:
    """A snapshot's encoded envelope: zstd, or zlib for snapshots written before."""
    if data.startswith(_ZSTD_FRAME):
        return zstandard.ZstdDecompressor().decompress(data)
    return zlib.decompress(data)


def decode_snapshot(
    data: bytes, view_type: type[V], identity: Projection[V, Any] | None = None
) -> tuple[V, datetime]:
    """A view from a snapshot; raises msgspec, zstd or zlib errors when it does not fit the
    view type, and SnapshotMismatch when it was folded with another identity than
    `identity`'s (the projection that will fold on from it; None skips the check, for tests
    of the fold)."""
    envelope = _envelope_decoder.decode(decompress_snapshot(data))
    if envelope.format != SNAPSHOT_FORMAT:
        raise ValueError(f"snapshot format {envelope.format} is not {SNAPSHOT_FORMAT}")
    if identity is not None:
        problem = identity_mismatch(envelope, identity)
        if problem is not None:
            raise SnapshotMismatch(problem)
    view = msgspec.msgpack.decode(envelope.view, type=view_type)
    view.last_seq = envelope.last_seq
    return view, envelope.taken_at


def identity_mismatch(envelope: SnapshotEnvelope, projection: Projection[Any, Any]) -> str | None:
    """Why a snapshot cannot be folded on from by `projection` (None when it can)."""
    if envelope.version != projection.version:
        return (
            f"it was folded by fold version {envelope.version or '(none)'!r}, "
            f"this is {projection.version!r}"
        )
    if envelope.fingerprint != projection.fingerprint:
        return (
            f"it was folded under another fold configuration (fingerprint "
            f"{envelope.fingerprint or '(none)'}, now {projection.fingerprint or '(none)'})"
        )
    return None


class SeqWaiters:
    """Futures waiting until a projection has folded a given stream sequence."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, object]] = []
        self._counter = 0
        # The lowest sequence waited for (inf: none). The fold compares each event's
        # sequence with it, one attribute read, instead of calling into this class per
        # event: under HTTP ingest requests always wait, and the calls were ~5 % of the
        # usage process's samples (py-spy, 2026-12-08).
        self.next_seq: float = math.inf

    def add(self, seq: int, waiter: object) -> None:
        """Register `waiter` (an asyncio.Future) to be resolved once `seq` is folded."""
        self._counter += 1
        heapq.heappush(self._heap, (seq, self._counter, waiter))
        self.next_seq = self._heap[0][0]

    def pop_ready(self, applied_seq: int) -> list[object]:
        """Every waiter whose sequence is now folded."""
        ready: list[object] = []
        while self._heap and self._heap[0][0] <= applied_seq:
            ready.append(heapq.heappop(self._heap)[2])
        self.next_seq = self._heap[0][0] if self._heap else math.inf
        return ready
