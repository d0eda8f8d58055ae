"""The README demo: a small DPN trained on the offline `digits` dataset in a few CPU minutes.

Every key of the trainer is defined here; the other configs start from this one.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Model: an architecture of `dpn_jax.list_models()` plus DPN field overrides.
    config.model = "dpn68"
    config.model_kwargs = ml_collections.ConfigDict(
        dict(k_sec=(1, 1, 1, 1), k_r=32, groups=4, num_init_features=16, inc_sec=(8, 8, 8, 8))
    )
    config.init_from = config_dict.placeholder(str)  # a model directory to fine-tune from
    # Compute dtype; parameters stay float32 ("bfloat16" on GPU/TPU). "float64": everything in
    # float64 (needs JAX_ENABLE_X64=1; slow, for checking numerics against PyTorch's double).
    config.dtype = "float32"
    config.drop_rate = 0.0

    # Data (see dpn_jax.data.pipeline): mean/std/crop_pct/interpolation default to the model's
    # pretrained cfg (or the fine-tuning source's).
    config.dataset = "digits"
    config.data_dir = config_dict.placeholder(str)
    config.eval_split = config_dict.placeholder(str)
    config.image_size = 32
    config.mean = config_dict.placeholder(tuple)
    config.std = config_dict.placeholder(tuple)
    config.crop_pct = config_dict.placeholder(float)
    config.interpolation = config_dict.placeholder(str)
    config.data_workers = 0  # grain worker processes decoding batches (0: threads of the trainer)
    # Augmentation, timm's keys: `aa` (e.g. "rand-m9-mstd0.5-inc1", "original") and colour jitter
    # (ignored when aa is set, as in timm; timm's train.py default is 0.4) run per image on the
    # host; random erasing (`reprob` > 0) on the device. train_interpolation: unset is
    # `interpolation`; "random" is timm's train.py default (bilinear or bicubic per image).
    config.aa = config_dict.placeholder(str)
    config.color_jitter = 0.0
    config.color_jitter_prob = config_dict.placeholder(float)
    config.train_interpolation = config_dict.placeholder(str)
    config.reprob = 0.0
    config.remode = "pixel"
    config.recount = 1
    # timm's --no-aug: the eval transform at the training size (no crop, flip or aa).
    config.no_aug = False
    # Mixup/CutMix on the device (timm's Mixup, targets smoothed by `smoothing`): active when
    # mixup > 0, cutmix > 0 or cutmix_minmax is set; needs an even batch per device.
    config.mixup = 0.0
    config.cutmix = 0.0
    config.cutmix_minmax = config_dict.placeholder(tuple)
    config.mixup_prob = 1.0
    config.mixup_switch_prob = 0.5
    config.mixup_mode = "batch"  # "batch", "pair" or "elem"

    # Optimisation: `learning_rate` is for `base_batch_size` and scales linearly with the
    # effective batch (batch_size * grad_accum_steps).
    config.num_epochs = 30.0
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.batch_size = 64  # global, over all devices and processes
    config.eval_batch_size = 128
    config.grad_accum_steps = 1  # optax.MultiSteps
    config.learning_rate = 0.1
    config.base_batch_size = 64
    # timm's scheduler (create_scheduler_v2): LR from warmup_lr up to the peak over
    # warmup_epochs, then "cosine" (down to min_lr at the end of the run, less cooldown_epochs),
    # "step" (x decay_rate every decay_epochs), "multistep" (x decay_rate at each of
    # decay_milestones) or "constant"; updated every optimizer update (sched_on_updates) or epoch.
    config.schedule = "cosine"
    config.sched_on_updates = True
    config.warmup_epochs = 1.0
    config.warmup_lr = 1e-5
    config.min_lr = 0.0
    config.cooldown_epochs = 0.0  # at min_lr after the cosine, added to num_epochs (as timm)
    config.decay_epochs = 90.0
    config.decay_milestones = (90, 180, 270)
    config.decay_rate = 0.1
    # timm's optimizers: "sgd"/"nesterov" (Nesterov momentum), "momentum", "adamw", "lamb",
    # "rmsproptf"; opt_eps/opt_betas unset: the optimizer's default.
    config.opt = "momentum"
    config.opt_eps = config_dict.placeholder(float)
    config.opt_betas = config_dict.placeholder(tuple)
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.weight_decay_pattern = r".*/kernel"  # conv and dense kernels: not BatchNorm, not biases
    config.clip_grad = config_dict.placeholder(float)  # unset: no clipping
    config.clip_mode = "norm"  # "norm" (global), "value" or "agc" (unit-wise, not the head)
    # Loss: softmax cross-entropy with label smoothing `smoothing`, or timm's BinaryCrossEntropy
    # (bce_loss; targets above bce_target_thresh become 1 when it is set).
    config.smoothing = 0.0
    config.bce_loss = False
    config.bce_target_thresh = config_dict.placeholder(float)
    config.ema_decay = 0.0  # > 0: keep an EMA of the weights (timm ModelEmaV3), export it
    config.ema_warmup = False  # timm --model-ema-warmup: decay min(ema_decay, 1 - (1 + n)^-2/3)
    config.skip_nonfinite_updates = False  # False: stop with an error at the first NaN/Inf step

    # Running.
    config.parallelism = "shard_map"  # or "pmap" (the same per-device step; README "Training")
    config.deterministic = False  # GPU: XLA's deterministic ops, bit-reproducible but slower
    config.seed = 0
    config.log_every_steps = 10
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 3
    return config
