"""A small OpenAI-compatible HTTP server on loopback for the usage client's tests.

Answers `POST /v1/chat/completions` and `POST /v1/responses`, streamed (SSE, chunk by chunk,
flushed) or not, with fixed token counts; can be told to fail the next requests of a path
with 429 or 500 (`Retry-After-Ms` short, so the OpenAI library retries at once), and to break
a stream with an error event. It runs in its own thread, so a synchronous client blocking the
test's event loop still gets its answers.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "gpt-4o-mini-2024-07-18"
# Tokens every answer reports: chat completions, and the Responses API.
CHAT_USAGE = {"prompt": 1000, "completion": 200, "cached": 400}
RESPONSES_USAGE = {"input": 500, "output": 100, "cached": 0}
TEXT = ["Buy", " low", ",", " sell", " high", "."]
# A model name that makes a chat stream fail after its first chunk (an SSE error event).
BREAKS_MID_STREAM = "gpt-4o-mini-breaks"

_ERRORS = {
    429: {"message": "Rate limit reached for gpt-4o-mini", "type": "requests", "code": None},
    500: {"message": "The server had an error", "type": "server_error", "code": None},
}


@dataclass
class Seen:
    """One request the server received."""

    path: str
    retry_count: str | None
    body: dict[str, Any]


@dataclass
class OpenAIServer:
    """The server's state: planned failures per path, the requests seen."""

    failures: dict[str, list[int]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    @property
    def base_url(self) -> str:
        """What to hand the OpenAI client as base_url."""
        return f"http://127.0.0.1:{self.port}/v1"

    def fail_next(self, path: str, *statuses: int) -> None:
        """Answer the next requests to `path` (`/v1/...`) with these statuses, in order."""
        with self.lock:
            self.failures.setdefault(path, []).extend(statuses)

    def _next_failure(self, path: str) -> int | None:
        with self.lock:
            planned = self.failures.get(path)
            return planned.pop(0) if planned else None


def _chat(body: dict[str, Any], rid: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(TEXT)},
                "finish_reason": "stop",
            }
        ],
        "usage": _chat_usage(),
    }


def _chat_usage() -> dict[str, Any]:
    return {
        "prompt_tokens": CHAT_USAGE["prompt"],
        "completion_tokens": CHAT_USAGE["completion"],
        "total_tokens": CHAT_USAGE["prompt"] + CHAT_USAGE["completion"],
        "prompt_tokens_details": {"cached_tokens": CHAT_USAGE["cached"]},
    }


def _chat_chunks(body: dict[str, Any], rid: str) -> Iterator[tuple[str | None, dict[str, Any]]]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{rid}",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    # The first chunk names the role and has no text yet (as OpenAI's do).
    yield None, chunk({"role": "assistant", "content": ""})
    for i, piece in enumerate(TEXT):
        yield None, chunk({"content": piece})
        if i == 0 and body.get("model") == BREAKS_MID_STREAM:
            yield None, {"error": {"message": "The model is overloaded", "code": "overloaded"}}
            return
    yield None, chunk({}, "stop")
    if (body.get("stream_options") or {}).get("include_usage"):
        yield (
            None,
            {
                "id": f"chatcmpl-{rid}",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": MODEL,
                "choices": [],
                "usage": _chat_usage(),
            },
        )


def _response(rid: str, done: bool) -> dict[str, Any]:
    return {
        "id": f"resp_{rid}",
        "object": "response",
        "created_at": 0,
        "model": MODEL,
        "status": "completed" if done else "in_progress",
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "".join(TEXT), "annotations": []}],
            }
        ]
        if done
        else [],
        "usage": {
            "input_tokens": RESPONSES_USAGE["input"],
            "input_tokens_details": {"cached_tokens": RESPONSES_USAGE["cached"]},
            "output_tokens": RESPONSES_USAGE["output"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": RESPONSES_USAGE["input"] + RESPONSES_USAGE["output"],
        }
        if done
        else None,
    }


def _response_events(rid: str) -> Iterator[tuple[str | None, dict[str, Any]]]:
    seq = 0
    yield (
        "response.created",
        {
            "type": "response.created",
            "sequence_number": seq,
            "response": _response(rid, done=False),
        },
    )
    for piece in TEXT:
        seq += 1
        yield (
            "response.output_text.delta",
            {
                "type": "response.output_text.delta",
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": piece,
                "logprobs": [],
                "sequence_number": seq,
            },
        )
    yield (
        "response.completed",
        {
            "type": "response.completed",
            "sequence_number": seq + 1,
            "response": _response(rid, done=True),
        },
    )


def _handler(state: OpenAIServer) -> type[BaseHTTPRequestHandler]:
    counter = iter(range(1, 1_000_000))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the test reads `seen` instead."""

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            with state.lock:
                rid = f"req_{next(counter)}"
                state.seen.append(
                    Seen(self.path, self.headers.get("x-stainless-retry-count"), body)
                )
            status = state._next_failure(self.path)
            if status is not None:
                self._json(status, {"error": _ERRORS[status]}, rid, {"retry-after-ms": "5"})
            elif self.path == "/v1/chat/completions":
                if body.get("stream"):
                    self._sse(_chat_chunks(body, rid), rid, done=True)
                else:
                    self._json(200, _chat(body, rid), rid)
            elif self.path == "/v1/responses":
                if body.get("stream"):
                    self._sse(_response_events(rid), rid, done=False)
                else:
                    self._json(200, _response(rid, done=True), rid)
            else:
                self._json(404, {"error": {"message": "no such route", "code": None}}, rid)

        def _json(
            self, status: int, payload: Any, rid: str, extra: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.send_header("x-request-id", rid)
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _sse(
            self, events: Iterator[tuple[str | None, dict[str, Any]]], rid: str, done: bool
        ) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("x-request-id", rid)
            # No length: the stream ends when the connection closes, after the last event.
            self.send_header("connection", "close")
            self.end_headers()
            for name, payload in events:
                head = f"event: {name}\n" if name else ""
                self.wfile.write(f"{head}data: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()  # chunk by chunk, as a real stream arrives
            if done:
                self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

    return Handler


@contextlib.contextmanager
def running_openai_server() -> Iterator[OpenAIServer]:
    """The server on a free loopback port, stopped on exit."""
    state = OpenAIServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
