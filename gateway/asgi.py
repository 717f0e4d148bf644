"""Plain ASGI types for the wrappers in front of Litestar's router.

The scope and messages are the server's dicts: Litestar's TypedDicts are narrower than what
a wrapper outside its router sees and adds (`path_template`, `route_handler`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
