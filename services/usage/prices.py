"""The price table: shipped prices.toml, overridden by settings; what a call costs."""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

import msgspec

from services.usage.contract import Price
from services.usage.settings import ModelPrice

PRICES_FILE = Path(__file__).with_name("prices.toml")
_DATED = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


class _PriceFile(msgspec.Struct, forbid_unknown_fields=True):
    prices: dict[str, ModelPrice]


def shipped_prices() -> dict[str, ModelPrice]:
    """The prices shipped with the service."""
    raw = tomllib.loads(PRICES_FILE.read_text(encoding="utf-8"))
    return msgspec.convert(raw, _PriceFile).prices


def configured_prices(overrides: Mapping[str, ModelPrice]) -> dict[str, Price]:
    """The shipped table updated with `overrides` (settings win), as the event carries it."""
    prices = shipped_prices()
    prices.update(overrides)
    return {
        model: Price(input=p.input, output=p.output, cached_input=p.cached_input)
        for model, p in sorted(prices.items())
    }


def base_model(model: str) -> str:
    """`gpt-4o-2024-08-06` → `gpt-4o`; names without a date stay as they are."""
    return _DATED.sub("", model)


class PriceTable:
    """Prices by model, with dated names falling back to their base model."""

    def __init__(self, prices: Mapping[str, ModelPrice | Price]) -> None:
        self._prices = dict(prices)
        self._cache: dict[str, ModelPrice | Price | None] = {}

    @classmethod
    def with_overrides(cls, overrides: Mapping[str, ModelPrice]) -> PriceTable:
        """The shipped table updated with `overrides` (settings win)."""
        prices = shipped_prices()
        prices.update(overrides)
        return cls(prices)

    def fingerprint(self) -> str:
        """A stable digest of every price (part of the projection's configuration)."""
        encoded = msgspec.json.encode(sorted(self._prices.items()))
        return hashlib.sha256(encoded).hexdigest()

    def price(self, model: str) -> ModelPrice | Price | None:
        """The model's price, or None when the model is unknown."""
        try:
            return self._cache[model]
        except KeyError:
            pass
        found = self._prices.get(model)
        if found is None:
            found = self._prices.get(base_model(model))
        if len(self._cache) < 10_000:
            self._cache[model] = found
        return found

    def cost(
        self, model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int
    ) -> float | None:
        """USD for one call; None when the model has no price."""
        # self.price(model)'s kept answer read here: this runs for every call folded.
        price = self._cache.get(model)
        if price is None:
            price = self.price(model)
            if price is None:
                return None
        # Cached tokens are part of the prompt tokens (as OpenAI reports them).
        cached = min(cached_tokens, prompt_tokens)
        cached_price = price.input if price.cached_input is None else price.cached_input
        return (
            (prompt_tokens - cached) * price.input
            + cached * cached_price
            + completion_tokens * price.output
        ) / 1_000_000
