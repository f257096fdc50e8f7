"""What the models take as input and give out: normalisation and class names.

Training, evaluation and serving all normalise with `preprocess_input`, the
one definition in the project. The eval crop of encoded images,
`preprocess_for_eval`, is TensorFlow's: `keras_resnext.kernels.images`.
"""

import functools
import json
import os

import numpy as np
from keras import ops

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


def preprocess_input(x, mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB):
    """RGB in [0, 255] (channels last) to `(x / 255 - mean) / std`.

    The default is ImageNet's mean/std, as torchvision's weights, so their
    checkpoints load and evaluate unchanged; weights normalised otherwise
    carry theirs in their `EvalTransform`.
    """
    x = ops.cast(x, "float32") if not _is_floating(x) else x
    mean = np.asarray(mean, dtype="float64") * 255.0
    std = np.asarray(std, dtype="float64") * 255.0
    # (x - mean) / std as one multiply-add: a broadcast divide is slow in tf.data.
    scale, shift = ops.cast((1.0 / std).astype("float32"), x.dtype), ops.cast(
        (-mean / std).astype("float32"), x.dtype)
    if _fully_known(x.shape):
        # TensorFlow's broadcast of a per-channel vector inside an arithmetic op
        # is several times slower than broadcast_to and then an op of equal
        # shapes (issue 14); a symbolic shape keeps the plain broadcast.
        scale, shift = ops.broadcast_to(scale, x.shape), ops.broadcast_to(shift, x.shape)
    return x * scale + shift


def outputs_probabilities(model):
    """Whether `model` ends in a softmax (else it gives logits)."""
    activation = getattr(model, "classifier_activation", None)
    if activation is None:
        last = model.layers[-1]
        activation = getattr(getattr(last, "activation", None), "__name__", None)
    return activation == "softmax"


def _fully_known(shape):
    # A TensorShape of unknown rank (tf.io.decode_image's) can't be iterated.
    return getattr(shape, "rank", 0) is not None and None not in tuple(shape)


def _is_floating(x):
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return False
    return "float" in str(dtype)


@functools.lru_cache(maxsize=1)
def imagenet_classes():
    """The 1000 ImageNet-1k classes in label order, as (wordnet_id, name) pairs."""
    path = os.path.join(os.path.dirname(__file__), "imagenet_classes.json")
    with open(path, encoding="utf-8") as f:
        return tuple(tuple(pair) for pair in json.load(f))


def decode_predictions(predictions, top=5):
    """Top-`top` (wordnet_id, class_name, score) per image, highest first.

    `predictions` is [batch, 1000] scores, as from an `include_top` model.
    """
    predictions = np.asarray(ops.convert_to_numpy(predictions))
    classes = imagenet_classes()
    if predictions.ndim != 2 or predictions.shape[1] != len(classes):
        raise ValueError(
            f"decode_predictions expects a batch of {len(classes)} ImageNet scores, "
            f"shape (batch, {len(classes)}); got shape {predictions.shape}."
        )
    decoded = []
    for row in predictions:
        best = np.argsort(-row, kind="stable")[:top]
        decoded.append([(*classes[i], float(row[i])) for i in best])
    return decoded
