"""TFRecord files in the layout of TF's build_imagenet_data.py, for tests."""

import os
import struct

import keras_resnext  # noqa: F401  Sets TensorFlow's CPU options before TF loads.
import tensorflow as tf  # noqa: E402


def tf_example(image_bytes, label):
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "image/format": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"JPEG"])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_tfrecords(directory, split, num_files, examples):
    """Spreads (image_bytes, label) over `split-0000i-of-0000n` files."""
    paths = []
    for shard in range(num_files):
        path = os.path.join(directory, f"{split}-{shard:05d}-of-{num_files:05d}")
        with tf.io.TFRecordWriter(path) as writer:
            for image_bytes, label in examples[shard::num_files]:
                writer.write(tf_example(image_bytes, label))
        paths.append(path)
    return paths


def corrupt_record_data(path, index):
    """Flips one byte of record `index`'s data, so that its data CRC fails."""
    with open(path, "r+b") as f:
        offset = 0
        for _ in range(index):
            f.seek(offset)
            (length,) = struct.unpack("<Q", f.read(8))
            offset += 8 + 4 + length + 4  # length, its CRC, the data, its CRC
        f.seek(offset + 12)
        first = f.read(1)
        f.seek(offset + 12)
        f.write(bytes([first[0] ^ 0xFF]))
