"""The README stays true: every setting a process reads is documented there."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from gateway.settings import GatewaySettings
from ops.hooks import HookSettings
from ops.nats_info import NatsInfoSettings
from services.batch.settings import Settings as BatchSettings
from services.health.settings import Settings as HealthSettings
from services.usage.settings import Settings as UsageSettings
from shared.settings import CommonSettings, env_name

README = (Path(__file__).parents[1] / "README.md").read_text()
CLASSES = [
    CommonSettings,
    GatewaySettings,
    HealthSettings,
    UsageSettings,
    BatchSettings,
    HookSettings,
    NatsInfoSettings,
]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_setting_is_in_the_readme(cls: type[msgspec.Struct]) -> None:
    missing = [
        env_name(cls, f.name)
        for f in msgspec.structs.fields(cls)
        if f"`{env_name(cls, f.name)}`" not in README and env_name(cls, f.name) not in README
    ]
    assert missing == []


def test_readme_gives_the_two_commands() -> None:
    assert "make run" in README
    assert "make test" in README
