"""Where examples come from: TFDS datasets, image folders and TFRecord files.

A source is a string, as the CLIs pass it:

- `cifar10`, `imagenette/160px-v2`, `imagenet2012` or `tfds:NAME`: a TFDS
  dataset (prepared on first use; `imagenet2012` needs `manual_dir`);
- `folder:ROOT`: `ROOT/train/<class>/*` and `ROOT/val/<class>/*` (or
  `ROOT/validation/`), classes sorted by name, `.jpg/.jpeg/.png` in any case;
- `tfrecord:PATTERN`: ImageNet-layout TFRecords (`image/encoded`,
  `image/class/label` 1-based as TF's `build_imagenet_data.py` writes them).
  `{split}` in the glob becomes `train` for train and `validation` (or `val`)
  for val; a directory means `DIR/{split}-*`.

Every source has the splits `train` and `val`. `open_source` lists the files
or reads the TFDS metadata once; `describe(split)` gives a `SplitInfo`, and
`records(split, ...)` yields `(key, payload)` pairs, where `key` names the file
or record for messages and `parse(payload)` gives `(image_bytes, label)`
inside the pipeline, so that reading and parsing failures are handled like
decoding ones.

A corrupt TFRecord (a length or CRC that does not check) ends the reading of
its file, as in tf.data and TFDS, which read through the same reader: the
format has no sync marker, so the next record cannot be found reliably. The
records lost that way are counted and named (`UnreadableFiles.file_read`).
"""

import dataclasses
import functools
import os

import tensorflow as tf

from keras_resnext.kernels.images import decode_image
from keras_resnext.preprocessing import imagenet_classes
from pipelines.tfrecords import count_tfrecords, keyed_tfrecords

__all__ = ["SPLITS", "SplitInfo", "describe_source", "open_source", "parse_source"]

SPLITS = ("train", "val")
FOLDER_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
FOLDER_VAL_DIRECTORIES = ("val", "validation")
TFRECORD_VAL_PREFIXES = ("validation", "val")
TFDS_VAL_SPLITS = ("validation", "test")
CIFAR_IMAGE_SIZE = 32
SNIFFED_IMAGES = 10
TFRECORD_CYCLE_LENGTH = 16


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """What a training or evaluation run needs to know about one split.

    `preprocessing` is "cifar" for 32x32 images and "imagenet" otherwise.
    `num_examples` counts every file or record, including any that turn out
    to be unreadable and are skipped.
    """

    source: str
    split: str
    class_names: tuple
    num_examples: int
    preprocessing: str

    @property
    def num_classes(self):
        return len(self.class_names)


def describe_source(source, split, *, data_dir=None, manual_dir=None,
                    tfrecord_label_offset=1, tfrecord_num_classes=1000):
    """`SplitInfo` (class names, example count, preprocessing) of one split."""
    return open_source(
        source, data_dir=data_dir, manual_dir=manual_dir,
        tfrecord_label_offset=tfrecord_label_offset,
        tfrecord_num_classes=tfrecord_num_classes,
    ).describe(split)


def open_source(source, *, data_dir=None, manual_dir=None,
                tfrecord_label_offset=1, tfrecord_num_classes=1000):
    """The source object for a source string (see the module docstring).

    `data_dir` and `manual_dir` go to TFDS. TFRecord labels are shifted down by
    `tfrecord_label_offset` and must then lie in `[0, tfrecord_num_classes)`.
    """
    kind, location = parse_source(source)
    if kind == "folder":
        return FolderSource(source, location)
    if kind == "tfrecord":
        return TFRecordSource(
            source, location, label_offset=tfrecord_label_offset,
            num_classes=tfrecord_num_classes,
        )
    return TFDSSource(source, location, data_dir=data_dir, manual_dir=manual_dir)


def parse_source(source):
    """`(kind, location)` of a source string: `("folder", ROOT)`,
    `("tfrecord", PATTERN)` or `("tfds", NAME)`; raises ValueError for an
    unknown kind."""
    kind, _, location = source.partition(":")
    if kind in ("folder", "tfrecord", "tfds"):
        return kind, location
    if location and not location[0].isdigit():  # TFDS names may end in :VERSION.
        raise ValueError(
            f"Unknown source kind {kind!r} in {source!r}; use a TFDS name, "
            "tfds:NAME, folder:ROOT or tfrecord:PATTERN."
        )
    return "tfds", source


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; splits are 'train' and 'val'.")


def _preprocessing_for_height_width(height, width):
    return "cifar" if (height, width) == (CIFAR_IMAGE_SIZE, CIFAR_IMAGE_SIZE) else "imagenet"


def _preprocessing_from_samples(encoded_images):
    """The preprocessing for the first decodable one of some encoded images."""
    for image_bytes in encoded_images:
        try:
            shape = decode_image(image_bytes).shape
        except tf.errors.OpError:
            continue
        return _preprocessing_for_height_width(shape[0], shape[1])
    return "imagenet"


