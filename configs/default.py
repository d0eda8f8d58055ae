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
    config.dtype = "float32"  # compute dtype; parameters stay float32 ("bfloat16" on GPU/TPU)
    config.drop_rate = 0.0  # dropout before the classifier

    # Data (see dpn_jax.data.pipeline): mean/std/crop_pct/interpolation default to the model's
    # pretrained cfg (or the fine-tuning source's).
    config.dataset = "digits"  # digits, folder:DIR, tfds:NAME or a TFDS name (README "Data")
    config.data_dir = config_dict.placeholder(str)  # TFDS data directory
    config.eval_split = config_dict.placeholder(str)  # unset: the dataset's validation split
    config.image_size = 32  # training and evaluation input size (pixels, square)
    config.mean = config_dict.placeholder(tuple)  # per RGB channel, of pixels in [0, 1]
    config.std = config_dict.placeholder(tuple)  # per RGB channel
    config.crop_pct = config_dict.placeholder(float)  # evaluation centre crop fraction
    config.interpolation = config_dict.placeholder(str)  # resize filter, e.g. "bicubic"
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

    # Optimisation: `learning_rate` is for `base_batch_size` and scales linearly with the
    # effective batch (batch_size * grad_accum_steps).
    config.num_epochs = 30.0
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.batch_size = 64  # global, over all devices and processes
    config.eval_batch_size = 128  # global, for evaluation
    config.grad_accum_steps = 1  # optax.MultiSteps
    config.learning_rate = 0.1  # for base_batch_size, scaled linearly to the effective batch
    config.base_batch_size = 64  # the batch learning_rate is given for
    config.schedule = "cosine"  # "cosine" (after linear warmup), "step" or "constant"
    config.warmup_epochs = 1.0
    config.step_decay_epochs = (30, 60, 90)  # "step": multiply by step_decay_factor at each
    config.step_decay_factor = 0.1  # see step_decay_epochs
    config.momentum = 0.9  # SGD momentum
    config.nesterov = False  # Nesterov momentum
    config.weight_decay = 1e-4  # L2, on the parameters weight_decay_pattern matches
    config.weight_decay_pattern = r".*/kernel"  # conv and dense kernels: not BatchNorm, not biases
    config.label_smoothing = 0.0  # of the cross-entropy targets
    config.ema_decay = 0.0  # > 0: keep an EMA of the weights, evaluate and export it
    config.skip_nonfinite_updates = False  # False: stop with an error at the first NaN/Inf step

    # Running.
    config.parallelism = "shard_map"  # or "pmap" (the same per-device step; README "Training")
    config.deterministic = False  # GPU: XLA's deterministic ops, bit-reproducible but slower
    config.seed = 0  # initialisation, augmentation and data order
    config.log_every_steps = 10  # metrics.jsonl, TensorBoard and the progress bar
    config.checkpoint_every_steps = 500  # also at the end and on SIGTERM/SIGINT
    config.keep_checkpoints = 3  # the newest N checkpoints are kept
    return config
