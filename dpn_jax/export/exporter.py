"""`export_model`: a model (`load_model`: a directory, a tag, a hub id) -> a serving artifact
and its sidecars.

Every format exports the same function, `Graph.apply`: NHWC float32 pixels, preprocessed as
`dpn-predict` does, -> float32 logits (or probabilities, or pooled features for a headless
model), in eval mode. Options are checked, the format's optional packages looked for and the
output path vetted before the model is read or anything is traced.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from dpn_jax.data.preprocessing import Preprocessing
from dpn_jax.errors import ConfigError
from dpn_jax.export.artifact_dir import check_output, staged_output
from dpn_jax.export.serving import Artifact, EntryPoint, TensorSpec, write_serving_config
from dpn_jax.models.layers import DTYPES
from dpn_jax.models.registry import Variables
from dpn_jax.version import __version__
from dpn_jax.weights.model_dir import ModelDir
from dpn_jax.weights.pretrained import load_model

FORMATS = ("stablehlo", "onnx", "savedmodel")
# `jax.export` platform names; the default artifact runs on all three.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
EXPORT_DTYPES = ("float32", "bfloat16")
# ONNX opset of the graph: 17 is read by onnxruntime >= 1.13, TensorRT >= 8.6 and OpenVINO.
DEFAULT_OPSET = 17
MIN_OPSET = 13
# format -> (modules it needs beyond dpn_jax's own dependencies, the extra that installs them)
REQUIREMENTS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "stablehlo": ((), None),
    "onnx": (("jax2onnx", "onnx"), "onnx"),
    "savedmodel": (("tensorflow",), "savedmodel"),
}


# format -> the convolution lowerings (`dpn_jax.ops.conv.CONV_LOWERINGS`) it can take, default first
FORMAT_LOWERINGS = {
    "stablehlo": ("xla", "native", "kernels"),
    "onnx": ("native",),
    "savedmodel": ("xla", "native"),
}


@dataclass(frozen=True)
class ExportOptions:
    """How to export; `batch_size` None is a symbolic (dynamic) batch dimension."""

    batch_size: int | None = None
    img_size: int | None = None  # default: the checkpoint's test-time size, as dpn-predict
    crop_pct: float | None = None  # recorded for the server's preprocessing
    use_test_size: bool = True
    dtype: str = "float32"  # compute dtype; inputs and outputs stay float32
    softmax: bool = False  # the graph ends in a softmax (probabilities instead of logits)
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS  # stablehlo / savedmodel
    conv_lowering: str | None = None  # None: the format's default (FORMAT_LOWERINGS)
    opset: int = DEFAULT_OPSET  # onnx

    def lowering(self, format: str) -> str:
        return self.conv_lowering or FORMAT_LOWERINGS[format][0]

    def check(self, format: str) -> None:
        """ConfigError naming the first setting `format` cannot take."""
        if format not in FORMATS:
            raise ConfigError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1 (or dynamic), got {self.batch_size}")
        Preprocessing.check_overrides(self.img_size, self.crop_pct)
        if self.dtype not in EXPORT_DTYPES:
            raise ConfigError(
                f"unknown dtype {self.dtype!r}; choose from {', '.join(EXPORT_DTYPES)}"
            )
        unknown = [p for p in self.platforms if p not in PLATFORMS]
        if unknown or not self.platforms:
            raise ConfigError(
                f"unknown platform {unknown[0] if unknown else '(none)'!r}; "
                f"choose from {', '.join(PLATFORMS)}"
            )
        lowering = self.lowering(format)
        if lowering not in FORMAT_LOWERINGS[format]:
            raise ConfigError(
                f"--format {format} takes conv lowering "
                f"{' or '.join(FORMAT_LOWERINGS[format])}, not {lowering!r}"
            )
        if lowering == "kernels" and self.platforms != ("cpu",):
            raise ConfigError(
                "conv lowering 'kernels' (dpn_jax's CPU kernels) makes a CPU-only "
                "artifact: pass --platforms cpu"
            )
        if format == "onnx" and self.dtype != "float32":
            raise ConfigError(
                "onnx exports float32 only (jax2onnx 0.17 cannot convert DPN's "
                "bfloat16 graph); let the runtime lower the precision, e.g. "
                "TensorRT's --fp16 / --bf16"
            )
        if format == "onnx" and self.opset < MIN_OPSET:
            raise ConfigError(f"opset must be >= {MIN_OPSET}, got {self.opset}")


@dataclass(frozen=True)
class Graph:
    """The function every format exports: `apply(variables, pixels)`, pixels NHWC float32."""

    apply: Callable[[Variables, jax.Array], jax.Array]
    variables: Variables
    batch_size: int | None
    preprocessing: Preprocessing  # what the pixels had (resolved)
    output_name: str  # logits, probabilities or features
    output_size: int

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    def input_struct(self) -> jax.ShapeDtypeStruct:
        """The pixels' shape and dtype, with a symbolic `batch` unless the batch is fixed."""
        batch = self.batch_size or jax.export.symbolic_shape("batch")[0]
        return jax.ShapeDtypeStruct((batch, self.image_size, self.image_size, 3), jnp.float32)

    def pixels_spec(self, layout: str = "NHWC") -> TensorSpec:
        size = (self.image_size, self.image_size)
        shape = (self.batch_size, *size, 3) if layout == "NHWC" else (self.batch_size, 3, *size)
        return TensorSpec(
            "pixels",
            shape,
            "float32",
            f"{layout} RGB, preprocessed as `preprocessing` says (timm's eval transform)",
        )

    def output_spec(self) -> TensorSpec:
        meaning = {
            "logits": "class logits",
            "probabilities": "softmax over the classes",
            "features": "globally pooled features (the model has no classifier)",
        }
        return TensorSpec(
            self.output_name,
            (self.batch_size, self.output_size),
            "float32",
            meaning[self.output_name],
        )

    def bound(self) -> Callable[[jax.Array], jax.Array]:
        """`apply` with the variables as constants of the graph."""
        return lambda pixels: self.apply(self.variables, pixels)


