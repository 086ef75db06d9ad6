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
    r"""["'][^"'\n]*:(delivered|inflight|attempts|pending|redriven|rl|pause|dlq|lock)\b"""
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The metrix_s2s modules that module ``name`` imports, anywhere in its body (a
    ``from package import module`` counts as importing the module)."""
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
    return {m for m in found if m in MODULES and m != name}


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


def test_the_shared_names_module_is_a_leaf() -> None:
    assert imports_of("metrix_s2s.names") == set()


def test_the_delivery_rules_do_no_io() -> None:
    source = (PACKAGE / "verdicts.py").read_text()
    imported = imports_of("metrix_s2s.verdicts")
    assert not imported & {"metrix_s2s.client", "metrix_s2s.stores", "metrix_s2s.redis_client"}
    assert not re.search(r"^\s*(import|from) (redis|requests|celery|kombu)\b", source, re.M)


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"metrix_s2s.keyspace"}))
def test_only_the_keyspace_spells_key_names(name: str) -> None:
    source = MODULES[name].read_text()
    if name.startswith("metrix_s2s.testing"):
        return  # the fake Metrix writes no Redis keys
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
    assert not re.search(r"'[^']*:(delivered|inflight|attempts|pending|dlq|rl|pause)", body)


def _ranges(header: str) -> dict[str, set[int]]:
    covered: dict[str, set[int]] = {"KEYS": set(), "ARGV": set()}
    for kind, first, last in re.findall(r"\b(KEYS|ARGV)\[(\d+)(?:\.\.(\d+))?\]", header):
        covered[kind].update(range(int(first), int(last or first) + 1))
    return covered


def test_every_lua_file_is_a_script_or_part_of_one() -> None:
    assert sorted(p.stem for p in LUA.glob("*.lua")) == sorted(redis_scripts.FILES)
    for name in redis_scripts.FILES:
        assert name in " ".join(_script_sources()), f"{name}.lua is loaded by no script"


def _script_sources() -> list[str]:
    source = (PACKAGE / "redis_scripts.py").read_text()
    return re.findall(r"source\(([^)]*)\)", source)
