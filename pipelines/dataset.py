"""`build_dataset`: batches of preprocessed images and labels from any source."""

import sys

import tensorflow as tf

from keras_resnext.transforms import EVAL_VIEWS, family_eval_transform, resolve_eval_transform
from pipelines import augment, cifar, imagenet
from pipelines.sources import open_source, parse_source

__all__ = ["PREPROCESSINGS", "build_dataset"]

PREPROCESSINGS = ("imagenet", "cifar")
DEFAULT_SHUFFLE_BUFFER = 10_000
UNREADABLE_FILES_LISTED = 5


def build_dataset(source, split, batch_size, training, image_size=None, *,
                  resize_size=None, preprocessing=None, data_dir=None,
                  manual_dir=None, tfrecord_label_offset=1,
                  tfrecord_num_classes=1000, shuffle_buffer=DEFAULT_SHUFFLE_BUFFER,
                  deterministic=False, seed=None, input_context=None,
                  color_jitter=False, pca_lighting=False,
                  auto_augment=None, random_erasing=0.0, mixup_alpha=0.0,
                  cutmix_alpha=0.0, mixup_switch_prob=0.5, repeated_augmentations=1,
                  num_classes=None, eval_view="center", crop_pct=None, interpolation=None,
                  eval_transform=None):
    """One pass over a split as batches of `(images, labels)`.

    Images are float32 [batch, image_size, image_size, 3], normalised by
    `keras_resnext.preprocess_input`; labels are int32 [batch], or float32
    [batch, num_classes] soft targets when training with mixup or cutmix.
    Callers repeat. The ten-crop eval view gives [batch, 10, image_size,
    image_size, 3]: `keras_resnext.training.evaluate_model` averages the
    model's probabilities over the crops.

    Args:
      source: a source string (see `pipelines.sources`): a TFDS name or
        `tfds:NAME`, `folder:ROOT` or `tfrecord:PATTERN`.
      split: "train" or "val".
      batch_size: examples per batch (per replica under `input_context`).
      training: random crops and flips, shuffled, full batches only.
        Otherwise the deterministic eval view of every example exactly once,
        the last partial batch included.
      image_size: crop size; default `eval_transform`'s, else 224
        (ImageNet-style) or 32 (CIFAR-style).
      resize_size: ImageNet-style eval only, the shorter side before the centre
        crop; default `eval_transform`'s at `image_size` (the family's: 256
        for 224, in that proportion for other sizes).
      preprocessing: "imagenet" or "cifar"; default "cifar" for 32x32 images.
      data_dir, manual_dir: passed to TFDS.
      tfrecord_label_offset: subtracted from TFRecord labels (1 for TF's
        1-based ImageNet TFRecords).
      tfrecord_num_classes: TFRecord labels must lie in [0, this); a label
        outside is an error that names the file and record.
      shuffle_buffer: examples in the shuffle buffer of TFRecord and TFDS
        sources, after their file-level shuffle. Folders shuffle all paths.
      deterministic: training order and augmentation reproducible from `seed`
        (0 if None), at some cost in speed. Evaluation is always deterministic.
      seed: seed of the shuffles and augmentations.
      input_context: a `tf.distribute.InputContext`; each input pipeline
        reads its own shard of the split.
      color_jitter, pca_lighting: fb.resnet.torch's colour augmentations for
        ImageNet-style training.
      auto_augment, random_erasing, mixup_alpha, cutmix_alpha,
      mixup_switch_prob, repeated_augmentations: the later recipes' training
        augmentations (`pipelines.augment`), all off by default and ignored
        for evaluation. `auto_augment`: None, "trivial_augment_wide" or a timm
        RandAugment string such as "rand-m6-mstd0.5-inc1" (ImageNet-style
        only); `random_erasing`: its probability per image (ImageNet-style
        only); `mixup_alpha`, `cutmix_alpha`: Beta alphas, one of the two per
        batch, cutmix with probability `mixup_switch_prob` when both are on;
        `repeated_augmentations`: each image of a pass appears this many
        times, differently augmented and spread over the input pipelines, in
        a pass of the same length (torchvision's RASampler).
      num_classes: the width of mixup/cutmix soft targets; default the
        source's number of classes.
      eval_view: ImageNet-style eval, "center" (§4's single crop) or
        "ten_crop" (fb.resnet.torch's: centre and corners, and their mirrors).
      crop_pct: ImageNet-style eval, timm's crop fraction instead of
        `resize_size`: resize to floor(image_size / crop_pct).
      interpolation: ImageNet-style eval resize, "bilinear" or "bicubic"
        (antialiased); default `eval_transform`'s.
      eval_transform: a `keras_resnext.transforms.EvalTransform` (or its
        dict), e.g. `model_eval_transform(model)`, that the eval arguments
        above override; default the family's (§4).

    Unreadable images (truncated, corrupt, empty) are skipped; at the end of
    each pass the pipeline prints to stderr how many it skipped and a few names.
    A corrupt TFRecord ends the reading of its file (nothing after it can be
    found reliably); the pass's report names the file and the record, and
    counts the records lost.
    """
    opened = open_source(
        source, data_dir=data_dir, manual_dir=manual_dir,
        tfrecord_label_offset=tfrecord_label_offset,
        tfrecord_num_classes=tfrecord_num_classes,
    )
    if preprocessing is None:
        preprocessing = opened.native_preprocessing(split)
    if preprocessing not in PREPROCESSINGS:
        raise ValueError(
            f"Unknown preprocessing {preprocessing!r}; use 'imagenet' or 'cifar'."
        )
    if preprocessing == "cifar" and (color_jitter or pca_lighting):
        raise ValueError(
            "color_jitter and pca_lighting are ImageNet-style augmentations; "
            f"{source} uses CIFAR-style preprocessing."
        )
    augmentations = augment.TrainingAugmentations(
        auto_augment=auto_augment, random_erasing=random_erasing,
        mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
        mixup_switch_prob=mixup_switch_prob,
        repeated_augmentations=repeated_augmentations,
    )
    if preprocessing == "cifar" and augmentations.per_image:
        raise ValueError(
            "auto_augment and random_erasing are ImageNet-style augmentations; "
            f"{source} uses CIFAR-style preprocessing."
        )
    source_classes = len(opened.class_names)
    if num_classes is None:
        num_classes = source_classes
    if num_classes < source_classes:
        raise ValueError(
            f"num_classes={num_classes} is fewer than the {source_classes} classes of {source}."
        )
    if eval_view not in EVAL_VIEWS:
        raise ValueError(f"Unknown eval_view {eval_view!r}; use one of {', '.join(EVAL_VIEWS)}.")
    if preprocessing == "cifar" and (eval_view != "center" or crop_pct or interpolation):
        raise ValueError(
            "eval_view, crop_pct and interpolation are ImageNet-style eval options; "
            f"{source} uses CIFAR-style preprocessing (the image as it is).")
    transform = resolve_eval_transform(
        eval_transform or family_eval_transform(preprocessing), image_size=image_size,
        # CIFAR-style views take the image as it is.
        resize_size=resize_size if preprocessing == "imagenet" else None,
        crop_pct=crop_pct, interpolation=interpolation)
    image_size = transform.image_size
    preprocess = _preprocess_function(
        preprocessing, training, image_size, transform, color_jitter, pca_lighting, eval_view,
        augmentations,
    )
    deterministic = deterministic or not training
    if training and deterministic and seed is None:
        seed = 0
    num_shards, shard_index = 1, 0
    if input_context is not None:
        num_shards = input_context.num_input_pipelines
        shard_index = input_context.input_pipeline_id
    shared_seed = seed
    if seed is not None:
        seed += shard_index

    unreadable = UnreadableFiles(f"{source} {split}")
    if training and augmentations.repeated_augmentations > 1:
        records = _repeated_records(
            opened, source, split, augmentations.repeated_augmentations,
            shuffle_buffer=shuffle_buffer, seed=shared_seed, deterministic=deterministic,
            num_shards=num_shards, shard_index=shard_index, unreadable=unreadable,
        )
    else:
        records = opened.records(
            split, shuffle=training, shuffle_buffer=shuffle_buffer, seed=seed,
            num_shards=num_shards, shard_index=shard_index, unreadable=unreadable,
        )

    def load(key, payload, element_seed=None):
        with tf.control_dependencies([unreadable.started(key)]):
            image_bytes, label = opened.parse(payload)
            image = preprocess(image_bytes, element_seed)
        # A failed read, parse or decode stops here, leaving `key` behind.
        with tf.control_dependencies([unreadable.finished(key, after=image)]):
            return key, tf.identity(image), label

    if training:
        element_seeds = tf.data.Dataset.random(
            seed=seed, rerandomize_each_iteration=True
        ).batch(2)
        records = tf.data.Dataset.zip(records, element_seeds)
        load_element = lambda record, element_seed: load(*record, element_seed)  # noqa: E731
    else:
        load_element = load
    examples = records.map(
        load_element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic
    ).ignore_errors()
    examples = examples.concatenate(unreadable.report_at_end(examples.element_spec))
    # Labels are checked per batch, which costs a per-element map's worth less
    # (issue 14); a training pass's dropped remainder is not trained on either.
    dataset = examples.batch(batch_size, drop_remainder=training).map(
        lambda keys, images, labels: _check_labels(keys, images, labels, source_classes),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic,
    )
    if training and augmentations.mixes:
        dataset = tf.data.Dataset.zip(dataset, augment.mixing_seeds(seed)).map(
            lambda batch, batch_seed: augment.mix_batch(
                *batch, batch_seed, num_classes=num_classes,
                mixup_alpha=augmentations.mixup_alpha,
                cutmix_alpha=augmentations.cutmix_alpha,
                switch_prob=augmentations.mixup_switch_prob,
            ),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic,
        )
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    return dataset.with_options(options)


