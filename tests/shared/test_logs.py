"""The log handler every process installs: no forged lines, no terminal escapes, no secrets."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from shared import redact
from shared.logs import configure_logging, escape_controls

SECRET = "tok-Kx93mPq71\n"
# The timestamp of a forged log line, text in a logged value.
FORGED = "2026-01-01T00:00:00"  # fixed history: any date would do


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """What the handler configure_logging installs writes (root logger restored after)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    configure_logging("test", "DEBUG", stream=out)
    redact.register(SECRET)
    try:
        yield out
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_newlines_and_ansi_escapes_in_arguments_stay_on_one_line(lines: io.StringIO) -> None:
    model = f"gpt-4o\n{FORGED} ERROR usage: forged\r\x1b[31mred\x1b[0m\x07\x9b\u2028"
    logging.getLogger("stockpilot.usage").warning("unpriced model %s", model)
    written = lines.getvalue()
    assert written.count("\n") == 1  # one record, one line
    assert "\x1b" not in written and "\r" not in written and "\x07" not in written
    assert "\x9b" not in written and "\u2028" not in written
    assert f"gpt-4o\\n{FORGED} ERROR usage: forged\\r\\x1b[31mred" in written
    assert "\\x07\\x9b\\u2028" in written


def test_controls_in_the_message_itself_are_escaped_too(lines: io.StringIO) -> None:
    logging.getLogger("x").error("first\nsecond\x1b]0;title\x07")
    written = lines.getvalue()
    assert written.endswith("first\\nsecond\\x1b]0;title\\x07\n")


def test_tracebacks_stay_multi_line_but_their_messages_cannot_add_lines(
    lines: io.StringIO,
) -> None:
    try:
        raise ValueError(f"bad value\n{FORGED} INFO forged\x1b[2J")
    except ValueError:
        logging.getLogger("x").exception("it failed")
    written = lines.getvalue().splitlines()
    assert written[0].endswith("it failed")
    assert written[1] == "Traceback (most recent call last):"
    assert any(line.startswith('  File "') for line in written)
    assert written[-1] == f"ValueError: bad value\\n{FORGED} INFO forged\\x1b[2J"
    assert not any(line.startswith(FORGED[:10]) for line in written)  # its day


SHAPES = {
    "raw": SECRET,
    "stripped": SECRET.strip(),
    "repr": repr(SECRET),
    "url-encoded": quote(SECRET, safe=""),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_registered_secret_never_reaches_a_line_in_any_shape(
    lines: io.StringIO, shape: str
) -> None:
    shown = SHAPES[shape]
    log = logging.getLogger("x")
    log.warning("in the message: " + shown.replace("%", "%%"))
    log.warning("in an argument: %s", shown)
    log.warning("in a repr argument: %r", SECRET)
    try:
        raise RuntimeError(f"refused header b'Bearer {shown}'")
    except RuntimeError:
        log.exception("in a traceback")
    written = lines.getvalue()
    assert written.count("***") >= 4
    for form in (SECRET, SECRET.strip(), repr(SECRET)[1:-1], quote(SECRET, safe="")):
        assert form not in written, form
    assert "Kx93mPq71" not in written


def test_other_handlers_get_the_redacted_record(lines: io.StringIO) -> None:
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    collect = Collect()
    logging.getLogger().addHandler(collect)  # after the redacting handler, as pytest's is
    logging.getLogger("x").warning("key %s", SECRET)
    logging.getLogger().removeHandler(collect)
    assert seen == ["key ***"]


def test_escape_controls_keeps_printable_text() -> None:
    text = "plain text, unicode é 日本, tabs\tand\\backslashes"
    assert escape_controls(text) == text.replace("\t", "\\t")
    assert escape_controls("a\nb\x1bc", keep_newlines=True) == "a\nb\\x1bc"
