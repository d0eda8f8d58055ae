"""timm's RandAugment "RA" recipe that trained `dpn68b.ra_in1k`: `--config configs/ra.py:dpn68b`.

Sources. The model card (huggingface.co/timm/dpn68b.ra_in1k, "Model Details"): "RandAugment
`RA` recipe. Inspired by and evolved from EfficientNet RandAugment recipes. Published as `B`
recipe in ResNet Strikes Back. SGD (w/ Nesterov) optimizer and AGC (adaptive gradient
clipping). Step (exponential decay w/ staged warmup) LR schedule with warmup." The numbers the
card leaves out are taken from the nearest published settings: Ross Wightman's gist of "old
RA2 hparams for some ResNet models, trained in the transition from SGD + RandAugment based 'RA'
settings to RMSProp based 'RA2'" (gist.github.com/rwightman/07839a82d0f50e42840168bc43df70b3,
an ecaresnet26d yaml for 2 GPUs: batch 2 x 352, lr 0.082, momentum 0.9, aa
rand-m9-mstd1.0-inc1, color_jitter 0.4, decay_epochs 1.0, decay_rate 0.988, min_lr 1e-5,
cooldown_epochs 10, EMA 0.999987, epochs 700, crop_pct 0.94 at 256 px) - not dpn68b's own run.
Mixup (0.19 there) is left off: the card names RA, not RA2 "with Mixup added".
Not published for this model, chosen here: warmup_epochs 3, weight_decay 1e-4, AGC factor
0.01 (timm's NFNet default), random erasing 0.4 'pixel', smoothing 0.1; the card's training
size for dpn68b.ra_in1k is 224.
"""

import ml_collections

from configs import imagenet


def get_config(variant: str = "dpn68b") -> ml_collections.ConfigDict:
    config = imagenet.get_config(variant)
    config.image_size = 224
    config.crop_pct = 0.94
    config.aa = "rand-m9-mstd1.0-inc1"
    config.color_jitter = 0.4  # ignored while aa is set (timm's rule)
    config.train_interpolation = "random"
    config.reprob = 0.4
    config.remode = "pixel"
    config.smoothing = 0.1

    config.opt = "sgd"  # timm: Nesterov momentum
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.clip_grad = 0.01
    config.clip_mode = "agc"
    config.base_batch_size = 704
    config.batch_size = 704
    config.learning_rate = 0.082
    config.num_epochs = 700.0
    config.schedule = "step"
    config.sched_on_updates = False  # timm's default: once per epoch
    config.decay_epochs = 1.0
    config.decay_rate = 0.988
    config.warmup_epochs = 3.0
    config.warmup_lr = 1e-5
    config.min_lr = 1e-5
    config.cooldown_epochs = 10.0
    config.ema_decay = 0.999987
    config.ema_warmup = False
    return config