def _repeated_records(opened, source, split, repetitions, *, shuffle_buffer, seed,
                      deterministic, num_shards, shard_index, unreadable):
    """The keys of a pass with repeated augmentation (`augment.repeated_records`).

    Every input pipeline reads the whole split in one shared shuffled order
    (seed 0 if none, as RASampler's) and keeps its share of the copies.
    """
    if num_shards > 1 and not deterministic and parse_source(source)[0] != "folder":
        # Their files are read in parallel, in an order that may differ per pipeline.
        raise ValueError(
            f"repeated_augmentations over {num_shards} input pipelines needs "
            f"deterministic=True for {source}: only folder sources read in one order "
            "everywhere otherwise."
        )
    if seed is None and num_shards > 1:
        seed = 0
    records = opened.records(
        split, shuffle=True, shuffle_buffer=shuffle_buffer, seed=seed,
        num_shards=1, shard_index=0, unreadable=unreadable,
    )
    return augment.repeated_records(
        records, repetitions, opened.describe(split).num_examples, num_shards, shard_index
    )


def _preprocess_function(preprocessing, training, image_size, eval_transform,
                         color_jitter, pca_lighting, eval_view, augmentations):
    if preprocessing == "cifar":
        if training:
            return lambda image_bytes, seed: cifar.preprocess_for_train(
                image_bytes, image_size, seed
            )
        return lambda image_bytes, seed: cifar.preprocess_for_eval(image_bytes, image_size)
    if training:
        # Normalised per image, in the parallel map: a map over whole batches
        # cost a third of a millisecond more per image (--breakdown in
        # benchmarks/pipeline.py), as each batch-sized result is a fresh
        # allocation of tens of megabytes that the allocator does not reuse.
        return lambda image_bytes, seed: imagenet.preprocess_for_train(
            image_bytes, image_size, seed, color_jitter=color_jitter,
            pca_lighting=pca_lighting, auto_augment=augmentations.auto_augment,
            random_erasing_probability=augmentations.random_erasing,
        )
    return lambda image_bytes, seed: imagenet.preprocess_for_eval(
        image_bytes, transform=eval_transform, view=eval_view
    )


