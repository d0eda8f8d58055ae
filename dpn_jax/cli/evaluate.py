"""`dpn-evaluate`: top-1 / top-5 accuracy and loss of a DPN checkpoint on a dataset.

    dpn-evaluate --model dpn92.mx_in1k --pretrained --dataset imagenet2012 \\
        --data-dir ~/tensorflow_datasets --manual-dir ~/imagenet_tars
    dpn-evaluate --checkpoint runs/digits/model --dataset digits --json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import jax

from dpn_jax.cli.common import command_parser, echo, run_command
from dpn_jax.cli.predict import add_model_arguments, load_from_arguments, source_name
from dpn_jax.infer.evaluate import evaluate_dataset
from dpn_jax.runtime.runner import PARALLELISMS
from dpn_jax.system.compilation_cache import enable_compilation_cache


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser("dpn-evaluate", __doc__)
    add_model_arguments(parser)
    parser.add_argument(
        "--dataset", default="imagenet2012", help="imagenet2012, tfds:NAME, folder:PATH or digits"
    )
    parser.add_argument("--data-dir", help="TFDS data directory")
    parser.add_argument(
        "--manual-dir",
        help="where the ILSVRC2012 tars are (imagenet2012 is prepared from them once)",
    )
    parser.add_argument(
        "--split", help="evaluation split (default: the dataset's validation split)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="global batch size")
    parser.add_argument(
        "--parallelism",
        choices=PARALLELISMS,
        default="shard_map",
        help="how the batch is spread over the devices (same numbers either way)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    enable_compilation_cache()  # $DPN_JAX_COMPILATION_CACHE=off disables it
    return run_command(parser.prog, lambda: evaluate_model(parser, args))


def evaluate_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    loaded = load_from_arguments(parser, args)
    preprocessing = loaded.preprocessing.resolve(
        args.img_size, args.crop_pct, use_test_size=not args.use_train_size
    )
    result, skipped = evaluate_dataset(
        loaded.build_model(),
        loaded.variables,
        args.dataset,
        preprocessing,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        manual_dir=args.manual_dir,
        split=args.split,
        parallelism=args.parallelism,
        progress=not args.no_progress,
    )
    results = {
        "model": source_name(args),
        "dataset": args.dataset,
        "top1": result.top1,
        "top5": result.top5,
        "loss": result.loss,
        "count": result.count,
        "skipped": skipped,
        "img_per_sec": result.img_per_sec,
        "seconds": result.seconds,
        "img_size": preprocessing.image_size,
        "crop_pct": preprocessing.crop_pct,
        "interpolation": preprocessing.interpolation,
        "prepared": result.prepared,
    }
    if jax.process_index() == 0:
        if args.json:  # fractions, for programs
            print(json.dumps(results, indent=2))
        else:  # percent, for people
            echo(
                f"{source_name(args)} on {args.dataset}: top-1 {100 * result.top1:.3f}%  "
                f"top-5 {100 * result.top5:.3f}%  loss {result.loss:.4f}  "
                f"({result.count} images, {result.img_per_sec:.1f} img/s, "
                f"{preprocessing.image_size}px crop {preprocessing.crop_pct}"
                f"{'; ' * bool(result.prepared)}{result.prepared})"
            )
        if skipped:
            print(
                f"dpn-evaluate: warning: {skipped} undecodable images were skipped", file=sys.stderr
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
