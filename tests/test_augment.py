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
from PIL import Image
from scipy import stats

from dpn_jax.data import auto_augment, transforms
from dpn_jax.data.batch_augment import Mixup, RandomErasing, mixup_target

torch = pytest.importorskip("torch")
timm_mixup = pytest.importorskip("timm.data.mixup")
timm_erasing = pytest.importorskip("timm.data.random_erasing")
timm_aa = pytest.importorskip("timm.data.auto_augment")
timm_transforms_factory = pytest.importorskip("timm.data.transforms_factory")

ALPHA = 1e-3  # per comparison; every test is seeded, so a pass is reproducible
SAMPLES = 3000
BINS = 12


def assert_same_distribution(ours, theirs, what: str, bins: int = BINS) -> None:
    """Two-sample chi-square test: on the values themselves when there are at most `bins` of
    them, else on bins at the pooled quantiles. Values are rounded to 1e-6 first, so that a
    float32 ulp does not split one discrete value in two."""
    ours, theirs = (np.round(np.asarray(x, np.float64), 6) for x in (ours, theirs))
    if len(ours) == 0 or len(theirs) == 0:  # an event neither has (e.g. boxes without cutmix)
        assert len(ours) == len(theirs), f"{what}: {len(ours)} vs {len(theirs)} samples"
        return
    pooled = np.concatenate([ours, theirs])
    values = np.unique(pooled)
    if len(values) <= bins:
        a = np.searchsorted(values, ours)
        b = np.searchsorted(values, theirs)
        assert_same_categories(list(a), list(b), what)
        return
    edges = np.unique(np.quantile(pooled, np.linspace(0, 1, bins + 1)))
    a, _ = np.histogram(ours, edges)
    b, _ = np.histogram(theirs, edges)
    chi_square_test(a, b, what)


def assert_same_categories(ours, theirs, what: str) -> None:
    """Two-sample chi-square test on categories."""
    names = sorted(set(ours) | set(theirs))
    chi_square_test([ours.count(n) for n in names], [theirs.count(n) for n in names], what)


