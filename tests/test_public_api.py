"""The public API (dpn_jax/__init__.py) and the version: each written once, in agreement."""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import dpn_jax
import dpn_jax.version

ROOT = Path(__file__).resolve().parents[1]
INIT = Path(dpn_jax.__file__)


def type_checking_imports() -> dict[str, str]:
    """name -> module of the imports under `if TYPE_CHECKING:` in dpn_jax/__init__.py."""
    tree = ast.parse(INIT.read_text())
    [block] = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    ]
    return {
        alias.asname or alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }


def test_all_the_lazy_table_and_the_type_checking_imports_agree():
    table = dpn_jax._EXPORTS
    assert sorted(dpn_jax.__all__) == sorted(table)
    assert type_checking_imports() == table
    for name, module in table.items():
        assert name in vars(importlib.import_module(module)), f"{module} defines no {name}"
        assert getattr(dpn_jax, name) is getattr(importlib.import_module(module), name)


def test_internals_are_not_public():
    assert "DualPathBlock" not in dpn_jax.__all__  # a DPN's block: dpn_jax.models.dpn
    assert "conv2d" in dpn_jax.__all__  # meant for other models too (the docstring says so)


def test_the_version_is_written_once():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    attr = pyproject["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    module, _, name = attr.rpartition(".")
    assert getattr(importlib.import_module(module), name) == dpn_jax.__version__
    assert dpn_jax.__version__ is dpn_jax.version.__version__
    assert dpn_jax.__version__.count(".") == 2  # e.g. 0.1.0
