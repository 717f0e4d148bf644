"""Import rules, checked by reading the source (no imports run, no servers).

Production code (services/, gateway/, ops/, shared/) never imports the test harness:
shared.testing and tests/ exist for tests and bench/ only. What production needs to launch a
nats-server lives in shared.nats_server. docs/architecture.md writes the rules down.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = ("services", "gateway", "ops", "shared")
# The harness itself: the one module under shared/ that may import what tests use.
HARNESS = Path("shared/testing.py")
FORBIDDEN = ("shared.testing", "tests")


def imported_modules(source: str, module: str) -> list[str]:
    """Every module `source` imports, anywhere in it (functions included), as a dotted name;
    `from a import b` counts as both `a` and `a.b` (b may be a module)."""
    names: list[str] = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
    return names


def is_forbidden(name: str) -> bool:
    """Whether `name` is the test harness or inside it."""
    return any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)


def violations() -> list[str]:
    """`path: module` for every production import of the test harness."""
    found: list[str] = []
    for top in PRODUCTION:
        for path in sorted((ROOT / top).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if relative == HARNESS:
                continue
            module = ".".join(relative.with_suffix("").parts)
            for name in imported_modules(path.read_text(encoding="utf-8"), module):
                if is_forbidden(name):
                    found.append(f"{relative}: imports {name}")
    return found


def test_production_code_never_imports_the_test_harness() -> None:
    assert violations() == []


def test_the_check_reads_every_production_package() -> None:
    """A check that read nothing would pass for the wrong reason."""
    for top in PRODUCTION:
        assert list((ROOT / top).rglob("*.py")), top


def test_the_check_sees_every_way_of_importing_the_harness() -> None:
    sources = {
        "import shared.testing": True,
        "from shared.testing import free_port": True,
        "from shared import testing": True,
        "def f():\n    from tests.clocks import NOON\n": True,
        "import tests": True,
        "from . import testing": True,  # relative, from inside shared/
        "from shared.nats_server import free_port": False,
        "import shared.testing_tools_elsewhere": False,
        "from services.usage import tests_of_nothing": False,
    }
    for source, expected in sources.items():
        names = imported_modules(source, "shared.bus")
        assert any(is_forbidden(name) for name in names) is expected, source
