"""Every snapshot carries its fold's version and configuration fingerprint (pure: no server)."""

from __future__ import annotations

import zlib
from dataclasses import replace
from datetime import timedelta

import msgspec
import pytest

from services.health.projection import FoldPolicy
from shared.projection import (
    SNAPSHOT_FORMAT,
    SnapshotMismatch,
    decode_snapshot,
    decompress_snapshot,
    encode_snapshot,
    fold_fingerprint,
)
from tests.clocks import NOON
from tests.shared.toy import ToyView, build

TAKEN = NOON - timedelta(hours=1)


def snapshot_of(version: str, fingerprint: str) -> bytes:
    _, projection = build()
    projection.version, projection.fingerprint = version, fingerprint
    projection.view.count, projection.view.last_seq = 7, 7
    return encode_snapshot(projection, TAKEN)


def test_a_snapshot_of_the_same_identity_is_restored() -> None:
    _, projection = build()
    projection = replace(projection, version="2", fingerprint="abc")
    view, taken = decode_snapshot(snapshot_of("2", "abc"), ToyView, projection)
    assert (view.count, view.last_seq, taken) == (7, 7, TAKEN)


@pytest.mark.parametrize(
    ("version", "fingerprint", "why"),
    [
        ("1", "abc", "folded by fold version '1', this is '2'"),
        ("2", "xyz", r"another fold configuration \(fingerprint xyz, now abc\)"),
    ],
)
def test_a_snapshot_of_another_identity_is_refused_with_the_reason(
    version: str, fingerprint: str, why: str
) -> None:
    _, projection = build()
    projection = replace(projection, version="2", fingerprint="abc")
    with pytest.raises(SnapshotMismatch, match=why):
        decode_snapshot(snapshot_of(version, fingerprint), ToyView, projection)


def test_a_snapshot_from_before_fold_identity_is_refused() -> None:
    """One stored before snapshots carried an identity: nothing says what folded it."""
    envelope = {
        "format": SNAPSHOT_FORMAT,
        "projection": "toy",
        "last_seq": 3,
        "taken_at": TAKEN,
        "view": msgspec.msgpack.encode(ToyView(count=3, last_seq=3)),
    }
    old = zlib.compress(msgspec.msgpack.encode(envelope))
    _, projection = build()
    with pytest.raises(SnapshotMismatch, match="fold version '\\(none\\)'"):
        decode_snapshot(old, ToyView, projection)
    view, _ = decode_snapshot(old, ToyView)  # without an identity to check: tests of folds
    assert view.count == 3


def test_the_fingerprint_follows_the_configuration() -> None:
    assert fold_fingerprint(FoldPolicy()) == fold_fingerprint(FoldPolicy())
    assert fold_fingerprint(FoldPolicy()) != fold_fingerprint(FoldPolicy(down_after=5))
    assert fold_fingerprint(1000) != fold_fingerprint(10)


def test_snapshots_are_zstd_and_the_zlib_ones_written_before_still_restore() -> None:
    """Snapshots are written with zstd (the usage view's Bloom filter compressed ~4 times
    faster than with zlib); one written with zlib before restores to the same view."""
    _, projection = build()
    projection.view = ToyView(count=7, last_seq=7)
    written = encode_snapshot(projection, TAKEN)
    assert written.startswith(b"\x28\xb5\x2f\xfd")  # a zstd frame
    earlier = zlib.compress(decompress_snapshot(written), level=1)
    for data in (written, earlier):
        view, taken_at = decode_snapshot(data, ToyView, projection)
        assert (view.count, view.last_seq, taken_at) == (7, 7, TAKEN)
    with pytest.raises(Exception, match="."):
        decode_snapshot(b"\x28\xb5\x2f\xfd" + b"\x00" * 12, ToyView, projection)
