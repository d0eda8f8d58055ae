"""Exporting a DPN for serving without dpn_jax: StableHLO (`jax.export`), ONNX, TF SavedModel.

`export_model(source, format, output, ExportOptions(...))` (the `dpn-export` command) writes a
directory with the artifact and `serving.json` (preprocessing, inputs and outputs, class
names); `read_stablehlo(directory)` loads a StableHLO export back as a `jax.export.Exported`.
"""

from dpn_jax.export.exporter import FORMATS, ExportOptions, export_model
from dpn_jax.export.serving import read_serving_config
from dpn_jax.export.stablehlo import read_stablehlo

__all__ = ["FORMATS", "ExportOptions", "export_model", "read_serving_config", "read_stablehlo"]
