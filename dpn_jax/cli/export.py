"""`dpn-export`: a model directory or pretrained tag as StableHLO, ONNX or a TF SavedModel.

    dpn-export dpn92.mx_in1k --format stablehlo --output dpn92_stablehlo
    dpn-export runs/digits/model --format onnx --output digits_onnx --softmax
    dpn-export dpn68b_ft --format savedmodel --output dpn68b_tf --batch-size 8

The output is a directory: the artifact (model.stablehlo, model.onnx or saved_model/),
serving.json (preprocessing, inputs and outputs, class names) and dpn-export's manifest.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dpn_jax.cli.common import command_parser, echo, run_command
from dpn_jax.errors import ConfigError
from dpn_jax.export.exporter import (
    DEFAULT_OPSET,
    DEFAULT_PLATFORMS,
    EXPORT_DTYPES,
    FORMATS,
    ExportOptions,
    export_model,
)
from dpn_jax.ops.conv import CONV_LOWERINGS


def _batch_size(text: str) -> int | None:
    if text == "dynamic":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'dynamic', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("dpn-export", __doc__)
    parser.add_argument(
        "source",
        help="model directory (dpn-convert or train.py output), or "
        "a model name or pretrained tag such as dpn92.mx_in1k",
    )
    parser.add_argument("--format", required=True, metavar="{" + ",".join(FORMATS) + "}")
    parser.add_argument(
        "--output", "-o", required=True, help="directory to write (must not exist, see --overwrite)"
    )
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default=None,
        metavar="N|dynamic",
        help="batch dimension of the graph (default: dynamic)",
    )
    parser.add_argument(
        "--img-size", type=int, help="input size (default: the checkpoint's test-time size)"
    )
    parser.add_argument(
        "--crop-pct",
        type=float,
        help="center-crop fraction recorded for preprocessing (default: the checkpoint's)",
    )
    parser.add_argument(
        "--use-train-size",
        action="store_true",
        help="ignore the config's test-time size/crop (as timm's scripts)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        metavar="{" + ",".join(EXPORT_DTYPES) + "}",
        help="compute dtype; inputs and outputs are float32 (default float32)",
    )
    parser.add_argument(
        "--softmax",
        action="store_true",
        help="end the graph with a softmax: probabilities instead of logits",
    )
    parser.add_argument(
        "--platforms",
        default=",".join(DEFAULT_PLATFORMS),
        help="stablehlo/savedmodel: comma-separated platforms the artifact runs "
        "on (default %(default)s)",
    )
    parser.add_argument(
        "--conv-lowering",
        metavar="{" + ",".join(CONV_LOWERINGS) + "}",
        help="how convolutions lower: xla (stablehlo/savedmodel default: per "
        "backend, no custom calls), native (one convolution op everywhere; "
        "onnx's only one, what TFLite needs), kernels (stablehlo with "
        "--platforms cpu: dpn_jax's CPU kernels, loading needs dpn_jax)",
    )
    parser.add_argument("--opset", type=int, help=f"onnx opset (default {DEFAULT_OPSET})")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT if it is an earlier dpn-export output",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(parser.prog, lambda: export_from_arguments(args))


def export_from_arguments(args: argparse.Namespace) -> int:
    if args.opset is not None and args.format != "onnx":
        raise ConfigError(f"--opset applies to --format onnx, not {args.format}")
    options = ExportOptions(
        batch_size=args.batch_size,
        img_size=args.img_size,
        crop_pct=args.crop_pct,
        use_test_size=not args.use_train_size,
        dtype=args.dtype,
        softmax=args.softmax,
        platforms=tuple(p.strip() for p in args.platforms.split(",") if p.strip()),
        conv_lowering=args.conv_lowering,
        opset=DEFAULT_OPSET if args.opset is None else args.opset,
    )
    export_model(args.source, args.format, args.output, options, overwrite=args.overwrite, log=echo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
