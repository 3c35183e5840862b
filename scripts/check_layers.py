#!/usr/bin/env python3
"""Fail on an import cycle inside ``src/dwebsocket`` or an import that points up a layer.

Every ``import`` and ``from ... import`` is read from the source with ``ast``,
those inside functions (lazy imports) included, so a cycle cannot hide behind
a deferred import. The layers, lowest first, are :data:`LAYERS`; a module may
import from its own layer or a lower one, never a higher one, and the import
graph must have no cycle at all.

    python scripts/check_layers.py            # prints the problems; exit 1 if any
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "dwebsocket"
PACKAGE = "dwebsocket"

#: The layers, lowest first: a module belongs to the first layer with a
#: prefix that matches its name (``prefix`` or ``prefix.*``).
LAYERS: list[tuple[str, list[str]]] = [
    ("leaves", ["conf", "metrics", "messages", "_redis", "transports.policy", "transports"]),
    ("connection", ["connection", "handshake", "session"]),
    ("groups", ["groups"]),
    ("transports", ["transports.wsgi", "transports.asgi", "transports.polling", "transports.opener"]),
    ("user API", ["websocket", "decorators"]),
    ("entry points", ["middleware", "asgi", "apps", "checks", "testing", "management", ""]),
]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, best_length = len(LAYERS) - 1, -1
    for index, (_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".") or prefix == ""
            if matches and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    return best


def imports_of(path: Path, module: str, modules: set[str]) -> set[str]:
    """The dwebsocket modules that *module* (at *path*) imports, lazily or not."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        # The longest known module that *name* is or lies in.
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name if name in modules else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    target = resolve(alias.name[len(PACKAGE) + 1:])
                    if target is not None:
                        found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if module else []
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                stem = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                stem = node.module[len(PACKAGE) + 1:]
            else:
                continue
            for alias in node.names:
                candidate = f"{stem}.{alias.name}" if stem else alias.name
                target = candidate if candidate in modules else resolve(stem)
                if target is not None:
                    found.add(target)
    found.discard(module)
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    modules = set(paths)
    return {m: imports_of(p, m, modules) for m, p in paths.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def problems(edges: dict[str, set[str]]) -> list[str]:
    out = [f"import cycle: {' <-> '.join(c)}" for c in cycles(edges)]
    for module, targets in sorted(edges.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                out.append(
                    f"{module or PACKAGE} ({LAYERS[layer_of(module)][0]}) imports {target} "
                    f"({LAYERS[layer_of(target)][0]}), a higher layer"
                )
    return out


def main(argv: Iterable[str] = ()) -> int:
    found = problems(graph())
    for line in found:
        print(line)
    if not found:
        print(f"{PACKAGE}: no import cycle, every import points down ({len(graph())} modules)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
