"""The package's layers: no import cycles between them, and the model and ops layers stand alone.

Every `import dpn_jax...` statement counts, also those inside functions (a lazy import is still
a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import dpn_jax

PACKAGE = Path(dpn_jax.__file__).parent
# What the model and ops layers may use: each other and the process-level basics.
MODEL_AND_OPS_MAY_IMPORT = {"models", "ops", "errors", "runtime"}


def layer_of(module: str) -> str | None:
    """'dpn_jax.train.trainer' -> 'train'; 'dpn_jax.factory' -> 'factory'."""
    parts = module.split(".")
    return parts[1] if parts[0] == "dpn_jax" and len(parts) > 1 else None


def imports_by_layer() -> dict[str, dict[str, set[str]]]:
    """layer -> imported layer -> the files that import it."""
    graph: dict[str, dict[str, set[str]]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        if relative.name == "__init__" and relative.parent == Path("dpn_jax"):
            continue  # the lazy public API names every layer on purpose
        layer = layer_of(".".join(relative.parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for target in {layer_of(n) for n in names} - {None, layer}:
                if node.__class__ is ast.ImportFrom and layer_of(node.module) is None:
                    continue  # `from dpn_jax import __version__`-style names of the package
                graph.setdefault(layer, {}).setdefault(target, set()).add(str(relative))
    return graph


def test_model_and_ops_layers_import_nothing_above_them():
    graph = imports_by_layer()
    for layer in ("models", "ops"):
        outside = {
            t: files
            for t, files in graph.get(layer, {}).items()
            if t not in MODEL_AND_OPS_MAY_IMPORT
        }
        assert not outside, f"{layer} imports {outside}"


def test_no_import_cycles_between_layers():
    graph = {layer: set(targets) for layer, targets in imports_by_layer().items()}
    visiting, done = [], set()

    def visit(layer: str) -> None:
        if layer in done:
            return
        assert layer not in visiting, "import cycle: " + " -> ".join(
            visiting[visiting.index(layer) :] + [layer]
        )
        visiting.append(layer)
        for target in sorted(graph.get(layer, ())):
            visit(target)
        visiting.pop()
        done.add(layer)

    for layer in sorted(graph):
        visit(layer)
    assert {
        "models",
        "ops",
        "data",
        "train",
        "infer",
        "weights",
        "cli",
        "runtime",
        "export",
        "nnx",
    } <= set(graph) | {t for ts in graph.values() for t in ts}


def test_every_function_reads_at_once():
    """No function of the package is 80 lines or longer (issue 28: the trainer's 175-line
    `_train` was cut into phases); a nested one counts on its own and inside its parent."""
    too_long = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines >= 80:
                    too_long[f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"] = lines
    assert not too_long
