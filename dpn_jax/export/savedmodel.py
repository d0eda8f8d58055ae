"""TensorFlow SavedModel through jax2tf (native serialization), for TF Serving.

The model is the same portable StableHLO as the stablehlo format, inside TensorFlow's
`XlaCallModule` op, with the weights as TF variables. Two signatures:

* `serving_default`: `pixels`, NHWC float32, preprocessed (serving.json's recipe);
* `serving_uint8`: `images`, NHWC uint8 RGB, already resized and center-cropped; the signature
  scales and normalises them itself.

Running it needs TensorFlow with XLA (any TF >= 2.16 CPU or GPU build; `XlaCallModule` is
compiled, never interpreted). README "Exporting for serving" says what it cannot do.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from dpn_jax.export.exporter import ExportOptions, Graph
from dpn_jax.export.serving import Artifact, EntryPoint, TensorSpec
from dpn_jax.ops.conv import conv_lowering

SAVED_MODEL_DIR = "saved_model"


def write(graph: Graph, directory: Path, options: ExportOptions) -> Artifact:
    import tensorflow as tf
    from jax.experimental import jax2tf

    size = graph.image_size
    batch_dim = "batch" if graph.batch_size is None else str(graph.batch_size)
    output = graph.output_spec()
    module = tf.Module()
    module.variables_ = jax.tree_util.tree_map(
        lambda a: tf.Variable(np.asarray(a), trainable=False), graph.variables
    )
    mean, std = (
        tf.constant(np.asarray(v, np.float32))
        for v in (graph.preprocessing.mean, graph.preprocessing.std)
    )
    with conv_lowering(options.lowering("savedmodel")):
        model = jax2tf.convert(
            graph.apply,
            with_gradient=False,
            polymorphic_shapes=[None, f"({batch_dim}, {size}, {size}, 3)"],
            native_serialization_platforms=options.platforms,
        )

        @tf.function(
            autograph=False,
            input_signature=[
                tf.TensorSpec([graph.batch_size, size, size, 3], tf.float32, name="pixels")
            ],
        )
        def serve_pixels(pixels):
            return {output.name: model(module.variables_, pixels)}

        @tf.function(
            autograph=False,
            input_signature=[
                tf.TensorSpec([graph.batch_size, size, size, 3], tf.uint8, name="images")
            ],
        )
        def serve_images(images):
            pixels = (tf.cast(images, tf.float32) / 255.0 - mean) / std
            return {output.name: model(module.variables_, pixels)}

        module.serve_pixels, module.serve_images = serve_pixels, serve_images
        tf.saved_model.save(
            module,
            str(directory / SAVED_MODEL_DIR),
            signatures={
                "serving_default": serve_pixels.get_concrete_function(),
                "serving_uint8": serve_images.get_concrete_function(),
            },
        )
    images = TensorSpec(
        "images",
        (graph.batch_size, size, size, 3),
        "uint8",
        "NHWC RGB, resized and center-cropped as `preprocessing` says; the "
        "signature scales and normalises it",
    )
    return Artifact(
        [
            EntryPoint("serving_default", graph.pixels_spec("NHWC"), output),
            EntryPoint("serving_uint8", images, output),
        ],
        {"platforms": list(options.platforms), "tensorflow_version": tf.__version__},
    )
