"""The package layout's rules, read from the source's imports (every `import` and `from ... import`,
including those inside functions, so a lazy import cannot hide a cycle):

- no import cycles between modules;
- a stage never imports a stage above it: tokenizers_vq < engram_vision < sample, metrics < train < study
  (sample and metrics are independent of each other);
- the plain-torch libraries, engram_vision and tokenizers_vq, import neither Lightning nor any stage;
- a package's `__main__.py` holds its command line only: no function but `main`, no class.

The checks themselves are tested on made-up graphs, so a broken checker cannot pass silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tokenizers_vq", "engram_vision", "sample", "metrics", "train", "study")
RANK = {"tokenizers_vq": 0, "engram_vision": 1, "sample": 2, "metrics": 2, "train": 3, "study": 4}
LIBRARIES = ("tokenizers_vq", "engram_vision")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every module `source` imports (absolute names; relative imports resolved against `module`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            # `from pkg import mod` imports the module pkg.mod when there is one
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (only names that are modules of the project)."""
    files = {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    graph = {}
    for module, path in files.items():
        names = imported_modules(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
        graph[module] = {name for name in names if name in files and name != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph.get(child, ()))))
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a package of the same or a higher rank than the importer's own."""
    bad = []
    for module, targets in graph.items():
        own = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != own and RANK[other] >= RANK[own]:
                bad.append(f"{module} -> {target}")
    return sorted(bad)


def test_the_checker_finds_cycles_and_upward_imports() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert layer_violations({"metrics.x": {"train.y", "tokenizers_vq.z"}, "sample.a": {"metrics.b"},
                             "study.s": {"train.y"}}) == ["metrics.x -> train.y", "sample.a -> metrics.b"]
    assert imported_modules("from .files import x\nimport torch", "tokenizers_vq.checkpoint", False) \
        >= {"tokenizers_vq.files", "torch"}
    assert "train.data.digits" in imported_modules("def f():\n    from train.data import digits\n",
                                                   "study.demo", False)


def test_the_graph_covers_every_package() -> None:
    graph = import_graph()
    assert {module.split(".")[0] for module in graph} == set(PACKAGES)
    assert "study.runner" in graph and "train.data.tokens" in graph["study.runner"]  # a lazy import


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_stage_imports_a_stage_above_it() -> None:
    bad = layer_violations(import_graph())
    assert not bad, "imports against the layer order (tokenizers_vq < engram_vision < sample, metrics < train " \
                    "< study):\n" + "\n".join(bad)


@pytest.mark.parametrize("library", LIBRARIES)
def test_plain_torch_libraries_import_no_lightning(library: str) -> None:
    offenders = []
    for path in (REPO / library).rglob("*.py"):
        module = module_name(path)
        for name in imported_modules(path.read_text(encoding="utf-8"), module, path.name == "__init__.py"):
            if name.split(".")[0] in {"lightning", "pytorch_lightning", "lightning_fabric"}:
                offenders.append(f"{module} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_main_modules_hold_the_command_line_only() -> None:
    mains = sorted(REPO.glob("*/__main__.py")) + sorted(REPO.glob("*/*/__main__.py"))
    assert {module_name(p) for p in mains} >= {"train.__main__", "train.prepare.__main__", "sample.__main__",
                                               "metrics.__main__", "study.__main__"}
    for path in mains:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = [node.name for node in tree.body
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        assert set(defined) <= {"main"}, f"{path.relative_to(REPO)} defines {defined}: library code belongs in a module"
