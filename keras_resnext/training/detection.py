"""Training keras-hub's RetinaNet on a ResNeXt backbone with `model.fit`:
the detector, its schedule, checkpoints and resume, the model_dir's logs,
COCO box AP, and a serving SavedModel.

Needs keras-hub (the `[hub]` extra). The detector is keras-hub's own, with our
model as its `image_encoder`: `RetinaNetBackbone` reads `pyramid_outputs`.
`model.fit` serves the default, one-device and mirrored strategies; multi-worker and TPU
runs are the classification loop's alone (Keras 3's `fit` fails under
MultiWorkerMirroredStrategy, keras#20585).
"""

import csv
import dataclasses
import functools
import json
import os
import random
import shutil
import time
import warnings
from typing import Callable, Optional

import keras
import keras_hub
import numpy as np
import tensorflow as tf

from keras_resnext.export import next_version
from keras_resnext.preprocessing import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from keras_resnext.training import run_dir
from keras_resnext.training.box_ap import coco_box_ap
from keras_resnext.training.checkpoints import Checkpoints
from keras_resnext.training.distribute import worker_info
from keras_resnext.training.errors import UserError, diverged
from keras_resnext.training.recipe import RecipeSchedule

BOX_FORMAT = "yxyx"
MIN_LEVEL, MAX_LEVEL = 3, 7  # RetinaNet's P3-P7 (Lin et al., 2017)
DETECTION_STRATEGIES = ("default", "one_device", "mirrored")
CSV_COLUMNS = ("epoch", "learning_rate", "loss", "box_loss", "classification_loss",
               "images_per_sec", "seconds")
SERVING_SIGNATURE = "serving_default"
CLASS_NAMES_FILE = "class_names.json"


@dataclasses.dataclass(frozen=True)
class DetectionConfig:
    """torchvision's RetinaNet reference (references/detection): SGD momentum
    0.9, lr 0.01 for a global batch of 16 (scaled linearly), weight decay
    1e-4, 26 epochs with lr /10 after 16 and 22, a linear warmup over the
    first 1000 steps."""

    model_dir: str
    epochs: int = 26
    batch_size: int = 16
    learning_rate: float = 0.01
    reference_batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 1000
    decay_fractions: tuple = (16 / 26, 22 / 26)
    steps_per_epoch: Optional[int] = None
    seed: Optional[int] = None
    max_checkpoints: int = 3

    @property
    def scaled_learning_rate(self):
        return self.learning_rate * self.batch_size / self.reference_batch_size


@dataclasses.dataclass(frozen=True)
class DetectionSplit:
    """`dataset_fn(seed)` gives one pass of `(images, {"boxes", "labels"})`
    batches of the global batch size; the split has `num_examples` images."""

    dataset_fn: Callable
    num_examples: int


# --------------------------------------------------------------------------
# The detector


def image_converter(image_size):
    """keras-hub's RetinaNet image converter with `preprocess_input`'s
    ImageNet normalisation (RGB in [0, 255] in), so that the backbone sees
    what it was trained on. It resizes to `image_size` without cropping."""
    std = np.asarray(IMAGENET_STD_RGB)
    return keras_hub.layers.RetinaNetImageConverter(
        image_size=(image_size, image_size), scale=list(1.0 / (255.0 * std)),
        offset=list(-np.asarray(IMAGENET_MEAN_RGB) / std), crop_to_aspect_ratio=False,
        pad_to_aspect_ratio=True, bounding_box_format=BOX_FORMAT)


def build_retinanet(image_encoder, num_classes, image_size):
    """keras-hub's `RetinaNetObjectDetector` on `image_encoder` (a ResNeXt
    built with `include_top=False`), FPN levels P3-P7 as in the paper."""
    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=image_encoder, min_level=MIN_LEVEL, max_level=MAX_LEVEL, use_p5=False,
        image_shape=(image_size, image_size, 3))
    preprocessor = keras_hub.models.RetinaNetObjectDetectorPreprocessor(
        image_converter=image_converter(image_size))
    return keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone, num_classes=num_classes, bounding_box_format=BOX_FORMAT,
        preprocessor=preprocessor)


def build_optimizer(config, steps_per_epoch):
    warmup_epochs = min(config.warmup_steps, steps_per_epoch * config.epochs) / steps_per_epoch
    schedule = RecipeSchedule(
        config.scaled_learning_rate, steps_per_epoch, config.epochs, kind="step",
        decay_epochs=tuple(round(config.epochs * f) for f in config.decay_fractions),
        decay_rate=0.1, warmup_epochs=warmup_epochs)
    return keras.optimizers.SGD(learning_rate=schedule, momentum=config.momentum,
                                weight_decay=config.weight_decay or None)


# --------------------------------------------------------------------------
# Training


@dataclasses.dataclass
class DetectionResult:
    metrics: dict
    model: keras.Model


