"""CIFAR-style views of one encoded image (§5.3 of the paper).

Training translates by up to 4 pixels (pad 4, random 32x32 crop) and flips
horizontally; evaluation uses the image as it is. Both normalise with
`keras_resnext.preprocess_input`, the project's one normalisation.
"""

import tensorflow as tf

from keras_resnext.kernels.images import decode_image
from keras_resnext.preprocessing import preprocess_input

__all__ = ["PADDING", "preprocess_for_eval", "preprocess_for_train"]

PADDING = 4


def preprocess_for_train(image_bytes, image_size=32, seed=None, padding=PADDING):
    """Random translation and flip of one encoded image: float32 [size, size, 3].

    The padding is added after normalisation, so it is the mean colour, as in
    fb.resnet.torch's CIFAR pipeline that the paper's code builds on. `seed` is
    a [2] integer tensor for the stateless random ops; None draws one.
    """
    if seed is None:
        seed = tf.random.uniform([2], maxval=tf.int32.max, dtype=tf.int32)
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=2)
    )
    image = preprocess_for_eval(image_bytes, image_size)
    image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    image = tf.image.stateless_random_crop(image, [image_size, image_size, 3], crop_seed)
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


def preprocess_for_eval(image_bytes, image_size=32):
    """One encoded image, normalised: float32 [image_size, image_size, 3].

    Images of another size are centre-cropped or zero-padded to `image_size`.
    """
    image = decode_image(image_bytes)
    image = tf.image.resize_with_crop_or_pad(image, image_size, image_size)
    image = tf.ensure_shape(tf.cast(image, tf.float32), [image_size, image_size, 3])
    return preprocess_input(image)
