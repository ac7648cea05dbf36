"""The shape of the code, read from its imports: the core imports nothing above it, no
modules import each other in a circle, and the README, the progress query and the step
list agree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from core.models import DeployStep

ROOT = Path(__file__).absolute().parent.parent
PACKAGES = ("core", "turbodeploy", "workflows", "activities", "flyapi", "flysim", "bench")
# What each layer may not import: the core sits below everything, the workflows and
# activities below the operator tools, the emulator and the benchmark.
FORBIDDEN = {
    "core": ("workflows", "activities", "flysim", "worker", "bench", "turbodeploy"),
    "workflows": ("flysim", "worker", "bench", "turbodeploy.client", "turbodeploy.cli"),
    "activities": ("workflows", "flysim", "worker", "bench", "turbodeploy.client"),
    "flyapi": ("turbodeploy", "workflows", "activities", "flysim", "worker", "bench"),
}


def _modules() -> dict[str, Path]:
    found = {"worker": ROOT / "worker.py"}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    """Modules imported at run time (imports under `if TYPE_CHECKING:` do not count)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_layers_point_one_way() -> None:
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        for layer, banned in FORBIDDEN.items():
            if name != layer and not name.startswith(layer + "."):
                continue
            for imported in _imports(path):
                if any(imported == b.rstrip(".") or imported.startswith(b) for b in banned):
                    wrong.append(f"{name} imports {imported}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_modules_import_each_other_in_a_circle() -> None:
    modules = _modules()
    graph = {
        name: {m for m in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    # A package's __init__ importing its own modules is the package, not a circle.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*trail[trail.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_the_readme_draws_the_step_list() -> None:
    readme = (ROOT / "README.md").read_text()
    diagram = readme[readme.index("## How it works") : readme.index("DeployResult {")]
    drawn = re.findall(r"^\s{19}([a-z_]+)\s{2,}[a-z_]+\s", diagram, flags=re.M)
    assert drawn == [s.value for s in DeployStep if s is not DeployStep.DONE]


def test_the_workflows_name_no_activity_by_string() -> None:
    referenced: set[tuple[str, str]] = set()
    for path in (ROOT / "workflows").glob("*.py"):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("execute_activity"):
                raise AssertionError(f"{path.name}:{node.lineno}: use execute_activity_method")
        referenced |= set(re.findall(r"\b([A-Z][A-Za-z]+Activities)\.([a-z_]+)\b", source))
    assert len(referenced) >= 15