def train_detector(model_fn, train_split, val_split, config, strategy=None, log=print):
    """Train the detector `model_fn()` builds (in the strategy's scope) with
    `model.fit`, resuming from `config.model_dir`.

    After each epoch: a CSV row (`training_log.csv`), TensorBoard scalars
    (`logs/train`) and a checkpoint (`checkpoints/ckpt-<epoch>`, written
    whole, so a kill leaves the previous one). A rerun resumes after the last
    checkpointed epoch, each epoch's input drawn from the seed and the epoch,
    as the uninterrupted run. At the end: COCO box AP on `val_split`, into
    `metrics.json` and `logs/validation`. The model_dir is locked for the run."""
    strategy = strategy or tf.distribute.get_strategy()
    if worker_info(strategy)[2] > 1:
        raise UserError("Detection training runs on one machine (default or mirrored "
                        "strategy): Keras' fit does not support multi-worker strategies.")
    steps_per_epoch = config.steps_per_epoch or train_split.num_examples // config.batch_size
    if steps_per_epoch < 1:
        raise UserError(f"The training split has {train_split.num_examples} images, fewer "
                        f"than one batch of {config.batch_size}; lower --batch_size.")
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    with run_dir.lock_for_run(config.model_dir, strategy):
        with strategy.scope():
            model = model_fn()
            optimizer = build_optimizer(config, steps_per_epoch)
            model.compile(optimizer=optimizer)
            optimizer.build(model.trainable_variables)
            completed = tf.Variable(0, dtype=tf.int64, trainable=False, name="completed_epochs")
            # --seed, else one drawn now and kept by the checkpoints for the resume.
            data_seed = tf.Variable(
                config.seed if config.seed is not None
                else random.SystemRandom().randrange(2**31), dtype=tf.int64, trainable=False,
                name="data_seed")
        settings = dict(batch_size=config.batch_size, steps_per_epoch=steps_per_epoch,
                        learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                        momentum=config.momentum)
        checkpoints = Checkpoints(
            tf.train.Checkpoint(model=model, optimizer=optimizer, completed_epochs=completed,
                                data_seed=data_seed,
                                run_settings=tf.Variable(json.dumps(settings), trainable=False)),
            config.model_dir, True, 0, config.max_checkpoints)
        restored = checkpoints.restore_latest(settings, log)
        start_epoch = int(completed.numpy())
        if restored:
            log(f"Restored {restored}: {start_epoch} of {config.epochs} epochs done, optimizer "
                f"step {int(optimizer.iterations.numpy())}.", flush=True)
        csv_path = os.path.join(config.model_dir, run_dir.CSV_LOG_NAME)
        run_dir.truncate_csv_log(csv_path, start_epoch, CSV_COLUMNS)
        writers = run_dir.create_summary_writers(config.model_dir)
        if config.seed is not None:
            data_seed.assign(config.seed)
        seed = int(data_seed.numpy())
        epoch_logger = _EpochLogger(optimizer, completed, checkpoints, csv_path, writers,
                                    steps_per_epoch * config.batch_size)
        if start_epoch < config.epochs:
            # One fit for the epochs left, each epoch its own pass drawn from the seed
            # and the epoch, so a resumed run sees the data the uninterrupted one saw.
            epochs = [train_split.dataset_fn(seed + epoch).repeat().take(steps_per_epoch)
                      for epoch in range(start_epoch, config.epochs)]
            model.fit(functools.reduce(tf.data.Dataset.concatenate, epochs),
                      epochs=config.epochs, initial_epoch=start_epoch,
                      steps_per_epoch=steps_per_epoch, callbacks=[epoch_logger], shuffle=False,
                      verbose=2)  # the pipeline shuffles
        last = epoch_logger.last
        ap = evaluate_detector(model, val_split.dataset_fn(seed))
        log(f"COCO box AP on {ap['eval_images']} val images: AP {_shown(ap['AP'])} - "
            f"AP50 {_shown(ap['AP50'])} - AP75 {_shown(ap['AP75'])}", flush=True)
        metrics = dict(
            ap, epochs_completed=int(completed.numpy()), steps_per_epoch=steps_per_epoch,
            global_batch_size=config.batch_size, num_replicas=strategy.num_replicas_in_sync,
            train_loss=float(last["loss"]) if last else _last_logged_loss(csv_path),
            ap_implementation="keras_resnext.training.box_ap (COCO's AP@[.5:.95], NumPy)")
        run_dir.write_scalars(writers["validation"], metrics["epochs_completed"], {
            f"box_{name}": ap[name] for name in ("AP", "AP50", "AP75") if ap[name] is not None})
        writers["train"].close()
        writers["validation"].close()
        run_dir.write_metrics(config.model_dir, metrics)
        return DetectionResult(metrics=metrics, model=model)


