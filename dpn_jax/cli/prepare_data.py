"""`dpn-prepare-data`: prepare a TFDS dataset once, as ArrayRecord, for training and evaluation.

    dpn-prepare-data imagenet2012 --data-dir ~/tensorflow_datasets --manual-dir ~/imagenet_tars
    dpn-prepare-data tfds:imagenette/320px --data-dir ~/tensorflow_datasets
    dpn-prepare-data imagenet2012 --data-dir ~/tensorflow_datasets --resize-shorter 256

Downloads the dataset (ImageNet: builds it from ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in the manual dir, by default <download dir>/manual) and writes it as
ArrayRecord, which training and evaluation read with random access and without TensorFlow.
This step needs TensorFlow: pip install 'dpn_jax[prepare]'. `digits` and `folder:PATH` need no
preparing.

With --resize-shorter N it then also writes a copy whose images are re-encoded as JPEG at a
shorter side of N pixels (aspect kept, never upscaled; --quality Q, default 90) into a TFDS
data dir of its own (--output-data-dir, default DATA_DIR/dpn_jax-shorterN-qQ); the original
stays as it is. Fewer pixels to decode per image means fewer cores per accelerator (README,
"Datasets"); train or evaluate with the copy's data dir (--config.data_dir / --data-dir). The
trainer's first line and dpn-evaluate's result name N and Q.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dpn_jax.cli.common import command_parser, echo, run_command
from dpn_jax.data.resized import DEFAULT_QUALITY, check_resize_settings
from dpn_jax.errors import ConfigError


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
        help="also write a copy with images re-encoded at this shorter side in pixels (never "
        "upscaled; default: no copy)",
    )
    parser.add_argument(
        "--quality",
        type=int,
        metavar="Q",
        help=f"JPEG quality of the resized copy, 1-100 (default: {DEFAULT_QUALITY})",
    )
    parser.add_argument(
        "--output-data-dir",
        metavar="DIR",
        help="data dir of the resized copy (default: DATA_DIR/dpn_jax-shorterN-qQ)",
    )
    args = parser.parse_args(argv)
    return run_command(parser.prog, lambda: prepare_dataset(args))


def prepare_dataset(args: argparse.Namespace) -> int:
    from dpn_jax.data.tfds_source import prepare, prepare_resized

    if args.resize_shorter is None and (args.quality is not None or args.output_data_dir):
        raise ConfigError(
            "--quality and --output-data-dir are for the resized copy: add --resize-shorter N"
        )
    quality = DEFAULT_QUALITY if args.quality is None else args.quality
    if args.resize_shorter is not None:
        check_resize_settings(args.resize_shorter, quality)  # before downloading anything
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
            quality=quality,
            output_data_dir=args.output_data_dir,
        )
        echo(
            f"{args.dataset}: resized to a {args.resize_shorter}-pixel shorter side, quality "
            f"{quality}, in {where}; train on it with --config.data_dir={root}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
