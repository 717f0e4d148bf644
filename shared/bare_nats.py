"""A second, bare NATS protocol connection beside nats-py's, for the two hot paths.

Why: nats-py handles each message through its parser, a `Msg` object, header parsing, a
queue and a callback task, and each JetStream `publish_async` through a future, a semaphore
and the same receive path for its acknowledgement. For the few frames a projection read
(`shared.stream_reader`) and a usage publisher (`shared.bare_publisher`) need, parsing bytes
directly is several times cheaper (BENCHMARKS.md). nats-core, the NATS team's lean client,
needs Python 3.13; this project runs 3.11. Everything else (requests, the JetStream API,
reconnects and server discovery) stays on nats-py: a bare connection is opened to the
server the nats-py connection is on, with its credentials, and the caller falls back to
nats-py whenever it cannot be (TLS, NKeys or JWT credentials).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar, cast
from urllib.parse import unquote

from nats.aio.client import Client as NATS

CONNECT_TIMEOUT_S = 5.0


class BareUnavailable(Exception):
    """A bare connection cannot be opened (or was lost): the caller uses nats-py instead."""


class BareUnreachable(BareUnavailable):
    """The server did not take the connection (restarting, in lame duck mode): try later."""


class BareRefused(BareUnavailable):
    """Not a passing failure: what this connection needs it does not speak (TLS, NKeys, JWT)
    or the server answered -ERR. Trying again at once would fail the same way."""


class FrameProtocol(asyncio.Protocol):
    """Splits the server's byte stream into frames: control lines and MSG/HMSG messages.

    INFO, PING, PONG and -ERR are handled here; each MSG or HMSG frame goes to `message`,
    which subclasses implement. Frames are parsed as immutable bytes: slices and splits are
    then the payloads and fields themselves, with no bytearray-to-bytes copy per message.
    """

    # At most about this many bytes of frames are handled in one turn of the event loop: the
    # rest of a chunk waits for the next turn, reading paused until it is handled. None:
    # every frame of a chunk at once. For a connection whose frames take long to handle:
    # under uvloop libuv reads a socket 256 KB at a time (up to 32 times) before anything
    # else runs, and a request or an acknowledgement on another connection waited for each
    # of those reads. Small chunks (a few frames) go on at once: pausing costs two system
    # calls.
    turn_every_bytes: int | None = None

    def __init__(self) -> None:
        # The unparsed end of the last chunk (a frame cut in two by the socket).
        self.rest = b""
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.info: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.pong: asyncio.Future[None] = loop.create_future()
        self.last_read = loop.time()
        # Set by a subclass to stop parsing (the rest of the chunk is left unread): a plain
        # attribute, read once a frame, rather than a property call.
        self.done = False

    # ----- to implement ------------------------------------------------------------------

    def message(self, parts: list[bytes], buffer: bytes, body_start: int, end: int) -> None:
        """Handle one whole MSG/HMSG frame.

        `parts` is its control line split on spaces (`MSG <subject> <sid> [reply] <size>` or
        `HMSG <subject> <sid> [reply] <header size> <total size>`); its body, headers first
        for HMSG, is `buffer[body_start:end]`.
        """
        raise NotImplementedError

    def stopped(self, reason: Exception | None) -> None:
        """The connection ended (`reason` None: closed as asked) or a frame stopped it."""

    # ----- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_handshake(BareUnavailable(f"connection lost: {exc or 'closed'}"))
        self.stopped(BareUnavailable(f"connection lost: {exc or 'closed by the server'}"))

    def data_received(self, data: bytes) -> None:
        self.last_read = asyncio.get_running_loop().time()
        if self._handle(self.rest + data if self.rest else data):
            self._turn()

    def _handle(self, buffer: bytes) -> bool:
        """Handle `buffer`'s whole frames, up to turn_every_bytes of them, and keep the rest
        for later; True when the loop should turn before more is handled."""
        budget = self.turn_every_bytes
        stop_at = len(buffer) if budget is None else budget
        position = 0
        try:
            while not self.done and position < stop_at:
                line_end = buffer.find(b"\r\n", position)
                if line_end < 0:
                    break
                if buffer[position] in (72, 77):  # HMSG / MSG
                    parts = buffer[position:line_end].split(b" ")
                    body_start = line_end + 2
                    end = body_start + int(parts[-1])
                    if len(buffer) < end + 2:
                        break  # the payload has not fully arrived yet
                    self.message(parts, buffer, body_start, end)
                    position = end + 2
                else:
                    line = buffer[position:line_end]
                    position = line_end + 2
                    self._control(line)
        except BareUnavailable as exc:
            self.stopped(exc)
        except Exception as exc:  # a frame this parser cannot read: stop, the caller goes on
            self.stopped(BareUnavailable(f"unreadable frame: {exc!r}"))
        self.rest = buffer[position:]
        return budget is not None and position >= budget and not self.done

    def _turn(self) -> None:
        """Reading paused until the next turn of the loop, which handles what is left."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()
            asyncio.get_running_loop().call_soon(self._read_on)

    def _read_on(self) -> None:
        """One turn later: the frames left over (another turn's worth at most), and after a
        turn that handled none, reading again. The turn after the last of them keeps it
        from running into the next read's frames, in the same turn, twice the bound."""
        transport = self.transport
        if self.done or transport is None or transport.is_closing():
            return
        left, self.rest = self.rest, b""
        if self._handle(left) or len(self.rest) < len(left):
            asyncio.get_running_loop().call_soon(self._read_on)
        else:
            transport.resume_reading()

    # ----- helpers ---------------------------------------------------------------------

    def _control(self, line: bytes) -> None:
        if line.startswith(b"PING"):
            self.write(b"PONG\r\n")
        elif line.startswith(b"PONG"):
            if not self.pong.done():
                self.pong.set_result(None)
        elif line.startswith(b"INFO "):
            if not self.info.done():
                self.info.set_result(json.loads(line[5:]))
        elif line.startswith(b"-ERR"):
            raise BareRefused(f"server error: {line[5:].decode(errors='replace')}")
        # +OK and anything else: nothing to do.

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail_handshake(self, reason: BaseException) -> None:
        for future in (self.info, self.pong):
            if not future.done():
                future.set_exception(reason)
                future.exception()  # never "exception was never retrieved"


