#!/usr/bin/env python
"""Convert DPN weights (timm / PyTorch / Hugging Face hub) to dpn_jax and back; see `--help`.

The same program as the `dpn-convert` console script (`dpn_jax.cli.launch.convert`).
"""

import sys

from dpn_jax.cli.launch import convert

if __name__ == "__main__":
    sys.exit(convert())
