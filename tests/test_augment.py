"""Randomised augmentations against timm's, in distribution.

They cannot agree sample for sample (different generators), so each test draws a few thousand
samples from ours and from timm's on the same tiny inputs and compares the distributions of
what must agree (mixup lambdas, the cutmix/mixup switch, box sizes and positions, erased areas,
aspects and counts) with a two-sample chi-square test at ALPHA, whose critical value comes from
the sample sizes and bin counts, not from hand-tuned tolerances. Deterministic parts (targets
for a given lambda) are compared exactly.
"""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dpn_jax.data.batch_augment import Mixup, RandomErasing, mixup_target

torch = pytest.importorskip("torch")
timm_mixup = pytest.importorskip("timm.data.mixup")
timm_erasing = pytest.importorskip("timm.data.random_erasing")

ALPHA = 1e-3  # per comparison; every test is seeded, so a pass is reproducible
SAMPLES = 3000
BINS = 12


def assert_same_distribution(ours, theirs, what: str, bins: int = BINS) -> None:
    """Two-sample chi-square test on bins at the pooled quantiles (discrete values merge;
    rounded to 1e-6 first, so that a float32 ulp does not move a discrete value across an edge)."""
    ours, theirs = (np.round(np.asarray(x, np.float64), 6) for x in (ours, theirs))
    if len(ours) == 0 or len(theirs) == 0:  # an event neither has (e.g. boxes without cutmix)
        assert len(ours) == len(theirs), f"{what}: {len(ours)} vs {len(theirs)} samples"
        return
    pooled = np.concatenate([ours, theirs])
    edges = np.unique(np.quantile(pooled, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:  # one value only: both must be that value
        assert np.all(ours == theirs[0]), what
        return
    a, _ = np.histogram(ours, edges)
    b, _ = np.histogram(theirs, edges)
    used = (a + b) > 0
    a, b = a[used], b[used]
    k1, k2 = np.sqrt(len(theirs) / len(ours)), np.sqrt(len(ours) / len(theirs))
    statistic = np.sum((k1 * a - k2 * b) ** 2 / (a + b))
    critical = stats.chi2.ppf(1 - ALPHA, len(a) - 1)
    assert statistic < critical, f"{what}: chi2 {statistic:.1f} >= {critical:.1f}\n{a}\n{b}"


def assert_same_rate(ours, theirs, what: str) -> None:
    """Two-proportion z-test: the frequencies of one event in two boolean samples agree."""
    ours, theirs = np.asarray(ours, bool), np.asarray(theirs, bool)
    pooled = np.concatenate([ours, theirs]).mean()
    sd = np.sqrt(pooled * (1 - pooled) * (1 / len(ours) + 1 / len(theirs)))
    z = stats.norm.ppf(1 - ALPHA / 2)
    assert abs(ours.mean() - theirs.mean()) <= z * sd + 1e-12, (what, ours.mean(), theirs.mean())


# --------------------------------------------------------------------------------- mixup


HEIGHT, WIDTH = 8, 12


def mixup_inputs(batch: int):
    """Row i is the constant i (so a pixel says which row it came from); labels 0..B-1."""
    images = np.broadcast_to(
        np.arange(batch, dtype=np.float32)[:, None, None, None], (batch, HEIGHT, WIDTH, 1)
    )
    return np.ascontiguousarray(images), np.arange(batch)


def run_ours(settings: dict, batch: int, samples: int = SAMPLES):
    images, labels = mixup_inputs(batch)
    mixup = Mixup(num_classes=batch, label_smoothing=0.0, **settings)
    keys = jax.random.split(jax.random.key(0), samples)
    mixed, targets = jax.jit(jax.vmap(mixup, in_axes=(0, None, None)))(keys, images, labels)
    return np.asarray(mixed)[..., 0], np.asarray(targets)


def run_timm(settings: dict, batch: int, samples: int = SAMPLES):
    np.random.seed(0)
    images, labels = mixup_inputs(batch)
    mixup = timm_mixup.Mixup(num_classes=batch, label_smoothing=0.0, **settings)
    results = [
        mixup(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels))
        for _ in range(samples)
    ]
    mixed = np.stack([x.numpy()[:, 0] for x, _ in results])
    return mixed, np.stack([t.numpy() for _, t in results])


def lambdas(targets):
    """Row i's lambda: its own label's weight (labels are 0..B-1, no smoothing)."""
    batch = targets.shape[1]
    return targets[:, np.arange(batch), np.arange(batch)]


def describe_rows(mixed, targets):
    """Per (sample, row): lambda, whether cut (pixels are only own/partner values), box rows."""
    samples, batch = mixed.shape[:2]
    own = np.arange(batch, dtype=np.float32)[None, :, None, None]
    partner = own[:, ::-1]
    from_partner = mixed == partner
    cut = np.all((mixed == own) | from_partner, axis=(2, 3)) & from_partner.any(axis=(2, 3))
    rows, cols = from_partner.any(axis=3), from_partner.any(axis=2)
    first_row, first_col = rows.argmax(-1), cols.argmax(-1)
    return dict(
        lam=lambdas(targets),
        cut=cut,
        area=from_partner.mean(axis=(2, 3)),
        height=rows.sum(-1),
        width=cols.sum(-1),
        top=first_row,
        left=first_col,
    )


MIXUP_CASES = {
    "mixup": dict(mixup_alpha=0.8, prob=0.7),
    "cutmix": dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    "switch": dict(mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.3, mode="elem"),
    "minmax": dict(cutmix_minmax=(0.2, 0.8), mode="pair", prob=0.8),
    "uncorrected": dict(mixup_alpha=0.0, cutmix_alpha=0.5, correct_lam=False),
}


@pytest.mark.parametrize("case", list(MIXUP_CASES))
def test_mixup_statistics_match_timm(case):
    """Lambda distribution (with its atom at 1 when prob < 1), the cut/mix switch, and the box
    height, width, position and area of cut rows agree with timm's for each mode."""
    settings = MIXUP_CASES[case]
    batch = 4
    ours, theirs = (describe_rows(*run(settings, batch)) for run in (run_ours, run_timm))
    rows = slice(None) if settings.get("mode", "batch") == "elem" else slice(0, 1)
    # 'batch' and 'pair' rows share draws: compare one row's (its partner is tested below)
    assert_same_distribution(ours["lam"][:, rows].ravel(), theirs["lam"][:, rows].ravel(), "lam")
    assert_same_rate(ours["cut"][:, rows].ravel(), theirs["cut"][:, rows].ravel(), "cutmix")
    assert_same_rate(ours["lam"] == 1, theirs["lam"] == 1, "unmixed rows")
    cut_ours, cut_theirs = ours["cut"][:, rows].ravel(), theirs["cut"][:, rows].ravel()
    for name in ("area", "height", "width", "top", "left"):
        assert_same_distribution(
            ours[name][:, rows].ravel()[cut_ours], theirs[name][:, rows].ravel()[cut_theirs], name
        )
    if settings.get("correct_lam", True):  # the target's lambda is the share the row kept
        np.testing.assert_allclose(
            ours["lam"][ours["cut"]], 1 - ours["area"][ours["cut"]], rtol=0, atol=1e-6
        )


def test_mixup_lambda_moments_are_beta():
    """Mean and variance of lambda against Beta(alpha, alpha), within 4.5 standard errors."""
    alpha = 0.4
    lam = lambdas(run_ours(dict(mixup_alpha=alpha), 2, samples=4000)[1])[:, 0]
    beta = stats.beta(alpha, alpha)
    fourth = beta.moment(4) - 4 * beta.mean() * beta.moment(3)
    fourth += 6 * beta.mean() ** 2 * beta.moment(2) - 3 * beta.mean() ** 4
    assert abs(lam.mean() - beta.mean()) < 4.5 * beta.std() / np.sqrt(len(lam))
    var_se = np.sqrt((fourth - beta.var() ** 2) / len(lam))
    assert abs(lam.var() - beta.var()) < 4.5 * var_se


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixup_rows_share_draws_as_timm(mode):
    """batch: one lambda for all rows; pair: rows i and B-1-i share theirs; elem: independent.
    Mixed rows are x_i * lam + x_(B-1-i) * (1 - lam) exactly as timm blends them."""
    batch = 6
    mixed, targets = run_ours(dict(mixup_alpha=1.0, mode=mode), batch, samples=200)
    lam = lambdas(targets)
    if mode == "batch":
        np.testing.assert_array_equal(lam, np.repeat(lam[:, :1], batch, 1))
    elif mode == "pair":
        np.testing.assert_array_equal(lam, lam[:, ::-1])
        assert np.all(lam[:, 0] != lam[:, 1])
    else:
        assert len(np.unique(lam)) == lam.size
    own = np.arange(batch, dtype=np.float32)
    blend = own * lam.astype(np.float32) + own[::-1] * (1 - lam.astype(np.float32))
    np.testing.assert_allclose(mixed, np.broadcast_to(blend[..., None, None], mixed.shape), 1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_target_equals_timm(smoothing):
    labels = np.array([3, 0, 7, 7, 1, 9])
    for lam in (0.37, np.linspace(0.1, 0.9, 6, dtype=np.float32)):
        ours = mixup_target(jnp.asarray(labels), 10, lam, smoothing)
        timm_lam = lam if np.isscalar(lam) else torch.from_numpy(lam)[:, None]
        theirs = timm_mixup.mixup_target(torch.from_numpy(labels), 10, timm_lam, smoothing)
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=0, atol=1e-7)


def test_mixup_keeps_smoothing_when_unmixed():
    """prob=0: images untouched, targets timm's smoothed one-hot (lambda 1)."""
    images, labels = mixup_inputs(4)
    mixed, targets = jax.jit(Mixup(prob=0.0, num_classes=5))(jax.random.key(0), images, labels)
    np.testing.assert_array_equal(np.asarray(mixed), images)
    expected = timm_mixup.mixup_target(torch.from_numpy(labels), 5, 1.0, 0.1).numpy()
    np.testing.assert_allclose(np.asarray(targets), expected, atol=1e-7)


# ------------------------------------------------------------------------- random erasing


def erase_ours(settings: dict, images: np.ndarray) -> np.ndarray:
    erasing = RandomErasing(**settings)
    return np.asarray(jax.jit(erasing)(jax.random.key(0), images.transpose(0, 2, 3, 1)))


def erase_timm(settings: dict, images: np.ndarray) -> np.ndarray:
    random.seed(0)
    torch.manual_seed(0)
    erasing = timm_erasing.RandomErasing(device="cpu", **settings)
    return erasing(torch.from_numpy(images.copy())).numpy().transpose(0, 2, 3, 1)


def erased_boxes(original: np.ndarray, erased: np.ndarray) -> dict:
    """Per image: erased?, erased area fraction, bounding-box height/width/top, colours used."""
    changed = np.any(erased != original, axis=-1)
    rows, cols = changed.any(2), changed.any(1)
    colours = [len(np.unique(e[c], axis=0)) for e, c in zip(erased, changed)]
    return dict(
        erased=changed.any((1, 2)),
        area=changed.mean((1, 2)),
        height=rows.sum(1),
        width=cols.sum(1),
        top=rows.argmax(1),
        left=cols.argmax(1),
        colours=np.array(colours),
    )


ERASING_CASES = {
    "const": dict(probability=0.6, mode="const"),
    "aspect": dict(probability=1.0, min_area=0.05, max_area=0.6, min_aspect=0.5, max_aspect=3),
    "count": dict(probability=1.0, mode="rand", min_area=0.02, max_area=0.1, max_count=4),
    "splits": dict(probability=1.0, mode="pixel", num_splits=2, min_count=2),
}


@pytest.mark.parametrize("case", list(ERASING_CASES))
def test_random_erasing_statistics_match_timm(case):
    """Erased or not, area, bounding-box size and position, and (with one random colour per
    box) the number of boxes agree with timm's RandomErasing on the same images."""
    settings = ERASING_CASES[case]
    channels = 3 if settings.get("mode") == "rand" else 1
    rng = np.random.default_rng(0)
    images = rng.uniform(5, 6, (2000, channels, 16, 20)).astype(np.float32)  # fills are ~N(0,1)
    nhwc = images.transpose(0, 2, 3, 1)
    ours = erased_boxes(nhwc, erase_ours(settings, images))
    theirs = erased_boxes(nhwc, erase_timm(settings, images))
    assert_same_rate(ours["erased"], theirs["erased"], "erased")
    if settings.get("num_splits"):
        assert not ours["erased"][: len(images) // 2].any()
    for name in ("area", "height", "width", "top", "left", "colours"):
        keep_o, keep_t = ours["erased"], theirs["erased"]
        assert_same_distribution(ours[name][keep_o], theirs[name][keep_t], name)
