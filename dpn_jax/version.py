"""dpn_jax's version: written into every model directory and export manifest, and read by
pyproject.toml (`tool.setuptools.dynamic`). A module of its own, so that modules needing it do
not import the package root (the lazy public API)."""

__version__ = "0.1.0"