class FolderSource:
    """`ROOT/<split>/<class>/<image>`, one class per directory."""

    def __init__(self, source, root):
        self.source = source
        self.root = root
        if not root or not tf.io.gfile.isdir(root):
            raise FileNotFoundError(f"Image folder {root!r} ({source}) does not exist.")
        self._files = {}
        train_directory = os.path.join(root, "train")
        if tf.io.gfile.isdir(train_directory):
            self._files["train"] = self._list_split(train_directory)
        val_directory = self._val_directory()
        if val_directory:
            self._files["val"] = self._list_split(val_directory)
        if "train" in self._files and "val" in self._files:
            train_classes = set(self._files["train"])
            val_classes = set(self._files["val"])
            if train_classes != val_classes:
                raise ValueError(
                    f"Class folders differ between {train_directory} and "
                    f"{val_directory}: only in train {sorted(train_classes - val_classes)}, "
                    f"only in val {sorted(val_classes - train_classes)}."
                )
        self.class_names = tuple(sorted(next(iter(self._files.values()), {})))

    def _val_directory(self):
        for name in FOLDER_VAL_DIRECTORIES:
            directory = os.path.join(self.root, name)
            if tf.io.gfile.isdir(directory):
                return directory
        return None

    @staticmethod
    def _list_split(directory):
        files = {}
        for entry in tf.io.gfile.listdir(directory):
            class_directory = os.path.join(directory, entry.rstrip("/"))
            if tf.io.gfile.isdir(class_directory):
                files[entry.rstrip("/")] = sorted(
                    os.path.join(class_directory, name)
                    for name in tf.io.gfile.listdir(class_directory)
                    if name.lower().endswith(FOLDER_IMAGE_EXTENSIONS)
                )
        if not any(files.values()):
            raise ValueError(
                f"No .jpg/.jpeg/.png images in class folders under {directory}."
            )
        return files

    def _split_files(self, split):
        _check_split(split)
        if split not in self._files:
            wanted = "train/" if split == "train" else "val/ or validation/"
            raise FileNotFoundError(f"Image folder {self.root} has no {wanted} directory.")
        paths, labels = [], []
        for label, class_name in enumerate(self.class_names):
            class_paths = self._files[split][class_name]
            paths.extend(class_paths)
            labels.extend([label] * len(class_paths))
        return paths, labels

    def describe(self, split):
        paths, _ = self._split_files(split)
        return SplitInfo(
            source=self.source, split=split, class_names=self.class_names,
            num_examples=len(paths), preprocessing=self.native_preprocessing(split),
        )

    def native_preprocessing(self, split):
        paths, _ = self._split_files(split)
        return _preprocessing_from_samples(_readable_files(paths[:SNIFFED_IMAGES]))

    def records(self, split, *, shuffle, shuffle_buffer, seed, num_shards, shard_index,
                unreadable):
        # The paths are shuffled completely instead; unreadable files fail in `parse`.
        del shuffle_buffer, unreadable
        paths, labels = self._split_files(split)
        dataset = tf.data.Dataset.from_tensor_slices(
            (tf.constant(paths), tf.constant(labels, tf.int32))
        ).shard(num_shards, shard_index)
        if shuffle:
            # Every file is an example, so shuffling the whole list of paths is
            # a complete shuffle at the cost of a few bytes per image.
            dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
        return dataset.map(lambda path, label: (path, (path, label)))

    @staticmethod
    def parse(payload):
        path, label = payload
        return tf.io.read_file(path), label


def _readable_files(paths):
    for path in paths:
        try:
            yield tf.io.read_file(path)
        except tf.errors.OpError:
            continue


