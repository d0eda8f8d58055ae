"""`dpn-predict`: top-k classes of images with a converted, fine-tuned or pretrained DPN.

dpn-predict --model dpn68b.ra_in1k --pretrained photos/ cat.jpg --top-k 5 --json
dpn-predict --checkpoint runs/digits/model photos/
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpn_jax.cli.common import EXIT_ERROR, command_parser, report_error, run_command
from dpn_jax.data.preprocessing import Preprocessing
from dpn_jax.errors import QUOTE_LIMIT, ConfigError, printable
from dpn_jax.infer.predict import Predictor, expand_inputs
from dpn_jax.models.registry import split_model_name
from dpn_jax.system.compilation_cache import enable_compilation_cache
from dpn_jax.weights.model_dir import ModelDir
from dpn_jax.weights.pretrained import load_model, pretrained_hub_id


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `dpn-predict` and `dpn-evaluate`: which weights, which preprocessing."""
    parser.add_argument(
        "--model",
        help="architecture or pretrained tag, e.g. dpn92.mx_in1k "
        "(with --checkpoint: optional, checked against it)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", metavar="DIR", help="converted or fine-tuned model directory"
    )
    source.add_argument(
        "--pretrained",
        action="store_true",
        help="timm's published weights for --model (downloaded once, cached)",
    )
    parser.add_argument("--img-size", type=int, help="input size (default: the checkpoint's)")
    parser.add_argument(
        "--crop-pct", type=float, help="center-crop fraction (default: the checkpoint's)"
    )
    parser.add_argument(
        "--use-train-size",
        action="store_true",
        help="ignore the config's test-time size/crop (as timm's scripts)",
    )


def load_from_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ModelDir:
    """The model the flags name (`load_model`); usage errors exit 2 before it is read."""
    if args.pretrained and not args.model:
        parser.error("--pretrained needs --model NAME_OR_TAG")
    try:
        Preprocessing.check_overrides(
            args.img_size, args.crop_pct, names={"img_size": "--img-size", "crop_pct": "--crop-pct"}
        )
    except ConfigError as error:
        parser.error(str(error))
    if args.pretrained:
        return load_model(pretrained_hub_id(args.model))
    model = load_model(Path(args.checkpoint))
    if args.model is not None and split_model_name(args.model)[0] != model.architecture:
        raise ConfigError(
            f"--model {args.model} does not match the checkpoint's architecture "
            f"{model.architecture} ({args.checkpoint})"
        )
    return model


def source_name(args: argparse.Namespace) -> str:
    """How the results name the model: the tag, or the directory as given."""
    return split_model_name(args.model)[1] if args.pretrained else args.checkpoint


def format_table(file: str, top_k: list[dict[str, Any]]) -> str:
    rows = [
        f"{p['prob']:8.4f}  {p['index']:>5}  {printable(p['label'] or '', QUOTE_LIMIT)}".rstrip()
        for p in top_k
    ]
    return "\n".join([printable(file), *rows])


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser("dpn-predict", __doc__)
    add_model_arguments(parser)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDERS")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be >= 1")
    enable_compilation_cache()  # $DPN_JAX_COMPILATION_CACHE=off disables it
    return run_command(parser.prog, lambda: predict(parser, args))


def predict(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    predictor = Predictor.from_model(
        load_from_arguments(parser, args),
        img_size=args.img_size,
        crop_pct=args.crop_pct,
        use_test_size=not args.use_train_size,
        batch_size=args.batch_size,
    )
    results, failures = [], 0
    for result in predictor.predict_files(expand_inputs(args.inputs), args.top_k):
        if result.error:
            report_error(parser.prog, result.error)
            failures += 1
        else:
            results.append({"file": result.file, "top_k": result.top_k})
            if not args.json:
                print(format_table(result.file, result.top_k), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))  # JSON escapes control characters itself
    if not results and not failures:
        report_error(parser.prog, "no images found in the given folders")
        return EXIT_ERROR
    return EXIT_ERROR if failures else 0


if __name__ == "__main__":
    sys.exit(main())
