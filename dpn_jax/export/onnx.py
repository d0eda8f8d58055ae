"""ONNX through jax2onnx: a graph for ONNX Runtime, TensorRT or OpenVINO, dynamic batch, NCHW input.

The input is NCHW, as timm's ONNX export and most ONNX tooling expect; the graph transposes it
once. Convolutions use the "native" lowering (one Conv with `group`, no per-backend branches,
which ONNX cannot express). Two workarounds for jax2onnx 0.17.1:

* JAX traces the model and jax2onnx converts the resulting jaxpr: jax2onnx's patch of Flax's
  `max_pool` accepts neither a positional window nor explicit padding pairs, as DPN's stem uses.
* jax2onnx lowers an NHWC max pool to a MaxPool with four spatial axes (N, H, W, C), which
  ONNX Runtime rejects ("Unsupported pooling size"); `_two_dimensional_max_pools` rewrites it
  into transpose, 2-D MaxPool, transpose.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import TYPE_CHECKING

import jax
from jax.extend.core import jaxpr_as_fun

from dpn_jax.errors import WeightsError
from dpn_jax.export.exporter import ExportOptions, Graph
from dpn_jax.export.serving import Artifact, EntryPoint, read_serving_config
from dpn_jax.ops.conv import conv_lowering

if TYPE_CHECKING:  # optional packages (the onnx extra), imported where they are used
    import onnx
    import onnxruntime

ARTIFACT_FILE = "model.onnx"


def write(graph: Graph, directory: Path, options: ExportOptions) -> Artifact:
    import jax2onnx
    import onnx

    pixels = graph.input_struct()  # one symbolic batch dimension for both traces
    with conv_lowering("native"):
        jaxpr = jax.make_jaxpr(graph.bound())(pixels)
    output = graph.output_spec()
    model = jax2onnx.to_onnx(
        jaxpr_as_fun(jaxpr),
        [pixels],
        opset=options.opset,
        model_name="dpn",
        inputs_as_nchw=[0],
        input_names=["pixels"],
        output_names=[output.name],
    )
    model = _two_dimensional_max_pools(model)
    onnx.checker.check_model(model)
    onnx.save_model(model, directory / ARTIFACT_FILE)
    return Artifact(
        [EntryPoint("main", graph.pixels_spec("NCHW"), output)],
        {"opset": options.opset, "converter": f"jax2onnx {importlib.metadata.version('jax2onnx')}"},
    )


def _two_dimensional_max_pools(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each MaxPool over (1, 1, N, H, W, C) with a (1, kh, kw, 1) window as an NCHW 2-D MaxPool.

    jax2onnx lowers `reduce_window_max` by prepending two unit axes and pooling over all of the
    operand's axes; the N and C axes of an image max pool have window 1, stride 1, no padding.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    nodes = []
    for node in graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        window = list(attributes.get("kernel_shape", ()))
        if node.op_type != "MaxPool" or len(window) <= 3:
            nodes.append(node)
            continue
        strides = list(attributes.get("strides", [1] * 4))
        pads = list(attributes.get("pads", [0] * 8))
        if (
            len(window) != 4
            or window[0] != 1
            or window[3] != 1
            or strides[0] != 1
            or strides[3] != 1
            or pads[0]
            or pads[3]
            or pads[4]
            or pads[7]
            or any(v != 1 for v in attributes.get("dilations", [1] * 4))
        ):
            raise NotImplementedError(
                f"jax2onnx emitted a MaxPool dpn_jax cannot rewrite: {node.name} {attributes}"
            )
        name = node.name
        unit_axes = helper.make_tensor(f"{name}_unit_axes", TensorProto.INT64, [2], [0, 1])
        graph.initializer.append(unit_axes)
        nodes += [
            helper.make_node("Squeeze", [node.input[0], unit_axes.name], [f"{name}_nhwc"]),
            helper.make_node("Transpose", [f"{name}_nhwc"], [f"{name}_nchw"], perm=[0, 3, 1, 2]),
            helper.make_node(
                "MaxPool",
                [f"{name}_nchw"],
                [f"{name}_pooled"],
                kernel_shape=window[1:3],
                strides=strides[1:3],
                pads=[pads[1], pads[2], pads[5], pads[6]],
            ),
            helper.make_node(
                "Transpose", [f"{name}_pooled"], [f"{name}_pooled_nhwc"], perm=[0, 2, 3, 1]
            ),
            helper.make_node(
                "Unsqueeze", [f"{name}_pooled_nhwc", unit_axes.name], [node.output[0]]
            ),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def onnxruntime_session(
    directory: str | os.PathLike, threads: int = 0
) -> onnxruntime.InferenceSession:
    """An `onnxruntime.InferenceSession` (CPU) for an onnx export directory.

    Its input `pixels` is NCHW: `session.run(None, {"pixels": nhwc.transpose(0, 3, 1, 2)})`.
    """
    import onnxruntime

    directory = Path(directory)
    try:
        config = read_serving_config(directory)
    except (OSError, ValueError) as error:
        raise WeightsError(f"{directory} is not a dpn-export onnx directory: {error}") from None
    if config["format"] != "onnx":
        raise WeightsError(f"{directory} holds a {config['format']} export, not onnx")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(
        str(directory / ARTIFACT_FILE), options, providers=["CPUExecutionProvider"]
    )