def connect_options(nc: NATS, info: dict[str, Any], name: str) -> bytes:
    """The CONNECT line for a bare connection with `nc`'s credentials."""
    url = nc.connected_url
    if url is None:
        raise BareUnavailable("not connected")
    if url.scheme not in ("nats", "") or info.get("tls_required"):
        raise BareRefused("TLS connections stay on nats-py")
    options: dict[str, Any] = {
        "verbose": False,
        "pedantic": False,
        "headers": True,
        "no_responders": True,
        "protocol": 1,
        "name": name,
        "lang": "python3",
        "version": "stockpilot",
    }
    # The main connection's credentials: in its URL, or given to nats-py as options.
    given = nc.options
    if given.get("user_credentials") or given.get("nkeys_seed") or given.get("nkeys_seed_str"):
        raise BareRefused("NKey and JWT credentials stay on nats-py")
    if url.username and url.password is not None:
        options["user"] = unquote(url.username)
        options["pass"] = unquote(url.password)
    elif url.username:
        options["auth_token"] = unquote(url.username)
    elif given.get("user"):
        options["user"] = given["user"]
        options["pass"] = given.get("password") or ""
    elif given.get("token"):
        options["auth_token"] = given["token"]
    elif info.get("auth_required"):
        raise BareRefused("the server wants credentials a bare connection does not handle")
    return b"CONNECT " + json.dumps(options).encode() + b"\r\n"


P = TypeVar("P", bound=FrameProtocol)


async def open_bare(
    nc: NATS, protocol: Callable[[], P], name: str, subscribe: str
) -> tuple[asyncio.Transport, P]:
    """Connect to `nc`'s server, say CONNECT, subscribe to `subscribe` (sid 1), await a PONG.

    Raises BareUnavailable when that cannot be done.
    """
    url = nc.connected_url
    if url is None or url.hostname is None:
        raise BareUnavailable("not connected")
    loop = asyncio.get_running_loop()
    try:
        transport, reader = await asyncio.wait_for(
            loop.create_connection(protocol, url.hostname, url.port or 4222), CONNECT_TIMEOUT_S
        )
    except (OSError, TimeoutError) as exc:
        raise BareUnreachable(f"cannot connect to {url.hostname}:{url.port}: {exc}") from None
    try:
        info = await asyncio.wait_for(reader.info, CONNECT_TIMEOUT_S)
        transport.write(connect_options(nc, info, name))
        transport.write(f"SUB {subscribe} 1\r\nPING\r\n".encode())
        await asyncio.wait_for(reader.pong, CONNECT_TIMEOUT_S)  # connected and subscribed
    except TimeoutError:
        transport.close()
        raise BareUnavailable("no answer from the server while connecting") from None
    except BaseException:
        transport.close()
        raise
    return transport, reader
