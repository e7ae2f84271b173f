"""House rules, read from the code itself: the core never loads or imports the rooms above it, arrows point down
only (studies -> tuning -> tracking -> core; report uses only metrics), there is no import cycle, and the package
stays a small house (at most 12 top-level modules, no file over 450 lines)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "comic"
HEAVY = {"ray", "optuna", "mlflow"}
CORE_PACKAGES = ("models", "losses", "data", "inference")
# Which rooms each room may import (besides itself); the core (top-level modules and its packages) is "core".
ALLOWED = {
    "core": {"core", "report"},
    "report": {"metrics"},
    "tracking": {"core", "report"},
    "tuning": {"core", "report", "tracking"},
    "studies": {"core", "report", "tracking", "tuning"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in CORE_PACKAGES or (len(parts) == 2 and not (PACKAGE / parts[1]).is_dir()):
        return "core"
    return parts[1]


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").is_file()


def _imports(path: Path) -> set[str]:
    """Every `comic...` module that `path` imports, anywhere in the file (function bodies included); for
    `from comic.x import y` that is `comic.x`, and `comic.x.y` too when y is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "comic"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "comic":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_graph_is_read_from_the_code():
    graph = _graph()
    assert "comic.tracking.run" in graph["comic.studies.runner"]  # the check is live: a known arrow is seen
    assert "comic.engine" in graph["comic.tracking.run"]


def test_arrows_point_down_only():
    wrong = []
    for module, targets in _graph().items():
        room = _room(module)
        for target in targets:
            other = _room(target)
            allowed = ALLOWED[room] | {room}
            if room == "report":
                allowed = {"report"} | ({"core"} if target == "comic.metrics" else set())
            if other not in allowed:
                wrong.append(f"{module} ({room}) -> {target} ({other})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    """Depth-first search over the module graph (package faces included): no module reaches itself."""
    graph = _graph()
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_core_imports_no_room_above_it():
    """AST: no core module imports tracking, tuning or studies, not even inside a function."""
    bad = [f"{m} -> {t}" for m, targets in _graph().items() if _room(m) == "core"
           for t in targets if _room(t) in {"tracking", "tuning", "studies"}]
    assert not bad, bad


def _core_modules() -> list[str]:
    return sorted(m for m in _graph() if _room(m) == "core" and not m.endswith("__main__"))


def test_core_import_leaves_orchestration_out():
    """`import comic`, then every core module, then the tracking room: Ray, MLflow and Optuna stay out of the core,
    and tracking (below tuning) loads MLflow but never Ray or Optuna."""
    tracking = [m for m in _graph() if _room(m) == "tracking"]
    code = "\n".join(["import sys", "def loaded(): return {m.split('.')[0] for m in sys.modules}", "import comic",
                      "print(sorted(loaded() & HEAVY))", f"import {', '.join(_core_modules())}",
                      "print(sorted(loaded() & HEAVY))", f"import {', '.join(tracking)}",
                      "print(sorted(loaded() & HEAVY))"])
    out = subprocess.run([sys.executable, "-c", f"HEAVY = set({sorted(HEAVY)!r})\n{code}"], capture_output=True,
                         text=True, check=True).stdout.split("\n")
    assert out[:3] == ["[]", "[]", "['mlflow']"], out


def test_the_house_stays_small():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= 12, sorted(top)
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines()))
            > 450}
    assert not long, long
