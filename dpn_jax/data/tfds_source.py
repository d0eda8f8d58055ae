"""`imagenet2012` and `tfds:NAME`: any TFDS dataset with (image, label) supervised keys.

The dataset is prepared on first use (downloaded, or for ImageNet built from the ILSVRC2012
tars in the manual dir, by default `<data_dir>/downloads/manual`). Images stay encoded
(`SkipDecoding`) so training can use the fused JPEG decode-and-crop.
"""
from __future__ import annotations

import tensorflow as tf
import tensorflow_datasets as tfds

from dpn_jax.data.sources import Shard


class TfdsReader:
    def __init__(self, name: str, *, data_dir: str | None = None, manual_dir: str | None = None):
        self.name = name
        self.builder = tfds.builder(name, data_dir=data_dir)
        self.builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        info = self.builder.info
        if info.supervised_keys is None or len(info.supervised_keys) != 2:
            raise ValueError(f"tfds:{name} has no (image, label) supervised keys")
        self.image_key, self.label_key = info.supervised_keys
        if not isinstance(info.features[self.image_key], tfds.features.Image):
            raise ValueError(f"tfds:{name}: feature {self.image_key!r} is not an image")
        self.class_names = tuple(info.features[self.label_key].names)

    @property
    def default_eval_split(self) -> str:
        for name in ("validation", "test"):
            if name in self.builder.info.splits:
                return name
        raise ValueError(f"tfds:{self.name} has only splits {sorted(self.builder.info.splits)}; "
                         "pass eval_split (and train_split), e.g. 'train[90%:]'")

    def num_examples(self, split: str) -> int:
        return self.builder.info.splits[split].num_examples

    def shard(self, split: str, process_index: int, process_count: int) -> Shard:
        def process_split(index: int) -> str:
            return tfds.split_for_jax_process(split, process_index=index,
                                              process_count=process_count)

        examples = self.builder.as_dataset(
            split=process_split(process_index), shuffle_files=False,
            decoders={self.image_key: tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(add_tfds_id=True))
        examples = examples.map(lambda ex: {"image": ex[self.image_key],
                                            "label": tf.cast(ex[self.label_key], tf.int32),
                                            "id": ex["tfds_id"]})
        sizes = [self.num_examples(process_split(i)) for i in range(process_count)]
        return Shard(examples, sizes[process_index], max(sizes))
