"""Fine-tune a converted or exported model directory on another dataset with a new head.

    python train.py --config configs/finetune.py --workdir runs/ft \
        --config.init_from converted/dpn68b --config.dataset folder:/data/flowers

Architecture, model_kwargs and preprocessing come from the directory's metadata.json; the
classifier is re-initialised when `num_classes` differs.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.init_from = ""  # required: set with --config.init_from=DIR
    config.image_size = 224
    config.batch_size = 64
    config.base_batch_size = 256
    config.learning_rate = 0.01
    config.weight_decay = 1e-4
    config.num_epochs = 10.0
    config.warmup_epochs = 1.0
    config.smoothing = 0.1
    config.ema_decay = 0.999
    config.ema_warmup = True  # a short fine-tune: the EMA follows the weights early on
    config.log_every_steps = 20
    return config
