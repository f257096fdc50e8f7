"""What the models take as input: normalisation, the eval crop, class names.

Training, evaluation and serving all normalise with `preprocess_input`, and
the dataset pipelines and SavedModel export share `preprocess_for_eval`, so
there is one definition of each in the project.
"""

import functools
import json
import os

import numpy as np
from keras import ops

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


def preprocess_input(x):
    """RGB in [0, 255] (channels last) to the ImageNet mean/std normalisation.

    The same normalisation as torchvision's weights, so their checkpoints load
    and evaluate unchanged.
    """
    x = ops.cast(x, "float32") if not _is_floating(x) else x
    mean = np.asarray(IMAGENET_MEAN_RGB, dtype="float64") * 255.0
    std = np.asarray(IMAGENET_STD_RGB, dtype="float64") * 255.0
    # (x - mean) / std as one multiply-add: a broadcast divide is slow in tf.data.
    scale, shift = (1.0 / std).astype("float32"), (-mean / std).astype("float32")
    return x * ops.cast(scale, x.dtype) + ops.cast(shift, x.dtype)


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


def decode_image(image_bytes):
    """Encoded JPEG/PNG/GIF/BMP bytes to uint8 RGB [height, width, 3].

    The format comes from the bytes, not the file name: ImageNet has PNG files
    named .JPEG, and CMYK or greyscale JPEGs become RGB.
    """
    import tensorflow as tf

    return tf.io.decode_image(
        image_bytes, channels=3, expand_animations=False, dtype=tf.uint8
    )


def resize_shorter_side(image, resize_size):
    """Resize so the shorter side is `resize_size` and the other
    `round(side * resize_size / shorter)`, with antialiased bilinear (as PIL)."""
    import tensorflow as tf

    shape = tf.shape(image)
    height = tf.cast(shape[0], tf.float64)
    width = tf.cast(shape[1], tf.float64)
    shorter = tf.minimum(height, width)
    scale = tf.cast(resize_size, tf.float64) / shorter
    new_height = tf.cast(tf.round(height * scale), tf.int32)
    new_width = tf.cast(tf.round(width * scale), tf.int32)
    return tf.image.resize(
        image, tf.stack([new_height, new_width]), method="bilinear", antialias=True
    )


def center_crop(image, image_size):
    """The centre `image_size` square, offset `(side - image_size) // 2`."""
    import tensorflow as tf

    shape = tf.shape(image)
    top = (shape[0] - image_size) // 2
    left = (shape[1] - image_size) // 2
    return image[top : top + image_size, left : left + image_size]


def preprocess_for_eval(image_bytes, image_size=224, resize_size=256):
    """The paper's evaluation view (§4) of one encoded image.

    Decode, resize the shorter side to `resize_size`, take the centre
    `image_size` x `image_size` crop and normalise: a float32
    [image_size, image_size, 3] tensor, exactly what the models take.
    """
    import tensorflow as tf

    if resize_size < image_size:
        raise ValueError(
            f"resize_size ({resize_size}) must be at least image_size ({image_size})."
        )
    image = decode_jpeg_accurately_or_any(image_bytes)
    image = resize_shorter_side(tf.cast(image, tf.float32), resize_size)
    image = center_crop(image, image_size)
    image = tf.ensure_shape(image, [image_size, image_size, 3])
    return preprocess_input(image)


def decode_jpeg_accurately_or_any(image_bytes):
    """JPEGs with the exact integer IDCT (as libjpeg in PIL); other formats as they are."""
    import tensorflow as tf

    return tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: decode_image(image_bytes),
    )
