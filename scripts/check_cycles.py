#!/usr/bin/env python3
"""Fails when the library's modules import each other in a cycle (issue 23).

Every file under src/ (but src/bin/, separate crates) is a module: src/run/setup.rs is
crate::run::setup, src/run/mod.rs is crate::run. A module depends on another when its non-test code
names it by a `crate::` or `super::` path (a `use` or a path in an expression). Edges between a
module and its own ancestors are not counted: a parent declares its children and re-exports their
items, and children use the parent's shared types (run/setup.rs uses run's RunError); what must
not happen is two modules of which neither contains the other naming each other, directly or
through others (run/safety.rs <-> run/setup.rs, collective/watchdog.rs <-> failure.rs were two).
Test modules (from the first `#[cfg(test)]` followed by `mod`) are left out.

Usage: scripts/check_cycles.py [SRC_DIR]   (exit 0: acyclic; 1: the cycles are printed)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PATH_RE = re.compile(r"\b(crate|super)((?:::(?:super|[A-Za-z_][A-Za-z0-9_]*))*)(::\{([^}]*)\})?")
TEST_RE = re.compile(r"#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([a-z]+\))?\s+)?mod\s")


def module_of(src: Path, file: Path) -> tuple[str, ...]:
    """The module path of `file` (without the leading `crate`)."""
    parts = list(file.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib"):
        parts.pop()
    return tuple(parts)


def strip_comments(text: str) -> str:
    """The text without `//` comments (doc comments name paths that are not imports)."""
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def resolve(path: tuple[str, ...], modules: set[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The longest prefix of `path` that is a module."""
    for n in range(len(path), -1, -1):
        if path[:n] in modules:
            return path[:n]
    return None


def edges(src: Path) -> dict[tuple[str, ...], set[tuple[str, ...]]]:
    files = [f for f in src.rglob("*.rs") if "bin" not in f.relative_to(src).parts[:1]]
    modules = {module_of(src, f) for f in files}
    graph: dict[tuple[str, ...], set[tuple[str, ...]]] = {m: set() for m in modules}
    for f in files:
        me = module_of(src, f)
        text = strip_comments(f.read_text())
        test = TEST_RE.search(text)
        if test:
            text = text[: test.start()]
        for m in PATH_RE.finditer(text):
            head, rest, braces = m.group(1), m.group(2), m.group(4)
            segs = [s for s in rest.split("::") if s]
            base: list[str] = []
            if head == "super":
                # `super` is the parent: crate::a in src/a/b.rs, crate in src/a/mod.rs.
                base = list(me[:-1])
            while segs and segs[0] == "super":
                base = base[:-1]
                segs.pop(0)
            targets = [tuple(base + segs)]
            if braces is not None:
                for item in braces.split(","):
                    first = item.strip().split("::")
                    if first and first[0] and first[0] not in ("self", "*"):
                        targets.append(tuple(base + segs + [first[0]]))
            for t in targets:
                r = resolve(t, modules)
                if r is None or r == me:
                    continue
                # A module and its ancestors: not an import edge (see the module documentation).
                if r[: len(me)] == me or me[: len(r)] == r:
                    continue
                graph[me].add(r)
    return graph


def cycles(graph: dict[tuple[str, ...], set[tuple[str, ...]]]) -> list[list[tuple[str, ...]]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[tuple[str, ...], int] = {}
    low: dict[tuple[str, ...], int] = {}
    stack: list[tuple[str, ...]] = []
    on: set[tuple[str, ...]] = set()
    out: list[list[tuple[str, ...]]] = []

    def visit(v: tuple[str, ...]) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def name(m: tuple[str, ...]) -> str:
    return "::".join(("crate",) + m)


def main() -> int:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "src"
    graph = edges(src)
    found = cycles(graph)
    for comp in found:
        inside = set(comp)
        print(f"import cycle among {len(comp)} modules:")
        for m in comp:
            print(f"  {name(m)} -> {', '.join(name(t) for t in sorted(graph[m] & inside))}")
    if found:
        return 1
    print(f"no import cycles among {len(graph)} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
