"""Object-detection input for keras-hub's RetinaNet: `(images, {"boxes",
"labels"})` batches from TFDS `coco/2017` or `voc/2007`, or a COCO-format
folder.

A source is a string, as `train/detection.py` passes it:

- `coco/2017`, `voc/2007` or `tfds:NAME`: a TFDS detection dataset (one with
  `objects/bbox` and `objects/label`); val is its `validation` split;
- `coco:ROOT`: the layout of the COCO download,
  `ROOT/annotations/instances_<split>*.json` with the images of that split in
  `ROOT/<split>*/` (the folder named like the JSON file: `instances_val2017.json`
  and `val2017/`), read with `json`, without pycocotools. Categories become
  labels 0.. in the order of their ids, as in TFDS.

Every example becomes one `image_size` square: resized so that its longer
side is `image_size` (aspect kept), zero-padded at the bottom and right, its
boxes scaled alike, in absolute pixels of that square as `BOX_FORMAT`
(keras-hub's default, "yxyx"). Training flips half the images horizontally.
Crowd (COCO) and difficult (VOC) boxes are left out of training and of the
evaluation's ground truth (COCO's evaluation instead ignores detections on
crowds; the difference is small). Batches pad boxes and labels with -1,
keras-hub's "no box"; every image keeps at least one row, so a batch without
objects still has a box axis.
"""

import contextlib
import dataclasses
import functools
import glob
import json
import os

import numpy as np
import tensorflow as tf

from keras_resnext.kernels.images import decode_image
from pipelines.dataset import UnreadableFiles

__all__ = ["BOX_FORMAT", "SPLITS", "DetectionSplitInfo", "build_detection_dataset",
           "describe_detection_source", "parse_detection_source", "read_coco_split"]

BOX_FORMAT = "yxyx"
SPLITS = ("train", "val")
TFDS_SPLITS = {"train": "train", "val": "validation"}
# The per-box flag of boxes that are not objects to find.
TFDS_IGNORED_BOX_FEATURES = ("is_crowd", "is_difficult")
PADDING = -1.0
SHUFFLE_BUFFER = 1024


@dataclasses.dataclass(frozen=True)
class DetectionSplitInfo:
    source: str
    split: str
    class_names: tuple
    num_examples: int

    @property
    def num_classes(self):
        return len(self.class_names)


def parse_detection_source(source):
    """`("coco", ROOT)` or `("tfds", NAME)`; ValueError for another kind."""
    kind, _, location = source.partition(":")
    if kind == "coco" and location:
        return "coco", location
    if kind == "tfds" and location:
        return "tfds", location
    if location and not location[0].isdigit():  # TFDS names may end in :VERSION.
        raise ValueError(f"Unknown detection source {source!r}; use a TFDS name "
                         "(coco/2017, voc/2007), tfds:NAME or coco:ROOT.")
    return "tfds", source


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; splits are 'train' and 'val'.")


# --------------------------------------------------------------------------
# COCO-format folders


@dataclasses.dataclass(frozen=True)
class CocoSplit:
    """One split of a COCO-format folder: image paths, and per image its
    boxes (normalised yxyx, float32 [n, 4]) and labels (int32 [n])."""

    annotation_file: str
    class_names: tuple
    image_paths: tuple
    boxes: tuple
    labels: tuple


