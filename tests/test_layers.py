"""The house's arrows, read from the code's own imports (every import, lazy ones inside functions included).

Layers, bottom up: `service` (the online path) <- `training` <- `exporters` (offline) <- `loadtest` (tools that measure)
<- `falconrec` (the one front door). An arrow may only run down or sideways, and no set of modules may import each
other in a loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "training", "exporters", "loadtest", "falconrec")
# What each package may import of the others (itself always).
ALLOWED = {
    "service": set(),
    "training": {"service"},
    "exporters": {"service", "training"},
    "loadtest": {"service", "training", "exporters"},
    "falconrec": {"service", "training", "exporters", "loadtest"},
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if "proto" in path.parts and path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules this one imports (resolved to the longest known module name)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def test_arrows_only_run_down():
    wrong = [
        f"{a} -> {b}"
        for a, targets in graph().items()
        for b in targets
        if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]]
    ]
    assert not wrong, "imports running up a layer:\n" + "\n".join(sorted(wrong))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan). An edge from a package to its own submodule is
    skipped: importing `a.b` runs `a/__init__` first, never the other way round."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w.startswith(v + "."):
                continue
            if w not in index:
                strong(w)
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
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return found


def test_no_import_cycles():
    loops = cycles(graph())
    assert not loops, "modules importing each other in a loop:\n" + "\n".join(" <-> ".join(c) for c in loops)


def test_no_loops_between_the_service_rooms():
    """service/'s folders (api, pipeline, stores, ingest, backends) and its ground-floor modules import downhill:
    no two folders import each other, even through different files."""

    def room(m: str) -> str:
        parts = m.split(".")
        return ".".join(parts[:2]) if parts[0] == "service" else parts[0]

    rooms: dict[str, set[str]] = {}
    for a, targets in graph().items():
        if a.startswith("service."):
            rooms.setdefault(room(a), set()).update(room(b) for b in targets if room(b) != room(a))
    loops = cycles(rooms)
    assert not loops, "service folders importing each other:\n" + "\n".join(" <-> ".join(c) for c in loops)


def test_the_walker_sees_lazy_imports(tmp_path):
    """The check is only as good as its reader: an import inside a function counts."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from service.contract import MANIFEST\n    import training.config\n")
    assert imports("loadtest.m", f, {"service.contract", "training.config", "training"}) == {
        "service.contract",
        "training.config",
    }
