"""Ops tooling over the streams: `events tail|export|import`, `replay`, `streams`.

Why one module of over 300 lines: it is the one command group for the streams, each
subcommand short and sharing the same connection checks, signal handling and output
conventions; the reading and the JSON-lines form already live in ops.stream_io.

Output is JSON lines on stdout (one object per message or per result; `streams` prints
tables unless --json); progress and diagnostics go to stderr. The stack is found by
ops.locate (STOCKPILOT_NATS_URL, or the embedded server recorded under STOCKPILOT_DATA_DIR)
and checked to hold the StockPilot streams; anything in the way is one line and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api as js_api
from nats.js.errors import NotFoundError as JsNotFoundError

from ops import locate, stream_io
from ops.replay import (
    STREAM_SERVICES,
    ReplayError,
    ReplayResult,
    live_definition,
    replay_definition,
    stream_name,
)
from ops.streams_report import render_table, streams_report, unavailable_services
from shared.nats_errors import is_nats_error
from shared.settings import CommonSettings, SettingsError, settings_or_exit
from shared.streams import STREAMS

_encode = msgspec.json.Encoder().encode


def _err(text: str) -> None:
    print(f"stockpilot: {text}", file=sys.stderr, flush=True)


def _out(line: bytes) -> None:
    sys.stdout.buffer.write(line + b"\n")
    sys.stdout.buffer.flush()


def _connected(settings: CommonSettings, *, stockpilot_only: bool = True) -> Any:
    """The stack's NATS (never a guess), checked to be StockPilot's; see ops.locate."""
    return locate.connected(settings, "stockpilot-ops", stockpilot_only=stockpilot_only)


def _run(
    args: argparse.Namespace, work: Callable[[CommonSettings], Coroutine[Any, Any, int]]
) -> int:
    from shared.logs import configure_logging

    settings = settings_or_exit(CommonSettings)
    configure_logging("stockpilot", "ERROR")
    try:
        return asyncio.run(work(settings))
    except locate.StackError as exc:
        _err(str(exc))
        return 2
    except (OSError, TimeoutError, nats.errors.NoServersError, nats.errors.TimeoutError) as exc:
        where = locate.shown(locate.servers_or_raise(settings))
        _err(f"NATS at {where} stopped answering ({type(exc).__name__})")
        return 2
    except (ReplayError, JsNotFoundError, ValueError, SettingsError) as exc:
        _err(str(exc) or type(exc).__name__)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not is_nats_error(exc):
            raise
        _err(f"NATS refused: {exc}")
        return 2


def _rfc3339(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a time zone (e.g. {text}Z)")
    return moment


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


# ----- events tail -----------------------------------------------------------------------


async def tail(
    nc: NATS,
    subject: str,
    emit: Callable[[stream_io.StoredMessage], None],
    *,
    stop: asyncio.Event,
    from_seq: int | None = None,
    count: int | None = None,
) -> int:
    """Follow `subject` (through its stream when one stores it); how many were emitted."""
    js = nc.jetstream()
    seen = 0

    async def callback(msg: Msg) -> None:
        nonlocal seen
        if count is not None and seen >= count:
            return
        emit(stream_io.from_msg(msg))
        seen += 1
        if count is not None and seen >= count:
            stop.set()

    try:
        stream: str | None = await js.find_stream_name_by_subject(subject)
    except JsNotFoundError:
        stream = None
    if stream is None:
        _err(f"no stream stores {subject}: following core NATS messages (no sequences)")
        subscription: Any = await nc.subscribe(subject, cb=callback)
    else:
        config = (
            stream_io.start_config(from_seq=from_seq)
            if from_seq is not None
            else js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.NEW)
        )
        subscription = await js.subscribe(
            subject,
            stream=stream,
            cb=callback,
            ordered_consumer=True,
            config=config,
            idle_heartbeat=5.0,
            inactive_threshold=30.0,
        )
        _err(f"following {subject} on {stream}")
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
    return seen


def _tail_command(args: argparse.Namespace) -> int:
    async def work(settings: CommonSettings) -> int:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        async with _connected(settings) as nc:
            await tail(
                nc,
                args.subject,
                lambda m: _out(_encode(m)),
                stop=stop,
                from_seq=args.from_seq,
                count=args.count,
            )
        return 0

    return _run(args, work)


# ----- events export / import --------------------------------------------------------------


def _export_command(args: argparse.Namespace) -> int:
    async def work(settings: CommonSettings) -> int:
        async with _connected(settings) as nc:
            js = nc.jetstream()
            name = stream_name(args.stream) if args.stream.lower() in _KNOWN else args.stream
            try:
                info = await js.stream_info(name)
            except (JsNotFoundError, nats.errors.BadSubjectError):
                raise ReplayError(_unknown_stream(args.stream)) from None
            progress = stream_io.Progress(f"export {name}", total=info.state.messages)
            await stream_io.export_stream(
                js,
                name,
                sys.stdout.buffer,
                since=args.since,
                until=args.until,
                from_seq=args.from_seq,
                progress=progress,
            )
            progress.finish()
        return 0

    return _run(args, work)


_KNOWN = {*STREAMS, *(s.name.lower() for s in STREAMS.values())}


def _unknown_stream(asked: str) -> str:
    """One line: no such stream, and the names that would do."""
    names = ", ".join(spec.name for spec in STREAMS.values())
    return f"no stream {asked!r} on this NATS: expected one of {names} (or {', '.join(STREAMS)})"


def _import_command(args: argparse.Namespace) -> int:
    async def work(settings: CommonSettings) -> int:
        # Into a stack's streams only: CONTRACT §2 lets only `up`, `service` and `gateway`
        # create them (`stockpilot up --provision-only` readies a fresh server for a restore).
        async with _connected(settings) as nc:
            js = nc.jetstream()
            progress = stream_io.Progress("import")
            report = await stream_io.import_messages(
                js,
                stream_io.stdin_batches(sys.stdin.buffer),
                keep_preconditions=args.keep_preconditions,
                progress=progress,
            )
            progress.finish(f"; {report.published} stored, {report.duplicates} duplicates")
            _out(_encode(report))
        return 0

    return _run(args, work)


# ----- replay -------------------------------------------------------------------------------


def _replay_command(args: argparse.Namespace) -> int:
    async def work(settings: CommonSettings) -> int:
        name = stream_name(args.stream)
        results: list[ReplayResult] = []
        not_compared: list[str] = []
        async with _connected(settings) as nc:
            for service in STREAM_SERVICES[name]:
                try:
                    # The fold settings (time zone, budgets, prices…) are the live service's:
                    # this shell's may differ without anything being wrong.
                    definition, answer, notes = await live_definition(nc, service, args.timeout)
                    for note in notes:
                        _err(f"{service}: {note}")
                    _err(f"replaying {name} into fresh {service} projections")
                    results += await replay_definition(
                        nc,
                        definition,
                        name,
                        timeout=args.timeout,
                        on_result=lambda r: _out(_encode(r)),
                        show_progress=True,
                        answer=answer,
                    )
                except ReplayError as exc:  # the other services can still be compared
                    _err(f"{service}: not compared: {exc}")
                    not_compared.append(service)
        unequal = [f"{r.service}/{r.projection}" for r in results if not r.equal]
        if unequal:
            _err(f"replay differs from the live view: {', '.join(unequal)}")
            return 1
        if not_compared:
            _err(f"could not compare {', '.join(not_compared)}: start the service and retry")
            return 1
        _err(f"replay equals the live view ({len(results)} projections)")
        return 0

    return _run(args, work)


# ----- streams ------------------------------------------------------------------------------


def _streams_command(args: argparse.Namespace) -> int:
    async def work(settings: CommonSettings) -> int:
        async with _connected(settings) as nc:
            lines = await streams_report(nc, timeout=args.timeout)
        if args.json:
            for line in lines:
                _out(_encode(line))
        else:
            where = locate.shown(settings.nats_servers)
            print(f"StockPilot NATS at {where} ({settings.nats_source})\n", flush=True)
            print(render_table(lines), end="", flush=True)
        down = unavailable_services(lines)
        if down:
            _err(
                f"not answering: {', '.join(down)} (the stack is up but these services are "
                "not: see the output of `stockpilot up`)"
            )
            return 1
        return 0

    return _run(args, work)


# ----- registration -------------------------------------------------------------------------


# How every ops command finds the stack (ops.locate), said in each one's --help.
_FINDING = (
    " The stack is the NATS in STOCKPILOT_NATS_URL or, when that is unset, the embedded "
    "server `stockpilot up` recorded under STOCKPILOT_DATA_DIR (default ./.data, also looked "
    "for in the parent folders); never another NATS (nothing at 127.0.0.1:4222 is assumed)."
)


def register(subparsers: Any) -> None:
    """Add `events tail|export|import`, `replay` and `streams`."""
    events = subparsers.add_parser(
        "events",
        help="tail, export and import stream messages as JSON lines",
        description="Tail, export and import the messages of the StockPilot streams." + _FINDING,
    )
    commands = events.add_subparsers(dest="events_command", metavar="ACTION", required=True)

    tail_parser = commands.add_parser(
        "tail",
        help="follow new messages on a subject",
        description=(
            "Print each new message on SUBJECT (wildcards allowed) as a JSON line with "
            "stream, seq, subject, time, headers and data, until Ctrl-C."
        ),
    )
    tail_parser.add_argument("subject", metavar="SUBJECT", help="e.g. 'stockpilot.alerts.>'")
    tail_parser.add_argument("--from-seq", type=int, help="start at this stream sequence")
    tail_parser.add_argument("--count", type=int, help="exit after this many messages")
    tail_parser.set_defaults(handler=_tail_command)

    export = commands.add_parser(
        "export",
        help="write a stream's stored messages as JSON lines",
        description=(
            "Write every stored message of STREAM (STOCKPILOT_USAGE or usage) as one JSON line: "
            "stream, seq, subject, time, headers and data (the payload as stored; data_b64 "
            "when it is not one line of JSON). Progress goes to stderr."
        ),
    )
    export.add_argument("stream", metavar="STREAM")
    start = export.add_mutually_exclusive_group()
    start.add_argument("--since", type=_rfc3339, help="first message stored at or after (RFC 3339)")
    start.add_argument("--from-seq", type=int, help="first stream sequence")
    export.add_argument("--until", type=_rfc3339, help="last message stored at or before")
    export.set_defaults(handler=_export_command)

    importer = commands.add_parser(
        "import",
        help="publish exported JSON lines from stdin",
        description=(
            "Publish the messages of `events export` lines read from stdin to their subjects, "
            "in order, with their headers (Nats-Msg-Id kept, so a repeated import stores "
            "nothing twice). Nats-Expected-* publish preconditions are dropped unless "
            "--keep-preconditions. The streams must exist: to restore into a fresh NATS, run "
            "`stockpilot up --provision-only` against it first (import never creates streams)."
        ),
    )
    importer.add_argument("--keep-preconditions", action="store_true")
    importer.set_defaults(handler=_import_command)

    replay = subparsers.add_parser(
        "replay",
        help="rebuild a stream's projections and compare with the live ones",
        description=(
            "Fold STREAM from the first event into fresh projections of the service(s) that "
            "fold it, up to the sequence the live service reports, and compare state digests. "
            "The fold settings (time zone, budgets, thresholds, prices, history bounds) are "
            "the live service's, as it reports them: each that differs from this shell's is "
            "named on stderr. One JSON line per projection; exit 0 when every one is equal, "
            "1 otherwise, 2 when the stack cannot be reached." + _FINDING
        ),
    )
    replay.add_argument("stream", metavar="STREAM", help=", ".join(STREAM_SERVICES))
    replay.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a service")
    replay.set_defaults(handler=_replay_command)

    streams = subparsers.add_parser(
        "streams",
        help="streams, sizes, consumers and projection lag",
        description=(
            "The running stack at a glance: each stream (messages, size, sequences, "
            "consumers), each service (up, catching_up or unavailable), each projection "
            "(last_seq, lag, last snapshot) from the service's status endpoint, and each "
            "alert hook (state, deliveries, failures) as the hook process last reported it. "
            "Tables for people; --json prints one JSON line per row instead, tagged by "
            "`kind` (stream, service, projection, hook). Exit status 0 when every service "
            "answers, 1 when one does not, 2 when the stack cannot be reached." + _FINDING
        ),
    )
    streams.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for a service")
    streams.add_argument("--json", action="store_true", help="JSON lines instead of tables")
    streams.set_defaults(handler=_streams_command)
