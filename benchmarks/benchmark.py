"""dpn_jax against timm in the same run: throughput, compile time, creation time, peak memory.

    python benchmarks/benchmark.py --models dpn68 --batch-sizes 16 --resolutions 224
    python benchmarks/benchmark.py --engines dpn_jax dpn_jax_plain dpn_jax_nnx timm_cl

For every (model, batch, resolution) each engine (dpn_jax, timm eager NCHW, timm eager
channels_last, timm torch.compile; on request the pmap adapter, the plain step on the Linen
and the NNX model, and for inference dpn_jax's exports: ONNX in ONNX Runtime, StableHLO through
`jax.export`) and mode runs in its own worker process on the same threads; the driver times
them in interleaved rounds, so load from other processes hits every engine alike. Peak host
memory is measured in one fresh worker per engine and mode; on a GPU the timing workers also
report the device's peak. Prints a table with the ratios to the first dpn_jax engine and writes
every number to JSON.

Every row also says how much arithmetic an image costs and how fast each engine does it: the
reference FLOPs per image (PyTorch's count of timm's convolutions and matmuls, as timm's GMACs
count them: the forward for inference, forward and backward for a training step), XLA's own
count of the compiled dpn_jax step as a cross-check, and GFLOP/s = reference FLOPs per image x
images/s, to hold against the machine's matmul peak (benchmarks/peak_flops.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

# The dpn_jax engines are the trainer's and dpn-predict's steps under each parallelism, and a
# plain step (one device, forward + loss + backward + optax) on the Linen and the NNX model.
# dpn_jax's exports (inference only; opt-in with --engines): ONNX in ONNX Runtime, StableHLO in
# JAX with each convolution lowering (`stablehlo`: the default, portable one)
EXPORT_ENGINES = ("onnxruntime", "stablehlo", "stablehlo_native", "stablehlo_kernels")
DEFAULT_ENGINES = ("dpn_jax", "timm", "timm_cl", "timm_compile")
ENGINES = DEFAULT_ENGINES + ("dpn_jax_pmap", "dpn_jax_plain", "dpn_jax_nnx") + EXPORT_ENGINES
MODES = ("infer", "train")
# Large buffers come from mmap and go back to the OS when freed, so resident memory tracks what
# each framework really holds (set for the memory workers only: it costs page faults).
MEMORY_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


@dataclass
class Result:
    engine: str
    mode: str
    model: str
    batch: int
    resolution: int
    dtype: str = "float32"
    backend: str = ""
    create_s: float | None = None
    compile_s: float | None = None
    step_ms: list[float] = field(default_factory=list)
    img_per_s: float | None = None
    peak_rss_mib: float | None = None
    step_rss_increase_mib: float | None = None
    device_peak_mib: float | None = None
    xla_temp_mib: float | None = None
    error: str | None = None
    # Reference FLOPs per image (`reference_flops`), XLA's count of a dpn_jax step divided by its
    # images (`xla_flops_per_image`), reference FLOPs per image x img/s / 1e9.
    flops_per_img: float | None = None
    xla_flops_per_img: float | None = None
    gflop_per_s: float | None = None


# ---------------------------------------------------------------------------------------------
# Engines: each builds a model and returns `step()`, a callable that runs one batch to completion.


class Engine:
    """`dtype` is the compute dtype: bfloat16 means dpn_jax's `dtype=bfloat16` (float32
    parameters) against timm under `torch.autocast(dtype=torch.bfloat16)`, i.e. AMP."""

    def __init__(
        self,
        name: str,
        mode: str,
        model: str,
        batch: int,
        resolution: int,
        dtype: str = "float32",
        remat: bool = False,
    ):
        self.result = Result(name, mode, model, batch, resolution, dtype)
        self.mode, self.model, self.batch, self.resolution, self.dtype, self.remat = (
            mode,
            model,
            batch,
            resolution,
            dtype,
            remat,
        )
        self.step: Callable[[], None] | None = None
        self.devices = 1  # the compiled program runs on each device with batch / devices images

    def build(self) -> None:
        raise NotImplementedError

    def compile_jax(self, fn, args) -> Any:
        """`fn` compiled for `args`, its compile time and XLA temporaries recorded."""
        t0 = time.perf_counter()
        compiled = self.compiled = fn.lower(*args).compile()
        self.result.compile_s = time.perf_counter() - t0
        memory = compiled.memory_analysis()
        if memory is not None:
            self.result.xla_temp_mib = memory.temp_size_in_bytes / 2**20
        self.result.xla_flops_per_img = xla_flops_per_image(compiled, self.batch // self.devices)
        return compiled


def trainer_optimizer(batch: int, num_classes: int = 1000) -> tuple[Any, Any, Any]:
    """The trainer's step settings for the training benchmarks (timm's SGD: momentum 0.9, weight
    decay 1e-4 off the norms and biases; a constant LR of 0.1), its optax transform and LR
    schedule: the same update in every dpn_jax engine."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import default  # the trainer's defaults (the repository's configs/)
    from dpn_jax.train.config import train_settings
    from dpn_jax.train.optim import create_optimizer

    config = default.get_config()
    config.update(
        batch_size=batch,
        base_batch_size=batch,
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        schedule="constant",
        warmup_epochs=0.0,
    )
    settings = train_settings(config, steps_per_epoch=1000, num_classes=num_classes)
    tx, schedule = create_optimizer(settings.optimizer, settings.schedule)
    return settings.step, tx, schedule


