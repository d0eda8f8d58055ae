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
MODEL_AND_OPS_MAY_IMPORT = {"models", "ops", "errors", "system"}
# The bottom layers: process/OS plumbing and the errors use nothing above them.
BOTTOM_LAYERS = {"system", "errors"}


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


def test_system_and_errors_import_nothing_above_them():
    graph = imports_by_layer()
    for layer in BOTTOM_LAYERS:
        above = {t: files for t, files in graph.get(layer, {}).items() if t not in BOTTOM_LAYERS}
        assert not above, f"{layer} imports {above}"
    assert "errors" in graph["system"]


def test_export_does_not_depend_on_infer():
    """An export needs a model and its preprocessing (weights/), not the Predictor."""
    assert "infer" not in imports_by_layer().get("export", {})


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
        "system",
        "export",
        "nnx",
    } <= set(graph) | {t for ts in graph.values() for t in ts}


def module_name(path: Path) -> str:
    """dpn_jax/data/sources.py -> 'dpn_jax.data.sources'; a package's __init__ -> the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_by_module() -> dict[str, set[str]]:
    """module -> the dpn_jax modules it imports, at the top or inside a function alike."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        if module == "dpn_jax":
            continue  # the lazy public API names every layer on purpose
        targets = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import module` imports the module; `from module import name`
                # the module that defines the name
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[module] = {t for t in targets if t in modules and t not in (module, "dpn_jax")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A path a -> ... -> a in `graph`, or None."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in done:
            return None
        if node in visiting:
            return visiting[visiting.index(node) :] + [node]
        visiting.append(node)
        for target in sorted(graph.get(node, ())):
            if cycle := visit(target):
                return cycle
        visiting.pop()
        done.add(node)
        return None

    return next(filter(None, map(visit, sorted(graph))), None)


def test_nothing_inside_imports_the_package_root():
    """`dpn_jax/__init__.py` is the lazy public API: a module importing a name from it depends
    on every layer (the version lives in `dpn_jax.version` for that reason)."""
    importers = [
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module == "dpn_jax" and node.level == 0
    ]
    assert importers == []


def test_no_import_cycles_between_modules_lazy_imports_included():
    """A function-level import that closes a cycle works only as long as nobody moves it to the
    top; modules that need each other are one module, or share a third that both import."""
    graph = imports_by_module()
    assert graph["dpn_jax.train.trainer"] >= {"dpn_jax.train.state", "dpn_jax.factory"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def constant_values(node: ast.expr) -> set | None:
    """What a constant's literal holds, for comparing two definitions: a scalar's value, a
    sequence's or set's elements, a dict's keys; None for anything computed."""
    if isinstance(node, ast.Constant):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        elements = node.elts
    elif isinstance(node, ast.Dict):
        elements = node.keys
    else:
        return None
    return {e.value for e in elements if isinstance(e, ast.Constant)} or None


def module_constants(path: Path) -> dict[str, set]:
    """UPPER_CASE names assigned a literal at module level -> constant_values of it."""
    constants = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id.lstrip("_").isupper():
            if (values := constant_values(value)) is not None:
                constants[target.id] = values
    return constants


def repeated_constants(root: Path) -> list[str]:
    """'NAME: a.py, b.py' for each constant that two modules define with overlapping values (the
    same scalar, or collections sharing an element): one concept written twice, which drifts
    (a list of image extensions that lost `.tif`). The same name with unrelated values (each
    export format's `ARTIFACT_FILE`) is a protocol, not a copy."""
    found: dict[str, list[tuple[str, set]]] = {}
    for path in sorted(root.rglob("*.py")):
        for name, values in module_constants(path).items():
            found.setdefault(name, []).append((str(path.relative_to(root.parent)), values))
    repeated = []
    for name, definitions in sorted(found.items()):
        for i, (file, values) in enumerate(definitions):
            for other, other_values in definitions[i + 1 :]:
                if values & other_values:
                    repeated.append(f"{name}: {file}, {other}")
    return repeated


def test_no_constant_is_defined_twice():
    assert repeated_constants(PACKAGE) == []


def test_repeated_constants_are_found(tmp_path):
    files = {
        "a.py": "EXTENSIONS = ('.jpg', '.png')\nARTIFACT = 'model.onnx'\nLIMIT = 3\n",
        "b.py": "EXTENSIONS = ['.png', '.tif']\nARTIFACT = 'model.hlo'\n_LIMIT = 3\n",
        "c.py": "def f():\n    EXTENSIONS = ('.jpg',)\nLIMIT = 3\nDTYPES = {'float32': 1}\n",
        "d.py": "DTYPES = ('float32', 'float64')\nSIZES = tuple(range(3))\n",
    }
    root = tmp_path / "dpn_jax"
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    assert repeated_constants(root) == [
        "DTYPES: dpn_jax/c.py, dpn_jax/d.py",
        "EXTENSIONS: dpn_jax/a.py, dpn_jax/b.py",
        "LIMIT: dpn_jax/a.py, dpn_jax/c.py",
    ]


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