def read_coco_split(root, split):
    """Read `ROOT/annotations/instances_<split>*.json`; every image it names
    must exist. Raises ValueError (missing or malformed files) in one line."""
    _check_split(split)
    annotation_file = _coco_annotation_file(root, split)
    try:
        with open(annotation_file, encoding="utf-8") as f:
            document = json.load(f)
        images, annotations = document["images"], document.get("annotations", [])
        categories = sorted(document["categories"], key=lambda category: category["id"])
        class_names = tuple(category["name"] for category in categories)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{annotation_file}: not COCO instances JSON ({error!r}).") from None
    label_of = {category["id"]: label for label, category in enumerate(categories)}
    image_folder = os.path.join(
        root, os.path.basename(annotation_file)[len("instances_"):-len(".json")])
    present = set(os.listdir(image_folder)) if os.path.isdir(image_folder) else set()
    with _naming_the_record(annotation_file, "image", images):
        by_image = {image["id"]: ([], []) for image in images}
    for annotation in annotations:
        with _naming_the_record(annotation_file, "annotation", annotation):
            x, y, width, height = annotation["bbox"]
            crowd = annotation.get("iscrowd", 0) or width <= 0 or height <= 0
            image_id, category_id = annotation["image_id"], annotation["category_id"]
        if crowd:
            continue
        if image_id not in by_image or category_id not in label_of:
            raise ValueError(f"{annotation_file}: annotation {annotation.get('id')} names an "
                             "image or category the file does not list.")
        by_image[image_id][0].append((y, x, y + height, x + width))
        by_image[image_id][1].append(label_of[category_id])
    paths, boxes, labels = [], [], []
    for image in images:
        path = os.path.join(image_folder, image["file_name"])
        # A file_name may have folders (COCO's format allows it); listdir sees only the top.
        if image["file_name"] not in present and not os.path.isfile(path):
            raise ValueError(f"{annotation_file} lists {image['file_name']}, which is not in "
                             f"{image_folder}.")
        paths.append(path)
        with _naming_the_record(annotation_file, "image", image):
            scale = np.array([image["height"], image["width"]] * 2, dtype=np.float64)
        image_boxes, image_labels = by_image[image["id"]]
        boxes.append((np.reshape(np.array(image_boxes, np.float64), (-1, 4)) / scale)
                     .astype(np.float32))
        labels.append(np.array(image_labels, np.int32))
    return CocoSplit(annotation_file, class_names, tuple(paths), tuple(boxes), tuple(labels))


@contextlib.contextmanager
def _naming_the_record(annotation_file, kind, record):
    """A malformed record of `annotation_file` as one ValueError naming it."""
    try:
        yield
    except (ValueError, KeyError, TypeError) as error:
        which = f"{kind} {record.get('id')}" if isinstance(record, dict) else f"the {kind} list"
        raise ValueError(f"{annotation_file}: {which} is malformed ({error!r}).") from None


def _coco_annotation_file(root, split):
    if not os.path.isdir(root):
        raise ValueError(f"coco:{root}: no such folder.")
    pattern = os.path.join(glob.escape(root), "annotations", f"instances_{split}*.json")
    found = sorted(glob.glob(pattern))
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({', '.join(found)})"
        raise ValueError(f"coco:{root}: {what} matching {pattern}; the {split} split needs "
                         f"one, with its images in {root}/{split}<suffix>/.")
    return found[0]


@functools.lru_cache(maxsize=8)
def _cached_coco_split(root, split):
    return read_coco_split(root, split)


def _coco_examples(root, split):
    """`(image path, normalised yxyx boxes, labels)` examples of a folder split."""
    coco = _cached_coco_split(root, split)
    lengths = [len(labels) for labels in coco.labels]
    boxes = tf.RaggedTensor.from_row_lengths(
        np.concatenate(coco.boxes + (np.zeros((0, 4), np.float32),)), lengths)
    labels = tf.RaggedTensor.from_row_lengths(
        np.concatenate(coco.labels + (np.zeros((0,), np.int32),)), lengths)
    return tf.data.Dataset.from_tensor_slices((list(coco.image_paths), boxes, labels))


# --------------------------------------------------------------------------
# TFDS


