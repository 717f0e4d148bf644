"""The usage client's local spool: every recorded call on disk until JetStream acknowledges it.

Why: the client's memory buffer is bounded and dies with the process. While NATS cannot take
writes (down, its store full, a stream at its limits) or is still owed acknowledgements when
the application stops, calls would be dropped; with the spool they wait on local disk, in the
order they were recorded, and go out when NATS takes writes again or at the next start (each
with its `Nats-Msg-Id`, so one sent twice is stored once).

Layout of a spool directory (one process at a time holds its `lock`, an flock):

    lock                        held while a recorder uses the spool
    cursor                      "<segment> <offset>": everything before it was acknowledged
    00000000000000000001.jsonl  segments: one encoded event (a JSON line) per line, appended

Segments are append-only; one whose every event is acknowledged is deleted. The bound
(`max_bytes`) counts the live segments' bytes: at the bound an event is refused and the
caller counts and logs it. A torn last line (a crash mid-write) is cut off at open.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgspec

log = logging.getLogger("stockpilot.usage.spool")

DEFAULT_MAX_BYTES = 128 * 1024 * 1024
SEGMENT_BYTES = 8 * 1024 * 1024
SUFFIX = ".jsonl"
# Slots tried under a spool root before giving up (one per process using the root at once).
MAX_SLOTS = 64


class SpoolError(Exception):
    """The spool cannot be used; the message says which and what to do."""


class SpoolBusy(SpoolError):
    """Another process holds this spool's lock."""


class _Id(msgspec.Struct):
    id: str


_decode_id = msgspec.json.Decoder(_Id).decode


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """Just after one event in the spool: its segment and the byte offset past its line."""

    segment: int
    offset: int


def _segment_name(number: int) -> str:
    return f"{number:020d}{SUFFIX}"


