"""dpn_jax's CPU kernels themselves: deterministic sums, shape guards, and the two builds.

- The sums over the batch (the weight gradients and BatchNorm's channel sums, shared out over
  XLA's thread pool) come out bit-identical call after call and whatever the thread count.
- Every handler refuses a mis-shaped call (operands, result, attributes) with an error that
  names the problem, before it reads or writes anything.
- The baseline and AVX2 + FMA builds agree, the baseline build holds no AVX instruction, and the
  loader picks the build per `DPN_JAX_CPU_KERNELS` and the CPU's flags.
`test_grouped_conv.py` checks the kernels' numbers against XLA's convolution.
"""

import functools
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpn_jax.errors import ConfigError
from dpn_jax.ops import cpu_kernels

requires_kernels = pytest.mark.skipif(
    not cpu_kernels.cpu_kernels_available(),
    reason="dpn_jax's CPU kernels (an optional extension) are not built or are switched off",
)

# (groups, stride, x shape, dy shape): the grouped convolutions whose weight gradient is checked,
# chosen for how `ParallelSum` splits them (csrc/cpu_kernels.h): 4 channels per group in one
# part, 21 work items (16-row blocks) in 16 uneven chunks; 8 per group, stride 2, 8 parts of 32
# channels, 8 items in 2 chunks; 32 per group, 16 parts, one chunk.
GROUPED_CASES = [
    (8, 1, (7, 40, 64, 32), (7, 40, 64, 32)),
    (32, 2, (4, 31, 31, 256), (4, 16, 16, 256)),
    (16, 1, (3, 7, 7, 512), (3, 7, 7, 512)),
]
# 1x1 weight gradient: 17 * 512 + 3 rows are 18 work items of 512 rows.
POINTWISE_ROWS, POINTWISE_IN, POINTWISE_OUT = 17 * 512 + 3, 24, 40
# BatchNorm's channel sums: 17 work items of 256 rows, the last short; 5 vectors of channels
# and 4 past them.
SUMS_ROWS, SUMS_CHANNELS = 16 * 256 + 5, 44
TOLERANCE = 2e-6  # of the largest magnitude, as test_grouped_conv.py


