"""`dpn-prepare-data`: prepare a TFDS dataset once, as ArrayRecord, for training and evaluation.

    dpn-prepare-data imagenet2012 --data-dir ~/tensorflow_datasets --manual-dir ~/imagenet_tars
    dpn-prepare-data tfds:imagenette/320px --data-dir ~/tensorflow_datasets

Downloads the dataset (ImageNet: builds it from ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in the manual dir, by default <download dir>/manual) and writes it as
ArrayRecord, which training and evaluation read with random access and without TensorFlow.
This step needs TensorFlow: pip install 'dpn_jax[prepare]'. `digits` and `folder:PATH` need no
preparing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dpn_jax.cli.common import command_parser, echo, run_command


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
    args = parser.parse_args(argv)
    return run_command(parser.prog, lambda: prepare_dataset(args))


def prepare_dataset(args: argparse.Namespace) -> int:
    from dpn_jax.data.tfds_source import prepare

    where = prepare(
        args.dataset,
        data_dir=args.data_dir,
        download_dir=args.download_dir,
        manual_dir=args.manual_dir,
    )
    echo(f"{args.dataset}: ArrayRecord in {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
