"""Layering rules of the ``lmprog`` package, checked on its source with ``ast`` (nothing is imported).

The import graph has one node per module (a package is its ``__init__``) and an edge ``a -> b`` for every
import of ``b`` in ``a``: at module level, inside functions and under ``if TYPE_CHECKING:`` alike, since a
lazy or type-only import still couples the two modules. Relative imports are resolved, and ``from pkg import
name`` is an edge to ``pkg.name`` when that is a module (and to ``pkg`` otherwise).

Rules, one test each, each failing with the list of offenders:

* no import cycle between lmprog modules (reported as ``a -> b -> a``);
* ``lmprog.inference`` does not import the front end or the compiler (``lmprog.dsl``, ``lmprog.compiler``);
* ``lmprog.automata`` does not import ``lmprog.compiler``, ``lmprog.inference`` or ``lmprog.dsl``;
* no ``from X import _name`` with ``X`` another lmprog module: a name that crosses modules is public.

``test_rules_find_violations`` runs the same functions on a small synthetic package, so the rules are known
to fire.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "lmprog"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


@dataclass(frozen=True)
class Import:
    """One import statement's target, as seen from ``importer``."""

    importer: str  # dotted module name
    target: str  # dotted module name of the module imported (a package means its __init__)
    names: tuple[str, ...]  # for ``from target import a, b``: the names taken that are not modules
    line: int


def module_sources(root: Path = ROOT, package: str = PACKAGE) -> dict[str, tuple[str, bool]]:
    """``{dotted name: (source, is_package)}`` for every ``.py`` file under ``root``."""
    out: dict[str, tuple[str, bool]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = [package, *rel.parts]
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path.read_text(encoding="utf-8"), is_pkg)
    return out


def _resolve_relative(importer: str, is_pkg: bool, level: int, module: str | None) -> str:
    base = importer.split(".") if is_pkg else importer.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, *(module.split(".") if module else [])])