class _EpochLogger(keras.callbacks.Callback):
    """After each epoch: check the loss, write the CSV row and TensorBoard
    scalars, then the checkpoint."""

    def __init__(self, optimizer, completed, checkpoints, csv_path, writers, images_per_epoch):
        super().__init__()
        self.optimizer, self.completed, self.checkpoints = optimizer, completed, checkpoints
        self.csv_path, self.writers = csv_path, writers
        self.images_per_epoch = images_per_epoch
        self.last = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.learning_rate = float(self.optimizer.learning_rate.numpy())
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.started
        self.last = dict(logs or {})
        if not np.isfinite(self.last["loss"]):
            raise diverged(f"the training loss is {self.last['loss']} after epoch {epoch + 1}",
                           self.checkpoints.directory, warmup_flag="--warmup_steps")
        row = dict(epoch=epoch + 1, learning_rate=self.learning_rate, loss=self.last["loss"],
                   box_loss=self.last.get("bbox_regression_loss"),
                   classification_loss=self.last.get("cls_logits_loss"), seconds=seconds,
                   images_per_sec=self.images_per_epoch / seconds)
        run_dir.append_csv_row(self.csv_path, row, CSV_COLUMNS)
        run_dir.write_scalars(self.writers["train"], epoch + 1, {
            f"epoch_{name}": value for name, value in row.items()
            if name not in ("epoch", "seconds") and value is not None})
        self.completed.assign(epoch + 1)
        self.checkpoints.save(epoch + 1)


def _last_logged_loss(csv_path):
    """A rerun with no epoch left reports the loss its last epoch logged."""
    if not os.path.exists(csv_path):
        return None
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["loss"]) if rows and rows[-1].get("loss") else None


def _shown(value):
    return "n/a" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------
# Evaluation and export


def evaluate_detector(model, dataset):
    """COCO box AP (`box_ap.coco_box_ap`) of `model`'s decoded detections on
    one pass of `dataset` (`(images, {"boxes", "labels"})` batches, -1 padding)."""
    # `predict`, not `predict_on_batch`: keras-hub 0.32's RetinaNet decodes only
    # what `predict` hands it. The pipeline's length is unknown (it skips unreadable
    # images), and reading such a dataset to its end makes Keras warn of an
    # interrupted training.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        predicted = model.predict(dataset.map(lambda images, targets: images), verbose=0)
    ground_truths = []
    for _, targets in dataset:
        for boxes, labels in zip(targets["boxes"].numpy(), targets["labels"].numpy()):
            ground_truths.append((boxes[labels >= 0], labels[labels >= 0]))
    detections = [(predicted["boxes"][index][:count], predicted["confidence"][index][:count],
                   predicted["labels"][index][:count])
                  for index, count in enumerate(predicted["num_detections"])]
    return dict(coco_box_ap(detections, ground_truths), eval_images=len(ground_truths))


def export_detector(model, base_dir, image_size, class_names):
    """Write a SavedModel into `base_dir/<next version>` whose
    `serving_default` takes float32 RGB images in [0, 255], `[batch,
    image_size, image_size, 3]` (as `pipelines.detection` makes them), and
    returns keras-hub's decoded detections: `boxes` (yxyx pixels),
    `confidence`, `labels`, `num_detections`; the label names are in
    `assets.extra/class_names.json`. Written to a temporary folder
    and renamed, so a server never sees half of it. Returns the path."""
    version = next_version(base_dir)
    final_path = os.path.join(base_dir, str(version))
    temporary = os.path.join(base_dir, f".tmp-{version}-{os.getpid()}")
    os.makedirs(base_dir, exist_ok=True)
    converter = model.preprocessor.image_converter

    def detect_one(image):
        normalised = converter(image[None])
        decoded = model.decode_predictions(model(normalised, training=False), normalised)
        return {name: value[0] for name, value in decoded.items()}

    def serve(images):
        # keras-hub's non-max suppression needs a static batch size: one image at a time.
        return tf.map_fn(detect_one, images, fn_output_signature=dict(
            boxes=tf.TensorSpec([None, 4], tf.float32),
            confidence=tf.TensorSpec([None], tf.float32),
            labels=tf.TensorSpec([None], tf.int32),
            num_detections=tf.TensorSpec([], tf.int32)))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SERVING_SIGNATURE, serve, input_signature=[
        tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")])
    try:
        archive.write_out(temporary, verbose=False)
        # TF Serving's place for files beside a model: assets.extra/.
        os.makedirs(os.path.join(temporary, "assets.extra"), exist_ok=True)
        with open(os.path.join(temporary, "assets.extra", CLASS_NAMES_FILE), "w",
                  encoding="utf-8") as f:
            json.dump(list(class_names), f)
        os.rename(temporary, final_path)
    finally:
        if os.path.exists(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
    return final_path
