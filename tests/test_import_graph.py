"""knetlab's import graph, read from the source with `ast` (module-level and function-level imports alike): no cycle
between modules, and no upward import (`models`, `data`, `evaluation` and the top-level modules never import
`knetlab.platform`); and, at run time, what a process that only reads the zoo imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "knetlab"
# Parts of knetlab that the platform builds on and that must never reach back into it.
BELOW_PLATFORM = ("knetlab.models", "knetlab.data", "knetlab.evaluation")


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """{"knetlab.models.zoo": path, "knetlab.models": path of its __init__.py, ...}"""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The knetlab modules `module` imports anywhere in its file (`from a.b import c` counts as a.b.c when that is
    a module, else as a.b). The implicit import of a parent package is not counted: Python runs it first, so it
    cannot close a cycle by itself."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {name for name in found if name in known and name != module}


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    modules = module_files(package_dir)
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    return [*paths[node], start]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a -> knetlab.platform.x' for every module below the platform that imports it."""
    below = [m for m in graph if m.startswith(BELOW_PLATFORM)
             or (m.count(".") == 1 and m not in ("knetlab.platform", "knetlab.__main__"))]
    return [f"{m} -> {t}" for m in sorted(below) for t in sorted(graph[m])
            if t == "knetlab.platform" or t.startswith("knetlab.platform.")]


def test_knetlab_has_no_import_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_models_data_and_evaluation_never_import_the_platform() -> None:
    assert upward_imports(import_graph()) == []


def test_the_walk_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The checks above can fail: a small package with a cycle through a function-level import, a relative import
    and an upward import is caught."""
    package = tmp_path / "knetlab"
    for name, text in {
        "__init__.py": "",
        "platform/__init__.py": "",
        "platform/cli.py": "from knetlab.models import zoo\n",
        "models/__init__.py": "",
        "models/zoo.py": "from .backbones import build\n",
        "models/backbones.py": "def build():\n    from knetlab.models.pretrained import load\n",
        "models/pretrained.py": "import knetlab.models.zoo\n\ndef load():\n    from knetlab.platform import cli\n",
    }.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    graph = import_graph(package)
    assert graph["knetlab.models.zoo"] == {"knetlab.models.backbones"}
    assert find_cycles(graph) == [["knetlab.models.backbones", "knetlab.models.pretrained", "knetlab.models.zoo",
                                   "knetlab.models.backbones"]]
    assert upward_imports(graph) == ["knetlab.models.pretrained -> knetlab.platform.cli"]


def test_reading_the_zoo_imports_neither_timm_nor_torchvision() -> None:
    """A knetlab driver and a sweep's trial actor read model specs and start runs without timm, torchvision and
    torch._dynamo (about 2 CPU-s of imports per process); building a model imports them."""
    code = "\n".join([
        "import sys",
        "import knetlab.models, knetlab.platform.cli, knetlab.platform.sweep, knetlab.platform.tasks",
        "from knetlab.models.zoo import create_model, model_spec",
        "model_spec('tiny'), model_spec('tiny-panoptic')",
        "heavy = lambda: [m for m in ('timm', 'torchvision', 'torch._dynamo') if m in sys.modules]",
        "print(heavy())",
        "create_model('tiny')",
        "print(heavy())",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "['timm', 'torchvision', 'torch._dynamo']"], result.stdout
