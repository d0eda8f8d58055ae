"""The README demo: a small DPN trained on the offline `digits` dataset in a few CPU minutes.

Every key of the trainer is defined here, with its meaning in the comment that ends its line
(`python train.py --help` lists them); the other configs start from this one.

The demo's network is `model = "demo"`: dpn68 shrunk (dpn_jax.train.config.DEMO_MODEL_KWARGS:
one block per stage, narrow) to train in CPU minutes. The shrinkage belongs to that name:
`--config.model=dpn92` trains timm's dpn92, and `model_kwargs` set here or on the command line
override the named architecture's fields (or the demo's) one by one.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Model: an architecture of `dpn_jax.list_models()` plus DPN field overrides.
    config.model = "demo"  # "demo" (dpn68 shrunk for CPU minutes) or an architecture, e.g. dpn92
    # Architecture overrides (DPNConfig fields); unset: the architecture's own value.
    config.model_kwargs = ml_collections.ConfigDict(
        dict(
            k_sec=config_dict.placeholder(tuple),
            inc_sec=config_dict.placeholder(tuple),
            k_r=config_dict.placeholder(int),
            groups=config_dict.placeholder(int),
            small=config_dict.placeholder(bool),
            num_init_features=config_dict.placeholder(int),
            b=config_dict.placeholder(bool),
            act=config_dict.placeholder(str),
            head_act=config_dict.placeholder(str),
            block_act=config_dict.placeholder(str),
        )
    )
    config.init_from = config_dict.placeholder(str)  # a model directory to fine-tune from
    # float64 needs JAX_ENABLE_X64=1: everything in float64, for checking numerics against torch.
    config.dtype = "float32"  # compute: float32, bfloat16 (params stay float32) or float64
    config.drop_rate = 0.0  # dropout before the classifier

    # Data (see dpn_jax.data.pipeline): mean/std/crop_pct/interpolation default to the model's
    # pretrained cfg (or the fine-tuning source's).
    config.dataset = "digits"  # digits, folder:DIR, tfds:NAME or a TFDS name (README "Datasets")
    config.data_dir = config_dict.placeholder(str)  # TFDS data directory
    config.eval_split = config_dict.placeholder(str)  # unset: the dataset's validation split
    config.image_size = 32  # training and evaluation input size (pixels, square)
    config.mean = config_dict.placeholder(tuple)  # per RGB channel, of pixels in [0, 1]
    config.std = config_dict.placeholder(tuple)  # per RGB channel
    config.crop_pct = config_dict.placeholder(float)  # evaluation centre crop fraction
    config.interpolation = config_dict.placeholder(str)  # resize filter, e.g. "bicubic"
    config.data_workers = 0  # grain worker processes decoding batches (0: threads of the trainer)
    config.reduced_decode = False  # JPEGs decoded at 1/2-1/8 scale where the crop allows
    # Augmentation, timm's keys: `aa` and colour jitter (ignored when aa is set, as in timm;
    # timm's train.py default is 0.4) run per image on the host; random erasing (`reprob` > 0)
    # on the device. "random" train_interpolation is timm's train.py default.
    config.aa = config_dict.placeholder(str)  # timm policy, e.g. "rand-m9-mstd0.5-inc1", "original"
    config.color_jitter = 0.0  # brightness/contrast/saturation jitter strength
    config.color_jitter_prob = config_dict.placeholder(float)  # unset: always jitter
    config.train_interpolation = config_dict.placeholder(str)  # unset: interpolation; "random"
    config.reprob = 0.0  # random erasing probability per image
    config.remode = "pixel"  # random erasing fill: "const", "rand" or "pixel"
    config.recount = 1  # random erasing: at most this many boxes per image
    config.no_aug = False  # timm --no-aug: the eval transform at the training size (no crop/flip)
    # Mixup/CutMix on the device (timm's Mixup, targets smoothed by `smoothing`): active when
    # mixup > 0, cutmix > 0 or cutmix_minmax is set; needs an even batch per device.
    config.mixup = 0.0  # mixup alpha (0: off)
    config.cutmix = 0.0  # cutmix alpha (0: off)
    config.cutmix_minmax = config_dict.placeholder(tuple)  # cutmix box size range, overrides alpha
    config.mixup_prob = 1.0  # probability of mixing a batch
    config.mixup_switch_prob = 0.5  # probability of cutmix instead of mixup when both are on
    config.mixup_mode = "batch"  # "batch", "pair" or "elem"

    # Optimisation: `learning_rate` is for `base_batch_size` and scales linearly with the
    # effective batch (batch_size * grad_accum_steps).
    config.num_epochs = 30.0  # run length in epochs (cooldown_epochs come on top)
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.batch_size = 64  # global, over all devices and processes
    config.eval_batch_size = 128  # global, for evaluation
    config.grad_accum_steps = 1  # optax.MultiSteps
    config.learning_rate = 0.1  # for base_batch_size, scaled linearly to the effective batch
    config.base_batch_size = 64  # the batch learning_rate is given for
    # timm's scheduler (create_scheduler_v2): LR from warmup_lr up to the peak over
    # warmup_epochs, then "cosine" (down to min_lr at the end of the run, less cooldown_epochs),
    # "step" (x decay_rate every decay_epochs), "multistep" (x decay_rate at each of
    # decay_milestones) or "constant"; updated every optimizer update (sched_on_updates) or epoch.
    config.schedule = "cosine"  # "cosine", "step", "multistep" or "constant"
    config.sched_on_updates = True  # False: the LR changes once per epoch (timm's default)
    config.warmup_epochs = 1.0  # linear warm-up from warmup_lr to the peak
    config.warmup_lr = 1e-5  # the LR the warm-up starts from
    config.min_lr = 0.0  # the cosine's end value
    config.cooldown_epochs = 0.0  # at min_lr after the cosine, added to num_epochs (as timm)
    config.decay_epochs = 90.0  # "step": multiply by decay_rate every decay_epochs
    config.decay_milestones = (90, 180, 270)  # "multistep": multiply by decay_rate at each
    config.decay_rate = 0.1  # "step"/"multistep" factor
    # timm's optimizers; opt_eps/opt_betas unset: the optimizer's default.
    config.opt = "momentum"  # "sgd"/"nesterov" (Nesterov), "momentum", "adamw", "lamb", "rmsproptf"
    config.opt_eps = config_dict.placeholder(float)  # optimizer epsilon
    config.opt_betas = config_dict.placeholder(tuple)  # Adam-style betas
    config.momentum = 0.9  # SGD / RMSProp momentum
    config.weight_decay = 1e-4  # on the parameters weight_decay_pattern matches
    config.weight_decay_pattern = r".*/kernel"  # conv and dense kernels: not BatchNorm, not biases
    config.clip_grad = config_dict.placeholder(float)  # unset: no clipping
    config.clip_mode = "norm"  # "norm" (global), "value" or "agc" (unit-wise, not the head)
    # Loss: softmax cross-entropy with label smoothing `smoothing`, or timm's BinaryCrossEntropy.
    config.smoothing = 0.0  # label smoothing (timm's --smoothing)
    config.bce_loss = False  # timm's BinaryCrossEntropy instead of softmax cross-entropy
    config.bce_target_thresh = config_dict.placeholder(float)  # BCE targets above it become 1
    config.ema_decay = 0.0  # > 0: keep an EMA of the weights (timm ModelEmaV3), export it
    config.ema_warmup = False  # timm --model-ema-warmup: decay min(ema_decay, 1 - (1 + n)^-2/3)
    config.skip_nonfinite_updates = False  # False: stop with an error at the first NaN/Inf step

    # Running.
    config.parallelism = "shard_map"  # or "pmap" (the same per-device step; README "Training")
    config.deterministic = False  # GPU: XLA's deterministic ops, bit-reproducible but slower
    config.seed = 0  # initialisation, augmentation and data order
    config.log_every_steps = 10  # metrics.jsonl, TensorBoard and the progress bar
    config.checkpoint_every_steps = 500  # also at the end and on SIGTERM/SIGINT
    config.keep_checkpoints = 3  # the newest N checkpoints are kept
    return config
