"""The package's shape: imports point one way (no cycles), serving and files never reach training, the recipe stays
one readable file and no function grows past what a reader holds in view."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lora_dreambooth"
RECIPE = "lora_dreambooth.training.recipe"
MAX_RECIPE_LINES = 400
MAX_FUNCTION_LINES = 80

# stage -> stages it must never import (DESIGN.md: components know nothing of the recipe; serving never trains)
FORBIDDEN = {
    "lora_dreambooth.data": ("lora_dreambooth.training", "lora_dreambooth.serve", "lora_dreambooth.models"),
    "lora_dreambooth.adapters": ("lora_dreambooth.training", "lora_dreambooth.serve", "lora_dreambooth.files"),
    "lora_dreambooth.files": ("lora_dreambooth.training", "lora_dreambooth.serve"),
    "lora_dreambooth.serve": ("lora_dreambooth.training",),
    "lora_dreambooth.evaluation": ("lora_dreambooth.training",),
    "lora_dreambooth.models": ("lora_dreambooth.training", "lora_dreambooth.serve", "lora_dreambooth.adapters"),
    "lora_dreambooth.config": ("lora_dreambooth.training", "lora_dreambooth.serve", "lora_dreambooth.files"),
    "lora_dreambooth.kernels": ("lora_dreambooth.training", "lora_dreambooth.serve", "lora_dreambooth.files",
                                "lora_dreambooth.adapters", "lora_dreambooth.models", "lora_dreambooth.data"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom, known: set[str]) -> list[str]:
    """The package modules one `from ... import ...` statement loads (lazy imports inside functions count too)."""
    if node.level:
        base = module.split(".")
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = [target] if target in known else []
    found += [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports anywhere in its body (module level or inside functions)."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.ImportFrom):
                graph[name].update(_resolve(name, path.name == "__init__.py", node, known))
            elif isinstance(node, ast.Import):
                graph[name].update(alias.name for alias in node.names if alias.name in known)
        graph[name].discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle_anywhere_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_stages_import_only_downstream():
    bad = []
    for module, imports in import_graph().items():
        for stage, forbidden in FORBIDDEN.items():
            if module == stage or module.startswith(stage + "."):
                bad += [f"{module} imports {target}" for target in sorted(imports)
                        if any(target == f or target.startswith(f + ".") for f in forbidden)]
    assert not bad, "\n".join(bad)


def test_components_never_import_the_recipe():
    importers = sorted(m for m, imports in import_graph().items() if RECIPE in imports)
    assert set(importers) <= {"lora_dreambooth", "lora_dreambooth.cli", "lora_dreambooth.demo",
                              "lora_dreambooth.synthetic.bench"}, importers


def test_importing_serving_loads_no_training_code():
    code = ("import sys, lora_dreambooth.serve.app, lora_dreambooth.serve.pipeline, lora_dreambooth.files.load_adapter;"
            "print(sorted(m for m in sys.modules if m.startswith('lora_dreambooth.training')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_recipe_is_one_file_of_at_most_400_lines():
    lines = len((PACKAGE / "training" / "recipe.py").read_text("utf-8").splitlines())
    assert lines <= MAX_RECIPE_LINES, lines


def test_no_function_longer_than_80_lines():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, long
