"""Import rules, checked by reading the source (no imports run, no servers).

Production code (services/, gateway/, ops/, shared/, all of it) never imports the test
harness: tests/ (tests.harness included) and bench/ exist for tests and benchmarks only, and
no production package holds a harness or a test framework. What production needs to launch a
nats-server lives in shared.nats_server. shared/ imports none of the packages built on it, a
service none of the other services, and a part of the service runtime not the Runtime that
composes it. Outside a service, only its public modules are imported (its contract, its client
modules; see PUBLIC), and each event struct is defined once, in its service's contract.
docs/architecture.md ("Import rules") writes them down.
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


# ----- a service's public face (issue 15) --------------------------------------------------
#
# Code outside a service package reaches the service through its public modules only, so the
# service may rearrange everything else. Which ones, by where the importing code lives:
# - `contract`: the wire (subjects, events, endpoint parameters and answers), for everyone;
# - the client modules: the API StockPilot AI's own code calls (README, "Recording from
#   StockPilot's own code"): the usage recorder, its budget checker, the OpenAI
#   instrumentation and the synchronous recorder; batch's worker client. ops (the demo)
#   and the bench call them as StockPilot AI would; the gateway never does;
# - the bench also runs a service inside its own process and times its parts (the fold, the
#   probes, a spend-log page from a cursor it makes at a chosen depth): the service's
#   `service`, `settings`, `projection`, `probes` and `spend_log` modules.
# tests/ may import anything. ops starts and rebuilds services by name (`stockpilot service`,
# `replay`) through importlib, which names the entry points (`__main__`, `settings`,
# `service`) as strings: running a service is not reading its wire, so that stays allowed
# and unseen here.
CONTRACT = frozenset({"contract"})
CLIENT = frozenset({"client", "budget_client", "instrument", "sync_recorder"})
BENCH_RUNS = frozenset({"service", "settings", "projection", "probes", "spend_log"})
PUBLIC = {
    "gateway": CONTRACT,
    "ops": CONTRACT | CLIENT,
    "bench": CONTRACT | CLIENT | BENCH_RUNS,
}


def imports_by_line(source: str, module: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in `source`, as `imported_modules` reads them."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            line = ast.unparse(node)
            found += [(node.lineno, name) for name in imported_modules(line, module)]
    return found


def service_module(name: str) -> str | None:
    """The module of a service package that `name` imports (`contract` for
    `services.usage.contract.UsageRecorded`), or None when it names no such module (the
    `services` package, a service package itself, anything else)."""
    parts = name.split(".")
    if parts[0] != "services" or len(parts) < 3:
        return None
    return parts[2]


def public_face_violations(top: str, sources: dict[Path, str]) -> list[str]:
    """`path:line: imports name` for every import in `sources` (files under `top`) of a
    service module that `PUBLIC[top]` does not list."""
    allowed = PUBLIC[top]
    found = []
    for path, source in sources.items():
        module = ".".join(path.with_suffix("").parts)
        for line, name in imports_by_line(source, module):
            inner = service_module(name)
            if inner is not None and inner not in allowed:
                # `from a.b import c` reads as `a.b` and `a.b.c`: one report per module.
                offence = f"{path}:{line}: imports {'.'.join(name.split('.')[:3])}"
                if offence not in found:
                    found.append(offence)
    return found


def sources_under(top: str) -> dict[Path, str]:
    """The text of every module under `top`, by its path relative to the repository."""
    return {
        path.relative_to(ROOT): path.read_text(encoding="utf-8")
        for path in sorted((ROOT / top).rglob("*.py"))
    }


def test_outside_a_service_only_its_public_modules_are_imported() -> None:
    found = [line for top in PUBLIC for line in public_face_violations(top, sources_under(top))]
    assert found == [], "\n".join(found)


def test_every_service_has_a_contract_module() -> None:
    services = [p for p in (ROOT / "services").iterdir() if p.is_dir() and p.name[0] != "_"]
    assert services
    for service in services:
        assert (service / "contract.py").is_file(), service.name


def test_the_public_face_check_sees_every_way_of_importing_a_service() -> None:
    sources = {
        "from services.usage.contract import UsageRecorded": [],
        "from services.usage import contract": [],
        "import services.batch.contract": [],
        "from services.usage.client import UsageRecorder": [],
        "from services import usage": [],
        "from services.usage.queries import stats": ["x.py:1: imports services.usage.queries"],
        "import services.health.projection": ["x.py:1: imports services.health.projection"],
        "from services.batch import locks": ["x.py:1: imports services.batch.locks"],
        "def f():\n    from services.usage.view import UsageView\n": [
            "x.py:2: imports services.usage.view"
        ],
    }
    for source, expected in sources.items():
        found = public_face_violations("ops", {Path("x.py"): source})
        assert found == expected, source
    # the bench may run a service, the gateway may not even use its client
    assert not public_face_violations("bench", {Path("b.py"): "from services.usage import service"})
    assert public_face_violations("bench", {Path("b.py"): "from services.usage import view"})
    assert public_face_violations("gateway", {Path("g.py"): "from services.usage import service"})
    assert public_face_violations("gateway", {Path("g.py"): "import services.usage.client"})


def test_the_event_check_finds_a_copy_however_it_derives_from_event() -> None:
    copies = {
        Path("ops/demo.py"): "class UsageRecorded(Event, frozen=True, tag='usage.recorded'): ...",
        Path("bench/x.py"): (
            "class _Base(shared.events.Event): ...\n"
            "class Reset(_Base, tag='usage.reset'): ...\n"
            "class Line(msgspec.Struct, tag='line'): ...\n"  # a tagged union, no event
        ),
    }
    found = [(str(path), name, tag) for path, _, name, tag in event_classes(copies)]
    assert found == [
        ("ops/demo.py", "UsageRecorded", "usage.recorded"),
        ("bench/x.py", "Reset", "usage.reset"),
    ]


# ----- one definition of each wire struct ---------------------------------------------------

# Where every event type is defined: a service's contract, or shared/events.py (the envelope
# and the alerts every service raises).
EVENT_HOMES = ("services/*/contract.py", "shared/events.py")


def base_names(node: ast.ClassDef) -> set[str]:
    """The last part of each base's name (`Event` for `shared.events.Event`)."""
    return {ast.unparse(base).rsplit(".", 1)[-1] for base in node.bases}


