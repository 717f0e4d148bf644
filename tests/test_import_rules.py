"""Import rules, checked by reading the source (no imports run, no servers).

Production code (services/, gateway/, ops/, shared/) never imports the test harness:
shared.testing and tests/ exist for tests and bench/ only. What production needs to launch a
nats-server lives in shared.nats_server. shared/ imports none of the packages built on it, and
a service none of the other services. docs/architecture.md ("Import rules") writes them down.
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


def inside(name: str, package: str) -> bool:
    """Whether module `name` is `package` or inside it."""
    return name == package or name.startswith(package + ".")


def is_forbidden(name: str) -> bool:
    """Whether `name` is the test harness or inside it."""
    return any(inside(name, bad) for bad in FORBIDDEN)


def modules(top: str) -> list[tuple[Path, list[str]]]:
    """(path relative to the repository, the modules it imports) of every module under `top`."""
    found: list[tuple[Path, list[str]]] = []
    for path in sorted((ROOT / top).rglob("*.py")):
        relative = path.relative_to(ROOT)
        module = ".".join(relative.with_suffix("").parts)
        found.append((relative, imported_modules(path.read_text(encoding="utf-8"), module)))
    return found


def violations() -> list[str]:
    """`path: module` for every production import of the test harness."""
    return [
        f"{path}: imports {name}"
        for top in PRODUCTION
        for path, names in modules(top)
        if path != HARNESS
        for name in names
        if is_forbidden(name)
    ]


def test_production_code_never_imports_the_test_harness() -> None:
    assert violations() == []


def test_shared_imports_nothing_built_on_it() -> None:
    above = ("services", "gateway", "ops")
    found = [
        f"{path}: imports {name}"
        for path, names in modules("shared")
        for name in names
        if any(inside(name, package) for package in above)
    ]
    assert found == []


def test_a_service_imports_no_other_service() -> None:
    found = []
    for service in sorted(p.name for p in (ROOT / "services").iterdir() if p.is_dir()):
        if service.startswith("__"):
            continue
        for path, names in modules(f"services/{service}"):
            found += [
                f"{path}: imports {name}"
                for name in names
                # `from services import x` also yields the bare `services`: not a service
                if inside(name, "services")
                and name != "services"
                and not inside(name, f"services.{service}")
            ]
    assert found == []


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
        names = imported_modules(source, "shared.streams")
        assert any(is_forbidden(name) for name in names) is expected, source
