"""StableHLO through `jax.export`: one serialized artifact for CPU, CUDA and TPU.

`jax.export.deserialize(bytes).call(pixels)` runs it in any JAX (within JAX's compatibility
window), with no dpn_jax or Flax code. Its convolutions use the portable lowering
(`conv_lowering("xla")`): what dpn_jax runs on each backend, minus dpn_jax's CPU kernels, which
are custom calls that only a process that registered them can run. The "kernels" lowering keeps
them, in an artifact for platform cpu alone (its serving.json lists the custom-call targets);
`read_stablehlo` registers them before loading one.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from dpn_jax.errors import WeightsError
from dpn_jax.export.exporter import ExportOptions, Graph
from dpn_jax.export.serving import Artifact, EntryPoint, read_serving_config
from dpn_jax.ops.conv import conv_lowering
from dpn_jax.ops.cpu_kernels import cpu_kernel_targets, cpu_kernels_available

ARTIFACT_FILE = "model.stablehlo"


def write(graph: Graph, directory: Path, options: ExportOptions) -> Artifact:
    lowering = options.lowering("stablehlo")
    allowed = (
        [jax.export.DisabledSafetyCheck.custom_call(t) for t in cpu_kernel_targets()]
        if lowering == "kernels"
        else []
    )
    with conv_lowering(lowering):
        exported = jax.export.export(
            jax.jit(graph.bound()), platforms=options.platforms, disabled_checks=allowed
        )(graph.input_struct())
    (directory / ARTIFACT_FILE).write_bytes(exported.serialize())
    module = exported.mlir_module()
    return Artifact(
        [EntryPoint("main", graph.pixels_spec("NHWC"), graph.output_spec())],
        {
            "platforms": list(exported.platforms),
            "calling_convention_version": exported.calling_convention_version,
            "custom_call_targets": [t for t in cpu_kernel_targets() if f"@{t}(" in module],
        },
    )


def read_stablehlo(directory: str | os.PathLike) -> jax.export.Exported:
    """The function of a stablehlo export directory: `read_stablehlo(DIR).call(pixels)`.

    An artifact exported with dpn_jax's CPU kernels needs them registered with XLA first,
    which this does.
    """
    directory = Path(directory)
    try:
        config = read_serving_config(directory)
        serialized = (directory / ARTIFACT_FILE).read_bytes()
    except (OSError, ValueError) as error:
        raise WeightsError(
            f"{directory} is not a dpn-export stablehlo directory: {error}"
        ) from None
    if config["format"] != "stablehlo":
        raise WeightsError(f"{directory} holds a {config['format']} export, not stablehlo")
    if config["export"]["custom_call_targets"] and not cpu_kernels_available():
        raise WeightsError(f"{directory} calls dpn_jax's CPU kernels, which are not built here")
    return jax.export.deserialize(serialized)
