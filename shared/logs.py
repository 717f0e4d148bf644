"""Log set-up shared by every process: one line per record, prefixed by the process name.

A log line is made safe in two ways. Secrets: the handler's filter and formatter redact every
secret the process's settings registered (shared.redact), in every form, from the message,
its arguments and the traceback. Control characters: a value that came from outside (a model
name, an event field, an error from a server) may carry CR/LF or ANSI escapes; they are shown
escaped (`\\n`, `\\x1b`), so one event can neither forge a log line nor colour a terminal.
Tracebacks keep their line breaks, but not the ones inside an exception's message.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from types import TracebackType
from typing import TextIO

from shared.redact import redact

# C0 and C1 controls, DEL, Unicode line/paragraph separators and bidi overrides/isolates.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROLS_BUT_NEWLINE = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str, keep_newlines: bool = False) -> str:
    """`text` with control characters shown as escapes (`\\n`, `\\x1b`, `\\u2028`)."""
    return (_CONTROLS_BUT_NEWLINE if keep_newlines else _CONTROLS).sub(_escaped, text)


# Chunks of a formatted traceback whose line breaks are its own (frames, headers); any other
# chunk is an exception's message, whose line breaks came from whoever raised it.
_TRACEBACK_STRUCTURE = ("Traceback ", "  File ", "  [Previous line", "\nDuring ", "\nThe above ")

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def format_traceback(exc_info: ExcInfo) -> str:
    """A multi-line traceback whose exception messages cannot add lines or escapes."""
    kind, value, tb = exc_info
    if kind is None or value is None:
        return ""
    chunks = traceback.TracebackException(kind, value, tb).format()
    lines: list[str] = []
    for chunk in chunks:
        body = chunk[:-1] if chunk.endswith("\n") else chunk
        if chunk.startswith(_TRACEBACK_STRUCTURE):
            lines.append(escape_controls(body, keep_newlines=True))
        else:
            lines.append(escape_controls(body))
    return "\n".join(lines)


class SafeFormatter(logging.Formatter):
    """A formatter whose lines carry no secret and no control character but their own."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        original = record.message
        record.message = escape_controls(original)
        try:
            return super().formatMessage(record)
        finally:
            record.message = original

    def formatException(self, ei: ExcInfo) -> str:  # noqa: N802 - logging's name
        return format_traceback(ei)

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return escape_controls(stack_info, keep_newlines=True)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class RedactSecrets(logging.Filter):
    """Renders a record's message with its arguments, redacted, before any handler sees it.

    The formatter redacts the final line too; redacting the record itself also protects
    whatever else reads it (a second handler, pytest's capture).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # bad %-arguments: logging reports those itself
            return True
        record.msg = redact(message)
        record.args = None
        return True


def configure_logging(
    process: str, level: str = "INFO", stream: TextIO | None = None
) -> logging.Handler:
    """Send logs to stderr (or `stream`) as `time level process: message`; the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        SafeFormatter(
            f"%(asctime)s %(levelname)s {escape_controls(process)}: %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
    )
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # nats-py logs every reconnect attempt at ERROR with a traceback; our callbacks say it once.
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    return handler