def _check_labels(keys, images, labels, num_classes):
    in_range = tf.logical_and(labels >= 0, labels < num_classes)

    def fail():
        # Built only on failure: string ops per batch would slow every pass.
        first = tf.argmin(tf.cast(in_range, tf.int32))
        message = tf.strings.join([
            "Label ", tf.strings.as_string(labels[first]),
            f" is outside [0, {num_classes}) in ", keys[first],
        ])
        with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
            return tf.identity(labels)

    return images, tf.cond(tf.reduce_all(in_range), lambda: labels, fail)


class UnreadableFiles:
    """Which files or records of a pass could not be read or decoded.

    tf.data's `ignore_errors` drops a failing element without saying which.
    Each key goes into a table before its element is loaded and leaves it once
    the image exists. Every pass tries every key again, so at the end of a
    pass the table holds exactly that pass's failures.

    Files of records that stop early (a corrupt TFRecord) are kept in a second
    table, file -> [records read, records in the file], for the same report.
    """

    def __init__(self, description, listed=UNREADABLE_FILES_LISTED):
        self.description = description
        self.listed = listed
        self.table = tf.lookup.experimental.MutableHashTable(
            key_dtype=tf.string, value_dtype=tf.int64, default_value=0
        )
        self.files_cut_short = tf.lookup.experimental.MutableHashTable(
            key_dtype=tf.string, value_dtype=tf.int64, default_value=[0, 0]
        )

    def started(self, key):
        return self.table.insert(key[None], tf.ones([1], tf.int64))

    def finished(self, key, after):
        with tf.control_dependencies([after]):
            return self.table.remove(key[None])

    def keys(self):
        return self.table.export()[0]

    def file_read(self, path, records_read, num_records):
        """Note that this pass read `records_read` of the file's `num_records`."""

        def cut_short():
            counts = tf.stack([records_read, num_records])
            with tf.control_dependencies([self.files_cut_short.insert(path[None], counts[None])]):
                return tf.constant(True)

        def whole():
            with tf.control_dependencies([self.files_cut_short.remove(path[None])]):
                return tf.constant(False)

        return tf.cond(records_read < num_records, cut_short, whole)

    def report_at_end(self, element_spec):
        """An empty dataset that, once reached, prints what failed in the pass."""

        def report(*element):
            del element
            keys = self.keys()
            count = tf.size(keys)
            if count > 0:
                message = tf.strings.join([
                    "pipelines: skipped ", tf.strings.as_string(count),
                    f" unreadable image(s) in this pass of {self.description}, including: ",
                    tf.strings.reduce_join(keys[:self.listed], separator=", "),
                ])
                # A known scalar shape makes tf.print write the string unquoted.
                tf.print(tf.reshape(message, []), output_stream=sys.stderr)
            paths, counts = self.files_cut_short.export()
            if tf.size(paths) > 0:
                records_read, num_records = counts[:, 0], counts[:, 1]
                lost = tf.strings.as_string(tf.reduce_sum(num_records - records_read))
                places = tf.strings.join([
                    paths, " record ", tf.strings.as_string(records_read), " (records ",
                    tf.strings.as_string(records_read), "-",
                    tf.strings.as_string(num_records - 1), " of ",
                    tf.strings.as_string(num_records), " lost)",
                ])
                message = tf.strings.join([
                    "pipelines: lost ", lost, f" record(s) in this pass of {self.description}"
                    " to ", tf.strings.as_string(tf.size(paths)), " corrupt record(s), "
                    "as a TFRecord file cannot be read past one: ",
                    tf.strings.reduce_join(places[:self.listed], separator=", "),
                ])
                tf.print(tf.reshape(message, []), output_stream=sys.stderr)
            return False

        return _run_once(report, element_spec)


def _run_once(predicate, element_spec):
    """A dataset of no elements that calls `predicate` when it is iterated.

    Concatenated after a pipeline, it runs at the end of every pass: tf.data
    makes the second part's iterator only when the first is exhausted.
    """
    placeholder = tf.nest.map_structure(
        lambda spec: tf.zeros([1 if dim is None else dim for dim in spec.shape], spec.dtype),
        element_spec,
    )
    return tf.data.Dataset.from_tensors(placeholder).filter(predicate)
