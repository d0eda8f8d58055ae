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
import sys
import time

import jax
import numpy as np

from dpn_jax.cli.common import command_parser, echo, run_command
from dpn_jax.errors import ConfigError
from dpn_jax.system.compilation_cache import enable_compilation_cache
from dpn_jax.weights.convert import ConversionError, Variables, flax_to_timm
from dpn_jax.weights.model_dir import ModelDir
from dpn_jax.weights.pretrained import Converted, convert_source, replace_head
from dpn_jax.weights.torch_export import check_export_output, save_state_dict

VERIFY_TOLERANCE = 1e-4  # max |jax - timm| / max |timm| over the logits
VERIFY_BATCH = 2


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("dpn-convert", __doc__)
    parser.add_argument(
        "src",
        help="checkpoint file, hub repo (timm/<tag>, hf-hub:owner/name) or "
        "pretrained tag; with --to-torch, a dpn_jax model directory",
    )
    parser.add_argument(
        "--output", "-o", help="model directory to write (must not exist, see --overwrite)"
    )
    parser.add_argument(
        "--model",
        help="architecture or tag (dpn92, dpn68b.ra_in1k); default: "
        "detected from the tensor shapes (hub repos named after a tag: that tag)",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        help="classifier size; if it differs from the "
        "checkpoint's, a fresh head is initialised for fine-tuning (0: no head)",
    )
    parser.add_argument(
        "--ema", action="store_true", help="take the EMA weights of a training checkpoint"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="compare with timm on a random batch "
        f"(needs torch + timm); fail above {VERIFY_TOLERANCE:g} relative difference",
    )
    parser.add_argument(
        "--to-torch",
        metavar="OUT.safetensors",
        help="export the model directory SRC as a timm state dict instead",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output; "
        "only a model directory (or file) that dpn-convert wrote is replaced",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    conversion_flags = (
        args.output or args.model or args.num_classes is not None or args.ema or args.verify
    )
    if args.to_torch and conversion_flags:
        parser.error("--to-torch takes only SRC (a model directory) and --overwrite")
    if not args.to_torch and not args.output:
        parser.error("--output DIR is required (or --to-torch OUT.safetensors to export)")
    if args.num_classes is not None and args.num_classes < 0:
        parser.error(f"--num-classes must be >= 0, got {args.num_classes}")
    enable_compilation_cache()  # $DPN_JAX_COMPILATION_CACHE=off disables it
    command = export_to_torch if args.to_torch else convert
    return run_command(parser.prog, lambda: command(args))


def convert(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    output = ModelDir.check_output(args.output, overwrite=args.overwrite)  # before the slow part
    converted = convert_source(
        args.src, model=args.model, num_classes=args.num_classes, ema=args.ema
    )
    model_dir = converted.model_dir
    echo(
        f"{converted.source.name}: {_describe(model_dir)}, {len(converted.state_dict)} tensors, "
        f"{_size(model_dir.variables)}"
    )
    if converted.head_note:
        echo(converted.head_note)
    if args.verify:
        max_abs, relative = verify_against_timm(converted)
        echo(
            f"verify: max abs diff {max_abs:.3g}, relative {relative:.3g} vs timm "
            f"({'logits' if converted.head_note is None else 'pooled features: new head'})"
        )
        if not relative <= VERIFY_TOLERANCE:
            raise ConversionError(
                f"relative difference {relative:.3g} to timm above "
                f"{VERIFY_TOLERANCE:g}; nothing written"
            )
    model_dir.save(output, overwrite=args.overwrite)
    echo(
        f"wrote {output} in {time.perf_counter() - start:.1f} s "
        f"(source sha256 {model_dir.sha256[:12]}...)"
    )
    return 0


def export_to_torch(args: argparse.Namespace) -> int:
    """A model directory -> a safetensors timm state dict (`load_state_dict(..., strict=True)`)."""
    start = time.perf_counter()
    out = check_export_output(args.to_torch, overwrite=args.overwrite)
    model_dir = ModelDir.load(args.src)
    state_dict = flax_to_timm(model_dir.variables, model_dir.architecture, **model_dir.model_kwargs)
    save_state_dict(
        out,
        state_dict,
        architecture=model_dir.architecture,
        model_kwargs=model_dir.model_kwargs,
        overwrite=args.overwrite,
    )
    kwargs = "".join(f", {k}={v!r}" for k, v in model_dir.model_kwargs.items())
    echo(
        f"{args.src}: {_describe(model_dir)}, {len(state_dict)} tensors, "
        f"{_size(model_dir.variables)}"
    )
    echo(
        f"wrote {out} in {time.perf_counter() - start:.1f} s; load it with "
        f"timm.create_model({model_dir.architecture!r}, "
        f"num_classes={model_dir.num_classes}{kwargs})"
        f".load_state_dict(safetensors.torch.load_file({str(out)!r}))"
    )
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
        raise ConfigError("--verify needs torch and timm: pip install 'dpn_jax[torch]'") from None
    model_dir = converted.model_dir
    keep_head = converted.head_note is None
    num_classes = model_dir.num_classes if keep_head else 0
    state_dict = {
        k: torch.from_numpy(np.asarray(v))
        for k, v in converted.state_dict.items()
        if keep_head or not k.startswith("classifier.")
    }
    reference = timm.create_model(
        model_dir.architecture, num_classes=num_classes, **model_dir.model_kwargs
    ).eval()
    reference.load_state_dict(state_dict, strict=True)
    model = model_dir.build_model(num_classes=num_classes)
    variables = model_dir.variables if keep_head else replace_head(model_dir.variables, 0)

    height, width = model_dir.preprocessing.input_size
    x = (
        np.random.default_rng(0)
        .standard_normal((VERIFY_BATCH, height, width, 3))
        .astype(np.float32)
    )
    with torch.no_grad():
        expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().astype(np.float64)
    actual = np.asarray(_forward(model, variables, x), np.float64)
    max_abs = float(np.max(np.abs(actual - expected)))
    return max_abs, max_abs / float(np.max(np.abs(expected)))


def _describe(model_dir: ModelDir) -> str:
    kwargs = "".join(f" {k}={v}" for k, v in model_dir.model_kwargs.items())
    return f"{model_dir.architecture}{kwargs}, {model_dir.num_classes} classes"


def _size(variables: Variables) -> str:
    params = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(variables["params"]))
    nbytes = sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(variables))
    return f"{params:,} parameters, {nbytes / 2**20:.1f} MB"


if __name__ == "__main__":
    sys.exit(main())
