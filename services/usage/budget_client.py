"""May StockPilot AI make this LLM call? The budget check of the usage client.

    budgets = BudgetChecker("http://127.0.0.1:8000", token=read_token)
    await budgets.check_budget(user_id=user.id, model="gpt-4o")   # raises BudgetExceeded
    async with budgets.guard(user_id=user.id, model="gpt-4o"):
        response = await client.chat.completions.create(...)
    recorder = UsageRecorder(nc, budgets=budgets)                 # recorder.check_budget(...)

The answer is the usage service's, from `GET /api/v1/usage/budget` (the gateway; the
application's NATS user may only publish its calls), and is kept for at most `max_age_s`
(a second) per set of parameters: on the hot path a check is a dict lookup and a clock
read. Concurrent checks of the same parameters share one request. A budget used up
meanwhile is noticed within that second, so an enforced budget can be overrun by the calls
of at most one second.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import httpx
import msgspec

from services.usage.contract import BudgetAnswer

MAX_AGE_S = 1.0
_decode = msgspec.json.Decoder(BudgetAnswer).decode

Key = tuple[str | None, str | None, str | None, str | None]


class BudgetError(Exception):
    """The budget could not be checked (the gateway did not answer, or refused)."""


class BudgetExceeded(Exception):
    """An enforced budget covering the call is used up; `answer` says which and how much."""

    def __init__(self, answer: BudgetAnswer) -> None:
        super().__init__(answer.reason or "an enforced LLM budget is used up")
        self.answer = answer


class BudgetChecker:
    """Budget answers from the gateway, each kept for at most `max_age_s`."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        max_age_s: float = MAX_AGE_S,
        timeout_s: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        # `http`: an HTTP client of one's own (its base URL is used, `base_url` ignored).
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(base_url=base_url, timeout=timeout_s)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._max_age = max_age_s
        self._monotonic = monotonic
        self._answers: dict[Key, tuple[float, BudgetAnswer]] = {}
        self._asking: dict[Key, asyncio.Future[BudgetAnswer]] = {}
        self.requests = 0

    async def aclose(self) -> None:
        """Close the HTTP client (unless it was handed in)."""
        if self._owns_http:
            await self._http.aclose()

    async def answer(
        self,
        *,
        user_id: str | None = None,
        model: str | None = None,
        endpoint: str | None = None,
        tag: str | None = None,
    ) -> BudgetAnswer:
        """The budgets covering such a call (at most `max_age_s` old)."""
        key = (user_id, model, endpoint, tag)
        held = self._answers.get(key)
        if held is not None and self._monotonic() - held[0] < self._max_age:
            return held[1]
        asking = self._asking.get(key)
        if asking is not None:
            return await asyncio.shield(asking)
        future: asyncio.Future[BudgetAnswer] = asyncio.get_running_loop().create_future()
        self._asking[key] = future
        try:
            fetched = await self._fetch(key)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it
            raise
        else:
            future.set_result(fetched)
            if len(self._answers) >= 10_000:
                self._answers.clear()
            self._answers[key] = (self._monotonic(), fetched)
            return fetched
        finally:
            del self._asking[key]

    async def check_budget(
        self,
        *,
        user_id: str | None = None,
        model: str | None = None,
        endpoint: str | None = None,
        tag: str | None = None,
    ) -> BudgetAnswer:
        """The answer for such a call; raises BudgetExceeded when it is not allowed."""
        found = await self.answer(user_id=user_id, model=model, endpoint=endpoint, tag=tag)
        if not found.allowed:
            raise BudgetExceeded(found)
        return found

    @contextlib.asynccontextmanager
    async def guard(
        self,
        *,
        user_id: str | None = None,
        model: str | None = None,
        endpoint: str | None = None,
        tag: str | None = None,
    ) -> AsyncIterator[BudgetAnswer]:
        """Enter only when the call is allowed (BudgetExceeded otherwise)."""
        yield await self.check_budget(user_id=user_id, model=model, endpoint=endpoint, tag=tag)

    async def _fetch(self, key: Key) -> BudgetAnswer:
        params = {
            name: value
            for name, value in zip(("user_id", "model", "endpoint", "tag"), key, strict=True)
            if value is not None
        }
        self.requests += 1
        try:
            response = await self._http.get(
                "/api/v1/usage/budget", params=params, headers=self._headers
            )
        except httpx.HTTPError as exc:
            raise BudgetError(f"the budget could not be checked: {exc!r}") from None
        if response.status_code != 200:
            raise BudgetError(
                f"the budget could not be checked: HTTP {response.status_code} "
                f"{response.text[:200]}"
            )
        try:
            return _decode(response.content)
        except msgspec.DecodeError as exc:
            raise BudgetError(f"the budget answer did not decode: {exc}") from None