def chi_square_test(a, b, what: str) -> None:
    """Two-sample chi-square test of bin counts `a` and `b` at level ALPHA; bins with fewer
    than 10 samples in all are pooled into one, so the chi-square approximation holds."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rare = (a + b) < 10
    if rare.any():
        a, b = np.append(a[~rare], a[rare].sum()), np.append(b[~rare], b[rare].sum())
    a, b = a[(a + b) > 0], b[(a + b) > 0]
    if len(a) < 2:  # all in one bin: nothing to tell apart
        return
    k1, k2 = np.sqrt(b.sum() / a.sum()), np.sqrt(a.sum() / b.sum())
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
    """Per image: erased?, erased area fraction, bounding-box height, width, aspect and
    position, colours used (with one colour per box: the boxes visible)."""
    changed = np.any(erased != original, axis=-1)
    rows, cols = changed.any(2), changed.any(1)
    colours = [len(np.unique(e[c], axis=0)) for e, c in zip(erased, changed)]
    return dict(
        erased=changed.any((1, 2)),
        area=changed.mean((1, 2)),
        height=rows.sum(1),
        width=cols.sum(1),
        aspect=rows.sum(1) / np.maximum(cols.sum(1), 1),
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
    for name in ("area", "height", "width", "aspect", "top", "left", "colours"):
        keep_o, keep_t = ours["erased"], theirs["erased"]
        assert_same_distribution(ours[name][keep_o], theirs[name][keep_t], name)


# ------------------------------------------------------------- RandAugment / AutoAugment (host)

FILL = (124, 117, 104)


def tiny_image(size=(12, 10), seed=0) -> Image.Image:
    """A small image with structure (a gradient plus noise) so every op changes it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: size[1], : size[0]]
    base = np.stack([x * 20, y * 25, (x + y) * 10], -1) + rng.integers(0, 40, (*y.shape, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


class FixedDraws:
    """A generator stand-in: every draw at the same quantile `u` (random() = u, uniform at u of
    its range, choice the first); and the same for Python's `random` when patched into timm."""

    def __init__(self, u: float):
        self.u = u

    def random(self, *_):
        return self.u

    def uniform(self, low, high):
        return low + self.u * (high - low)

    def integers(self, *_):
        return 0

    def choice(self, seq):
        return seq[0]


def test_every_timm_op_is_here():
    """Our op table is timm's, less the absolute-pixel translations no policy uses."""
    assert set(auto_augment.NAME_TO_OP) == set(timm_aa.NAME_TO_OP) - {"TranslateX", "TranslateY"}
    assert set(auto_augment.LEVEL_TO_ARG) == set(auto_augment.NAME_TO_OP)
    assert auto_augment.RAND_TRANSFORMS == tuple(timm_aa._RAND_TRANSFORMS)
    assert auto_augment.RAND_INCREASING_TRANSFORMS == tuple(timm_aa._RAND_INCREASING_TRANSFORMS)
    for name in ("weights", "3aw", "3a"):
        expected = timm_aa.rand_augment_choices(name)
        ours = auto_augment.RAND_CHOICES[name]
        assert (dict(ours) if isinstance(ours, dict) else list(ours)) == (
            dict(expected) if isinstance(expected, dict) else list(expected)
        )
    for name in ("original", "originalr", "v0", "v0r", "3a"):
        timm_policy = timm_aa.auto_augment_policy(name, dict(img_mean=FILL))
        ours = auto_augment.AA_POLICIES[name]
        assert [[(op.name, op.prob, op.magnitude) for op in sub] for sub in timm_policy] == [
            list(sub) for sub in ours
        ]


@pytest.mark.parametrize("name", sorted(auto_augment.NAME_TO_OP))
@pytest.mark.parametrize("magnitude", [0, 3, 7, 10, 13])
@pytest.mark.parametrize("u", [0.2, 0.9])  # both signs of the randomly negated ops
def test_op_at_a_magnitude_equals_timm(name, magnitude, u, monkeypatch):
    """Each op at a fixed magnitude (no noise, probability 1) gives timm's pixels exactly:
    same magnitude scale, sign convention, fill and Pillow call."""
    image = tiny_image()
    hparams = dict(img_mean=FILL, interpolation=Image.Resampling.BICUBIC, magnitude_max=15)
    draws = FixedDraws(u)
    for fn in ("random", "uniform", "choice"):
        monkeypatch.setattr(timm_aa.random, fn, getattr(draws, fn))
    try:
        theirs = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)(image)
    except ValueError:  # Pillow >= 13 refuses 0 bits; older Pillow (and we) make it black
        assert name.startswith("Posterize")
        theirs = Image.new("RGB", image.size)
    ours_hparams = auto_augment.Hparams(
        fill=FILL, resample=Image.Resampling.BICUBIC, magnitude_max=15
    )
    ours = auto_augment.AugmentOp(name, 1.0, magnitude, ours_hparams)(image, draws)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def record_ops(table: dict, log: list) -> dict:
    """The op table with each op replaced by one that logs (name, level arguments): what is
    applied, not the pixels (the test above checks those)."""

    def recording(name):
        def record(img, *args, **kwargs):
            log.append((name, args))
            return img

        return record

    return {name: recording(name) for name in table}


def timm_aa_transform(aa: str):
    """timm's transform for an `aa` string, with the hparams its create_transform gives."""
    hparams = dict(translate_const=3, img_mean=FILL)
    if aa.startswith("rand"):
        return timm_aa.rand_augment_transform(aa, hparams)
    if aa.startswith("augmix"):
        return timm_aa.augment_and_mix_transform(aa, {**hparams, "translate_pct": 0.3})
    return timm_aa.auto_augment_transform(aa, hparams)


def applied_ops(aa: str, monkeypatch, samples: int = 1500):
    """(ours, timm's): per image, the (op, arguments) list each implementation applied."""
    image = tiny_image((8, 8))
    ours, theirs, log = [], [], []
    monkeypatch.setattr(auto_augment, "NAME_TO_OP", record_ops(auto_augment.NAME_TO_OP, log))
    transform = auto_augment.auto_augment(aa, mean=np.array(FILL) / 255)
    for seed in range(samples):
        transform(image, np.random.default_rng(seed))
        ours.append(log[:])
        log.clear()
    monkeypatch.setattr(timm_aa, "NAME_TO_OP", record_ops(timm_aa.NAME_TO_OP, log))
    transform = timm_aa_transform(aa)
    random.seed(0)
    np.random.seed(0)
    for _ in range(samples):
        transform(image)
        theirs.append(log[:])
        log.clear()
    return ours, theirs


@pytest.mark.parametrize(
    "aa",
    [
        "rand-m9-mstd0.5-inc1",  # the RA recipe
        "rand-n3-m12-p0.7-mstd101-mmax15",  # uniform magnitudes, a higher bound
        "rand-m7-n4-tweights",  # weighted choice without replacement
        "original-mstd0.5",
        "v0r",
        "augmix-m5-w4-d2",
        "augmix-a0.5-mstd2",  # random depth, gaussian magnitudes
    ],
)
def test_policy_op_and_magnitude_frequencies_match_timm(aa, monkeypatch):
    """For one image and many seeds: how many ops each image gets, which ops, and each op's
    argument distribution (the magnitude after noise, clipping, scaling and sign) agree with
    timm's own transform, instrumented the same way."""
    ours, theirs = applied_ops(aa, monkeypatch)
    assert_same_categories([len(x) for x in ours], [len(x) for x in theirs], "ops per image")
    ours_ops = [op for image in ours for op in image]
    theirs_ops = [op for image in theirs for op in image]
    assert_same_categories([n for n, _ in ours_ops], [n for n, _ in theirs_ops], "op choice")
    for name in sorted({n for n, args in theirs_ops if args}):
        assert_same_distribution(
            [args[0] for n, args in ours_ops if n == name],
            [args[0] for n, args in theirs_ops if n == name],
            f"{name} argument",
        )


# ------------------------------------------------------------------ colour jitter, train transform


@pytest.mark.parametrize("index, factor", [(0, 0.6), (1, 1.35), (2, 0.2), (3, 0.3), (3, -0.45)])
def test_each_colour_adjustment_equals_torchvision(index, factor):
    from torchvision.transforms import functional

    image = tiny_image((16, 12))
    theirs = [
        functional.adjust_brightness,
        functional.adjust_contrast,
        functional.adjust_saturation,
        functional.adjust_hue,
    ][index](image, factor)
    ours = transforms._COLOR_ADJUSTMENTS[index](image, factor)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("factors", [(0.4, 0.4, 0.4), (0.0, 0.5, 0.3, 0.1)])
def test_colour_jitter_distribution_matches_torchvision(factors):
    """Per-channel means of the jittered image over many seeds: torchvision's random order and
    factor ranges give the same distribution as ours."""
    from torchvision import transforms as tv

    image = tiny_image((8, 8))
    torch.manual_seed(0)
    jitter = tv.ColorJitter(*factors)
    theirs = np.stack([np.asarray(jitter(image)).mean((0, 1)) for _ in range(2000)])
    ours = np.stack(
        [
            np.asarray(transforms.color_jitter(image, factors, np.random.default_rng(s))).mean(
                (0, 1)
            )
            for s in range(2000)
        ]
    )
    for channel in range(3):
        assert_same_distribution(ours[:, channel], theirs[:, channel], f"channel {channel}")


def test_train_transform_follows_timm_order():
    """aa replaces colour jitter (timm disables it under AutoAugment/RandAugment), and the aa
    ops see the crop: the same seed gives crop+flip then the policy's draws."""
    image = tiny_image((40, 30))
    plain = transforms.TrainTransform(image_size=16, interpolation="bicubic")
    jitter = transforms.TrainTransform(image_size=16, interpolation="bicubic", color_jitter=0.4)
    aa = transforms.TrainTransform(image_size=16, interpolation="bicubic", aa="original")
    aa_jitter = transforms.TrainTransform(
        image_size=16, interpolation="bicubic", aa="original", color_jitter=0.4
    )
    policy = auto_augment.auto_augment("original", mean=aa.mean, resample=Image.Resampling.BICUBIC)
    for seed in range(20):
        crop = plain(image, np.random.default_rng(seed))
        np.testing.assert_array_equal(
            aa(image, np.random.default_rng(seed)), aa_jitter(image, np.random.default_rng(seed))
        )
        rng = np.random.default_rng(seed)
        np.testing.assert_array_equal(plain(image, rng), crop)
        np.testing.assert_array_equal(
            aa(image, np.random.default_rng(seed)), np.asarray(policy(Image.fromarray(crop), rng))
        )
    assert not all(
        np.array_equal(
            plain(image, np.random.default_rng(s)), jitter(image, np.random.default_rng(s))
        )
        for s in range(5)
    )


def test_random_train_interpolation_picks_bilinear_or_bicubic():
    """timm's 'random': the crop is the bilinear or the bicubic resize of the same window, each
    about half of the time (binomial bound)."""
    image = tiny_image((40, 30))
    picks = []
    for seed in range(300):
        out = transforms.train_crop(
            image, image_size=16, interpolation="random", rng=np.random.default_rng(seed)
        )
        window = transforms.random_resized_crop_window(30, 40, np.random.default_rng(seed))
        candidates = [
            transforms.resized_crop(image, window, 16, name, flip)
            for name in ("bilinear", "bicubic")
            for flip in (False, True)
        ]
        matches = [i for i, c in enumerate(candidates) if np.array_equal(out, c)]
        assert matches, seed
        picks.append(matches[0] // 2)
    bound = stats.norm.ppf(1 - ALPHA / 2) * np.sqrt(0.25 / len(picks))
    assert abs(np.mean(picks) - 0.5) < bound


@pytest.mark.parametrize(
    "key, bad, good",
    [
        ("aa", "rand-m9-x1", "rand-m9-mstd0.5-inc1"),
        ("aa", "augmix-m5-x2", "augmix-m5-w4-d2"),
        ("aa", "orignal", "v0r"),
        ("color_jitter", -0.1, 0.4),
        ("color_jitter_prob", 1.5, 0.8),
        ("train_interpolation", "cubic", "random"),
        ("reprob", 1.1, 0.25),
        ("remode", "zeros", "const"),
        ("recount", 0, 3),
    ],
)
def test_augmentation_keys_are_validated(key, bad, good):
    from configs import default
    from dpn_jax.errors import ConfigError
    from dpn_jax.train.config import validate_config

    config = default.get_config()
    config[key] = bad
    with pytest.raises(ConfigError, match=rf"^--config\.{key}=.*: must be "):
        validate_config(config)
    config[key] = good
    validate_config(config)


@pytest.mark.parametrize("interpolation", ["bicubic", "random"])
def test_no_aug_is_timms_noaug_train_transform(interpolation):
    """timm's --no-aug: resize the shorter side, centre crop, no flip; bit-identical."""
    image = tiny_image((50, 36))
    timm_transform = timm_transforms_factory.transforms_noaug_train(
        32, interpolation=interpolation, use_prefetcher=True
    )
    ours = transforms.TrainTransform(
        image_size=32, interpolation=interpolation, aa="original", color_jitter=0.4, no_aug=True
    )
    expected = timm_transform(image).numpy().transpose(1, 2, 0)
    for seed in range(3):
        np.testing.assert_array_equal(ours(image, np.random.default_rng(seed)), expected)


@pytest.mark.parametrize("aa", ["augmix-m5-w4-d2", "augmix-m3-b1"])
def test_augmix_output_distribution_matches_timm(aa):
    """AugMix's mixing (Dirichlet chain weights, Beta blend, or timm's blended approximation):
    per-channel means of the output, and its mean distance from the input, over many seeds
    agree with timm's."""
    image = tiny_image((8, 8))
    pixels = np.asarray(image, np.float64)

    def statistics(output):
        output = np.asarray(output, np.float64)
        return [*output.mean((0, 1)), np.abs(output - pixels).mean()]

    random.seed(0)
    np.random.seed(0)
    timm_transform = timm_aa_transform(aa)
    theirs = np.array([statistics(timm_transform(image)) for _ in range(1000)])
    transform = auto_augment.auto_augment(aa, mean=np.array(FILL) / 255)
    ours = np.array([statistics(transform(image, np.random.default_rng(s))) for s in range(1000)])
    for index, name in enumerate(["red", "green", "blue", "distance"]):
        assert_same_distribution(ours[:, index], theirs[:, index], name)
