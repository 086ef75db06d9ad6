"""The package's shape, checked: no import cycle, key names built in one module, Lua scripts
in files that say what they take. Static checks of the source; no service is needed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from metrix_s2s import redis_scripts

PACKAGE = Path(__file__).resolve().parents[1] / "metrix_s2s"
LUA = PACKAGE / "lua"
#: Fragments of metrix-s2s's key names; only the keyspace module may spell them.
KEY_FRAGMENTS = re.compile(
    r"""["'][^"'\n]*:(delivered|inflight|attempts|tries|pending|redriven|rl|pause|dlq|lock)\b"""
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The metrix_s2s modules that module ``name`` imports, anywhere in its body (a
    ``from package import module`` counts as importing the module). Importing a module of a
    subpackage from outside it also runs the subpackage's ``__init__``, so that counts too (the
    root package, the public facade that loads everything, is left out)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in MODULES else base)
    found = {m for m in found if m in MODULES}
    for module in list(found):
        parts = module.split(".")
        for depth in range(2, len(parts)):
            package = ".".join(parts[:depth])
            if not (name == package or name.startswith(package + ".")):
                found.add(package)
    found.discard(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_import_graph_has_no_cycle() -> None:
    graph = {name: imports_of(name) for name in MODULES}
    assert sum(len(edges) for edges in graph.values()) > 50  # the graph was really read
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_importing_a_subpackage_module_from_outside_counts_its_package() -> None:
    # producer imports metrix_s2s.workers; the tasks import the producer, never the reverse
    assert "metrix_s2s.workers" in imports_of("metrix_s2s.producer")
    assert "metrix_s2s.tasks" in imports_of("metrix_s2s.demo")  # it imports metrix_s2s.tasks
    assert "metrix_s2s.tasks" not in reachable("metrix_s2s.operations")
    assert "metrix_s2s.tasks" not in imports_of("metrix_s2s.tasks.send")  # its own package


def test_the_shared_names_module_is_a_leaf() -> None:
    assert imports_of("metrix_s2s.names") == set()


def reachable(name: str) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        for nxt in imports_of(todo.pop()) - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_delivery_rules_do_no_io() -> None:
    source = (PACKAGE / "verdicts.py").read_text()
    io = {
        "client",
        "stores",
        "redis_client",
        "ledger",
        "deadletter",
        "delivery",
        "tasks",
        "workers",
    }
    assert not reachable("metrix_s2s.verdicts") & {f"metrix_s2s.{m}" for m in io}
    assert not re.search(r"^\s*(import|from) (redis|requests|celery|kombu)\b", source, re.M)


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"metrix_s2s.keyspace"}))
def test_only_the_keyspace_spells_key_names(name: str) -> None:
    source = MODULES[name].read_text()
    # docstrings and comments may name keys; code may not
    assert KEY_FRAGMENTS.findall(_strip_docstrings(source)) == []


def _strip_docstrings(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                body[0].value = ast.Constant("")
    return ast.unparse(tree)


@pytest.mark.parametrize("path", sorted(LUA.glob("*.lua")), ids=lambda p: p.name)
def test_a_lua_script_opens_with_what_it_takes_and_spells_no_key(path: Path) -> None:
    lines = path.read_text().splitlines()
    header = "\n".join(line for line in lines if line.startswith("--"))
    body = "\n".join(line for line in lines if not line.startswith("--"))
    assert lines[0].startswith(f"-- {path.name}:")
    covered = _ranges(header)
    for kind, number in re.findall(r"\b(KEYS|ARGV)\[(\d+)\]", body):
        assert int(number) in covered[kind], f"{kind}[{number}] is not in {path.name}'s header"
    spelled = r"""['"][^'"]*:(delivered|inflight|attempts|tries|pending|dlq|rl|pause)"""
    assert not re.search(spelled, body)


def _ranges(header: str) -> dict[str, set[int]]:
    covered: dict[str, set[int]] = {"KEYS": set(), "ARGV": set()}
    for kind, first, last in re.findall(r"\b(KEYS|ARGV)\[(\d+)(?:\.\.(\d+))?\]", header):
        covered[kind].update(range(int(first), int(last or first) + 1))
    return covered


def test_every_lua_file_is_a_script_or_part_of_one() -> None:
    assert sorted(p.stem for p in LUA.glob("*.lua")) == sorted(redis_scripts.FILES)
    loaded = {name for names in _script_sources() for name in names}
    assert loaded == set(redis_scripts.FILES)


def _script_sources() -> list[list[str]]:
    """The file names each ``source(...)`` call of redis_scripts.py joins."""
    tree = ast.parse((PACKAGE / "redis_scripts.py").read_text())
    return [
        [arg.value for arg in node.args if isinstance(arg, ast.Constant)]
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "source"
    ]