def _tfds_builder(name, data_dir):
    """The TFDS builder of `name`, prepared (downloaded on first use); a
    ValueError if it is not a detection dataset."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    features = builder.info.features
    objects = features["objects"] if "objects" in features else {}
    if "bbox" not in objects or "label" not in objects:
        raise ValueError(f"TFDS dataset {name} has no objects/bbox and objects/label features; "
                         "it is not a detection dataset.")
    if not builder.is_prepared():
        builder.download_and_prepare()
    return builder


def _tfds_class_names(builder):
    return tuple(builder.info.features["objects"]["label"].names)


def _tfds_examples(builder, split, training, seed):
    import tensorflow_datasets as tfds

    read_config = tfds.ReadConfig(shuffle_seed=seed)
    dataset = builder.as_dataset(split=TFDS_SPLITS[split], shuffle_files=training,
                                 read_config=read_config,
                                 decoders={"image": tfds.decode.SkipDecoding()})
    ignored = [name for name in TFDS_IGNORED_BOX_FEATURES
               if name in builder.info.features["objects"]]

    def example(record):
        objects = record["objects"]
        keep = tf.ones_like(objects["label"], tf.bool)
        for name in ignored:
            keep &= tf.logical_not(tf.cast(objects[name], tf.bool))
        return (record["image"], tf.boolean_mask(objects["bbox"], keep),
                tf.cast(tf.boolean_mask(objects["label"], keep), tf.int32))

    return dataset.map(example, num_parallel_calls=tf.data.AUTOTUNE)


# --------------------------------------------------------------------------
# Describing and building


def describe_detection_source(source, split, *, data_dir=None):
    """`DetectionSplitInfo` (class names, number of images) of one split."""
    _check_split(split)
    kind, location = parse_detection_source(source)
    if kind == "coco":
        coco = _cached_coco_split(location, split)
        return DetectionSplitInfo(source, split, coco.class_names, len(coco.image_paths))
    builder = _tfds_builder(location, data_dir)
    if TFDS_SPLITS[split] not in builder.info.splits:
        raise ValueError(f"TFDS dataset {location} has no {TFDS_SPLITS[split]} split (it has "
                         f"{', '.join(builder.info.splits) or 'none'}).")
    return DetectionSplitInfo(source, split, _tfds_class_names(builder),
                              builder.info.splits[TFDS_SPLITS[split]].num_examples)


def build_detection_dataset(source, split, batch_size, training, image_size, *,
                            data_dir=None, seed=None):
    """One pass of `(images, {"boxes", "labels"})` batches: images float32
    RGB in [0, 255], `[batch, image_size, image_size, 3]`; boxes `BOX_FORMAT`
    pixels `[batch, n, 4]`; labels float32 `[batch, n]`; padding -1.
    Training shuffles and flips; evaluation keeps the order."""
    _check_split(split)
    kind, location = parse_detection_source(source)
    if kind == "coco":
        dataset = _coco_examples(location, split)
        read = tf.io.read_file
    else:
        dataset = _tfds_examples(_tfds_builder(location, data_dir), split, training, seed)
        read = tf.identity  # TFDS gives the encoded bytes
    if training:
        dataset = dataset.shuffle(SHUFFLE_BUFFER, seed=seed)
    unreadable = UnreadableFiles(f"{source} {split}")

    def view(index, example):
        path_or_bytes, boxes, labels = example
        key = (path_or_bytes if kind == "coco"
               else tf.strings.join([f"{location} record ", tf.strings.as_string(index)]))
        with tf.control_dependencies([unreadable.started(key)]):
            image = decode_image(read(path_or_bytes))
            if training:
                image, boxes = random_horizontal_flip(image, boxes, seed)
            image, boxes = resize_and_pad(image, boxes, image_size)
        # A failed read or decode stops here, leaving `key` in the report's table.
        with tf.control_dependencies([unreadable.finished(key, after=image)]):
            return tf.identity(image), dict(boxes=boxes, labels=tf.cast(labels, tf.float32))

    dataset = dataset.enumerate().map(view, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    dataset = dataset.concatenate(unreadable.report_at_end(dataset.element_spec))
    dataset = dataset.map(at_least_one_row)
    dataset = dataset.padded_batch(
        batch_size, padded_shapes=([image_size, image_size, 3], dict(boxes=[None, 4],
                                                                     labels=[None])),
        padding_values=(0.0, dict(boxes=PADDING, labels=PADDING)), drop_remainder=training)
    return dataset.prefetch(tf.data.AUTOTUNE)


def random_horizontal_flip(image, boxes, seed=None):
    """Flip `image` left-right with probability 1/2, and its normalised yxyx
    `boxes` with it."""
    image, boxes = tf.convert_to_tensor(image), tf.convert_to_tensor(boxes)
    flip = tf.random.uniform([], seed=seed) < 0.5
    flipped_boxes = tf.stack([boxes[:, 0], 1.0 - boxes[:, 3], boxes[:, 2], 1.0 - boxes[:, 1]],
                             axis=-1)
    return (tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image),
            tf.where(flip, flipped_boxes, boxes))


def resize_and_pad(image, boxes, image_size):
    """Resize `image` (uint8 [h, w, 3]) so its longer side is `image_size`,
    pad it to an `image_size` square at the bottom and right, and turn its
    normalised yxyx `boxes` into pixels of that square. Returns float32."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = image_size / tf.reduce_max(shape)
    resized_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), 1)
    image = tf.image.resize(image, resized_shape, antialias=True)
    image = tf.image.pad_to_bounding_box(image, 0, 0, image_size, image_size)
    pixels = tf.cast(tf.tile(resized_shape, [2]), tf.float32)
    return image, tf.reshape(boxes, [-1, 4]) * pixels


def at_least_one_row(image, target):
    missing = tf.maximum(1 - tf.shape(target["labels"])[0], 0)
    return image, dict(
        boxes=tf.concat([target["boxes"], tf.fill([missing, 4], PADDING)], 0),
        labels=tf.concat([target["labels"], tf.fill([missing], PADDING)], 0))
