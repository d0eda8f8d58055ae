"""Convert DPN weights between timm / PyTorch and dpn_jax model directories.

    dpn-convert timm/dpn92.mx_in1k --output dpn92_jax --verify
    dpn-convert my_run/model_best.pth.tar --ema --num-classes 10 --output dpn68b_ft
    dpn-convert dpn68b_ft --to-torch dpn68b_ft.safetensors

Sources: .safetensors, PyTorch .pth/.pt/.bin/.pth.tar (read with `torch.load(weights_only=True)`,
so a pickle cannot run code), training checkpoints (`state_dict` / `state_dict_ema` / `model`,
DDP `module.` prefixes), Cadene `pretrainedmodels` names, and hub repos (`timm/dpn92.mx_in1k`,
`hf-hub:owner/repo`, cached by huggingface_hub and usable offline with `HF_HUB_OFFLINE=1`).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from dpn_jax.runtime.compilation_cache import enable_compilation_cache
from dpn_jax.weights.sources import SAFETENSORS_SUFFIX, SourceError
from dpn_jax.weights.convert import ConversionError, Variables, flax_to_timm
from dpn_jax.weights.pretrained import (Converted, convert_source, load_model_dir, model_from_metadata, replace_head,
                                save_model_dir)

VERIFY_TOLERANCE = 1e-4  # max |jax - timm| / max |timm| over the logits
VERIFY_BATCH = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpn-convert", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("src", help="checkpoint file or hub repo; with --to-torch, a dpn_jax model directory")
    parser.add_argument("--output", "-o", help="model directory to write (must not exist, see --overwrite)")
    parser.add_argument("--model", help="architecture or tag (dpn92, dpn68b.ra_in1k); default: detected "
                        "from the tensor shapes (hub repos named after a tag: that tag)")
    parser.add_argument("--num-classes", type=int, help="classifier size; if it differs from the "
                        "checkpoint's, a fresh head is initialised for fine-tuning (0: no head)")
    parser.add_argument("--ema", action="store_true", help="take the EMA weights of a training checkpoint")
    parser.add_argument("--verify", action="store_true", help="compare with timm on a random batch "
                        f"(needs torch + timm); fail above {VERIFY_TOLERANCE:g} relative difference")
    parser.add_argument("--to-torch", metavar="OUT.safetensors",
                        help="export the model directory SRC as a timm state dict instead")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    enable_compilation_cache()  # $DPN_JAX_CACHE_DIR=off disables it
    conversion_flags = args.output or args.model or args.num_classes is not None or args.ema or args.verify
    if args.to_torch and conversion_flags:
        parser.error("--to-torch takes only SRC (a model directory) and --overwrite")
    if not args.to_torch and not args.output:
        parser.error("--output DIR is required (or --to-torch OUT.safetensors to export)")
    if args.num_classes is not None and args.num_classes < 0:
        parser.error(f"--num-classes must be >= 0, got {args.num_classes}")
    try:
        return export_to_torch(args) if args.to_torch else convert(args)
    except (SourceError, ConversionError, FileExistsError, FileNotFoundError, OSError, ValueError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1


def convert(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    output = Path(args.output)
    if output.exists() and not args.overwrite:  # fail before the slow part
        raise FileExistsError(f"{output} already exists (pass --overwrite to replace it)")
    converted = convert_source(args.src, model=args.model, num_classes=args.num_classes, ema=args.ema)
    metadata = converted.metadata
    print(f"{converted.source.name}: {_describe(metadata)}, {len(converted.state_dict)} tensors, "
          f"{_size(converted.variables)}")
    if converted.head_note:
        print(converted.head_note)
    if args.verify:
        max_abs, relative = verify_against_timm(converted)
        print(f"verify: max abs diff {max_abs:.3g}, relative {relative:.3g} vs timm "
              f"({'logits' if converted.head_note is None else 'pooled features: new head'})")
        if not relative <= VERIFY_TOLERANCE:
            print(f"dpn-convert: error: relative difference {relative:.3g} above {VERIFY_TOLERANCE:g}; "
                  f"nothing written", file=sys.stderr)
            return 1
    save_model_dir(output, converted.variables, metadata, overwrite=args.overwrite)
    print(f"wrote {output} in {time.perf_counter() - start:.1f} s "
          f"(source sha256 {metadata['sha256'][:12]}...)")
    return 0


def export_to_torch(args: argparse.Namespace) -> int:
    """A model directory -> a safetensors timm state dict (`load_state_dict(..., strict=True)`)."""
    from safetensors.numpy import save_file

    start = time.perf_counter()
    out = Path(args.to_torch)
    if not out.name.endswith(SAFETENSORS_SUFFIX):
        raise ValueError(f"--to-torch {out}: the export is a {SAFETENSORS_SUFFIX} file")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    if not Path(args.src).is_dir():
        raise FileNotFoundError(f"{args.src} is not a dpn_jax model directory")
    variables, metadata = load_model_dir(args.src)
    state_dict = flax_to_timm(variables, metadata["architecture"], **metadata["model_kwargs"])
    staging = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file(state_dict, staging, metadata={"format": "pt"})
        os.replace(staging, out)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    kwargs = "".join(f", {k}={v!r}" for k, v in metadata["model_kwargs"].items())
    print(f"{args.src}: {_describe(metadata)}, {len(state_dict)} tensors, {_size(variables)}")
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s; load it with "
          f"timm.create_model({metadata['architecture']!r}, num_classes={metadata['num_classes']}{kwargs})"
          f".load_state_dict(safetensors.torch.load_file({str(out)!r}))")
    return 0


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, variables: Variables, x: np.ndarray) -> jax.Array:
    return model.apply(variables, x)


def verify_against_timm(converted: Converted) -> tuple[float, float]:
    """(max abs, relative) difference between dpn_jax and timm on the same random batch.

    timm gets the source tensors as read; with a replaced head both sides run without a
    classifier and the pooled features are compared.
    """
    try:
        import timm
        import torch
    except ImportError:
        raise SourceError("--verify needs torch and timm: pip install 'dpn_jax[torch]'") from None
    metadata = converted.metadata
    keep_head = converted.head_note is None
    num_classes = metadata["num_classes"] if keep_head else 0
    state_dict = {k: torch.from_numpy(np.asarray(v)) for k, v in converted.state_dict.items()
                  if keep_head or not k.startswith("classifier.")}
    reference = timm.create_model(metadata["architecture"], num_classes=num_classes,
                                  **metadata["model_kwargs"]).eval()
    reference.load_state_dict(state_dict, strict=True)
    model = model_from_metadata(metadata, num_classes=num_classes)
    variables = converted.variables if keep_head else replace_head(converted.variables, 0)

    height, width = metadata["pretrained_cfg"]["input_size"]
    x = np.random.default_rng(0).standard_normal((VERIFY_BATCH, height, width, 3)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().astype(np.float64)
    actual = np.asarray(_forward(model, variables, x), np.float64)
    max_abs = float(np.max(np.abs(actual - expected)))
    return max_abs, max_abs / float(np.max(np.abs(expected)))


def _describe(metadata: dict) -> str:
    kwargs = "".join(f" {k}={v}" for k, v in metadata["model_kwargs"].items())
    return f"{metadata['architecture']}{kwargs}, {metadata['num_classes']} classes"


def _size(variables: Variables) -> str:
    params = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(variables["params"]))
    nbytes = sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(variables))
    return f"{params:,} parameters, {nbytes / 2**20:.1f} MB"


if __name__ == "__main__":
    sys.exit(main())
