"""Import contracts, checked on the source with ``ast`` (no import-linter, nothing imported).

(a) Layering: imports point down the LAYERS table; siblings in different groups never
    import each other; the ``meshnode`` package ``__init__`` imports nothing of ours.
(b) Sans-IO: every module is a core unless it is a driver (DRIVERS / DRIVER_PREFIXES).
    Cores import none of CORE_FORBIDDEN and no driver module (which would bring the
    forbidden modules in through the back door).
(c) Adapters: each wrapped third-party package has exactly one importer (ADAPTERS).

Imports anywhere in a file count (inside functions, under ``if TYPE_CHECKING:``, and
``importlib.import_module("literal")``): a lower layer that needs something from above
declares a ``typing.Protocol`` instead. To add a module, add its prefix to LAYERS (and to
DRIVERS if it owns sockets, timers or tasks).
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_ROOTS = ("meshnode", "discovery", "routing")

# (prefix, rank), bottom to top. The first prefix that matches a module's dotted name
# (equal to it, or followed by ".") is its group. A module may import a module of a
# strictly lower rank, or one of its own group. Equal ranks in different groups are
# siblings that must not import each other (crypto | wire, client | exit, config | log).
LAYERS: Sequence[tuple[str, float]] = (
    ("meshnode.errors", 0),
    ("meshnode.crypto", 1),
    ("meshnode.wire", 1),
    ("meshnode.identity", 2),
    ("meshnode.contact", 2.5),  # a contact carries a key: contact -> identity, never back
    ("meshnode.link", 3),
    ("discovery", 4),
    ("routing", 5),  # reads discovery's value types
    ("meshnode.client", 6),
    ("meshnode.exit", 6),
    ("meshnode.control", 7),
    ("meshnode.config", 8),
    ("meshnode.log", 8),
    ("meshnode.node", 9),
    ("meshnode.demo", 10),
    ("meshnode.cli", 10.5),  # `meshnode demo` may start the demo
    ("meshnode.__main__", 11),  # `python -m meshnode` runs the CLI
)

# The package __init__: imports nothing of ours (keeps `import meshnode.link` cycle-free),
# so any module may import it (for __version__).
ROOT_PACKAGE = "meshnode"

DRIVERS = frozenset(
    {
        "meshnode.link.udp",
        "meshnode.node",
        "meshnode.cli",
        "meshnode.__main__",
        "meshnode.demo",
        "meshnode.log",
        "meshnode.config",
    }
)
DRIVER_PREFIXES = (
    "meshnode.client",
    "meshnode.exit",
    "meshnode.control",
    "discovery.dht",
    "discovery.transport",
    "discovery.publisher",
    "routing.manager",
)
CORE_FORBIDDEN = frozenset(
    {
        "asyncio",
        "socket",
        "selectors",
        "threading",
        "time",
        "random",
        "aiohttp",
        "click",
        "subprocess",
    }
)

# Third-party top-level package -> the only modules allowed to import it.
ADAPTERS: dict[str, frozenset[str]] = {
    "nacl": frozenset({"meshnode.crypto"}),
    "cryptography": frozenset({"meshnode.crypto"}),
    "noise": frozenset({"meshnode.link.noise"}),
    "kademlia": frozenset({"discovery.dht"}),
    "rpcudp": frozenset({"discovery.dht"}),
    "umsgpack": frozenset({"discovery.rpc"}),
    "aiohttp": frozenset({"meshnode.control"}),
    "cbor2": frozenset({"discovery.descriptor"}),
}


# --- The checker -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Import:
    target: str  # absolute dotted name of the imported module
    line: int
    text: str  # the statement as written, for messages


@dataclass(frozen=True, slots=True)
class Module:
    name: str
    path: str  # as shown in messages, relative to the repository
    is_package: bool
    imports: tuple[Import, ...]


def is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def is_project(name: str) -> bool:
    return name.split(".", 1)[0] in PROJECT_ROOTS


def top_level(name: str) -> str:
    return name.split(".", 1)[0]


def layer_of(name: str) -> tuple[str, float] | None:
    for prefix, rank in LAYERS:
        if is_under(name, prefix):
            return prefix, rank
    return None


def is_driver(name: str) -> bool:
    return name in DRIVERS or any(is_under(name, p) for p in DRIVER_PREFIXES)


def module_name_for(path: Path, root: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    parts = module.split(".")
    if not is_package:
        parts.pop()
    if level > 1:
        if level - 1 > len(parts) - 1:
            raise ValueError(f"relative import beyond the top-level package in {module}")
        parts = parts[: len(parts) - (level - 1)]
    return ".".join([*parts, name] if name else parts)


def parse_imports(
    source: str, *, module: str, is_package: bool, known: Iterable[str] = ()
) -> tuple[Import, ...]:
    """Every import in ``source`` as an absolute module name with its line.

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module in
    ``known``, else as an import of ``pkg`` (``name`` is an attribute).
    """
    known_set = set(known)
    tree = ast.parse(source)
    lines = source.splitlines()
    found: list[Import] = []

    def text_at(node: ast.stmt | ast.expr) -> str:
        return lines[node.lineno - 1].strip() if 0 < node.lineno <= len(lines) else ""

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, node.lineno, text_at(node)) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            else:
                base = node.module or ""
            if base == "__future__":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if alias.name != "*" and sub in known_set else base
                found.append(Import(target, node.lineno, text_at(node)))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (
                    isinstance(node.func, ast.Attribute)
                    and node.func.attr == "import_module"
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "importlib"
                )
            )
        ):
            found.append(Import(node.args[0].value, node.lineno, text_at(node)))
    return tuple(sorted(found, key=lambda i: (i.line, i.target)))


def load_module(
    name: str,
    source: str,
    *,
    is_package: bool = False,
    path: str | None = None,
    known: Iterable[str] = (),
) -> Module:
    shown = path or name.replace(".", "/") + ("/__init__.py" if is_package else ".py")
    imports = parse_imports(source, module=name, is_package=is_package, known=known)
    return Module(name=name, path=shown, is_package=is_package, imports=imports)


def collect(root: Path = REPO) -> list[Module]:
    files: list[tuple[str, bool, Path]] = []
    for package in PROJECT_ROOTS:
        for path in sorted((root / package).rglob("*.py")):
            name, is_package = module_name_for(path, root)
            files.append((name, is_package, path))
    known = {name for name, _, _ in files}
    return [
        load_module(
            name,
            path.read_text(encoding="utf-8"),
            is_package=is_package,
            path=str(path.relative_to(root)),
            known=known,
        )
        for name, is_package, path in files
    ]


def where(module: Module, imp: Import) -> str:
    return f"{module.path}:{imp.line}: `{imp.text}`"


def check_layers(modules: Iterable[Module]) -> list[str]:
    problems: list[str] = []
    for module in modules:
        project_imports = [i for i in module.imports if is_project(i.target)]
        if module.name == ROOT_PACKAGE:
            problems.extend(
                f"{where(module, i)}: the `{ROOT_PACKAGE}` package __init__ must import "
                f"nothing from the project (imports {i.target})"
                for i in project_imports
            )
            continue
        source_layer = layer_of(module.name)
        if source_layer is None:
            problems.append(
                f"{module.path}: module {module.name} has no layer; add its prefix to LAYERS "
                f"in tests/test_architecture.py (and to DRIVERS if it owns sockets or tasks)"
            )
            continue
        group, rank = source_layer
        for imp in project_imports:
            if imp.target == ROOT_PACKAGE:
                continue
            target_layer = layer_of(imp.target)
            if target_layer is None:
                problems.append(
                    f"{where(module, imp)}: imports {imp.target}, which has no layer; add its "
                    f"prefix to LAYERS in tests/test_architecture.py"
                )
                continue
            target_group, target_rank = target_layer
            if target_group == group or target_rank < rank:
                continue
            kind = "a sibling layer" if target_rank == rank else "a higher layer"
            problems.append(
                f"{where(module, imp)}: {module.name} ({group}, rank {rank:g}) imports "
                f"{imp.target} ({target_group}, rank {target_rank:g}), {kind}; imports must "
                f"point down (declare a typing.Protocol and let the node inject it)"
            )
    return problems


def check_sans_io(modules: Iterable[Module]) -> list[str]:
    problems: list[str] = []
    for module in modules:
        if is_driver(module.name):
            continue
        for imp in module.imports:
            if top_level(imp.target) in CORE_FORBIDDEN:
                problems.append(
                    f"{where(module, imp)}: {module.name} is a sans-IO core and must not "
                    f"import {top_level(imp.target)} (take `now` and an injected RNG; move "
                    f"I/O to a driver, or list the module in DRIVERS)"
                )
            elif is_project(imp.target) and is_driver(imp.target):
                problems.append(
                    f"{where(module, imp)}: {module.name} is a sans-IO core and must not "
                    f"import the driver {imp.target}"
                )
    return problems


def check_adapters(modules: Iterable[Module]) -> list[str]:
    problems: list[str] = []
    for module in modules:
        for imp in module.imports:
            allowed = ADAPTERS.get(top_level(imp.target))
            if allowed is not None and module.name not in allowed:
                problems.append(
                    f"{where(module, imp)}: only {', '.join(sorted(allowed))} may import "
                    f"{top_level(imp.target)}; go through that adapter"
                )
    return problems


def report(problems: list[str]) -> str:
    return f"{len(problems)} import contract violation(s):\n  " + "\n  ".join(problems)


# --- The contracts, on the real tree ---------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> list[Module]:
    return collect()


def test_found_the_tree(modules: list[Module]) -> None:
    names = {m.name for m in modules}
    assert len(modules) >= 5, f"found only {sorted(names)} under {REPO}"
    assert {"meshnode", "meshnode.errors", "meshnode.crypto", "meshnode.identity"} <= names
    assert any(m.imports for m in modules)


def test_layers(modules: list[Module]) -> None:
    problems = check_layers(modules)
    assert not problems, report(problems)


def test_sans_io_cores(modules: list[Module]) -> None:
    problems = check_sans_io(modules)
    assert not problems, report(problems)


def test_adapters(modules: list[Module]) -> None:
    problems = check_adapters(modules)
    assert not problems, report(problems)


# --- The checker checks something ------------------------------------------------------

KNOWN = {
    "meshnode",
    "meshnode.errors",
    "meshnode.crypto",
    "meshnode.wire",
    "meshnode.identity",
    "meshnode.contact",
    "meshnode.link",
    "meshnode.link.replay",
    "meshnode.link.endpoint",
    "meshnode.link.udp",
    "discovery",
    "discovery.descriptor",
    "discovery.dht",
    "routing",
    "routing.circuit",
}


def mod(name: str, source: str, *, is_package: bool = False) -> Module:
    return load_module(name, textwrap.dedent(source), is_package=is_package, known=KNOWN)


def all_problems(*modules: Module) -> list[str]:
    return check_layers(modules) + check_sans_io(modules) + check_adapters(modules)


def test_checker_catches_asyncio_in_a_core() -> None:
    core = mod(
        "meshnode.link.endpoint",
        """\
        from __future__ import annotations

        import asyncio
        """,
    )
    problems = check_sans_io([core])
    assert problems == [
        "meshnode/link/endpoint.py:3: `import asyncio`: meshnode.link.endpoint is a sans-IO "
        "core and must not import asyncio (take `now` and an injected RNG; move I/O to a "
        "driver, or list the module in DRIVERS)"
    ]


@pytest.mark.parametrize(
    "source",
    [
        "import time",
        "from time import monotonic",
        "import asyncio.events",
        "import socket as s",
        "def f():\n    import random\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import threading\n",
        "import importlib\nimportlib.import_module('subprocess')",
        "from meshnode.link import udp",
        "from . import udp",
    ],
)
def test_checker_catches_every_form_of_forbidden_core_import(source: str) -> None:
    assert len(check_sans_io([mod("meshnode.link.endpoint", source)])) == 1


def test_checker_lets_drivers_do_io() -> None:
    assert not all_problems(
        mod("meshnode.link.udp", "import asyncio, socket, time\nfrom . import endpoint"),
        mod("discovery.dht", "import asyncio\nimport kademlia\nfrom rpcudp import protocol"),
        mod("meshnode.exit.service", "import asyncio"),
        mod("routing.manager", "import asyncio"),
    )


def test_checker_passes_down_imports() -> None:
    assert not all_problems(
        mod("meshnode.crypto", "import nacl.signing\nfrom meshnode.errors import MeshError"),
        mod("meshnode.identity", "from meshnode import crypto\nfrom meshnode import errors"),
        mod("meshnode.contact", "from meshnode.identity import b32encode"),
        mod("meshnode.link.endpoint", "from meshnode.identity import Identity\nimport meshnode"),
        mod("meshnode.link.endpoint", "from . import replay\nfrom .replay import ReplayWindow"),
        mod("meshnode.link.endpoint", "from ..identity import NodeId\nfrom .. import crypto"),
        mod("meshnode.link", "from . import replay", is_package=True),
        mod("routing.circuit", "from discovery.descriptor import NodeDescriptor"),
        mod("meshnode.cli", "from meshnode import __version__\nfrom meshnode.node import Node"),
        mod("meshnode.__main__", "from meshnode.cli import main"),
        mod("meshnode.config", "from meshnode.link.config import LinkConfig"),
    )


@pytest.mark.parametrize(
    ("name", "source", "target"),
    [
        ("meshnode.crypto", "from meshnode.link import endpoint", "meshnode.link.endpoint"),
        ("meshnode.errors", "import meshnode.crypto", "meshnode.crypto"),
        ("meshnode.identity", "from meshnode.contact import Contact", "meshnode.contact"),
        ("meshnode.link.endpoint", "from .. import contact\nfrom routing import x", "routing"),
        ("discovery.descriptor", "from routing.circuit import Circuit", "routing.circuit"),
        ("routing.circuit", "from meshnode.node import Node", "meshnode.node"),
        ("meshnode.node", "import meshnode.cli", "meshnode.cli"),
    ],
)
def test_checker_catches_up_imports(name: str, source: str, target: str) -> None:
    problems = check_layers([mod(name, source)])
    assert problems
    assert all("a higher layer" in p for p in problems)
    assert any(f"imports {target} " in p for p in problems)


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("meshnode.crypto", "from meshnode.wire import Reader"),
        ("meshnode.wire", "from meshnode import crypto"),
        ("meshnode.config", "from meshnode.log import configure"),
        ("meshnode.log", "import meshnode.config"),
        ("meshnode.client.socks5", "from meshnode.exit.policy import ExitPolicy"),
    ],
)
def test_checker_catches_sibling_imports(name: str, source: str) -> None:
    problems = check_layers([mod(name, source)])
    assert len(problems) == 1
    assert "a sibling layer" in problems[0]


def test_checker_root_package_imports_nothing() -> None:
    root = mod("meshnode", "from meshnode.node import Node", is_package=True)
    problems = check_layers([root])
    assert len(problems) == 1
    assert "must import nothing from the project" in problems[0]
    assert problems[0].startswith("meshnode/__init__.py:1:")
    assert not check_layers([mod("meshnode", "import os", is_package=True)])


def test_checker_unknown_module_says_where_to_add_it() -> None:
    problems = check_layers([mod("meshnode.gizmo", "import os")])
    assert len(problems) == 1
    assert (
        "meshnode/gizmo.py: module meshnode.gizmo has no layer; add its prefix to LAYERS"
        in (problems[0])
    )
    problems = check_layers([mod("meshnode.link.x", "from meshnode.gizmo import G")])
    assert len(problems) == 1
    assert "imports meshnode.gizmo, which has no layer" in problems[0]


def test_checker_prefixes_match_whole_names() -> None:
    assert layer_of("meshnode.link.replay") == ("meshnode.link", 3)
    assert layer_of("meshnode.linker") is None
    assert layer_of("meshnode.cli") == ("meshnode.cli", 10.5)
    assert not is_driver("routing.managerial")
    assert is_driver("routing.manager")


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("meshnode.identity", "import nacl.signing"),
        ("meshnode.link.session", "from cryptography.hazmat.primitives import hashes"),
        ("meshnode.link.endpoint", "from noise.connection import NoiseConnection"),
        ("discovery.store", "from kademlia.storage import IStorage"),
        ("meshnode.node", "import rpcudp"),
    ],
)
def test_checker_catches_adapter_bypass(name: str, source: str) -> None:
    problems = check_adapters([mod(name, source)])
    assert len(problems) == 1
    assert f"{name.replace('.', '/')}.py:1: `{source}`: only " in problems[0]


def test_checker_adapter_owner_may_import() -> None:
    assert not check_adapters(
        [
            mod("meshnode.crypto", "import nacl.bindings\nfrom cryptography import exceptions"),
            mod("meshnode.link.noise", "from noise.connection import Keypair"),
        ]
    )


def test_checker_resolves_relative_imports() -> None:
    session = mod(
        "meshnode.link.session",
        """\
        from . import replay
        from .replay import ReplayWindow
        from .. import crypto
        from ..identity import NodeId
        from .constants import KEY_BYTES
        """,
    )
    assert [i.target for i in session.imports] == [
        "meshnode.link.replay",
        "meshnode.link.replay",
        "meshnode.crypto",
        "meshnode.identity",
        "meshnode.link.constants",
    ]
    package = mod("meshnode.link", "from . import replay\nfrom .. import errors", is_package=True)
    assert [i.target for i in package.imports] == ["meshnode.link.replay", "meshnode.errors"]
    # A name that is not a known module is an attribute of the package it comes from.
    version = mod("meshnode.cli", "from meshnode import __version__")
    assert [i.target for i in version.imports] == ["meshnode"]


def test_module_names_from_paths() -> None:
    assert module_name_for(REPO / "meshnode" / "link" / "udp.py", REPO) == (
        "meshnode.link.udp",
        False,
    )
    assert module_name_for(REPO / "discovery" / "__init__.py", REPO) == ("discovery", True)
