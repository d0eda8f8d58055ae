"""`dpn-prepare-data`: prepare a TFDS dataset once, as ArrayRecord, for training and evaluation.

    dpn-prepare-data imagenet2012 --data-dir ~/tensorflow_datasets --manual-dir ~/imagenet_tars
    dpn-prepare-data tfds:imagenette/320px --data-dir ~/tensorflow_datasets
    dpn-prepare-data imagenet2012 --data-dir ~/tensorflow_datasets --resize-shorter 256

Downloads the dataset (ImageNet: builds it from ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in the manual dir, by default <download dir>/manual) and writes it as
ArrayRecord, which training and evaluation read with random access and without TensorFlow.
This step needs TensorFlow: pip install 'dpn_jax[prepare]'. `digits` and `folder:PATH` need no
preparing.

With --resize-shorter N it then writes a copy whose JPEGs are re-encoded at a shorter side of N
pixels (never upscaled; --quality Q, default 90) into its own data dir (--output-data-dir,
default DATA_DIR/dpn_jax-shorterN-qQ): training decodes such images about twice as fast; train
with data_dir set to the copy. The trainer's first line says the images were pre-resized.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dpn_jax.cli.common import command_parser, echo, run_command
from dpn_jax.data.resized import DEFAULT_QUALITY, check_resize_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser("dpn-prepare-data", __doc__)
    parser.add_argument("dataset", help="imagenet2012 or tfds:NAME")
    parser.add_argument(
        "--data-dir", help="TFDS data directory (default: TFDS's, ~/tensorflow_datasets)"
    )
    parser.add_argument("--download-dir", help="where downloads go (default: DATA_DIR/downloads)")
    parser.add_argument(
        "--manual-dir",
        help="where manually downloaded files are, e.g. the "
        "ILSVRC2012 tars (default: DOWNLOAD_DIR/manual)",
    )
    parser.add_argument(
        "--resize-shorter",
        type=int,
        metavar="N",
        help="also write a copy with images resized to this shorter side (default: none)",
    )
    parser.add_argument(
        "--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality of the resized copy"
    )
    parser.add_argument(
        "--output-data-dir",
        help="data dir of the resized copy (default: DATA_DIR/dpn_jax-shorterN-qQ)",
    )
    args = parser.parse_args(argv)
    return run_command(parser.prog, lambda: prepare_dataset(args))


def prepare_dataset(args: argparse.Namespace) -> int:
    from dpn_jax.data.tfds_source import prepare, prepare_resized

    if args.resize_shorter is not None:
        check_resize_settings(args.resize_shorter, args.quality)  # before downloading anything
    where = prepare(
        args.dataset,
        data_dir=args.data_dir,
        download_dir=args.download_dir,
        manual_dir=args.manual_dir,
    )
    echo(f"{args.dataset}: ArrayRecord in {where}")
    if args.resize_shorter is not None:
        root, where = prepare_resized(
            args.dataset,
            data_dir=args.data_dir,
            shorter=args.resize_shorter,
            quality=args.quality,
            output_data_dir=args.output_data_dir,
        )
        echo(
            f"{args.dataset}: resized to a {args.resize_shorter}-pixel shorter side, quality "
            f"{args.quality}, in {where}; train on it with --config.data_dir={root}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