class Spool:
    """A bounded, ordered, append-only file spool of encoded events; one process at a time."""

    def __init__(self, directory: Path, max_bytes: int, lock_fd: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._lock_fd = lock_fd
        # Small bounds (tests, tight disks) get small segments so deletion keeps up.
        self._segment_bytes = min(SEGMENT_BYTES, max(max_bytes // 8, 4096))
        self._sizes: dict[int, int] = {}  # live segment -> bytes, in order
        self._writer: BinaryIO | None = None
        self._reader: BinaryIO | None = None
        self._reader_segment = -1
        self._dirty = False
        self._recover()
        self._cursor_fd = os.open(self.directory / "cursor", os.O_RDWR | os.O_CREAT, 0o600)
        self._cursor = self._read_cursor()
        self._read = self._cursor
        self.unread = self._count_from(self._cursor)

    # ----- opening --------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path | str, max_bytes: int = DEFAULT_MAX_BYTES) -> Spool:
        """Open (create) the spool in `directory` and lock it; SpoolBusy when already held."""
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"usage spool {directory} cannot be created: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusy(f"usage spool {directory} is in use by another process") from None
        try:
            return cls(directory, max_bytes, fd)
        except BaseException:
            os.close(fd)  # releases the lock
            raise

    @classmethod
    def open_slot(cls, root: Path | str, max_bytes: int = DEFAULT_MAX_BYTES) -> Spool:
        """The first spool under `root` (slot-0, slot-1, …) no other process holds: a restarted
        process takes over what an earlier one left, two at once never share one."""
        for slot in range(MAX_SLOTS):
            try:
                return cls.open(Path(root) / f"slot-{slot}", max_bytes)
            except SpoolBusy:
                continue
        raise SpoolError(f"usage spool {root}: all {MAX_SLOTS} slots are in use")

    def _recover(self) -> None:
        """Find the segments; cut a torn last line (the write a crash interrupted)."""
        numbers = sorted(
            int(p.name[: -len(SUFFIX)])
            for p in self.directory.glob("*" + SUFFIX)
            if p.name[: -len(SUFFIX)].isdigit()
        )
        for number in numbers:
            path = self.directory / _segment_name(number)
            size = path.stat().st_size
            if size:
                with path.open("rb+") as f:
                    f.seek(max(0, size - 1))
                    if f.read(1) != b"\n":
                        data = path.read_bytes()
                        size = data.rfind(b"\n") + 1
                        f.truncate(size)
                        log.warning("usage spool %s: a torn last line was cut off", path)
            self._sizes[number] = size

    def _read_cursor(self) -> Position:
        first = min(self._sizes, default=1)
        raw = os.pread(self._cursor_fd, 64, 0).split()
        try:
            segment, offset = int(raw[0]), int(raw[1])
        except (IndexError, ValueError):
            return Position(first, 0)
        if segment not in self._sizes:
            # Its segment was deleted (all acknowledged) or never written: start at the next.
            later = [n for n in self._sizes if n > segment]
            return Position(min(later), 0) if later else Position(segment + 1, 0)
        self._delete_before(segment)
        return Position(segment, min(offset, self._sizes[segment]))

    def _count_from(self, start: Position) -> int:
        count = 0
        for number, size in self._sizes.items():
            if number < start.segment or not size:
                continue
            with (self.directory / _segment_name(number)).open("rb") as f:
                if number == start.segment:
                    f.seek(start.offset)
                while chunk := f.read(1 << 20):
                    count += chunk.count(b"\n")
        return count

    # ----- writing --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes in the live segments (what the bound counts)."""
        return sum(self._sizes.values())

    @property
    def end(self) -> Position:
        """Just after the last event appended."""
        if not self._sizes:
            return Position(self._cursor.segment, 0)
        last = max(self._sizes)
        return Position(last, self._sizes[last])

    def append(self, payload: bytes, *, held: bool = False) -> Position | None:
        """Append one encoded event (no newline in it); None when the bound is reached.

        `held`: the caller keeps this event in memory and sends it itself, so reading goes on
        after it; only while nothing before it is unread (or order would break).
        """
        if held and self.unread:
            raise ValueError("an event can be held only while nothing before it is unread")
        line_size = len(payload) + 1
        if self.size + line_size > self.max_bytes:
            return None
        end = self.end
        if self._writer is None or end.offset >= self._segment_bytes:
            segment = end.segment + 1 if end.offset >= self._segment_bytes else end.segment
            self._open_writer(segment)
            end = Position(segment, self._sizes.setdefault(segment, 0))
        assert self._writer is not None
        self._writer.write(payload + b"\n")
        self._dirty = True
        after = Position(end.segment, end.offset + line_size)
        self._sizes[end.segment] = after.offset
        if held:
            self._read = after
        else:
            self.unread += 1
        return after

    def _open_writer(self, segment: int) -> None:
        if self._writer is not None:
            self._writer.flush()
            os.fsync(self._writer.fileno())
            self._writer.close()
        self._writer = (self.directory / _segment_name(segment)).open("ab")

    def flush(self) -> None:
        """Hand what was appended to the OS (survives the process, not the machine)."""
        if self._writer is not None and self._dirty:
            self._writer.flush()

    def sync(self) -> None:
        """Make what was appended durable (fsync)."""
        if self._writer is not None and self._dirty:
            self._writer.flush()
            os.fsync(self._writer.fileno())
            self._dirty = False

    # ----- reading and acknowledging --------------------------------------------------------

    def read(self, limit: int) -> list[tuple[str, bytes, Position]]:
        """Up to `limit` unread events, oldest first: (id, payload, position after it)."""
        self.flush()
        events: list[tuple[str, bytes, Position]] = []
        while len(events) < limit and self._read < self.end:
            segment = self._read.segment
            if segment not in self._sizes or self._read.offset >= self._sizes[segment]:
                self._read = Position(min(n for n in self._sizes if n > segment), 0)
                continue
            if self._reader_segment != segment or self._reader is None:
                if self._reader is not None:
                    self._reader.close()
                self._reader = (self.directory / _segment_name(segment)).open("rb")
                self._reader_segment = segment
            self._reader.seek(self._read.offset)
            offset = self._read.offset
            while len(events) < limit and offset < self._sizes[segment]:
                line = self._reader.readline()
                offset += len(line)
                self.unread -= 1
                payload = line.rstrip(b"\n")
                try:
                    event_id = _decode_id(payload).id
                except msgspec.DecodeError:
                    # Not written by us as it is (a damaged disk): kept out of the stream.
                    log.error("usage spool %s: a line that is no event was skipped", self.directory)
                    continue
                events.append((event_id, payload, Position(segment, offset)))
            self._read = Position(segment, offset)
        return events

    def commit(self, position: Position) -> None:
        """Everything up to `position` is acknowledged: remember it, delete spent segments."""
        if position <= self._cursor:
            return
        self._cursor = position
        os.pwrite(self._cursor_fd, b"%020d %020d\n" % (position.segment, position.offset), 0)
        self._delete_before(position.segment)

    def _delete_before(self, segment: int) -> None:
        for number in [n for n in self._sizes if n < segment]:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / _segment_name(number)).unlink()
            del self._sizes[number]
            if number == self._reader_segment and self._reader is not None:
                self._reader.close()
                self._reader, self._reader_segment = None, -1

    @property
    def pending(self) -> bool:
        """Whether any event in the spool is not acknowledged yet."""
        return self._cursor < self.end

    def close(self) -> None:
        """Make everything durable and release the lock; an empty spool leaves no segment."""
        self.sync()
        for f in (self._writer, self._reader):
            if f is not None:
                f.close()
        self._writer = self._reader = None
        if not self.pending:
            for number in list(self._sizes):
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / _segment_name(number)).unlink()
            self._sizes.clear()
            os.ftruncate(self._cursor_fd, 0)
        os.fsync(self._cursor_fd)
        os.close(self._cursor_fd)
        os.close(self._lock_fd)  # releases the flock