class JaxEngine(Engine):
    """dpn_jax as `train.py` and `dpn-predict` run it: the runner's step over every device
    (`dpn_jax`: jit + shard_map; `dpn_jax_pmap`: the pmap adapter), uint8 images normalised on
    the device, the trainer's SGD step (momentum, masked weight decay, finiteness checks)."""

    def build(self) -> None:
        import jax
        import jax.numpy as jnp
        import numpy as np

        import dpn_jax
        from dpn_jax.infer.predict import make_predict_step
        from dpn_jax.runtime.runner import REPLICATED, SHARDED, Runner
        from dpn_jax.train.state import create_train_state
        from dpn_jax.train.step import compile_train_step, make_train_step

        jnp.zeros(()).block_until_ready()  # backend start-up is not model creation
        self.result.backend = jax.default_backend()
        runner = Runner("pmap" if self.result.engine == "dpn_jax_pmap" else "shard_map")
        self.devices = runner.num_devices
        t0 = time.perf_counter()
        model, variables = dpn_jax.create_model(
            self.model, dtype=jnp.dtype(self.dtype), remat=self.remat, axis_name=runner.axis_name
        )
        jax.block_until_ready(variables)
        self.result.create_s = time.perf_counter() - t0

        cfg = dpn_jax.pretrained_cfg(self.model)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (self.batch, self.resolution, self.resolution, 3), np.uint8)
        if self.mode == "infer":
            fn = runner.compile(
                make_predict_step(model, cfg["mean"], cfg["std"]),
                in_specs=(REPLICATED, SHARDED),
                out_specs=SHARDED,
            )
            args = (runner.replicate(variables), runner.put_batch(images))
        else:
            step_settings, tx, schedule = trainer_optimizer(self.batch)
            state = create_train_state(variables, tx, seed=0, use_ema=False)
            fn = compile_train_step(
                runner, make_train_step(model, tx, schedule, step_settings, cfg["mean"], cfg["std"])
            )
            labels = rng.integers(0, 1000, self.batch).astype(np.int32)
            args = (runner.replicate(state), runner.put_batch({"image": images, "label": labels}))

        compiled = self.compile_jax(fn, args)
        state = list(args)

        def step() -> None:
            if self.mode == "infer":
                compiled(*state).block_until_ready()
            else:
                state[0], metrics = compiled(*state)
                metrics["loss"].block_until_ready()

        self.step = step