class TFRecordSource:
    """TFRecord files of `tf.train.Example`s in the ImageNet layout."""

    def __init__(self, source, pattern, *, label_offset, num_classes):
        self.source = source
        if tf.io.gfile.isdir(pattern):
            pattern = os.path.join(pattern, "{split}-*")
        if "{split}" not in pattern:
            raise ValueError(
                f"TFRecord pattern {pattern!r} ({source}) must contain {{split}} "
                "(e.g. /data/imagenet/{split}-*) or name a directory."
            )
        self.pattern = pattern
        self.label_offset = label_offset
        if num_classes == len(imagenet_classes()):
            self.class_names = tuple(wordnet_id for wordnet_id, _ in imagenet_classes())
        else:
            self.class_names = tuple(str(label) for label in range(num_classes))

    def _split_files(self, split):
        _check_split(split)
        prefixes = ("train",) if split == "train" else TFRECORD_VAL_PREFIXES
        for prefix in prefixes:
            files = sorted(tf.io.gfile.glob(self.pattern.format(split=prefix)))
            if files:
                return files
        tried = " or ".join(self.pattern.format(split=prefix) for prefix in prefixes)
        raise FileNotFoundError(f"No TFRecord files match {tried}.")

    def describe(self, split):
        files = self._split_files(split)
        return SplitInfo(
            source=self.source, split=split, class_names=self.class_names,
            num_examples=sum(count_tfrecords(path) for path in files),
            preprocessing=self.native_preprocessing(split),
        )

    def native_preprocessing(self, split):
        files = self._split_files(split)
        records = tf.data.TFRecordDataset(files[:1]).ignore_errors().take(SNIFFED_IMAGES)
        return _preprocessing_from_samples(
            self.parse(record)[0] for record in records
        )

    def records(self, split, *, shuffle, shuffle_buffer, seed, num_shards, shard_index,
                unreadable):
        files = self._split_files(split)
        files_and_counts = (
            files, tf.constant([count_tfrecords(path) for path in files], tf.int64)
        )
        records_of_file = functools.partial(keyed_tfrecords, unreadable=unreadable)
        if len(files) >= num_shards:
            file_dataset = tf.data.Dataset.from_tensor_slices(files_and_counts).shard(
                num_shards, shard_index
            )
            if shuffle:
                file_dataset = file_dataset.shuffle(
                    len(files), seed=seed, reshuffle_each_iteration=True
                )
            records = file_dataset.interleave(
                records_of_file,
                cycle_length=min(len(files), TFRECORD_CYCLE_LENGTH),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        else:
            # Fewer files than workers: read them in a fixed order and take
            # every num_shards-th record, so the shards still partition the split.
            records = (
                tf.data.Dataset.from_tensor_slices(files_and_counts)
                .flat_map(records_of_file)
                .shard(num_shards, shard_index)
            )
        if shuffle:
            records = records.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        return records

    def parse(self, payload):
        features = tf.io.parse_single_example(payload, {
            "image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        })
        label = features["image/class/label"] - self.label_offset
        return features["image/encoded"], tf.cast(label, tf.int32)


class TFDSSource:
    """A TensorFlow Datasets dataset with an `image` and a `label` feature."""

    def __init__(self, source, name, *, data_dir, manual_dir):
        import tensorflow_datasets as tfds

        self.source = source
        self._tfds = tfds
        self.builder = tfds.builder(name, data_dir=data_dir)
        if not self.builder.is_prepared():
            if self.builder.MANUAL_DOWNLOAD_INSTRUCTIONS and manual_dir is None:
                raise ValueError(
                    f"TFDS dataset {name} is not prepared in {self.builder.data_dir}; "
                    "pass manual_dir, the directory holding its manually downloaded "
                    "files (for imagenet2012, the two ILSVRC2012 tars)."
                )
            self._prepare(name, manual_dir)
        features = self.builder.info.features
        self.class_names = tuple(features["label"].names)
        height, width = features["image"].shape[:2]
        self.preprocessing = _preprocessing_for_height_width(height, width)

    def _prepare(self, name, manual_dir):
        import tensorflow as tf

        manual = self.builder.MANUAL_DOWNLOAD_INSTRUCTIONS
        if manual and not (tf.io.gfile.isdir(manual_dir) and tf.io.gfile.listdir(manual_dir)):
            raise ValueError(
                f"manual_dir {manual_dir} does not exist or is empty: it must hold TFDS "
                f"dataset {name}'s manually downloaded files (for imagenet2012, "
                "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar)."
            )
        try:
            self.builder.download_and_prepare(
                download_config=self._tfds.download.DownloadConfig(manual_dir=manual_dir)
            )
        except (AssertionError, OSError, ValueError, tf.errors.OpError) as error:
            # TFDS reports missing or unreadable files as multi-line assertions
            # and IO errors; one line names what to fix.
            where = f" from manual_dir {manual_dir}" if manual else ""
            message = " ".join(str(error).split())
            raise ValueError(
                f"TFDS could not prepare {name} in {self.builder.data_dir}{where}: "
                f"{message}"
            ) from None

    def _tfds_split(self, split):
        _check_split(split)
        names = ("train",) if split == "train" else TFDS_VAL_SPLITS
        for name in names:
            if name in self.builder.info.splits:
                return name
        raise ValueError(
            f"TFDS dataset {self.builder.name} has no {' or '.join(names)} split "
            f"(it has {', '.join(self.builder.info.splits) or 'none'})."
        )

    def describe(self, split):
        tfds_split = self._tfds_split(split)
        return SplitInfo(
            source=self.source, split=split, class_names=self.class_names,
            num_examples=self.builder.info.splits[tfds_split].num_examples,
            preprocessing=self.native_preprocessing(split),
        )

    def native_preprocessing(self, split):
        del split  # TFDS features fix the image size for all splits.
        return self.preprocessing

    def records(self, split, *, shuffle, shuffle_buffer, seed, num_shards, shard_index,
                unreadable):
        # TFDS reads its files itself; what it cannot read shows only in the
        # example count (see `keras_resnext.training.make_evaluate`).
        del unreadable
        tfds = self._tfds
        tfds_split = self._tfds_split(split)
        if num_shards > 1:
            # Partitions the examples, whatever the number of files.
            tfds_split = tfds.even_splits(tfds_split, n=num_shards)[shard_index]
        dataset = self.builder.as_dataset(
            split=tfds_split,
            shuffle_files=shuffle,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(shuffle_seed=seed, add_tfds_id=True),
        )
        if shuffle:
            dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        return dataset.map(
            lambda example: (example["tfds_id"], (example["image"], example["label"]))
        )

    @staticmethod
    def parse(payload):
        image_bytes, label = payload
        return image_bytes, tf.cast(label, tf.int32)
