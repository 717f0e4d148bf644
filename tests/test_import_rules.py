"""Import rules, checked by reading the source (no imports run, no servers).

Production code (services/, gateway/, ops/, shared/, all of it) never imports the test
harness: tests/ (tests.harness included) and bench/ exist for tests and benchmarks only, and
no production package holds a harness or a test framework. What production needs to launch a
nats-server lives in shared.nats_server. shared/ imports none of the packages built on it, a
service none of the other services, and a part of the service runtime not the Runtime that
composes it. docs/architecture.md ("Import rules") writes them down.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = ("services", "gateway", "ops", "shared")
# The harness and what only tests and benchmarks use; shared.testing is where the harness
# once lived (inside a production package) and must not come back.
FORBIDDEN = ("tests", "bench", "shared.testing", "pytest", "_pytest", "hypothesis")
# The parts the service runtime is composed of (shared.runtime composes them): each is
# testable alone, so none imports the Runtime (a type-only import for annotations is fine).
RUNTIME_PARTS = (
    "shared/alert_outbox.py",
    "shared/change_notices.py",
    "shared/endpoints.py",
    "shared/projection_runner.py",
    "shared/service_status.py",
    "shared/snapshotter.py",
)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (never run)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for part in node.body for inner in ast.walk(part))
    return skipped


def imported_modules(source: str, module: str, *, at_run_time: bool = False) -> list[str]:
    """Every module `source` imports, anywhere in it (functions included), as a dotted name;
    `from a import b` counts as both `a` and `a.b` (b may be a module), and a constant name
    handed to `importlib.import_module` or `__import__` counts too. `at_run_time`: leave out
    the imports under `if TYPE_CHECKING:`."""
    names: list[str] = []
    package = module.rsplit(".", 1)[0]
    tree = ast.parse(source)
    skipped = _type_checking_only(tree) if at_run_time else set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Call) and _is_dynamic_import(node.func):
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.append(first.value)
        elif isinstance(node, ast.Import):
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


def _is_dynamic_import(func: ast.expr) -> bool:
    """`import_module(...)`, `importlib.import_module(...)` or `__import__(...)`."""
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name in ("import_module", "__import__")


def inside(name: str, package: str) -> bool:
    """Whether module `name` is `package` or inside it."""
    return name == package or name.startswith(package + ".")


def is_forbidden(name: str) -> bool:
    """Whether `name` is the test harness or inside it."""
    return any(inside(name, bad) for bad in FORBIDDEN)


def modules(top: str, *, at_run_time: bool = False) -> list[tuple[Path, list[str]]]:
    """(path relative to the repository, the modules it imports) of every module under `top`."""
    found: list[tuple[Path, list[str]]] = []
    for path in sorted((ROOT / top).rglob("*.py")):
        relative = path.relative_to(ROOT)
        module = ".".join(relative.with_suffix("").parts)
        source = path.read_text(encoding="utf-8")
        found.append((relative, imported_modules(source, module, at_run_time=at_run_time)))
    return found


def violations() -> list[str]:
    """`path: module` for every production import of the test harness."""
    return [
        f"{path}: imports {name}"
        for top in PRODUCTION
        for path, names in modules(top)
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


def test_no_part_of_the_runtime_imports_the_runtime() -> None:
    parts = {path: names for path, names in modules("shared", at_run_time=True)}
    found = [
        f"{path}: imports {name}"
        for path in map(Path, RUNTIME_PARTS)
        for name in parts[path]
        if inside(name, "shared.runtime")
    ]
    assert found == []


def test_the_runtime_check_reads_every_part_and_skips_only_type_checking() -> None:
    for part in RUNTIME_PARTS:
        assert (ROOT / part).is_file(), part
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from shared.runtime import C\n"
    )
    assert "shared.runtime" in imported_modules(source, "shared.endpoints")
    assert "shared.runtime" not in imported_modules(source, "shared.endpoints", at_run_time=True)


def test_the_check_reads_every_production_package() -> None:
    """A check that read nothing would pass for the wrong reason."""
    for top in PRODUCTION:
        assert list((ROOT / top).rglob("*.py")), top


def test_the_check_sees_every_way_of_importing_the_harness() -> None:
    sources = {
        "import shared.testing": True,
        "from tests.harness import free_port": True,
        "from shared import testing": True,
        "def f():\n    from tests.clocks import NOON\n": True,
        "import tests": True,
        "from . import testing": True,  # relative, from inside shared/
        "from bench.harness import start": True,
        "import pytest": True,
        "from hypothesis import given": True,
        "import importlib\nimportlib.import_module('tests.harness')": True,
        "from importlib import import_module\nimport_module('bench')": True,
        "__import__('shared.testing')": True,
        "from shared.nats_server import free_port": False,
        "import shared.testing_tools_elsewhere": False,
        "from services.usage import tests_of_nothing": False,
        "import benchmark_of_nothing": False,
        "import importlib\nimportlib.import_module(f'services.{name}.settings')": False,
    }
    for source, expected in sources.items():
        names = imported_modules(source, "shared.streams")
        assert any(is_forbidden(name) for name in names) is expected, source
