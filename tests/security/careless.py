"""Careless PostgreSQL and Redis servers on loopback: they refuse the password and quote it.

Real servers never put the password in their refusal; a proxy, a pooler or an old server
might. These speak just enough of the real wire protocols for the real drivers (asyncpg,
redis-py) to send their credentials and raise the server's error, so the probes' redaction is
tested against an error that does show the secret, in whatever form the driver decoded it to.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

_SSL_REQUEST = 80877103
_GSS_REQUEST = 80877104


def _pg_message(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


async def _pg_serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:  # SSLRequest / GSSENCRequest (answered "no"), then the StartupMessage
            (length,) = struct.unpack("!I", await reader.readexactly(4))
            body = await reader.readexactly(length - 4)
            (code,) = struct.unpack("!I", body[:4])
            if code in (_SSL_REQUEST, _GSS_REQUEST):
                writer.write(b"N")
                await writer.drain()
                continue
            break
        fields = body[4:].split(b"\0")
        params = dict(zip(fields[::2], fields[1::2], strict=False))
        user = params.get(b"user", b"").decode()
        writer.write(_pg_message(b"R", struct.pack("!I", 3)))  # AuthenticationCleartextPassword
        await writer.drain()
        kind = await reader.readexactly(1)
        (length,) = struct.unpack("!I", await reader.readexactly(4))
        password = (await reader.readexactly(length - 4)).rstrip(b"\0").decode()
        assert kind == b"p"
        message = f'password authentication failed for user "{user}" with password "{password}"'
        error = b"".join(
            tag + value.encode() + b"\0"
            for tag, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", "28P01"), (b"M", message))
        )
        writer.write(_pg_message(b"E", error + b"\0"))
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, AssertionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _read_command(reader: asyncio.StreamReader) -> list[str]:
    header = (await reader.readline()).strip()
    if not header.startswith(b"*"):
        raise ConnectionError("not a RESP array")
    args = []
    for _ in range(int(header[1:])):
        size = int((await reader.readline()).strip()[1:])
        args.append((await reader.readexactly(size + 2))[:-2].decode())
    return args


async def _redis_serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        command = await _read_command(reader)
        # `AUTH [user] pass`, or `HELLO 3 AUTH user pass` (redis-py's first command).
        upper = [arg.upper() for arg in command]
        if "AUTH" in upper:
            credentials = command[upper.index("AUTH") + 1 :]
            quoted = " ".join(repr(arg) for arg in credentials)
            writer.write(f"-WRONGPASS invalid username-password pair {quoted}\r\n".encode())
        else:
            writer.write(b"-NOAUTH Authentication required.\r\n")
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()  # one answer per connection: the client gives up after it anyway
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def careless_postgres() -> AsyncIterator[int]:
    """A PostgreSQL that asks for the password in clear and refuses it, quoting it; its port."""
    server = await asyncio.start_server(_pg_serve, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def careless_redis() -> AsyncIterator[int]:
    """A Redis that refuses every AUTH, quoting its arguments (repr-escaped); its port."""
    server = await asyncio.start_server(_redis_serve, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]
