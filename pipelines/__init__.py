"""tf.data input pipelines for ResNeXt training and evaluation.

`build_dataset(source, split, batch_size, training)` gives one pass of
`(images, labels)` batches; `describe_source(source, split)` gives the class
names and example count. `pipelines.imagenet` and `pipelines.cifar` hold the
per-image views; the ImageNet eval crop is `keras_resnext`'s own.
"""

import keras_resnext  # noqa: F401  Sets TensorFlow's CPU options before TF loads.
from pipelines import cifar, imagenet  # noqa: E402
from pipelines.dataset import build_dataset  # noqa: E402
from pipelines.sources import SPLITS, SplitInfo, describe_source  # noqa: E402

__all__ = [
    "SPLITS",
    "SplitInfo",
    "build_dataset",
    "cifar",
    "describe_source",
    "imagenet",
]