def imports_of(name: str, source: str, is_pkg: bool, modules: set[str], package: str = PACKAGE) -> list[Import]:
    """Every import of a module of ``package`` in ``source`` (the module ``name``), anywhere in the file."""
    found: list[Import] = []

    def inside(target: str) -> bool:
        return target == package or target.startswith(package + ".")

    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if inside(alias.name):
                    # ``import a.b.c`` runs a, a.b and a.b.c; the edge that matters is the deepest module.
                    target = alias.name
                    while target not in modules and "." in target:
                        target = target.rsplit(".", 1)[0]
                    found.append(Import(name, target, (), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(name, is_pkg, node.level, node.module)
            else:
                base = node.module or ""
            if not inside(base):
                continue
            plain: list[str] = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # ``from pkg import module``
                    found.append(Import(name, sub, (), node.lineno))
                else:
                    plain.append(alias.name)
            if plain:
                found.append(Import(name, base, tuple(plain), node.lineno))
    return found


def build_graph(sources: dict[str, tuple[str, bool]],
                package: str = PACKAGE) -> tuple[dict[str, set[str]], list[Import]]:
    """The import graph ``{module: modules it imports}`` (self-imports dropped) and every import found."""
    modules = set(sources)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    every: list[Import] = []
    for name, (source, is_pkg) in sources.items():
        for imp in imports_of(name, source, is_pkg, modules, package):
            every.append(imp)
            if imp.target != name and imp.target in modules:
                graph[name].add(imp.target)
    return graph, every


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles, each as a path ``[a, b, ..., a]`` starting at its smallest module.

    Tarjan's algorithm (iterative) finds the strongly connected components; in each, a shortest cycle through
    every module of it is reported (duplicates removed), so every module caught in a cycle shows up with its
    shortest way back to itself, and the report is deterministic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            advanced = False
            for w in children:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in graph[v]:
                    components.append(sorted(comp))
    cycles: list[list[str]] = []
    for comp in sorted(components):
        members = set(comp)
        found = []
        for start in comp:
            path = _shortest_cycle(graph, members, start)
            k = path.index(min(path))  # rotate to start at the smallest module, so rotations compare equal
            path = path[k:-1] + path[:k] + [path[k]]
            if path not in found:
                found.append(path)
        cycles.extend(sorted(found, key=lambda p: (len(p), p)))
    return cycles


def _shortest_cycle(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """A shortest cycle ``[start, ..., start]`` inside ``members`` (breadth-first, deterministic)."""
    parent: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    back = []
                    while v != start:
                        back.append(v)
                        v = parent[v]
                    return [start, *back[::-1], start]
                if w in members and w not in seen:
                    seen.add(w)
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a cycle component but on no cycle")


def underscore_imports(every: list[Import]) -> list[str]:
    """``from X import _name`` across modules (``__dunder__`` names and ``__future__`` are fine)."""
    out = set()
    for imp in every:
        if imp.target == imp.importer:
            continue
        for n in imp.names:
            if n.startswith("_") and not (n.startswith("__") and n.endswith("__")):
                out.add((imp.importer, imp.line, f"from {imp.target} import {n}"))
    return [f"{m}:{line}: {what}" for m, line, what in sorted(out)]


def forbidden_imports(every: list[Import], layer: str, banned: tuple[str, ...]) -> list[str]:
    """Imports by modules of ``layer`` (a package) of modules in any of the ``banned`` packages."""

    def under(mod: str, pkg: str) -> bool:
        return mod == pkg or mod.startswith(pkg + ".")

    out = set()
    for imp in every:
        if under(imp.importer, layer) and any(under(imp.target, b) for b in banned):
            what = f"from {imp.target} import {', '.join(imp.names)}" if imp.names else f"import {imp.target}"
            out.add((imp.importer, imp.line, what))
    return [f"{m}:{line}: {what}" for m, line, what in sorted(out)]


def _report(title: str, offenders: list[str]) -> str:
    return f"{title} ({len(offenders)}):\n  " + "\n  ".join(offenders)


@functools.lru_cache(maxsize=1)
def _lmprog_graph() -> tuple[dict[str, set[str]], list[Import]]:
    return build_graph(module_sources())


# ------------------------------------------------------------------------------------------------ the rules


def test_the_graph_sees_the_package():
    graph, every = _lmprog_graph()
    assert "lmprog.compiler.checks" in graph and "lmprog.dsl" in graph
    assert "lmprog.dsl" in graph["lmprog.program"] or any(m.startswith("lmprog.dsl.") for m in graph["lmprog.program"])
    assert every


def test_no_import_cycles():
    graph, _ = _lmprog_graph()
    cycles = [" -> ".join(c) for c in find_cycles(graph)]
    assert not cycles, _report("import cycles between lmprog modules", cycles)


def test_inference_does_not_import_the_compiler_or_front_end():
    _, every = _lmprog_graph()
    bad = forbidden_imports(every, "lmprog.inference", ("lmprog.compiler", "lmprog.dsl"))
    assert not bad, _report("lmprog.inference importing lmprog.compiler / lmprog.dsl", bad)


def test_automata_do_not_import_compiler_inference_or_front_end():
    _, every = _lmprog_graph()
    bad = forbidden_imports(every, "lmprog.automata", ("lmprog.compiler", "lmprog.inference", "lmprog.dsl"))
    assert not bad, _report("lmprog.automata importing lmprog.compiler / lmprog.inference / lmprog.dsl", bad)


def test_no_private_names_across_modules():
    _, every = _lmprog_graph()
    bad = underscore_imports(every)
    assert not bad, _report("underscore names imported from another lmprog module (make them public)", bad)


# ---------------------------------------------------------------------------------------- the rules can fail


def test_rules_find_violations():
    sources = {
        "pkg": ("", True),
        "pkg.a": ("from __future__ import annotations\nfrom . import b\nfrom .c import _hidden, __version__\n", False),
        "pkg.b": ("def f():\n    from pkg.a import thing\n", False),
        "pkg.c": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.sub.d\n", False),
        "pkg.sub": ("from ..c import x\n", True),
        "pkg.sub.d": ("from pkg import sub\nimport pkg.c\n", False),
        "pkg.inner": ("from pkg.e import _private_func\n", False),
        "pkg.e": ("import os\nfrom pkg.e import _self_ok\n", False),
        "pkg.layer": ("from pkg.a import y\n", True),
        "pkg.layer.m": ("import pkg.b\nfrom pkg import a\n", False),
    }
    graph, every = build_graph(sources, package="pkg")
    assert graph["pkg.a"] == {"pkg.b", "pkg.c"}
    assert graph["pkg.b"] == {"pkg.a"}  # an import inside a function counts
    assert graph["pkg.c"] == {"pkg.sub.d"}  # so does one under TYPE_CHECKING
    assert graph["pkg.sub"] == {"pkg.c"}  # relative import from a package's __init__
    assert graph["pkg.sub.d"] == {"pkg.sub", "pkg.c"}  # ``from pkg import sub`` is an import of pkg.sub
    assert graph["pkg.e"] == set()
    cycles = find_cycles(graph)
    assert ["pkg.a", "pkg.b", "pkg.a"] in cycles
    assert ["pkg.c", "pkg.sub.d", "pkg.c"] in cycles
    assert ["pkg.c", "pkg.sub.d", "pkg.sub", "pkg.c"] in cycles  # the shortest cycle through pkg.sub
    assert len(cycles) == 3
    assert underscore_imports(every) == ["pkg.a:3: from pkg.c import _hidden",
                                         "pkg.inner:1: from pkg.e import _private_func"]
    assert forbidden_imports(every, "pkg.layer", ("pkg.a",)) == ["pkg.layer:1: from pkg.a import y",
                                                                 "pkg.layer.m:2: import pkg.a"]
    assert find_cycles({"x": {"y"}, "y": set()}) == []
    assert find_cycles({"x": {"x"}}) == [["x", "x"]]