def require_packages(format: str) -> None:
    """ConfigError naming the `pip install` that provides what `format` needs."""
    modules, extra = REQUIREMENTS[format]
    missing = [m for m in modules if not _importable(m)]
    if missing:
        raise ConfigError(
            f"--format {format} needs {' and '.join(missing)}, which are not "
            f"installed: pip install 'dpn_jax[{extra}]'"
        )


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def model_record(source: str | os.PathLike, model: ModelDir) -> dict[str, Any]:
    """serving.json's record of which model was exported."""
    return {
        "source": str(source),
        "architecture": model.architecture,
        "num_classes": model.num_classes,
        "model_kwargs": dict(model.model_kwargs),
        "weights_sha256": model.sha256,
    }


def build_graph(
    model_dir: ModelDir, preprocessing: Preprocessing, options: ExportOptions, name: str
) -> Graph:
    model = model_dir.build_model(dtype=DTYPES[options.dtype])
    if options.softmax and not model.num_classes:
        raise ConfigError(f"{name} has no classifier (num_classes=0): nothing to softmax")

    def apply(variables: Variables, pixels: jax.Array) -> jax.Array:
        out = model.apply(variables, pixels, train=False)
        return jax.nn.softmax(out, axis=-1) if options.softmax else out

    if not model.num_classes:
        output_name = "features"
    else:
        output_name = "probabilities" if options.softmax else "logits"
    size = preprocessing.image_size
    pixels = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = model_dir.variables
    output_size = jax.eval_shape(apply, variables, pixels).shape[-1]
    return Graph(apply, variables, options.batch_size, preprocessing, output_name, output_size)


def _writer(format: str) -> Callable[[Graph, Path, ExportOptions], Artifact]:
    module = importlib.import_module(f"dpn_jax.export.{format}")
    return module.write


def export_model(
    source: str | os.PathLike,
    format: str,
    output: str | os.PathLike,
    options: ExportOptions = ExportOptions(),
    *,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> Path:
    """Export `source` as `format` into the directory `output`; returns its absolute path.

    The directory holds the artifact, `serving.json` (preprocessing, inputs/outputs, class
    names) and dpn-export's manifest; it is written beside `output` and renamed into place,
    replacing an earlier export only with `overwrite`.
    """
    options.check(format)
    require_packages(format)
    output = Path(output).expanduser().absolute()
    check_output(output, overwrite)
    start = time.perf_counter()
    model_dir = load_model(source)
    try:
        preprocessing = model_dir.preprocessing.resolve(
            options.img_size, options.crop_pct, options.use_test_size
        )
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    graph = build_graph(model_dir, preprocessing, options, str(source))
    settings = {
        "batch_size": options.batch_size,
        "image_size": preprocessing.image_size,
        "dtype": options.dtype,
        "softmax": options.softmax,
        "conv_lowering": options.lowering(format),
    }
    manifest = {"format": format, "dpn_jax_version": __version__, "source": str(source)}
    with staged_output(output, manifest, overwrite) as staging:
        artifact = _writer(format)(graph, staging, options)
        write_serving_config(
            staging,
            format=format,
            entry_points=artifact.entry_points,
            preprocessing=preprocessing,
            class_names=model_dir.labels,
            model=model_record(source, model_dir),
            export={**settings, **artifact.details},
        )
    log(
        f"wrote {output} ({format}, {_describe(artifact.entry_points)}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return output


def _describe(entry_points: list[EntryPoint]) -> str:
    def shape(spec):
        return "[" + ", ".join("batch" if d is None else str(d) for d in spec.shape) + "]"

    return "; ".join(
        f"{e.name}: {e.input.name} {e.input.dtype}{shape(e.input)} -> "
        f"{e.output.name} {e.output.dtype}{shape(e.output)}"
        for e in entry_points
    )
