"""The import structure of both packages, read from the source (``ast``, nothing imported).

- No import cycle between modules, counting imports inside functions: a cycle hidden in a
  function only fails later, at the first call.
- An import inside a function is for an optional dependency only (a package not every
  install has: the training stack on a device, a teacher's torch, a camera's picamera2).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"facenet_edge": ROOT / "sdk" / "facenet_edge", "facenet_train": ROOT / "converters" / "facenet_train"}

# Top-level packages a function may import: each is missing from some install.
OPTIONAL = {
    "tensorflow", "keras", "matplotlib",  # the `train` extra
    "torch", "timm", "onnxruntime", "dlib", "face_recognition_models",  # the `teacher` and `dlib` extras
    "psutil",  # the `bench` extra
    "picamera2",  # the `pi` extra
    "ai_edge_litert", "tflite_runtime",  # whichever TFLite runtime is installed
}
# Deferred imports that are not optional dependencies, each with its reason.
DEFERRED = {
    # `__version__` only: `import facenet_edge` stays cheap (test_no_tensorflow times it).
    ("facenet_edge", "importlib.metadata"),
    # Capture set-up only when `facenet-edge stream` runs.
    ("facenet_edge.cli", "facenet_edge.camera"),
    # The benchmark harness only when `facenet-edge bench` runs.
    ("facenet_edge.cli", "facenet_edge.bench"),
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module, absolute
    line: int
    in_function: bool


def module_name(package: str, path: Path) -> str:
    parts = path.relative_to(PACKAGES[package]).with_suffix("").parts
    return ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))


def modules() -> dict[str, Path]:
    return {module_name(p, f): f for p, root in PACKAGES.items() for f in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> list[Import]:
    """Every import statement of the module, targets resolved to absolute module names (for
    ``from .x import y``: ``.x.y`` when that is a module, else ``.x``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend(Import(name, alias.name, child.lineno, inside) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.rsplit(".", child.level - 1)[0]
                    base = f"{anchor}.{base}" if base else anchor
                for alias in child.names:
                    submodule = f"{base}.{alias.name}"
                    found.append(Import(name, submodule if submodule in known else base, child.lineno, inside))
            visit(child, inside)

    visit(tree, False)
    return found


def all_imports() -> list[Import]:
    found = modules()
    return [i for name, path in found.items() for i in imports_of(name, path, set(found))]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" when fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    known = set(modules())
    edges: dict[str, set[str]] = {}
    for i in all_imports():
        if i.target in known and i.target != i.module:
            edges.setdefault(i.module, set()).add(i.target)
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_function_level_imports_are_optional_dependencies():
    hidden = sorted({
        f"{i.module}:{i.line} imports {i.target}" for i in all_imports()
        if i.in_function and i.target.partition(".")[0] not in OPTIONAL and (i.module, i.target) not in DEFERRED
    })
    assert not hidden, "imports inside functions (move them to the top; optional dependencies go in OPTIONAL): " + \
        "; ".join(hidden)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}}) is None
