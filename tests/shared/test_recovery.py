"""Event-sourcing invariants: snapshot + tail equals a full replay; kill -9 loses nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import msgspec
import nats
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.projection import decode_snapshot, encode_snapshot, view_digest
from shared.publish import encode_event
from shared.service_status import DigestAnswer
from shared.streams import provision
from tests.clocks import NOON
from tests.shared.toy import Counted, ToyView, build

# Any past instant does, nothing here depends on the day: three hours before the run's noon
# (tests.clocks.NOON), never a literal date.
T0 = NOON - timedelta(hours=3)

events = st.lists(
    st.builds(
        lambda i, model, code: Counted(
            id=f"e{i}", occurred_at=T0 + timedelta(seconds=i), model=model, status_code=code
        ),
        st.integers(0, 10_000),
        st.sampled_from(["gpt-4o", "gpt-4o-mini", "o3"]),
        st.sampled_from([200, 429, 500, -1]),
    ),
    max_size=60,
)


def fold_all(raw: list[bytes]) -> ToyView:
    _, projection = build()
    for seq, data in enumerate(raw, start=1):
        try:
            projection.fold(seq, data)
        except Exception:
            projection.view.last_seq = seq  # what the runtime does with a refused event
    return projection.view


@settings(max_examples=60, deadline=None)
@given(events, st.integers(min_value=0, max_value=60))
def test_snapshot_plus_tail_equals_full_replay(stream: list[Counted], cut: int) -> None:
    raw = [encode_event(e) for e in stream]
    cut = min(cut, len(raw))
    _, head = build()
    for seq, data in enumerate(raw[:cut], start=1):
        try:
            head.fold(seq, data)
        except Exception:
            head.view.last_seq = seq
    view, _ = decode_snapshot(encode_snapshot(head, T0), ToyView)
    head.view = view
    for seq, data in enumerate(raw[cut:], start=cut + 1):
        try:
            head.fold(seq, data)
        except Exception:
            head.view.last_seq = seq
    assert view_digest(head.view) == view_digest(fold_all(raw))


async def test_service_killed_mid_stream_recovers_to_full_replay(
    env: dict[str, str], tmp_path: Path
) -> None:
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    js = nc.jetstream()
    await provision(js)
    total = 6_000
    raw = []
    for i in range(total):
        event = Counted(id=f"e{i}", occurred_at=T0, model=f"m{i % 7}", status_code=200)
        raw.append(encode_event(event))
    # Frequent snapshots so the kill lands between a snapshot and the tail.
    child_env = os.environ | env | {"STOCKPILOT_SNAPSHOT_EVERY_S": "0.2"}
    command = [sys.executable, "-m", "tests.shared.toy_main"]
    root = Path(__file__).parents[2]
    first = subprocess.Popen(command, env=child_env, cwd=root)
    try:
        for i, data in enumerate(raw):
            await js.publish("stockpilot.usage.recorded", data, headers={"Nats-Msg-Id": f"e{i}"})
            if i == total // 2:
                await asyncio.sleep(0.6)
                first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        assert first.returncode == -signal.SIGKILL
        second = subprocess.Popen(command, env=child_env, cwd=root)
        try:
            answer = None
            for _ in range(200):
                try:
                    msg = await nc.request("stockpilot.svc.usage.digest", b"{}", timeout=1)
                    answer = msgspec.json.decode(msg.data, type=DigestAnswer)
                    if answer.projections[-1].last_seq == total:
                        break
                except nats.errors.Error:
                    pass
                await asyncio.sleep(0.1)
            assert answer is not None
            live = answer.projections[-1]
            assert live.last_seq == total
            assert live.digest == view_digest(fold_all(raw))
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=15) == 0
    finally:
        if first.poll() is None:
            first.kill()
        await nc.close()