def event_classes(sources: dict[Path, str]) -> list[tuple[Path, int, str, str]]:
    """(path, line, class name, tag) of every event type: a class declared with a string
    `tag=` that derives, through any of the classes seen, from `Event`. (Other tagged unions,
    such as the lines of `stockpilot streams`, are no events.)"""
    classes = [
        (path, node)
        for path, source in sources.items()
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ClassDef)
    ]
    events = {"Event"}
    while True:  # every class whose base is an event class is one too
        more = {node.name for _, node in classes if base_names(node) & events} - events
        if not more:
            break
        events |= more
    return [
        (path, node.lineno, node.name, str(keyword.value.value))
        for path, node in classes
        if node.name in events
        for keyword in node.keywords
        if keyword.arg == "tag" and isinstance(keyword.value, ast.Constant)
    ]


def test_each_event_type_is_defined_once_in_its_services_contract() -> None:
    """No copy of an event struct (the demo's own UsageRecorded was one)."""
    sources = {
        path: text for top in (*PRODUCTION, "bench") for path, text in sources_under(top).items()
    }
    places: dict[str, list[str]] = {}
    for path, line, name, tag in event_classes(sources):
        places.setdefault(tag, []).append(f"{path}:{line}: {name}")
        if not any(path.match(home) for home in EVENT_HOMES):
            places[tag].append(f"{path}:{line}: outside a contract module")
    assert {"usage.recorded", "health.checked", "lock.acquired", "alert"} <= set(places)
    assert {tag: where for tag, where in places.items() if len(where) > 1} == {}


def test_no_struct_of_a_contract_is_declared_again_elsewhere() -> None:
    """A struct named like one of a contract's, outside it, is a copy waiting to drift."""
    contract_names: dict[str, str] = {}
    for path in sorted((ROOT / "services").glob("*/contract.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                contract_names[node.name] = str(path.relative_to(ROOT))
    assert "UsageRecorded" in contract_names
    found = [
        f"{path}:{node.lineno}: {node.name} (defined in {contract_names[node.name]})"
        for top in (*PRODUCTION, "bench")
        for path, source in sources_under(top).items()
        if not path.match("services/*/contract.py")
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ClassDef) and node.name in contract_names
    ]
    assert found == [], "\n".join(found)