class PlainEngine(Engine):
    """`dpn_jax_plain` (Linen) and `dpn_jax_nnx` (NNX, `NnxEngine`): the same plain step as a
    user writes it: one device, no `shard_map`, uint8 images normalised on the device; training
    is forward, softmax cross-entropy, backward and the trainer's optax transform, the model's
    state donated (no collectives, metrics, finiteness check or EMA). The two differ only in the
    model API, so dpn_jax_plain / dpn_jax_nnx is Linen against NNX, and dpn_jax / dpn_jax_plain
    what the trainer's step costs over a plain one (BENCHMARKS.md, "The trainer's step")."""

    # True: the step returns (new state, output); False: it updates its state in place (NNX).
    returns_state = True

    def build(self) -> None:
        import jax
        import jax.numpy as jnp
        import numpy as np
        import optax

        import dpn_jax
        from dpn_jax.data.transforms import normalize

        jnp.zeros(()).block_until_ready()  # backend start-up is not model creation
        self.result.backend = jax.default_backend()
        t0 = time.perf_counter()
        state = self.create(jnp.dtype(self.dtype))
        jax.block_until_ready(jax.tree.leaves(state))
        self.result.create_s = time.perf_counter() - t0

        cfg = dpn_jax.pretrained_cfg(self.model)
        rng = np.random.default_rng(0)
        shape = (self.batch, self.resolution, self.resolution, 3)
        images = jax.device_put(rng.integers(0, 256, shape, np.uint8))
        inputs = lambda images: normalize(images, cfg["mean"], cfg["std"], jnp.dtype(self.dtype))
        if self.mode == "infer":
            fn, args = self.infer_step(inputs), [state, images]
        else:
            labels = jax.device_put(rng.integers(0, 1000, self.batch).astype(np.int32))
            loss = lambda logits, labels: optax.softmax_cross_entropy_with_integer_labels(
                logits, labels
            ).mean()
            tx = trainer_optimizer(self.batch)[1]
            fn, state = self.train_step(state, tx, inputs, loss)
            args = [state, images, labels]
        compiled = self.compile_jax(fn, args)

        def step() -> None:
            out = compiled(*args)
            if self.returns_state and self.mode == "train":
                args[0], out = out
            jax.block_until_ready(out)

        self.step = step

    # The model API (Linen here, NNX in `NnxEngine`): its state, created; the jitted
    # inference `(state, images) -> probabilities`; the jitted, donating training step
    # `(state, images, labels) -> loss` with its initial state.

    def create(self, dtype: Any) -> Any:
        import dpn_jax

        self.net, variables = dpn_jax.create_model(self.model, dtype=dtype, remat=self.remat)
        return variables

    def infer_step(self, inputs: Callable) -> Any:
        import jax

        return jax.jit(
            lambda variables, images: jax.nn.softmax(
                self.net.apply(variables, inputs(images), train=False), axis=-1
            )
        )

    def train_step(self, variables: Any, tx: Any, inputs: Callable, loss: Callable) -> Any:
        import jax
        import optax

        def step(state, images, labels):
            def loss_fn(params):
                logits, new_vars = self.net.apply(
                    {"params": params, "batch_stats": state["batch_stats"]},
                    inputs(images),
                    train=True,
                    mutable=["batch_stats"],
                )
                return loss(logits, labels), new_vars["batch_stats"]

            (value, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            return {"params": params, "batch_stats": stats, "opt_state": opt_state}, value

        state = {**variables, "opt_state": tx.init(variables["params"])}
        return jax.jit(step, donate_argnums=0), state


class NnxEngine(PlainEngine):
    """`dpn_jax_nnx`: `PlainEngine`'s step on the NNX model (`dpn_jax.nnx`) as an NNX user
    writes it: `nnx.Optimizer`, `nnx.value_and_grad`, `model.train()`, `nnx.jit` in tree mode
    (`graph=False`: graph mode's per-call traversal of the module costs more, BENCHMARKS.md,
    "Flax NNX")."""

    returns_state = False

    def create(self, dtype: Any) -> Any:
        from dpn_jax import nnx as dpn_nnx

        return dpn_nnx.create_model(self.model, dtype=dtype, remat=self.remat)

    def infer_step(self, inputs: Callable) -> Any:
        import jax
        from flax import nnx

        return nnx.jit(
            lambda model, images: jax.nn.softmax(model(inputs(images)), axis=-1), graph=False
        )

    def train_step(self, model: Any, tx: Any, inputs: Callable, loss: Callable) -> Any:
        from flax import nnx

        def step(state, images, labels):
            model, optimizer = state
            value, grads = nnx.value_and_grad(lambda model: loss(model(inputs(images)), labels))(
                model
            )
            optimizer.update(model, grads)
            return value

        model.train()
        state = (model, nnx.Optimizer(model, tx, wrt=nnx.Param))
        return nnx.jit(step, donate_argnums=0, graph=False), state


class TimmEngine(Engine):
    def build(self) -> None:
        import timm
        import torch

        channels_last = self.result.engine in ("timm_cl", "timm_compile")
        self.result.backend = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(self.result.backend)
        torch.backends.cudnn.benchmark = True  # as timm's train.py
        autocast = lambda: torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"
        )
        t0 = time.perf_counter()
        model = timm.create_model(self.model).to(device)
        self.result.create_s = time.perf_counter() - t0
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        x = torch.randn(self.batch, 3, self.resolution, self.resolution, device=device).contiguous(
            memory_format=memory_format
        )
        y = torch.randint(0, 1000, (self.batch,), device=device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        if self.mode == "infer":
            model.eval()

            def run() -> None:
                with torch.inference_mode(), autocast():
                    net(x)
                sync()
        else:
            model.train()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

            def run() -> None:
                optimizer.zero_grad(set_to_none=True)
                with autocast():
                    loss = torch.nn.functional.cross_entropy(net(x), y)
                loss.backward()
                optimizer.step()
                sync()

        net = model
        if self.result.engine == "timm_compile":
            net = torch.compile(model)
            t0 = time.perf_counter()
            run()  # compiles
            self.result.compile_s = time.perf_counter() - t0
        self.step = run


class ExportedEngine(Engine):
    """A `dpn-export` artifact of the model (dynamic batch), loaded without dpn_jax's model code.

    `onnxruntime`: the ONNX export (NCHW input) in ONNX Runtime's CPU provider, with as many
    threads as the worker has cores; `stablehlo`: the StableHLO export through
    `jax.export.deserialize`, with the portable convolution lowering (`stablehlo_native`: one
    grouped convolution op per layer; `stablehlo_kernels`: a CPU-only artifact calling dpn_jax's
    kernels). `create s` is `create_model` plus the export (jax2onnx's own start-up included),
    `compile s` loading the artifact (ONNX Runtime's graph optimisation, XLA's compile).
    Inference only.
    """

    def build(self) -> None:
        import jax
        import numpy as np

        import dpn_jax
        from dpn_jax.data.preprocessing import Preprocessing
        from dpn_jax.export import ExportOptions, export_model, read_stablehlo
        from dpn_jax.export.exporter import DEFAULT_PLATFORMS
        from dpn_jax.export.onnx import onnxruntime_session
        from dpn_jax.models.registry import split_model_name
        from dpn_jax.weights.model_dir import ModelDir

        if self.mode != "infer" or self.dtype != "float32":
            raise ValueError(f"the {self.result.engine} engine runs float32 inference only")
        self.result.backend = (
            "cpu" if self.result.engine == "onnxruntime" else jax.default_backend()
        )
        format = "onnx" if self.result.engine == "onnxruntime" else "stablehlo"
        arch, tag = split_model_name(self.model)
        x = np.random.default_rng(0).standard_normal(
            (self.batch, self.resolution, self.resolution, 3), dtype=np.float32
        )
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            _, variables = dpn_jax.create_model(self.model)
            ModelDir(
                architecture=arch,
                num_classes=1000,
                preprocessing=Preprocessing.of_model(self.model),
                variables=variables,
                source=self.model,
            ).save(f"{tmp}/model")
            lowering = self.result.engine.partition("_")[2] or None
            export_model(
                f"{tmp}/model",
                format,
                f"{tmp}/{format}",
                ExportOptions(
                    img_size=self.resolution,
                    conv_lowering=lowering,
                    platforms=("cpu",) if lowering == "kernels" else DEFAULT_PLATFORMS,
                ),
            )
            self.result.create_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            if format == "onnx":
                session = onnxruntime_session(f"{tmp}/onnx", threads=len(os.sched_getaffinity(0)))
                nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
                self.step = lambda: session.run(None, {"pixels": nchw})
            else:
                pixels = jax.device_put(x)
                compiled = jax.jit(read_stablehlo(f"{tmp}/stablehlo").call).lower(pixels).compile()
                self.step = lambda: compiled(pixels).block_until_ready()
            self.result.compile_s = time.perf_counter() - t0


def engine_class(name: str) -> type[Engine]:
    return (
        NnxEngine
        if name == "dpn_jax_nnx"
        else PlainEngine
        if name == "dpn_jax_plain"
        else JaxEngine
        if name.startswith("dpn_jax")
        else ExportedEngine
        if name in EXPORT_ENGINES
        else TimmEngine
    )


def make_engine(args: argparse.Namespace) -> Engine:
    """The one engine and mode a worker's command line names."""
    name = args.engines[0]
    return engine_class(name)(
        name,
        args.modes[0],
        args.models[0],
        args.batch_sizes[0],
        args.resolutions[0],
        args.dtype,
        args.remat,
    )


# ---------------------------------------------------------------------------------------------
# FLOPs per image: the arithmetic a step must do, whichever engine does it.


def _conv_backward_flops(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: int,
    output_mask: list[bool],
    **kwargs: Any,
) -> int:
    """A convolution's input gradient and weight gradient each cost its forward FLOPs.

    Replaces torch.utils.flop_counter's formula, whose weight gradient ignores `groups` and so
    counts DPN's grouped 3x3 convolutions' weight gradients 32x (pytorch/pytorch#183405 fixes it
    upstream); the forward count from the weight's shape is right for grouped convolutions.
    """
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (bool(output_mask[0]) + bool(output_mask[1]))


def reference_flops(model: str, resolution: int, mode: str) -> float:
    """FLOPs per image of timm's `model`: `torch.utils.flop_counter`'s count of convolutions and
    matmuls (2 per multiply-add, as timm's GMACs x 2; normalisation, activations and the
    optimizer's update are not counted), for the forward (`infer`) or the forward and backward
    of the cross-entropy loss (`train`: what a training step computes). Traced on the meta
    device: shapes only, no arithmetic, so it is cheap."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = timm.create_model(model)
        x = torch.empty(1, 3, resolution, resolution)
        counter = FlopCounterMode(
            display=False,
            custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops},
        )
        with counter:
            if mode == "infer":
                with torch.no_grad():
                    net.eval()(x)
            else:
                loss = torch.nn.functional.cross_entropy(net.train()(x), torch.zeros(1).long())
                loss.backward()
    return float(counter.get_total_flops())


def xla_flops_per_image(compiled: Any, images: int) -> float | None:
    """XLA's own FLOP count of a compiled program (per device) over the images it processes.

    A cross-check of `reference_flops`, not a substitute: XLA counts the elementwise work too,
    and nothing inside custom calls (dpn_jax's CPU convolution kernels).
    """
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = (cost or {}).get("flops")
    return flops / images if flops and flops > 0 else None


def flops_worker(args: argparse.Namespace) -> list[Result]:
    """The reference FLOPs per image for the worker's model, resolution and every mode."""
    model, resolution = args.models[0], args.resolutions[0]
    return [
        Result(
            "timm",
            mode,
            model,
            1,
            resolution,
            flops_per_img=reference_flops(model, resolution, mode),
        )
        for mode in args.modes
    ]


def _run_flops_worker(args: argparse.Namespace, model: str, resolution: int) -> dict[str, float]:
    """{mode: reference FLOPs per image}, counted in a worker so that the driver never imports
    torch; empty (GFLOP/s not reported) where it fails, e.g. without torch and timm."""
    cmd = _worker_command("flops", args, model, 1, resolution, ["timm"], args.modes)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(f"FLOP count worker exited {proc.returncode}: no GFLOP/s", file=sys.stderr)
        return {}
    return {r["mode"]: r["flops_per_img"] for r in json.loads(proc.stdout)}


def _add_flops(results: list[Result], flops: dict[str, float]) -> list[Result]:
    for r in results:
        r.flops_per_img = flops.get(r.mode)
        if r.flops_per_img and r.img_per_s:
            r.gflop_per_s = r.flops_per_img * r.img_per_s / 1e9
    return results


# ---------------------------------------------------------------------------------------------
# Workers (run in a subprocess each so every measurement starts from a clean process).


def _rss_mib(field_name: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


def _error_text(e: Exception) -> str:
    """An engine that cannot run here is reported in one line of the table, not fatal."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def timing_worker(args: argparse.Namespace) -> list[Result]:
    """One engine and mode: build, warm up, then time one step per `step` line on stdin.

    Each engine runs in its own process, as a user runs one framework at a time: XLA's step
    right after a PyTorch step measured up to 1.7x slower (BENCHMARKS.md, "Why one process per
    engine").
    """
    engine = make_engine(args)
    try:
        engine.build()
        for _ in range(args.warmup):
            engine.step()
    except Exception as e:
        engine.result.error = _error_text(e)
    print("failed" if engine.result.error else "ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        for _ in range(args.settle_steps):
            engine.step()
        t0 = time.perf_counter()
        engine.step()
        print((time.perf_counter() - t0) * 1e3, flush=True)
    if not engine.result.error:  # a GPU's peak needs no separate worker: RSS is not involved
        engine.result.device_peak_mib = _device_peak_mib(engine)
    return [engine.result]


@dataclass
class _TimingWorker:
    """A timing worker that finished building; `ready` False: its build failed (not timed)."""

    engine: str
    mode: str
    proc: subprocess.Popen
    ready: bool
    step_ms: list[float] = field(default_factory=list)


def run_interleaved(
    args: argparse.Namespace, model: str, batch: int, resolution: int
) -> list[Result]:
    """Start one timing worker per engine and mode (one at a time, so compiles do not overlap),
    then time them in interleaved rounds: load from other processes hits every engine alike.

    A worker not ready within `--build-timeout` seconds (a `torch.compile` that runs for ever,
    say) is stopped and reported as an error; one whose build failed reports its own error.
    """
    workers, failed = [], []
    for mode in args.modes:
        for name in engines_for(mode, args.engines):
            proc = subprocess.Popen(
                _worker_command("timing", args, model, batch, resolution, [name], [mode]),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            started = time.perf_counter()
            in_time = select.select([proc.stdout], [], [], args.build_timeout)[0]
            ready = bool(in_time) and proc.stdout.readline().strip() == "ready"
            print(
                f"built {name}/{mode} in {time.perf_counter() - started:.0f} s: "
                f"{'ok' if ready else 'worker failed' if in_time else 'timed out'}",
                file=sys.stderr,
                flush=True,
            )
            if not in_time:
                proc.kill()
                proc.wait()
                failed.append(
                    Result(
                        name,
                        mode,
                        model,
                        batch,
                        resolution,
                        args.dtype,
                        error=f"not built within --build-timeout {args.build_timeout} s",
                    )
                )
                continue
            workers.append(_TimingWorker(name, mode, proc, ready))
    timed = [w for w in workers if w.ready]
    for round_ in range(args.iters if timed else 0):
        shift = round_ % len(timed)
        for w in timed[shift:] + timed[:shift]:
            try:
                w.proc.stdin.write("step\n")
                w.proc.stdin.flush()
                w.step_ms.append(float(w.proc.stdout.readline()))
            except (BrokenPipeError, ValueError):
                pass  # the worker stopped: its error comes with its result below
    results = failed
    for w in workers:
        out, _ = w.proc.communicate("done\n")
        lines = out.strip().splitlines()
        if w.proc.returncode != 0 or not lines:
            results.append(
                Result(
                    w.engine,
                    w.mode,
                    model,
                    batch,
                    resolution,
                    args.dtype,
                    error=f"timing worker exited {w.proc.returncode}",
                )
            )
            continue
        result = Result(**json.loads(lines[-1])[0])
        result.step_ms = w.step_ms
        if w.step_ms:
            result.img_per_s = batch / (statistics.median(w.step_ms) / 1e3)
        results.append(result)
    return results


def engines_for(mode: str, engines: list[str]) -> list[str]:
    return [e for e in engines if mode == "infer" or e not in EXPORT_ENGINES]


def memory_worker(args: argparse.Namespace) -> list[Result]:
    """One engine and mode: peak resident (or device) memory while it runs steps."""
    engine = make_engine(args)
    r = engine.result
    try:
        engine.build()
        engine.step()
        rss_before = _rss_mib("VmRSS")
        _reset_peak_rss()
        for _ in range(2):
            engine.step()
        r.peak_rss_mib = _rss_mib("VmHWM")
        r.step_rss_increase_mib = r.peak_rss_mib - rss_before
        r.device_peak_mib = _device_peak_mib(engine)
    except Exception as e:
        r.error = _error_text(e)
    return [r]


def _device_peak_mib(engine: Engine) -> float | None:
    if engine.result.backend in ("gpu", "cuda", "tpu"):
        if engine.result.engine.startswith("dpn_jax"):
            import jax

            stats = jax.local_devices()[0].memory_stats() or {}
            return stats.get("peak_bytes_in_use", 0) / 2**20 or None
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return None


# ---------------------------------------------------------------------------------------------
# Driver.


def _worker_command(
    kind: str,
    args: argparse.Namespace,
    model: str,
    batch: int,
    resolution: int,
    engines: list[str],
    modes: list[str],
) -> list[str]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        kind,
        "--models",
        model,
        "--batch-sizes",
        str(batch),
        "--resolutions",
        str(resolution),
        "--engines",
        *engines,
        "--modes",
        *modes,
        "--dtype",
        args.dtype,
        "--iters",
        str(args.iters),
        "--warmup",
        str(args.warmup),
        "--settle-steps",
        str(args.settle_steps),
    ]
    if args.remat:
        cmd.append("--remat")
    if args.cache_dir:
        cmd += ["--cache-dir", args.cache_dir]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd


def _run_memory_worker(
    args: argparse.Namespace, model: str, batch: int, resolution: int, engine: str, mode: str
) -> list[Result]:
    cmd = _worker_command("memory", args, model, batch, resolution, [engine], [mode])
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, env=dict(os.environ, **MEMORY_WORKER_ENV), text=True
    )
    if proc.returncode != 0:
        return [
            Result(
                engine,
                mode,
                model,
                batch,
                resolution,
                args.dtype,
                error=f"memory worker exited {proc.returncode}",
            )
        ]
    return [Result(**r) for r in json.loads(proc.stdout)]


def _merge(timing: list[Result], memory: list[Result]) -> list[Result]:
    for r in timing:
        for m in memory:
            if (m.engine, m.mode) == (r.engine, r.mode):
                r.peak_rss_mib, r.step_rss_increase_mib = m.peak_rss_mib, m.step_rss_increase_mib
                r.device_peak_mib = r.device_peak_mib or m.device_peak_mib
                r.error = r.error or m.error
    return timing


def _fmt(value: float | None, spec: str) -> str:
    return format("-", f">{spec.split('.')[0]}") if value is None else format(value, spec)


def print_table(results: list[Result]) -> None:
    """`jax/this`: the images/s of the first dpn_jax engine of `--engines` (for the same model,
    batch, resolution and mode) over this row's: `--engines dpn_jax_plain dpn_jax_nnx` gives
    Linen / NNX. `GFLOP/img`: the reference count (`reference_flops`), the same in every row of
    a mode; `XLA GF/img`: XLA's count of a dpn_jax step (`xla_flops_per_image`); `GFLOP/s`:
    the reference count x img/s, over every core the engine ran on."""
    header = (
        f"{'model':8} {'batch':>5} {'res':>4} {'dtype':8} {'mode':5} {'engine':13} {'img/s':>7} "
        f"{'jax/this':>8} {'create s':>8} {'compile s':>9} {'peak RSS MiB':>12} "
        f"{'step +MiB':>9} {'dev MiB':>8} {'GFLOP/img':>9} {'XLA GF/img':>10} {'GFLOP/s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        ours = next(
            (
                o
                for o in results
                if o.engine.startswith("dpn_jax")
                and (o.model, o.batch, o.resolution, o.mode)
                == (r.model, r.batch, r.resolution, r.mode)
            ),
            None,
        )
        ratio = ours.img_per_s / r.img_per_s if ours and ours.img_per_s and r.img_per_s else None
        print(
            f"{r.model:8} {r.batch:5d} {r.resolution:4d} {r.dtype:8} {r.mode:5} {r.engine:13} "
            f"{_fmt(r.img_per_s, '7.2f')} {_fmt(ratio, '8.2f')} {_fmt(r.create_s, '8.2f')} "
            f"{_fmt(r.compile_s, '9.1f')} {_fmt(r.peak_rss_mib, '12.0f')} "
            f"{_fmt(r.step_rss_increase_mib, '9.0f')} {_fmt(r.device_peak_mib, '8.0f')} "
            f"{_fmt(r.flops_per_img and r.flops_per_img / 1e9, '9.2f')} "
            f"{_fmt(r.xla_flops_per_img and r.xla_flops_per_img / 1e9, '10.2f')} "
            f"{_fmt(r.gflop_per_s, '7.1f')}" + (f"  ({r.error})" if r.error else "")
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["dpn68"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[16])
    p.add_argument("--resolutions", nargs="+", type=int, default=[224])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(DEFAULT_ENGINES))
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype; bfloat16 = float32 parameters, bfloat16 compute "
        "(timm under torch.autocast)",
    )
    p.add_argument("--iters", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per engine after compile")
    p.add_argument(
        "--settle-steps",
        type=int,
        default=1,
        help="untimed steps before each timed one, so every timed step follows a step "
        "of the same engine (XLA's first step after PyTorch ran measured up to "
        "1.7x slower here; a user runs one framework at a time)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="pin every worker to this many cores (0: all the process may use)",
    )
    p.add_argument(
        "--build-timeout",
        type=float,
        default=1800,
        help="seconds an engine may take to build, compile and warm up",
    )
    p.add_argument("--remat", action="store_true", help="dpn_jax with per-block rematerialisation")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory workers")
    p.add_argument("--json", default="benchmark_results.json", help="where to write the results")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="JAX compilation cache shared by the workers (default: a fresh temporary "
        "one, so the timing worker compiles cold and the memory workers reuse it)",
    )
    p.add_argument("--worker", choices=("timing", "memory", "flops"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def setup_threads(threads: int, uses_torch: bool) -> None:
    """Same cores for both frameworks: pin the process, size torch's pool to match."""
    if threads:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:threads]))
    if uses_torch:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        uses_torch = args.engines[0].startswith("timm")
        setup_threads(args.threads, uses_torch)
        if not uses_torch:  # (timm's workers run as timm's users run it: without dpn_jax)
            # dpn_jax first, before JAX starts: dpn_jax/system/host_memory.py
            from dpn_jax.system.compilation_cache import enable_compilation_cache

            if args.cache_dir:
                enable_compilation_cache(args.cache_dir)
        worker = dict(timing=timing_worker, memory=memory_worker, flops=flops_worker)[args.worker]
        results = worker(args)
        print(json.dumps([asdict(r) for r in results]))
        return

    if args.cache_dir is None:
        args.cache_dir = tempfile.mkdtemp(prefix="dpn_jax_benchmark_cache_")
    results = []
    for model in args.models:
        for res in args.resolutions:
            flops = _run_flops_worker(args, model, res)
            for batch in args.batch_sizes:
                timing = run_interleaved(args, model, batch, res)
                memory = (
                    []
                    if args.no_memory
                    else [
                        r
                        for m in args.modes
                        for e in engines_for(m, args.engines)
                        if e != "timm_compile"
                        for r in _run_memory_worker(args, model, batch, res, e, m)
                    ]
                )
                results += _add_flops(_merge(timing, memory), flops)
    print_table(results)
    record = dict(
        command=" ".join([os.path.basename(sys.executable), *sys.argv]),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=dict(
            platform=platform.platform(),
            processor=platform.processor(),
            cpus=len(os.sched_getaffinity(0)),
            load_average=os.getloadavg(),
            glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
        ),
        dtype=args.dtype,
        remat=args.remat,
        results=[asdict(r) for r in results],
    )
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