def _grouped_kernel_grad(groups, stride, x, dy, suffix=""):
    shape = (3, 3, x.shape[-1] // groups, dy.shape[-1])
    return cpu_kernels.kernel_call(
        "dpn_grouped_conv_kernel_grad" + suffix, shape, x, dy, groups=groups, stride=stride, pad=1
    )


def _pointwise_kernel_grad(x, dy, suffix=""):
    return cpu_kernels.kernel_call(
        "dpn_pointwise_kernel_grad" + suffix, (x.shape[1], dy.shape[1]), x, dy
    )


def _channel_sums(a, b, suffix=""):
    return cpu_kernels.kernel_call("dpn_channel_sums" + suffix, (2, a.shape[1]), a, b)


def _reference_channel_sums(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.stack([a.sum(0), (a * b).sum(0)])


def _weight_gradient_inputs():
    """(name, jitted kernel sum, reference, x, dy) of every case, fixed random inputs: the
    weight gradients and BatchNorm's channel sums, the kernels' sums over the batch."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    cases = []
    for groups, stride, x_shape, dy_shape in GROUPED_CASES:
        reference = functools.partial(_reference_kernel_grad, groups, stride)
        kernel = functools.partial(_grouped_kernel_grad, groups, stride)
        cases.append(
            (
                f"grouped {x_shape} stride {stride}",
                kernel,
                reference,
                normal(*x_shape),
                normal(*dy_shape),
            )
        )
    cases.append(
        (
            "1x1",
            _pointwise_kernel_grad,
            lambda x, dy: np.asarray(x, np.float64).T @ np.asarray(dy, np.float64),
            normal(POINTWISE_ROWS, POINTWISE_IN),
            normal(POINTWISE_ROWS, POINTWISE_OUT),
        )
    )
    cases.append(
        (
            "channel sums",
            _channel_sums,
            _reference_channel_sums,
            normal(SUMS_ROWS, SUMS_CHANNELS),
            normal(SUMS_ROWS, SUMS_CHANNELS),
        )
    )
    return cases


def _reference_kernel_grad(groups, stride, x, dy):
    """dw[ky, kx, i, g*O + o] = sum over (n, oy, ox) of x[n, oy*s + ky - 1, ox*s + kx - 1, g*I + i]
    dy[n, oy, ox, g*O + o], in float64 (XLA's grouped weight gradient takes seconds here)."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    dy = np.asarray(dy, np.float64)
    n, rows, cols, out_channels = dy.shape
    dy = dy.reshape(n, rows, cols, groups, -1)
    taps = [
        np.einsum(
            "nyxgi,nyxgo->igo",
            x[
                :,
                ky : ky + stride * (rows - 1) + 1 : stride,
                kx : kx + stride * (cols - 1) + 1 : stride,
            ].reshape(n, rows, cols, groups, -1),
            dy,
        )
        for ky in range(3)
        for kx in range(3)
    ]
    return np.stack(taps).reshape(3, 3, -1, out_channels)


@pytest.fixture(scope="module")
def weight_gradients():
    """name -> (the kernel gradient once, its jitted function, x, dy); checked against XLA."""
    computed = {}
    for name, kernel, reference, x, dy in _weight_gradient_inputs():
        fn = jax.jit(kernel)
        got, want = np.asarray(fn(x, dy)), reference(x, dy)
        np.testing.assert_allclose(
            got, want, rtol=0, atol=TOLERANCE * np.abs(want).max(), err_msg=name
        )
        computed[name] = (got, fn, x, dy)
    return computed


def _assert_same_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    differ = int(np.sum(got.view(np.uint32) != want.view(np.uint32)))
    assert differ == 0, (
        f"{what}: {differ} of {got.size} values differ, by up to {np.abs(got - want).max():.3g}"
    )


class _BusyPool:
    """Keeps XLA's CPU thread pool busy from another thread (matmuls) while the block runs."""

    def __enter__(self):
        self._stop = threading.Event()
        a = jnp.ones((384, 384))
        matmul = jax.jit(lambda a: a @ a)

        def run():
            while not self._stop.is_set():
                matmul(a).block_until_ready()

        self._thread = threading.Thread(target=run)
        self._thread.start()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@requires_kernels
def test_weight_gradients_are_bit_identical_call_after_call(weight_gradients):
    """25 more calls each, the pool shared with other work: every bit the same as the first.

    Per-thread partial sums (the kernels before 2026-11-30) differed in every call here.
    """
    with _BusyPool():
        for name, (first, fn, x, dy) in weight_gradients.items():
            for call in range(25):
                _assert_same_bits(np.asarray(fn(x, dy)), first, f"{name}, call {call + 2}")


_ONE_THREAD_SCRIPT = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before JAX: its pool gets 1 thread
import numpy as np
sys.path.insert(0, os.path.dirname(sys.argv[1]))
from test_cpu_kernels import _weight_gradient_inputs
np.savez(sys.argv[2], **{name: np.asarray(kernel(x, dy))
                         for name, kernel, _, x, dy in _weight_gradient_inputs()})
"""


@requires_kernels
@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs a second CPU and sched_setaffinity to run with fewer threads",
)
def test_weight_gradients_do_not_depend_on_the_thread_count(weight_gradients, tmp_path):
    """The same gradients from a process whose XLA pool has one thread: the same bits."""
    out = tmp_path / "one_thread.npz"
    subprocess.run(
        [sys.executable, "-c", _ONE_THREAD_SCRIPT, __file__, str(out)],
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    with np.load(out) as one_thread:
        for name, (first, *_) in weight_gradients.items():
            _assert_same_bits(one_thread[name], first, f"{name}, one thread")


# --- shape guards --------------------------------------------------------------------------


def _call(target, a_shape, b_shape, result_shape, **attributes):
    result = jax.ShapeDtypeStruct(result_shape, jnp.float32)
    call = jax.ffi.ffi_call(target, result)
    return call(
        jnp.zeros(a_shape),
        jnp.zeros(b_shape),
        **{name: np.int64(value) for name, value in attributes.items()},
    )


# A valid call of each grouped product: 64 channels in 16 groups of 4, stride 1, pad 1, 7x7.
_X, _W, _Y = (2, 7, 7, 64), (3, 3, 4, 64), (2, 7, 7, 64)
_GEOMETRY = {"groups": 16, "stride": 1, "pad": 1}
_FORWARD = ("dpn_grouped_conv_forward", _X, _W, _Y)  # x, kernel -> y
_INPUT_GRAD = ("dpn_grouped_conv_input_grad", _Y, _W, _X)  # dy, transposed kernel -> dx
_KERNEL_GRAD = ("dpn_grouped_conv_kernel_grad", _X, _Y, _W)  # x, dy -> dw


def _with(call, index, shape):
    call = list(call)
    call[index] = shape
    return tuple(call)


_PRODUCT_NAMES = {
    "forward": "forward",
    "input_grad": "input gradient",
    "kernel_grad": "kernel gradient",
}
GROUPED_GUARD_CASES = [  # (call, attribute changes, the message's words), by what is wrong
    pytest.param(
        _with(_FORWARD, 1, (2, 7, 448)),
        {},
        r"x of shape \(2, 7, 448\), expected 4 dimensions",
        id="x-rank",
    ),
    pytest.param(
        _with(_FORWARD, 3, (98, 64)),
        {},
        r"y of shape \(98, 64\), expected 4 dimensions",
        id="y-rank",
    ),
    pytest.param(
        _with(_FORWARD, 2, (9, 4, 64)),
        {},
        r"kernel of shape \(9, 4, 64\), expected 4 dimensions",
        id="kernel-rank",
    ),
    pytest.param(
        _with(_FORWARD, 1, (2, 0, 7, 64)),
        {},
        r"x of shape \(2, 0, 7, 64\), expected a non-empty image",
        id="x-empty",
    ),
    pytest.param(
        _with(_KERNEL_GRAD, 2, (2, 7, 7, 0)),
        {},
        r"dy of shape \(2, 7, 7, 0\), expected a non-empty image",
        id="dy-empty",
    ),
    pytest.param(_FORWARD, {"groups": 0}, r"groups = 0, expected >= 1", id="groups-0"),
    pytest.param(_FORWARD, {"stride": 0}, r"stride = 0, expected 1 to 3", id="stride-0"),
    pytest.param(_FORWARD, {"stride": 4}, r"stride = 4, expected 1 to 3", id="stride-4"),
    pytest.param(_FORWARD, {"pad": -1}, r"pad = -1, expected 0 to 2", id="pad-negative"),
    pytest.param(_FORWARD, {"pad": 3}, r"pad = 3, expected 0 to 2", id="pad-3"),
    pytest.param(
        _FORWARD,
        {"groups": 3},
        r"x of shape \(2, 7, 7, 64\): its 64 channels do not split into 3 groups",
        id="x-channels-groups",
    ),
    pytest.param(
        _with(_with(_FORWARD, 3, (2, 7, 7, 40)), 2, (3, 3, 4, 40)),
        {},
        r"y of shape \(2, 7, 7, 40\): its 40 channels do not split into 16 groups",
        id="y-channels-groups",
    ),
    pytest.param(
        _with(_FORWARD, 3, (3, 7, 7, 64)),
        {},
        r"x of shape \(2, 7, 7, 64\) and y of shape \(3, 7, 7, 64\) differ in batch",
        id="batch",
    ),
    pytest.param(
        _with(_with(_FORWARD, 1, (2, 1, 1, 64)), 3, (2, 1, 1, 64)),
        {"pad": 0},
        r"x of shape \(2, 1, 1, 64\) padded by 0 is smaller than the 3x3 kernel",
        id="image-smaller-than-kernel",
    ),
    pytest.param(
        _with(_FORWARD, 3, (2, 6, 7, 64)),
        {},
        r"y of shape \(2, 6, 7, 64\) does not match x of shape \(2, 7, 7, 64\) "
        r"with stride 1 and pad 1: expected 7 rows",
        id="y-rows",
    ),
    pytest.param(
        _with(_FORWARD, 3, (2, 7, 8, 64)), {}, r"pad 1: expected 7 columns", id="y-columns"
    ),
    pytest.param(
        _FORWARD, {"stride": 2}, r"with stride 2 and pad 1: expected 4 rows", id="y-rows-for-stride"
    ),
    pytest.param(
        _with(_FORWARD, 2, (1, 1, 4, 64)),
        {},
        r"kernel of shape \(1, 1, 4, 64\), expected \(3, 3, 4, 64\) for x of shape "
        r"\(2, 7, 7, 64\), y of shape \(2, 7, 7, 64\) and 16 groups",
        id="kernel-size",
    ),
    pytest.param(
        _with(_FORWARD, 2, (3, 3, 8, 64)),
        {},
        r"kernel of shape \(3, 3, 8, 64\), expected \(3, 3, 4, 64\)",
        id="kernel-in-channels",
    ),
    pytest.param(
        _with(_FORWARD, 2, (3, 3, 4, 32)),
        {},
        r"kernel of shape \(3, 3, 4, 32\), expected \(3, 3, 4, 64\)",
        id="kernel-out-channels",
    ),
    pytest.param(
        ("dpn_grouped_conv_forward", (2, 7, 7, 40), (3, 3, 5, 40), (2, 7, 7, 40)),
        {"groups": 8},
        r"no kernel for groups of 5 input and 5 output channels",
        id="no-layout",
    ),
    # The input gradient: dx (its result) is the image, its operand dy the output side.
    pytest.param(
        _with(_INPUT_GRAD, 3, (2, 9, 9, 64)),
        {},
        r"dy of shape \(2, 7, 7, 64\) does not match dx of shape \(2, 9, 9, 64\)",
        id="input-grad-dx-size",
    ),
    pytest.param(
        ("dpn_grouped_conv_input_grad", (2, 7, 7, 32), (3, 3, 8, 32), (2, 7, 7, 64)),
        {"groups": 8},
        r"transposed kernel of shape \(3, 3, 8, 32\), expected \(3, 3, 4, 64\)",
        id="input-grad-kernel-not-transposed",
    ),
    # The kernel gradient sizes its writes from dw.
    pytest.param(
        _with(_KERNEL_GRAD, 3, (3, 3, 4, 32)),
        {},
        r"dw of shape \(3, 3, 4, 32\), expected \(3, 3, 4, 64\)",
        id="kernel-grad-dw-out-channels",
    ),
    pytest.param(
        _with(_KERNEL_GRAD, 3, (3, 3, 8, 64)),
        {},
        r"dw of shape \(3, 3, 8, 64\), expected \(3, 3, 4, 64\)",
        id="kernel-grad-dw-in-channels",
    ),
    pytest.param(
        _with(_KERNEL_GRAD, 3, (2, 3, 4, 64)),
        {},
        r"dw of shape \(2, 3, 4, 64\), expected \(3, 3, 4, 64\)",
        id="kernel-grad-dw-size",
    ),
    pytest.param(
        _with(_KERNEL_GRAD, 2, (2, 5, 5, 64)),
        {},
        r"dy of shape \(2, 5, 5, 64\) does not match x of shape \(2, 7, 7, 64\)",
        id="kernel-grad-dy-size",
    ),
]


@requires_kernels
@pytest.mark.parametrize("call,attributes,message", GROUPED_GUARD_CASES)
def test_grouped_conv_refuses_a_mis_shaped_call(call, attributes, message):
    target, a, b, result = call
    product = _PRODUCT_NAMES[target.removeprefix("dpn_grouped_conv_")]
    with pytest.raises(
        jax.errors.JaxRuntimeError,
        match=f"INVALID_ARGUMENT: dpn_jax grouped conv {product}: .*{message}",
    ):
        _call(target, a, b, result, **{**_GEOMETRY, **attributes})


@requires_kernels
@pytest.mark.parametrize(
    "x,dy,dw,message",
    [
        pytest.param(
            (600, 7, 1),
            (600, 30),
            (7, 30),
            r"x of shape \(600, 7, 1\), expected 2 dimensions",
            id="x-rank",
        ),
        pytest.param(
            (600, 7), (600,), (7, 30), r"dy of shape \(600\), expected 2 dimensions", id="dy-rank"
        ),
        pytest.param(
            (600, 7), (600, 30), (210,), r"dw of shape \(210\), expected 2 dimensions", id="dw-rank"
        ),
        pytest.param(
            (600, 7),
            (599, 30),
            (7, 30),
            r"x of shape \(600, 7\) and dy of shape \(599, 30\) differ in rows",
            id="rows",
        ),
        pytest.param(
            (600, 7),
            (600, 30),
            (7, 29),
            r"dw of shape \(7, 29\), expected \(7, 30\) for x of shape \(600, 7\) "
            r"and dy of shape \(600, 30\)",
            id="dw-out-channels",
        ),
        pytest.param(
            (600, 7),
            (600, 30),
            (8, 30),
            r"dw of shape \(8, 30\), expected \(7, 30\)",
            id="dw-in-channels",
        ),
    ],
)
def test_pointwise_kernel_gradient_refuses_a_mis_shaped_call(x, dy, dw, message):
    with pytest.raises(
        jax.errors.JaxRuntimeError,
        match="INVALID_ARGUMENT: dpn_jax 1x1 kernel gradient: " + message,
    ):
        _call("dpn_pointwise_kernel_grad", x, dy, dw)


@requires_kernels
@pytest.mark.parametrize(
    "a, b, sums, message",
    [
        pytest.param(
            (600,), (600,), (2, 600), r"a of shape \(600\), expected 2 dimensions", id="a-rank"
        ),
        pytest.param(
            (600, 7),
            (600, 8),
            (2, 7),
            r"b of shape \(600, 8\), expected the shape of a of shape \(600, 7\)",
            id="b-shape",
        ),
        pytest.param(
            (600, 7), (600, 7), (7,), r"sums of shape \(7\), expected \(2, 7\)", id="sums-shape"
        ),
    ],
)
def test_channel_sums_refuse_a_mis_shaped_call(a, b, sums, message):
    with pytest.raises(
        jax.errors.JaxRuntimeError, match="INVALID_ARGUMENT: dpn_jax channel sums: " + message
    ):
        _call("dpn_channel_sums", a, b, sums)


@requires_kernels
def test_the_guards_let_valid_calls_through():
    """The guard cases' base calls run (so each case above fails on its own change alone)."""
    for target, a, b, result in (_FORWARD, _INPUT_GRAD, _KERNEL_GRAD):
        assert _call(target, a, b, result, **_GEOMETRY).shape == result
    assert _call("dpn_pointwise_kernel_grad", (600, 7), (600, 30), (7, 30)).shape == (7, 30)
    assert _call("dpn_channel_sums", (600, 7), (600, 7), (2, 7)).shape == (2, 7)


# --- the two builds and the loader ---------------------------------------------------------


def _built(module):
    return cpu_kernels.built_library(module) is not None


@functools.cache
def _register_baseline() -> str:
    """The baseline build's targets, registered beside the chosen build's; their suffix."""
    cpu_kernels.register_targets(
        cpu_kernels.built_library(cpu_kernels.BASELINE_LIBRARY), "_baseline"
    )
    return "_baseline"


@requires_kernels
def test_baseline_build_matches_the_chosen_build():
    """Every product, baseline against the build `auto` loads (AVX2 + FMA here), within the
    reference tolerance: the same sums in the same order, but FMA rounds once per multiply-add."""
    suffix = _register_baseline()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 9, 8, 64), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 64), dtype=np.float32))  # 8 groups of 8
    dy = jnp.asarray(rng.standard_normal((2, 5, 4, 64), dtype=np.float32))  # stride 2
    geometry = {"groups": 8, "stride": 2, "pad": 1}
    products = [
        ("dpn_grouped_conv_forward", dy.shape, x, w, geometry),
        ("dpn_grouped_conv_input_grad", x.shape, dy, w, geometry),
        ("dpn_grouped_conv_kernel_grad", w.shape, x, dy, geometry),
        (
            "dpn_pointwise_kernel_grad",
            (64, 64),
            x.reshape(-1, 64),
            jnp.tile(dy.reshape(-1, 64), (4, 1))[:144],
            {},
        ),
        ("dpn_channel_sums", (2, 64), x.reshape(-1, 64), x.reshape(-1, 64) + 1, {}),
    ]
    for target, shape, a, b, attributes in products:
        chosen = np.asarray(cpu_kernels.kernel_call(target, shape, a, b, **attributes))
        baseline = np.asarray(cpu_kernels.kernel_call(target + suffix, shape, a, b, **attributes))
        np.testing.assert_allclose(
            baseline, chosen, rtol=0, atol=TOLERANCE * np.abs(chosen).max(), err_msg=target
        )


