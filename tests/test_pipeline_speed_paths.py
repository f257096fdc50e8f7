"""What the training pipeline's faster paths (issue 14) must keep computing.

Normalisation moved from a map over batches into the per-image map, labels
are checked per batch, the bicubic resize reads float32 pixels and
`preprocess_input` broadcasts its mean/std before the multiply-add; none of
that may change a value, an error or a symbolic use.
"""

import io
import os

import keras
import numpy as np
import pytest
from PIL import Image

import keras_resnext
import pipelines
from pipelines import imagenet
from pipelines.sources import open_source
from tfrecord_files import write_tfrecords

import tensorflow as tf  # noqa: E402  After keras_resnext, which sets TF's options.

MEAN_RGB = np.array(keras_resnext.preprocessing.IMAGENET_MEAN_RGB) * 255.0
STD_RGB = np.array(keras_resnext.preprocessing.IMAGENET_STD_RGB) * 255.0


def encode_jpeg(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def textured_folder(root, count=6, height=40, width=52):
    rng = np.random.default_rng(0)
    for index in range(count):
        directory = os.path.join(root, "train", f"class_{index % 2}")
        os.makedirs(directory, exist_ok=True)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        with open(os.path.join(directory, f"{index}.jpg"), "wb") as f:
            f.write(encode_jpeg(pixels))


def reference_train_view(image_bytes, image_size, seed):
    """The paper view of one image, written out step by step: crop, flip,
    bicubic resize of the uint8 crop, (x / 255 - mean) / std."""
    crop_seed, flip_seed, _, _ = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    image = imagenet.decode_random_crop(image_bytes, crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = tf.image.resize(image, [image_size, image_size], method="bicubic").numpy()
    return (image.astype(np.float64) - MEAN_RGB) / STD_RGB


def test_training_batches_are_the_per_image_reference_views(tmp_path):
    textured_folder(str(tmp_path))
    source, seed, image_size = f"folder:{tmp_path}", 5, 24
    dataset = pipelines.build_dataset(source, "train", 3, True, image_size=image_size,
                                      deterministic=True, seed=seed)
    images = np.concatenate([batch.numpy() for batch, _ in dataset])
    # The same shuffled keys and per-element seeds as build_dataset draws.
    records = open_source(source).records(
        "train", shuffle=True, shuffle_buffer=None, seed=seed, num_shards=1, shard_index=0,
        unreadable=None)
    element_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    expected = [
        reference_train_view(tf.io.read_file(path), image_size, element_seed)
        for (path, _), element_seed in tf.data.Dataset.zip(records, element_seeds)
    ]
    assert images.shape == (6, image_size, image_size, 3)
    np.testing.assert_allclose(images, np.stack(expected), rtol=0, atol=1e-5)


def test_bicubic_training_resize_is_bit_identical_to_resizing_the_uint8_crop():
    crop = tf.constant(np.random.default_rng(1).integers(0, 256, (37, 61, 3), np.uint8))
    for size in (16, 224):
        np.testing.assert_array_equal(
            imagenet.resize_crop(crop, size),
            tf.image.resize(crop, [size, size], method="bicubic"))


def test_a_label_out_of_range_in_a_training_batch_names_its_record(tmp_path):
    pixels = np.zeros((8, 8, 3), np.uint8)
    examples = [(encode_jpeg(pixels), label) for label in (1, 3, 2)]  # 1-based: 3 is 2
    (path,) = write_tfrecords(str(tmp_path), "train", 1, examples)
    dataset = pipelines.build_dataset(f"tfrecord:{tmp_path}", "train", 3, True, image_size=8,
                                      tfrecord_num_classes=2, deterministic=True)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=f"Label 2 is outside \\[0, 2\\) in {path} record 1"):
        for _ in dataset:
            pass


def test_preprocess_input_of_concrete_and_symbolic_shapes():
    pixels = np.random.default_rng(2).uniform(0, 255, (2, 5, 7, 3)).astype("float32")
    expected = (pixels - MEAN_RGB) / STD_RGB
    np.testing.assert_allclose(keras_resnext.preprocess_input(pixels), expected, atol=1e-5)
    unknown_shape = tf.function(keras_resnext.preprocess_input,
                                input_signature=[tf.TensorSpec([None, None, None, 3])])
    np.testing.assert_allclose(unknown_shape(pixels), expected, atol=1e-5)
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras_resnext.preprocess_input(inputs))
    np.testing.assert_allclose(model(pixels), expected, atol=1e-5)


def test_preprocess_input_of_a_decoded_image_of_unknown_rank():
    pixels = np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype="uint8")
    encoded = tf.io.encode_png(pixels).numpy()
    # decode_image (GIFs allowed) gives a tensor of unknown rank.
    dataset = tf.data.Dataset.from_tensors(encoded).map(
        lambda png: keras_resnext.preprocess_input(tf.io.decode_image(png, channels=3)))
    np.testing.assert_allclose(next(iter(dataset)), (pixels - MEAN_RGB) / STD_RGB, atol=1e-5)
