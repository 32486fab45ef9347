"""The package's import layers: data flows one way through the stages, and no module imports itself in a circle.

Lowest layer first; a module may import its own layer and those below it, never one above (lazy imports inside
functions count too; imports under ``if TYPE_CHECKING:`` do not, since they never run). The order, and why:

- ``errors``; then ``io``, ``parallel``, ``device`` and ``registry`` (file formats, model-folder facts, worker pools,
  the :class:`~autoseg.device.Runtime`, the part tables' machinery that every stage's parts use); ``data`` writes
  synthetic datasets with ``io``;
- ``fingerprint`` -> ``networks`` -> ``planner``: networks describe their architecture and what it costs (parameters,
  memory of a training step); the planner chooses patch and batch sizes with those estimates;
- ``interop``: models of other frameworks (nnU-Net v2) turned into plans and checkpoints;
- ``preprocessing`` -> ``plugins`` (extra channels and derived labels fitted on preprocessed cases);
- ``inference`` (the engine: sliding window, predictor, export, uncertainty, ONNX) -> ``evaluation`` (metrics,
  quality rules) -> ``training``, whose final validation predicts the held-out cases with the engine and scores them;
- ``ensemble`` (selection, postprocessing, the deploy pipeline, bundles) -> ``report`` -> ``api`` -> ``cli``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import autoseg

ROOT = Path(autoseg.__file__).parent
LAYERS: list[set[str]] = [
    {"errors"},
    {"io", "parallel", "device", "registry"},
    {"data"},
    {"fingerprint"},
    {"networks"},
    {"planner"},
    {"interop"},
    {"preprocessing"},
    {"plugins"},
    {"inference"},
    {"evaluation"},
    {"training"},
    {"ensemble"},
    {"federated"},
    {"report"},
    {"api"},
    {"cli", "__main__"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("autoseg", *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _runtime_imports(tree: ast.AST) -> list[ast.ImportFrom | ast.Import]:
    """Every import statement except those under ``if TYPE_CHECKING:``."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _edges() -> dict[str, set[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("autoseg")}
                continue
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else (node.module or "")
            if not base.startswith("autoseg"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in modules else base)
        edges[name] = targets - {name}
    return edges


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None  # the root package: version and lazy public names, importable from anywhere
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module} belongs to no layer; add its package to LAYERS (and say why in the docstring)")


def test_every_import_goes_down_the_layers():
    upward = [f"{src} -> {dst}" for src, targets in sorted(_edges().items()) for dst in sorted(targets)
              if _layer(src) is not None and _layer(dst) is not None and _layer(dst) > _layer(src)]
    assert upward == [], "imports that run back up the stages:\n" + "\n".join(upward)


def test_no_import_cycles():
    edges = _edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    assert cycles == [], f"import cycles: {cycles}"


def test_every_error_class_lives_in_errors_py():
    stray = []
    for path in ROOT.rglob("*.py"):
        if path.name == "errors.py" and path.parent == ROOT:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith(("Error", "Exception"))
                                                      for b in node.bases):
                stray.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert stray == [], "error classes outside autoseg/errors.py: " + ", ".join(stray)


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1
                start = body[1].lineno if has_doc else body[0].lineno
                if node.end_lineno - start + 1 > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert long == [], "functions over 60 lines (docstring excluded); split them by step: " + ", ".join(long)
