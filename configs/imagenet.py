"""ImageNet-1k with the DPN model card's recipe: `--config configs/imagenet.py:dpn92`.

SGD momentum 0.9, weight decay 1e-4, LR 0.316 (= sqrt(0.1), 0.4 for dpn98) at batch 1280
(960 for dpn131), 224 input, bicubic, crop 0.875; the LR is scaled linearly to the global batch
actually used. The paper divides the LR by 10 on plateaus; here at fixed epochs.
"""

import ml_collections

from configs import default

RECIPE_BATCH = {"dpn131": 960}
RECIPE_LR = {"dpn98": 0.4}


def get_config(variant: str = "dpn92") -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model = variant
    config.dataset = "imagenet2012"
    config.image_size = 224
    config.crop_pct = 0.875
    config.interpolation = "bicubic"
    config.dtype = "bfloat16"

    config.base_batch_size = RECIPE_BATCH.get(variant, 1280)
    config.batch_size = config.base_batch_size
    config.eval_batch_size = 1000
    config.learning_rate = RECIPE_LR.get(variant, 0.316)
    config.num_epochs = 100.0
    config.schedule = "multistep"
    config.decay_milestones = (30, 60, 90)
    config.sched_on_updates = False
    config.warmup_epochs = 0.0
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    return config