@requires_kernels
def test_baseline_build_is_deterministic_too(weight_gradients):
    """The baseline build's weight gradients, called twice, while the pool is busy."""
    suffix = _register_baseline()
    with _BusyPool():
        for groups, stride, x_shape, _ in GROUPED_CASES:
            _, _, x, dy = weight_gradients[f"grouped {x_shape} stride {stride}"]
            fn = jax.jit(functools.partial(_grouped_kernel_grad, groups, stride, suffix=suffix))
            _assert_same_bits(np.asarray(fn(x, dy)), np.asarray(fn(x, dy)), f"{x.shape} baseline")


@pytest.mark.skipif(
    not _built(cpu_kernels.BASELINE_LIBRARY) or shutil.which("objdump") is None,
    reason="needs the baseline build and binutils' objdump",
)
def test_baseline_build_uses_no_avx_instruction():
    """What makes it portable: no VEX/EVEX-encoded (AVX, AVX2, FMA, AVX-512) instruction."""
    library = cpu_kernels.built_library(cpu_kernels.BASELINE_LIBRARY)
    disassembly = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", library], check=True, capture_output=True, text=True
    ).stdout
    avx = re.findall(r"^\s+[0-9a-f]+:\s+(v\w+)\s.*%[xyz]mm", disassembly, re.MULTILINE)
    assert not avx, f"AVX instructions in {library}: {sorted(set(avx))[:10]}"
    if _built(cpu_kernels.AVX2_LIBRARY):  # the check finds them where they are
        avx2 = subprocess.run(
            [
                "objdump",
                "-d",
                "--no-show-raw-insn",
                cpu_kernels.built_library(cpu_kernels.AVX2_LIBRARY),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert re.search(r"^\s+[0-9a-f]+:\s+vfmadd\w+\s.*%ymm", avx2, re.MULTILINE)


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(match[1].split()) if match else None


@pytest.mark.skipif(
    not _built(cpu_kernels.BASELINE_LIBRARY) or _cpu_flags() is None,
    reason="needs the baseline build and /proc/cpuinfo's flags",
)
def test_the_cpu_check_agrees_with_proc_cpuinfo():
    library = cpu_kernels.built_library(cpu_kernels.BASELINE_LIBRARY)
    assert cpu_kernels.cpu_supports_avx2_fma(library) == ({"avx2", "fma"} <= _cpu_flags())


@pytest.fixture
def fake_builds(monkeypatch):
    """Both builds 'built' at made-up paths, the CPU's flags as the test sets them."""
    paths = {
        cpu_kernels.BASELINE_LIBRARY: "/built/baseline.so",
        cpu_kernels.AVX2_LIBRARY: "/built/avx2.so",
    }
    monkeypatch.setattr(cpu_kernels, "built_library", paths.get)
    monkeypatch.delenv(cpu_kernels.CPU_KERNELS_ENV, raising=False)
    return paths


@pytest.mark.parametrize(
    "setting,avx2_fma,chosen",
    [
        (None, True, "/built/avx2.so"),
        (None, False, "/built/baseline.so"),
        ("auto", True, "/built/avx2.so"),
        (" Auto ", False, "/built/baseline.so"),
        ("baseline", True, "/built/baseline.so"),
        ("BASELINE", False, "/built/baseline.so"),
    ],
)
def test_loader_picks_the_build_per_setting_and_cpu(
    fake_builds, monkeypatch, setting, avx2_fma, chosen
):
    if setting is not None:
        monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV, setting)
    asked = []
    monkeypatch.setattr(
        cpu_kernels, "cpu_supports_avx2_fma", lambda baseline: asked.append(baseline) or avx2_fma
    )
    assert cpu_kernels.chosen_library() == chosen
    assert set(asked) <= {"/built/baseline.so"}  # the baseline build answers, never the other


def test_loader_takes_the_baseline_where_no_avx2_build_exists(fake_builds, monkeypatch):
    """Other architectures build the baseline only."""
    del fake_builds[cpu_kernels.AVX2_LIBRARY]
    monkeypatch.setattr(cpu_kernels, "cpu_supports_avx2_fma", lambda baseline: True)
    assert cpu_kernels.chosen_library() == "/built/baseline.so"


@pytest.mark.parametrize("setting", ["off", "0", "no", "False", ""])
def test_switched_off_the_kernels_are_not_loaded(fake_builds, monkeypatch, setting):
    monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV, setting)
    with pytest.warns(UserWarning, match="kernels are switched off .*pure-XLA lowering"):
        available = cpu_kernels.cpu_kernels_available.__wrapped__()
    assert not available


def test_an_unknown_setting_is_a_config_error(fake_builds, monkeypatch):
    monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV, "avx512")
    with pytest.raises(
        ConfigError, match="DPN_JAX_CPU_KERNELS='avx512': expected auto, baseline or off"
    ):
        cpu_kernels.chosen_library()
