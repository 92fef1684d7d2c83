"""The package's shape, as ARCHITECTURE.md describes it: no import circles, the C bindings know
nothing of the model, and the model's math knows nothing of its decode back-ends."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "phimoe_cli"


def imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from . import x`` counts as x, not the package)."""
    files = {".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): f
             for f in PACKAGE.rglob("*.py")}
    graph = {}
    for name, f in files.items():
        pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if base.split(".")[0] == "phimoe_cli":
                    subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files}
                    deps |= subs or {base}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "phimoe_cli"}
        graph[name] = deps - {name}
    return graph


def test_no_import_circles():
    graph = imports()

    def circle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            module, path = stack.pop()
            for dep in graph.get(module, ()):
                if dep == start:
                    return [*path, dep]
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, [*path, dep]))
        return None

    circles = [c for c in map(circle_from, sorted(graph)) if c]
    assert not circles, " ; ".join(" -> ".join(c) for c in circles)


def test_layers_point_one_way():
    graph = imports()
    assert graph["phimoe_cli.model.native"] == set()  # tensors and matrices only
    for math in ("phimoe_cli.model.layers", "phimoe_cli.model.phimoe"):
        assert not graph[math] & {"phimoe_cli.model.decode", "phimoe_cli.model.native"}, math
    assert graph["phimoe_cli.errors"] == set()  # a leaf every layer may raise from
    model = {m for m in graph if m.startswith("phimoe_cli.model")}
    for m in model:  # the model package never reaches up into the commands
        assert all(d.startswith("phimoe_cli.model") or d == "phimoe_cli.errors" for d in graph[m]), (m, graph[m])
