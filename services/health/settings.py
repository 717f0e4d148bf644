"""Health service settings: what to probe, how often, and when a result counts as degraded."""

from __future__ import annotations

import os
from typing import Annotated, ClassVar, Literal

import msgspec

from shared.redact import is_conninfo, parse_conninfo
from shared.settings import (
    CommonSettings,
    Percent,
    PositiveFloat,
    PositiveInt,
    SettingsError,
    strip_whitespace,
)

# An external API's name becomes a subject token (`stockpilot.health.checked.external.<name>`).
ApiName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
# Every probe is bounded; the gateway waits a little longer than the longest one for `?fresh`.
ProbeTimeout = Annotated[float, msgspec.Meta(gt=0, le=60)]
HttpMethod = Literal["GET", "HEAD", "POST", "OPTIONS"]
ENV_PREFIX = "env:"


class ExternalApi(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One external HTTP API to probe (an item of STOCKPILOT_EXTERNAL_APIS).

    A header value `env:NAME` is replaced by the variable NAME when the settings load, so no
    secret has to sit in the configuration itself.
    """

    name: ApiName
    url: str
    method: HttpMethod = "GET"
    expect_status: Annotated[int, msgspec.Meta(ge=100, le=599)] = 200
    timeout_s: ProbeTimeout | None = None
    headers: dict[str, str] = {}

    def __repr__(self) -> str:
        # Header values may be secrets resolved from the environment: never shown.
        return (
            f"ExternalApi(name={self.name!r}, method={self.method!r}, "
            f"expect_status={self.expect_status}, headers={sorted(self.headers)})"
        )

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"external API {self.name!r}: url must start with http:// or https://")


def _resolve_headers(api: ExternalApi, environ: dict[str, str]) -> ExternalApi:
    resolved: dict[str, str] = {}
    for header, value in api.headers.items():
        if value.startswith(ENV_PREFIX):
            variable = value[len(ENV_PREFIX) :]
            if variable not in environ:
                raise SettingsError(
                    f"STOCKPILOT_EXTERNAL_APIS: header {header!r} of {api.name!r} refers to "
                    f"the variable {variable}, which is not set"
                )
            value = environ[variable]
        # A secret read from a file (`$(cat key)`, a mounted Kubernetes secret) ends with a
        # newline that HTTP forbids in a header; the value meant is the one without it.
        resolved[header] = value.strip()
    return msgspec.structs.replace(api, headers=resolved)


class HealthSettings(CommonSettings, frozen=True, kw_only=True):
    """Targets, schedule, degraded thresholds and hysteresis of the health service."""

    __env_names__: ClassVar[dict[str, str]] = {
        "openai_api_key": "OPENAI_API_KEY",
        "openai_base_url": "OPENAI_BASE_URL",
    }

    database_url: str | None = None
    redis_url: str | None = None
    openai_api_key: str | None = None
    openai_base_url: str = "https://api.openai.com/v1"
    external_apis: list[ExternalApi] = []

    health_interval_s: PositiveFloat = 30.0
    probe_timeout_s: ProbeTimeout = 3.0

    # Degraded thresholds.
    database_slow_ms: PositiveFloat = 1000.0
    database_connections_pct: Percent = 80.0
    redis_slow_ms: PositiveFloat = 100.0
    redis_memory_pct: Percent = 90.0
    openai_slow_ms: PositiveFloat = 5000.0
    external_slow_ms: PositiveFloat = 5000.0
    # The external-apis aggregate: healthy at >= this % reachable, degraded at >= the other.
    external_healthy_pct: Percent = 80.0
    external_degraded_pct: Percent = 50.0

    # Hysteresis: consecutive results in a new state before the status changes.
    hysteresis_down: PositiveInt = 3
    hysteresis_up: PositiveInt = 2

    # Bounds of the projection: raw samples kept per component (covering 24 h at the default
    # interval), hourly buckets per component (90 days), points per series in /history.
    history_max_samples: Annotated[int, msgspec.Meta(ge=10, le=100_000)] = 5_000
    history_max_hours: Annotated[int, msgspec.Meta(ge=1, le=2160)] = 2160
    history_max_points: Annotated[int, msgspec.Meta(ge=10, le=10_000)] = 1_000

    def __repr__(self) -> str:
        # The key, passwords in URLs and header values are secrets: show what is configured.
        return (
            f"HealthSettings(database={self.database_url is not None}, "
            f"redis={self.redis_url is not None}, openai={self.openai_api_key is not None}, "
            f"external_apis={[api.name for api in self.external_apis]}, "
            f"interval_s={self.health_interval_s:g}, probe_timeout_s={self.probe_timeout_s:g})"
        )

    def __post_init__(self) -> None:
        super().__post_init__()
        names = [api.name for api in self.external_apis]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise SettingsError(
                f"STOCKPILOT_EXTERNAL_APIS: duplicate name(s) {', '.join(duplicated)}"
            )
        if self.external_degraded_pct > self.external_healthy_pct:
            raise SettingsError(
                "STOCKPILOT_EXTERNAL_DEGRADED_PCT: must not exceed STOCKPILOT_EXTERNAL_HEALTHY_PCT"
            )
        # Surrounding whitespace (a trailing newline from a secret file) is never meant: a key
        # or a URL with it fails, and the error then shows the secret in an escaped form.
        strip_whitespace(self, "database_url", "redis_url", "openai_api_key")
        msgspec.structs.force_setattr(self, "openai_base_url", self.openai_base_url.strip())
        if self.database_url and is_conninfo(self.database_url):
            try:
                parse_conninfo(self.database_url)
            except ValueError as exc:
                raise SettingsError(f"STOCKPILOT_DATABASE_URL: {exc}") from None
        if not self.openai_base_url.startswith(("http://", "https://")):
            raise SettingsError("OPENAI_BASE_URL: must start with http:// or https://")
        # The settings module is where the environment is read: resolve `env:` headers now.
        if any(api.headers for api in self.external_apis):
            environ = dict(os.environ)
            msgspec.structs.force_setattr(
                self,
                "external_apis",
                [_resolve_headers(api, environ) for api in self.external_apis],
            )


# Tooling finds a service's settings class under this name.
Settings = HealthSettings
