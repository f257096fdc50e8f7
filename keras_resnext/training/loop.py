"""The paper's training recipe (§4) as one distributed custom training loop.

One loop serves every `tf.distribute` strategy (default, one device,
mirrored, multi-worker, TPU): `strategy.run` over a Keras model and optimizer
inside a `tf.function`. Keras' own `model.fit` fails under
MultiWorkerMirroredStrategy in Keras 3 (keras#20585, tensorflow#72388), and
its BackupAndRestore has every worker write into one folder; the loop here
checkpoints with `tf.train.CheckpointManager`, the chief into `model_dir`
and the other workers into throwaway folders, so nothing races.

TensorFlow only. `import keras_resnext` does not import this module.
"""

import contextlib
import csv
import dataclasses
import gc
import glob
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from keras_resnext import _tf_ops

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, runs are not guarded
    fcntl = None

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
LR_SCHEDULES = ("step", "cosine")
MIXED_PRECISION_POLICIES = {
    "none": "float32",
    "float16": "mixed_float16",
    "bfloat16": "mixed_bfloat16",
}

CHECKPOINT_SUBDIR = "checkpoints"
CSV_LOG_NAME = "training_log.csv"
CSV_COLUMNS = ("epoch", "learning_rate", "loss", "top1", "val_loss", "val_top1",
               "val_top5", "images_per_sec", "seconds")
METRICS_NAME = "metrics.json"
LOCK_NAME = ".lock"
EXPORT_RECORD_NAME = "export.json"
# What a run means beyond its architecture: resuming with any of these changed
# would continue one run under another's recipe (a 100x learning-rate jump for
# steps_per_epoch, say), so the checkpoint records them and a resume must
# match. More --epochs is not among them: extending a run is resuming it.
RUN_SETTINGS = ("batch_size", "steps_per_epoch", "learning_rate", "lr_schedule",
                "lr_decay_rate", "warmup_epochs", "weight_decay", "momentum", "nesterov",
                "label_smoothing", "mixed_precision", "ema_decay")
SETTING_FLAGS = {"learning_rate": "--lr (the peak learning rate)",
                 "steps_per_epoch": "--steps_per_epoch (given, or training examples // batch)"}


class UserError(Exception):
    """A problem the user can fix (a flag, a path, the data); the CLIs print
    its message as one line and exit non-zero."""


class TrainingDiverged(UserError):
    """The loss stopped being finite."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A published training recipe. `learning_rate` is for a global batch of
    `reference_batch_size` and scales linearly with the batch; the step
    schedule divides it by 10 at each fraction of `epochs` in `decay_at`."""

    batch_size: int
    learning_rate: float
    reference_batch_size: int
    weight_decay: float
    epochs: int
    decay_at: tuple
    momentum: float = 0.9
    nesterov: bool = True


RECIPES = {
    # §4 and fb.resnet.torch: lr 0.1 per 256, /10 at epochs 30, 60, 90 of 100.
    "imagenet": Recipe(batch_size=256, learning_rate=0.1, reference_batch_size=256,
                       weight_decay=1e-4, epochs=100, decay_at=(0.3, 0.6, 0.9)),
    # The official CIFAR recipe: batch 128, lr 0.1, wd 5e-4, 300 epochs,
    # /10 at 50% and 75% of training.
    "cifar": Recipe(batch_size=128, learning_rate=0.1, reference_batch_size=128,
                    weight_decay=5e-4, epochs=300, decay_at=(0.5, 0.75)),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs besides the model and the data.

    `learning_rate` is the peak rate for this global `batch_size` (already
    scaled; see `config_from_recipe`). `lr_decay_epochs` are the step
    schedule's boundaries in epochs. `weight_decay` is coupled L2, added to
    the gradient of every parameter (see `add_weight_decay`).
    """

    model_dir: str
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    momentum: float = 0.9
    nesterov: bool = True
    lr_schedule: str = "step"
    lr_decay_epochs: tuple = ()
    lr_decay_rate: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    mixed_precision: str = "none"
    ema_decay: Optional[float] = None
    steps_per_epoch: Optional[int] = None
    steps_per_loop: int = 1
    validation_freq: int = 1
    seed: Optional[int] = None
    max_checkpoints: int = 3
    progress_seconds: float = 30.0

    def __post_init__(self):
        _check(self.epochs >= 1, f"epochs must be at least 1; got {self.epochs}.")
        _check(self.batch_size >= 1, f"batch_size must be at least 1; got {self.batch_size}.")
        _check(self.learning_rate > 0, f"learning rate must be positive; got {self.learning_rate}.")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0; got {self.weight_decay}.")
        _check(0 <= self.momentum < 1, f"momentum must be in [0, 1); got {self.momentum}.")
        _check(self.lr_schedule in LR_SCHEDULES,
               f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {self.lr_schedule!r}.")
        _check(0 <= self.warmup_epochs < self.epochs,
               f"warmup_epochs must be in [0, epochs={self.epochs}); got {self.warmup_epochs}.")
        _check(0 <= self.label_smoothing < 1,
               f"label_smoothing must be in [0, 1); got {self.label_smoothing}.")
        _check(self.mixed_precision in MIXED_PRECISION_POLICIES,
               f"mixed_precision must be one of {', '.join(MIXED_PRECISION_POLICIES)}; "
               f"got {self.mixed_precision!r}.")
        _check(self.ema_decay is None or 0 < self.ema_decay < 1,
               f"ema_decay must be in (0, 1); got {self.ema_decay}.")
        _check(self.steps_per_epoch is None or self.steps_per_epoch >= 1,
               f"steps_per_epoch must be at least 1; got {self.steps_per_epoch}.")
        _check(self.steps_per_loop >= 1, f"steps_per_loop must be at least 1; got {self.steps_per_loop}.")
        _check(self.validation_freq >= 0, f"validation_freq must be >= 0; got {self.validation_freq}.")
        _check(self.progress_seconds >= 0,
               f"progress_seconds must be >= 0; got {self.progress_seconds}.")


def _check(condition, message):
    if not condition:
        raise UserError(message)


def config_from_recipe(recipe, model_dir, **overrides):
    """A `TrainConfig` following `recipe` (a `Recipe` or a `RECIPES` key).

    `overrides` replace recipe values: `batch_size`, `epochs`,
    `weight_decay`, `momentum`, `nesterov`, and `base_learning_rate` (the
    rate for the recipe's reference batch), plus any other `TrainConfig`
    field. The peak rate is `base_learning_rate * batch_size /
    reference_batch_size` (linear scaling, Goyal et al.) and the step
    boundaries sit at the recipe's fractions of `epochs`.
    """
    if isinstance(recipe, str):
        recipe = RECIPES[recipe]
    overrides = {key: value for key, value in overrides.items() if value is not None}
    batch_size = overrides.pop("batch_size", recipe.batch_size)
    epochs = overrides.pop("epochs", recipe.epochs)
    base_learning_rate = overrides.pop("base_learning_rate", recipe.learning_rate)
    fields = dict(
        model_dir=model_dir,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=base_learning_rate * batch_size / recipe.reference_batch_size,
        weight_decay=recipe.weight_decay,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
        lr_decay_epochs=tuple(round(fraction * epochs) for fraction in recipe.decay_at),
    )
    fields.update(overrides)
    return TrainConfig(**fields)


# --------------------------------------------------------------------------
# Strategies and workers


def create_strategy(name, tpu_address=None):
    """The `tf.distribute.Strategy` called `name` (one of `STRATEGIES`).

    Create it before any other TensorFlow work: multi-worker and TPU
    strategies configure the runtime.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        device = "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        _check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise UserError(f"Unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}.")


def _check_tf_config():
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise UserError(
            "--strategy multi_worker reads the cluster from the TF_CONFIG environment "
            "variable, which is not set (see the README's multi-host section)."
        )
    try:
        tf_config = json.loads(raw)
        tf_config["cluster"], tf_config["task"]["type"], tf_config["task"]["index"]
    except (ValueError, KeyError, TypeError):
        raise UserError(
            "TF_CONFIG must be JSON with 'cluster' and 'task': {'type', 'index'}; "
            f"got {raw!r}."
        ) from None


def worker_info(strategy):
    """(is_chief, task_id, num_workers) of this process in `strategy`'s cluster.

    The chief is task 'chief', or worker 0 of a cluster without one.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True, 0, 1
    cluster = resolver.cluster_spec().as_dict()
    num_workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None:  # no TF_CONFIG: a one-worker cluster
        return True, 0, 1
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0
                                        and "chief" not in cluster)
    return is_chief, task_id or 0, max(num_workers, 1)


def is_chief(strategy):
    return worker_info(strategy)[0]


# --------------------------------------------------------------------------
# The recipe: learning rate, loss, weight decay, optimizer


@keras.saving.register_keras_serializable(package="keras_resnext")
class RecipeSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup, then the step schedule of §4 or a cosine decay.

    Step: `peak * decay_rate ** (number of boundaries <= epoch)`, changing at
    epoch starts as in the official Torch code (epoch counts from 0 here, so
    ImageNet's 0.1 * 0.1^floor((epoch - 1) / 30) for 1-based epochs has
    boundaries (30, 60, 90)). Cosine: `peak * (1 + cos(pi * t)) / 2` over the
    epochs after warmup, per step. Warmup rises linearly per step from
    `peak / warmup_steps` to `peak` (Goyal et al., for large batches).
    """

    def __init__(self, peak_learning_rate, steps_per_epoch, epochs, kind="step",
                 decay_epochs=(), decay_rate=0.1, warmup_epochs=0.0):
        self.peak_learning_rate = float(peak_learning_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.epochs = int(epochs)
        self.kind = kind
        self.decay_epochs = tuple(float(epoch) for epoch in decay_epochs)
        self.decay_rate = float(decay_rate)
        self.warmup_epochs = float(warmup_epochs)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        peak = tf.constant(self.peak_learning_rate, tf.float32)
        warmup_steps = self.warmup_epochs * self.steps_per_epoch
        if self.kind == "step":
            epoch = tf.floor(step / self.steps_per_epoch)
            passed = tf.add_n([tf.cast(epoch >= boundary, tf.float32)
                               for boundary in self.decay_epochs] or [tf.constant(0.0)])
            decayed = peak * tf.pow(self.decay_rate, passed)
        else:
            total_steps = float(self.epochs * self.steps_per_epoch)
            progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1.0)
            progress = tf.clip_by_value(progress, 0.0, 1.0)
            decayed = peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
        if warmup_steps <= 0:
            return decayed
        warming = peak * (step + 1.0) / warmup_steps
        return tf.where(step < warmup_steps, warming, decayed)

    def get_config(self):
        return dict(peak_learning_rate=self.peak_learning_rate,
                    steps_per_epoch=self.steps_per_epoch, epochs=self.epochs,
                    kind=self.kind, decay_epochs=list(self.decay_epochs),
                    decay_rate=self.decay_rate, warmup_epochs=self.warmup_epochs)


def build_optimizer(config, steps_per_epoch):
    """SGD with (Nesterov) momentum on the recipe's schedule, no built-in
    weight decay (the loop adds coupled L2), and dynamic loss scaling for
    float16."""
    schedule = RecipeSchedule(
        config.learning_rate, steps_per_epoch, config.epochs, config.lr_schedule,
        config.lr_decay_epochs, config.lr_decay_rate, config.warmup_epochs,
    )
    optimizer = keras.optimizers.SGD(
        learning_rate=schedule, momentum=config.momentum, nesterov=config.nesterov
    )
    if config.mixed_precision == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def per_example_loss(labels, logits, num_classes, label_smoothing=0.0):
    """Softmax cross-entropy per example, from logits, in float32."""
    logits = tf.cast(logits, tf.float32)
    if label_smoothing:
        targets = tf.one_hot(labels, num_classes)
        return keras.losses.categorical_crossentropy(
            targets, logits, from_logits=True, label_smoothing=label_smoothing
        )
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=logits
    )


def add_weight_decay(gradients, variables, weight_decay):
    """Coupled L2: `gradient + weight_decay * variable` for every parameter.

    This is the paper's weight decay: the official Torch code (optim.sgd's
    `weightDecay`) adds it to the gradient of every parameter, BN's gamma
    and beta and the classifier bias included, before momentum. Keras'
    `SGD(weight_decay=...)` instead shrinks weights by `lr * wd` after the
    momentum step (decoupled), a different optimiser at the same numbers.
    """
    return [
        gradient + tf.cast(weight_decay, gradient.dtype) * tf.cast(variable, gradient.dtype)
        for gradient, variable in zip(gradients, variables)
    ]


def ema_decay_at(ema_decay, num_updates):
    """The EMA decay after `num_updates` steps: `min(decay, (1 + n) / (10 + n))`,
    as tf.train.ExponentialMovingAverage, so early averages forget the
    random initialisation quickly."""
    num_updates = tf.cast(num_updates, tf.float32)
    return tf.minimum(ema_decay, (1.0 + num_updates) / (10.0 + num_updates))


# --------------------------------------------------------------------------
# Steps


def make_train_loop(model, optimizer, strategy, config, ema_weights=None):
    """A `tf.function(iterator, num_steps)` that runs `num_steps` training
    steps on `strategy` and returns the float32 sums
    `[loss, correct top-1, examples]` over them.

    Each replica's loss is its examples' summed cross-entropy over the
    global batch, so the replicas' gradients sum to the global mean; the
    optimizer all-reduces (sums) them. Coupled L2 is added per replica as
    `weight_decay / num_replicas * variable`, so that sum adds exactly
    `weight_decay * variable`.
    """
    num_replicas = strategy.num_replicas_in_sync
    num_classes = model.output_shape[-1]
    variables = model.trainable_variables
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    model_weights = model.weights

    def replica_step(images, labels):
        with tf.GradientTape() as tape, _tf_ops.native_kernels():
            logits = model(images, training=True)
            losses = per_example_loss(labels, logits, num_classes, config.label_smoothing)
            loss = tf.nn.compute_average_loss(losses, global_batch_size=config.batch_size)
            scaled_loss = optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, variables)
        # scale_loss(x) is x times the current loss scale (x itself without
        # loss scaling), so the decay stays in step with the scaled gradient.
        gradients = add_weight_decay(
            gradients, variables, optimizer.scale_loss(config.weight_decay / num_replicas)
        )
        if loss_scaled and num_replicas > 1:
            gradients = _skip_everywhere_if_any_nonfinite(gradients)
        optimizer.apply(gradients, variables)
        if ema_weights is not None:
            decay = ema_decay_at(config.ema_decay, optimizer.iterations)
            for average, weight in zip(ema_weights, model_weights):
                value = tf.cast(weight.value, average.dtype)
                average.assign(decay * average + (1.0 - decay) * value)
        correct = tf.reduce_sum(tf.cast(
            tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32),
                     tf.cast(labels, tf.int32)), tf.float32))
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        return tf.stack([tf.reduce_sum(losses), correct, count])

    @tf.function
    def train_loop(iterator, num_steps):
        sums = tf.zeros([3], tf.float32)
        for _ in tf.range(num_steps):
            per_replica = strategy.run(replica_step, args=next(iterator))
            sums += strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        return sums

    return train_loop


def _skip_everywhere_if_any_nonfinite(gradients):
    # Keras' LossScaleOptimizer checks each replica's own gradients before
    # they are all-reduced; replicas that disagree would branch differently
    # around the all-reduce and hang. Poisoning every replica's gradients
    # when any is non-finite makes all of them skip the step together.
    context = tf.distribute.get_replica_context()
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in gradients])
    nonfinite_replicas = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                            1.0 - tf.cast(finite, tf.float32))
    poison = tf.where(nonfinite_replicas > 0, float("nan"), 0.0)
    return [g + tf.cast(poison, g.dtype) for g in gradients]


def make_evaluate(model, strategy, distributed_dataset, expected_examples=None):
    """A function that evaluates `model` on one pass of `distributed_dataset`
    and returns its top-1, top-5, mean cross-entropy and example count.

    At the end of a pass some replicas may get empty batches; every example
    is counted exactly once. With `expected_examples` (the split's size), the
    result holds it too, and a pass that covers fewer examples says so.
    """
    num_classes = model.output_shape[-1]
    top_k = min(5, num_classes)

    def batch_sums(images, labels):
        with _tf_ops.native_kernels():
            logits = tf.cast(model(images, training=False), tf.float32)
        labels = tf.cast(labels, tf.int32)
        losses = per_example_loss(labels, logits, num_classes)
        best = tf.math.top_k(logits, k=top_k).indices
        hits = tf.cast(tf.equal(best, labels[:, None]), tf.float32)
        return tf.stack([
            tf.reduce_sum(losses),
            tf.reduce_sum(hits[:, 0]),
            tf.reduce_sum(hits),
            tf.cast(tf.shape(labels)[0], tf.float32),
        ])

    def replica_step(images, labels):
        # TF's CPU convolution returns a wrongly shaped tensor for an empty batch.
        return tf.cond(tf.shape(labels)[0] > 0, lambda: batch_sums(images, labels),
                       lambda: tf.zeros([4], tf.float32))

    # One trace for full and partial batches alike (and the same collective
    # keys on every worker).
    @tf.function(input_signature=[distributed_dataset.element_spec])
    def eval_step(batch):
        per_replica = strategy.run(replica_step, args=batch)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def evaluate():
        totals = np.zeros(4, dtype=np.float64)
        for batch in distributed_dataset:
            totals += eval_step(batch).numpy()
        loss_sum, top1, top5, count = totals
        if count == 0:
            raise UserError("The validation split yielded no examples.")
        if expected_examples is not None and count < expected_examples:
            print(f"training: evaluated {int(count)} of {expected_examples} examples: "
                  f"{expected_examples - int(count)} could not be read (the input "
                  "pipeline's report names them).", file=sys.stderr, flush=True)
        return dict(loss=loss_sum / count, top1=top1 / count, top5=top5 / count,
                    num_examples=int(count), num_examples_expected=expected_examples)

    return evaluate


def make_average_local_state(strategy, variables):
    """A function that sets `variables` on every replica to their mean
    across replicas.

    BN moving statistics (and their EMA) are updated by each replica from
    its own batch, so replicas drift apart; averaging them at each epoch end
    (as timm's distribute_bn) makes checkpoints, evaluation and the export
    agree on every worker.
    """
    if strategy.num_replicas_in_sync == 1 or not variables:
        return lambda: None

    def replica_fn():
        context = tf.distribute.get_replica_context()
        values = [tf.identity(_tf_variable(v)) for v in variables]
        means = context.all_reduce(tf.distribute.ReduceOp.MEAN, values)
        for variable, mean in zip(variables, means):
            _tf_variable(variable).assign(mean)

    @tf.function
    def average():
        strategy.run(replica_fn)

    return average


def _tf_variable(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


def _copy_per_device(strategy, targets, sources):
    """`target.assign(source)` on every device's copy, in cross-replica context."""
    def assign(target, source):
        return target.assign(tf.cast(source, target.dtype))

    for target, source in zip(targets, sources):
        strategy.extended.update(_tf_variable(target), assign, args=(_tf_variable(source),))


# --------------------------------------------------------------------------
# State on disk


def _write_atomically(path, text):
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


def _read_metrics(model_dir):
    try:
        with open(os.path.join(model_dir, METRICS_NAME), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _float_or_none(value):
    return None if value is None else float(value)


def write_metrics(model_dir, metrics):
    _write_atomically(os.path.join(model_dir, METRICS_NAME),
                      json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def export_once(model_dir, export_dir, epochs_completed, export):
    """Call `export()`, which writes a SavedModel into `export_dir` and returns
    its path, unless `model_dir` records that it already exported this state
    (`epochs_completed`) there: a rerun of a finished run adds no identical
    version. Returns `(path, exported_now)`.

    Also removes the temporary folders (`.tmp-VERSION-PID`) of exports whose
    process is gone. Without a `model_dir` it always exports.
    """
    _remove_dead_exports(export_dir)
    if model_dir is None or epochs_completed is None:
        return export(), True
    record_path = os.path.join(model_dir, EXPORT_RECORD_NAME)
    with ModelDirLock(model_dir):
        try:
            with open(record_path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = {}
        if (record.get("export_dir") == os.path.realpath(export_dir)
                and record.get("epochs_completed") == epochs_completed
                and os.path.isdir(record.get("path", ""))):
            return record["path"], False
        path = export()
        _write_atomically(record_path, json.dumps(dict(
            export_dir=os.path.realpath(export_dir), path=path,
            epochs_completed=epochs_completed), indent=2) + "\n")
        return path, True


def _remove_dead_exports(export_dir):
    for folder in glob.glob(os.path.join(glob.escape(export_dir), ".tmp-*-*")):
        match = re.fullmatch(r"\.tmp-[0-9]+-([0-9]+)", os.path.basename(folder))
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _truncate_csv_log(path, completed_epochs):
    """Keep the rows of the epochs a checkpoint holds; a row written just
    before a crash, for an epoch that will be trained again, goes."""
    if not os.path.exists(path):
        return
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if int(row["epoch"]) <= completed_epochs]
    buffer = [",".join(CSV_COLUMNS)]
    for row in rows:
        buffer.append(",".join(row.get(column, "") for column in CSV_COLUMNS))
    _write_atomically(path, "\n".join(buffer) + "\n")


def _append_csv_row(path, row):
    new_file = not os.path.exists(path)
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new_file:
            writer.writeheader()
        writer.writerow({column: _format_csv_value(row.get(column)) for column in CSV_COLUMNS})
        f.flush()
        os.fsync(f.fileno())


def _format_csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class ModelDirLock:
    """An advisory lock on a model_dir, so that one run at a time writes there.

    `flock`: the OS releases it when its holder exits or dies, so a lock is
    never stale. The lock file names its holder. Re-entrant within a process,
    so a caller may hold it around `train()` and an export.
    """

    _held = {}  # real path -> [open lock file, depth]

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.key = os.path.realpath(model_dir)

    def __enter__(self):
        held = self._held.get(self.key)
        if held is not None:
            held[1] += 1
            return self
        os.makedirs(self.model_dir, exist_ok=True)
        lock_file = open(os.path.join(self.model_dir, LOCK_NAME), "a+", encoding="utf-8")
        if fcntl is not None:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock_file.seek(0)
                holder = lock_file.read().strip() or "another process"
                lock_file.close()
                raise UserError(
                    f"{self.model_dir} is in use by another run ({holder}); wait for it to "
                    "end or use another --model_dir.") from None
        lock_file.truncate(0)
        lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock_file.flush()
        self._held[self.key] = [lock_file, 1]
        return self

    def __exit__(self, *exc_info):
        held = self._held[self.key]
        held[1] -= 1
        if held[1] == 0:
            del self._held[self.key]
            held[0].close()  # releases the flock
        return False


@contextlib.contextmanager
def _lock_for_run(model_dir, strategy):
    """The chief holds model_dir's lock for the run; if it cannot, every
    worker stops (the others would wait for it in their first collective)."""
    chief, _, num_workers = worker_info(strategy)
    lock = ModelDirLock(model_dir) if chief else contextlib.nullcontext()
    refused, locked = None, False
    try:
        lock.__enter__()
        locked = True
    except UserError as error:
        refused = error
    try:
        if num_workers > 1 and _sum_over_replicas(strategy, [float(not locked)])[0] > 0:
            raise refused or UserError(f"The chief could not lock {model_dir}; see its error.")
        if refused is not None:
            raise refused
        yield
    finally:
        if locked:
            lock.__exit__(None, None, None)


class _Checkpoints:
    """Checkpoint saving and restoring for chief and non-chief workers.

    The chief keeps `max_to_keep` checkpoints in `model_dir/checkpoints`,
    numbered by completed epochs. Other workers must take part in each save
    (saving may need collectives), so they write into their own temporary
    folder and delete it. Every worker restores from the chief's folder,
    which therefore must be shared storage in a multi-host run.
    """

    def __init__(self, checkpoint, model_dir, chief, task_id, max_to_keep):
        self.directory = os.path.join(model_dir, CHECKPOINT_SUBDIR)
        self.chief = chief
        write_directory = self.directory if chief else os.path.join(
            self.directory, f".worker{task_id}-tmp")
        if chief:
            _remove_leftovers(model_dir, self.directory)
        self.manager = tf.train.CheckpointManager(
            checkpoint, write_directory, max_to_keep=max_to_keep if chief else 1
        )
        self.checkpoint = checkpoint
        self.write_directory = write_directory

    def restore_latest(self, run_settings, warn):
        """Restore the newest intact checkpoint and return its path (None if
        there is none). An unreadable one is passed over with a warning; one
        written by another model, optimizer or `RUN_SETTINGS` is an error."""
        unreadable = []
        for path in _checkpoints_newest_first(self.directory):
            try:
                _check_run_settings(path, run_settings)
                status = self.checkpoint.restore(path)
                status.assert_existing_objects_matched()
                # save_counter is created on the next save; nothing else is left over.
                status.expect_partial()
            except (AssertionError, ValueError) as error:
                raise UserError(
                    f"The checkpoint {path} does not match this model and optimizer "
                    f"(another architecture or recipe?); use a new --model_dir. "
                    f"({_first_line(error)})"
                ) from None
            except tf.errors.OpError as error:
                unreadable.append(path)
                warn(f"Warning: the checkpoint {path} is unreadable ({_first_line(error)}); "
                     "trying the one before it.", flush=True)
                continue
            return path
        if unreadable:
            raise UserError(
                f"No intact checkpoint in {self.directory}: {', '.join(unreadable)} cannot be "
                "read; move them away to start afresh, or use a new --model_dir.")
        return None

    def save(self, epoch):
        path = self.manager.save(checkpoint_number=epoch)
        if not self.chief:
            shutil.rmtree(self.write_directory, ignore_errors=True)
        return path


def _first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _checkpoints_newest_first(directory):
    # From the files rather than the `checkpoint` state file, which a kill
    # can leave naming a checkpoint that was never finished.
    numbers = []
    for index in glob.glob(os.path.join(glob.escape(directory), "ckpt-*.index")):
        match = re.fullmatch(r"ckpt-([0-9]+)\.index", os.path.basename(index))
        if match:
            numbers.append(int(match.group(1)))
    return [os.path.join(directory, f"ckpt-{number}") for number in sorted(numbers, reverse=True)]


def _run_settings(config, steps_per_epoch):
    values = dict(dataclasses.asdict(config), steps_per_epoch=steps_per_epoch)
    return {name: values[name] for name in RUN_SETTINGS}


def _check_run_settings(path, run_settings):
    """Raise, naming the flag, if the checkpoint at `path` was written with
    other `RUN_SETTINGS` (checkpoints that predate the record pass)."""
    reader = tf.train.load_checkpoint(path)
    key = "run_settings/.ATTRIBUTES/VARIABLE_VALUE"
    if not reader.has_tensor(key):
        return
    recorded = json.loads(reader.get_tensor(key))
    for name in RUN_SETTINGS:
        if name in recorded and recorded[name] != run_settings[name]:
            flag = SETTING_FLAGS.get(name, f"--{name}")
            raise UserError(
                f"The checkpoint {path} was written with {flag} {recorded[name]}; this run has "
                f"{run_settings[name]}. Resuming would mix two runs: pass the same value, or "
                "use a new --model_dir.")


def _remove_leftovers(model_dir, checkpoint_dir):
    """Remove what killed runs leave: half-written checkpoints (TensorFlow's
    `ckpt-N_temp` folders), other workers' throwaway folders and half-written
    files (`name.tmp-PID`). The caller holds the model_dir lock, so no live
    run owns them."""
    for folder in (glob.glob(os.path.join(glob.escape(checkpoint_dir), "*_temp"))
                   + glob.glob(os.path.join(glob.escape(checkpoint_dir), ".worker*-tmp"))):
        shutil.rmtree(folder, ignore_errors=True)
    for path in glob.glob(os.path.join(glob.escape(model_dir), "*.tmp-*")):
        if os.path.isfile(path):
            os.remove(path)


# --------------------------------------------------------------------------
# The run


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a dataset: `dataset_fn(per_replica_batch_size,
    input_context)` returns one pass of `(images, labels)` batches for that
    worker (input_context may be None), and the split has `num_examples`."""

    dataset_fn: Callable
    num_examples: int
    source: Optional[str] = None  # what it is read from, for error messages


@dataclasses.dataclass
class TrainResult:
    metrics: dict
    model: keras.Model


def _set_dtype_policy(name):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    return previous


def _distribute(strategy, split, batch_size, repeat):
    num_replicas = strategy.num_replicas_in_sync
    if batch_size % num_replicas:
        raise UserError(
            f"The global batch size {batch_size} does not split evenly over "
            f"{num_replicas} replicas; choose a multiple of {num_replicas}."
        )

    def dataset_fn(input_context):
        per_replica = input_context.get_per_replica_batch_size(batch_size)
        dataset = split.dataset_fn(per_replica, input_context)
        return dataset.repeat() if repeat else dataset

    return strategy.distribute_datasets_from_function(dataset_fn)


def _sum_over_replicas(strategy, values):
    """The float64 sum of `values` over all replicas (every worker must call)."""
    @tf.function
    def all_reduce():
        def replica_fn():
            context = tf.distribute.get_replica_context()
            return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.constant(values, tf.float64))
        return strategy.run(replica_fn)

    return strategy.experimental_local_results(all_reduce())[0].numpy()


def _check_workers_agree(strategy, value, what):
    """Raise unless every worker holds the same number `value`."""
    if strategy.num_replicas_in_sync == 1:
        return
    # ReduceOp has no MIN/MAX: values agree iff n * sum(v^2) == sum(v)^2.
    total, total_squares, count = _sum_over_replicas(
        strategy, [float(value), float(value) ** 2, 1.0])
    if count * total_squares != total * total:
        raise UserError(
            f"Workers disagree on {what} (this worker: {value}, mean {total / count:g}): "
            "--model_dir must be storage that every worker reads and the chief writes."
        )


def wait_for_all_workers(strategy):
    """Return once every worker has called this; a no-op with one worker.

    Workers that leave while the chief still writes (an export, say) make
    the chief's runtime wait on them and report them as crashed.
    """
    if worker_info(strategy)[2] > 1:
        _sum_over_replicas(strategy, [0.0])


def train(model_fn, train_split, val_split, config, strategy=None, log=None):
    """Train the model that `model_fn()` builds, resuming from `config.model_dir`.

    `model_fn` runs inside the strategy's scope under the mixed-precision
    policy; it should return a model with a logits head
    (`classifier_activation=None`) and may load initial weights. The run
    resumes after the last completed epoch checkpointed in
    `model_dir/checkpoints`; it writes TensorBoard logs to `model_dir/logs`,
    one CSV row per epoch to `model_dir/training_log.csv` and, at the end,
    `model_dir/metrics.json` (chief only). Returns a `TrainResult` whose
    model holds the final weights (the EMA if `config.ema_decay`).

    The chief holds `model_dir`'s lock (`ModelDirLock`) for the run, and a
    resume must keep the `RUN_SETTINGS` its checkpoint records. Unless
    `config.steps_per_epoch` is given, each epoch's input is built afresh
    under a TensorFlow global seed derived from the run's data seed
    (`config.seed`, else drawn at random and kept in the checkpoints) and the
    epoch, so a resumed run sees the data order and augmentation the
    uninterrupted run would have seen.
    """
    strategy = strategy or tf.distribute.get_strategy()
    with _lock_for_run(config.model_dir, strategy):
        return _train(model_fn, train_split, val_split, config, strategy, log)


def _train(model_fn, train_split, val_split, config, strategy, log):
    log = log or _print
    chief, task_id, num_workers = worker_info(strategy)
    say = log if chief else (lambda *args, **kwargs: None)
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)

    steps_per_epoch = config.steps_per_epoch or train_split.num_examples // config.batch_size
    if steps_per_epoch < 1:
        raise UserError(
            f"The training split has {train_split.num_examples} examples, fewer than one "
            f"global batch of {config.batch_size}; lower --batch_size."
        )
    os.makedirs(config.model_dir, exist_ok=True)

    previous_policy = _set_dtype_policy(MIXED_PRECISION_POLICIES[config.mixed_precision])
    try:
        with strategy.scope():
            model = model_fn()
            optimizer = build_optimizer(config, steps_per_epoch)
            optimizer.build(model.trainable_variables)
            ema_weights = _create_ema_weights(model, strategy) if config.ema_decay else None
            completed_epochs = tf.Variable(0, dtype=tf.int64, trainable=False,
                                           name="completed_epochs")
    finally:
        keras.config.set_dtype_policy(previous_policy)

    run_settings = _run_settings(config, steps_per_epoch)
    # Each epoch's input order and augmentation follow from this and the
    # epoch: --seed, else a random one, drawn at the run's start and kept by
    # its checkpoints, so that a resume repeats the uninterrupted run and two
    # unseeded runs don't share one data order.
    data_seed = tf.Variable(
        config.seed if config.seed is not None else random.SystemRandom().randrange(2**31),
        dtype=tf.int64, trainable=False, name="data_seed")
    state = dict(model=model, optimizer=optimizer, completed_epochs=completed_epochs,
                 run_settings=tf.Variable(json.dumps(run_settings), trainable=False),
                 data_seed=data_seed)
    if ema_weights is not None:
        state["ema"] = ema_weights
    checkpoints = _Checkpoints(tf.train.Checkpoint(**state), config.model_dir, chief,
                               task_id, config.max_checkpoints)
    restored = checkpoints.restore_latest(run_settings, say)
    if config.seed is not None:
        data_seed.assign(config.seed)
    start_epoch = int(completed_epochs.numpy())
    _check_workers_agree(strategy, start_epoch, "the last completed epoch")
    if restored:
        say(f"Restored {restored}: {start_epoch} of {config.epochs} epochs done, "
            f"optimizer step {int(optimizer.iterations.numpy())}.")

    csv_path = os.path.join(config.model_dir, CSV_LOG_NAME)
    writers = None
    if chief:
        _truncate_csv_log(csv_path, start_epoch)
        writers = {name: tf.summary.create_file_writer(os.path.join(config.model_dir, "logs", name))
                   for name in ("train", "validation")}

    train_loop = make_train_loop(model, optimizer, strategy, config, ema_weights)
    local_state = list(model.non_trainable_weights)
    if ema_weights is not None:
        trainable = {id(w) for w in model.trainable_weights}
        local_state += [e for e, w in zip(ema_weights, model.weights) if id(w) not in trainable]
    average_local_state = make_average_local_state(strategy, local_state)
    evaluate = make_evaluate(
        model, strategy, _distribute(strategy, val_split, config.batch_size, repeat=False),
        val_split.num_examples)
    probe = make_evaluate(
        model, strategy, _distribute(strategy, _first_batch(val_split), config.batch_size,
                                     repeat=False))

    ema = _EmaSwap(strategy, model, ema_weights)
    throughput = _Throughput()
    last_train, final, iterator = {}, None, None
    for epoch in range(start_epoch, config.epochs):
        log(f"Epoch {epoch + 1}/{config.epochs}", flush=True)
        learning_rate = float(optimizer.learning_rate.numpy())
        # An epoch that is a pass (the default) starts its own, so a resumed
        # run repeats the uninterrupted one. Shorter --steps_per_epoch epochs
        # continue one stream: fresh passes would keep a shuffle buffer's
        # examples from the start of the data.
        if iterator is None or config.steps_per_epoch is None:
            iterator = _epoch_iterator(strategy, train_split, config, int(data_seed.numpy()),
                                       epoch)
        started = time.perf_counter()
        last_train = _train_epoch(train_loop, iterator, steps_per_epoch, config, epoch,
                                  chief, checkpoints.directory, throughput, train_split)
        seconds = time.perf_counter() - started
        average_local_state()
        row = dict(epoch=epoch + 1, learning_rate=learning_rate, loss=last_train["loss"],
                   top1=last_train["top1"], seconds=seconds,
                   images_per_sec=steps_per_epoch * config.batch_size / seconds)
        last_epoch = epoch + 1 == config.epochs
        if last_epoch or (config.validation_freq and (epoch + 1) % config.validation_freq == 0):
            with ema:
                val = evaluate()
            _check_finite(val["loss"], "validation loss", epoch, checkpoints.directory)
            row.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
            say(f"val_loss: {val['loss']:.4f} - val_top1: {val['top1']:.4f} - "
                f"val_top5: {val['top5']:.4f}", flush=True)
            final = val if last_epoch else None
        else:
            _check_finite(probe()["loss"], "loss on a validation batch", epoch,
                          checkpoints.directory)
        if chief:
            _append_csv_row(csv_path, row)
            _write_summaries(writers, row, epoch + 1)
        completed_epochs.assign(epoch + 1)
        checkpoints.save(epoch + 1)

    # The final evaluation and the returned model use the EMA weights.
    ema.swap_in()
    if final is None:
        final = evaluate()
    say(f"Final evaluation on {final['num_examples']} of {val_split.num_examples} examples: "
        f"top1 {final['top1']:.4f} "
        f"- top5 {final['top5']:.4f} - loss {final['loss']:.4f}", flush=True)
    # A rerun with nothing left to train keeps the training figures it found.
    previous = _previous_training_figures(config.model_dir, csv_path) if not last_train else {}
    metrics = dict(
        epochs_completed=int(completed_epochs.numpy()),
        top1=float(final["top1"]), top5=float(final["top5"]), loss=float(final["loss"]),
        eval_examples=final["num_examples"], eval_examples_expected=val_split.num_examples,
        images_per_sec=throughput.images_per_sec() or previous.get("images_per_sec"),
        num_workers=num_workers, num_replicas=strategy.num_replicas_in_sync,
        global_batch_size=config.batch_size, steps_per_epoch=steps_per_epoch,
        train_loss=_float_or_none(last_train.get("loss", previous.get("train_loss"))),
        train_top1=_float_or_none(last_train.get("top1", previous.get("train_top1"))),
        weights="ema" if ema_weights is not None else "trained",
    )
    if chief:
        if writers:
            for writer in writers.values():
                writer.close()
        write_metrics(config.model_dir, metrics)
    return TrainResult(metrics=metrics, model=model)


def _print(*args, **kwargs):
    print(*args, **kwargs)


def _epoch_iterator(strategy, split, config, data_seed, epoch):
    # TensorFlow combines every random op's seed, given or not, with the
    # global seed, so the epoch's shuffles and augmentation seeds follow from
    # (data_seed, epoch) alone, however many epochs this process has run.
    tf.random.set_seed(int(np.random.SeedSequence([data_seed % 2**32, epoch]).generate_state(1)[0]))
    return iter(_distribute(strategy, split, config.batch_size, repeat=True))


def _previous_training_figures(model_dir, csv_path):
    """A rerun's training figures: metrics.json's, or if a kill came before
    it was written, the last CSV row's."""
    previous = _read_metrics(model_dir)
    if previous.get("train_loss") is not None or not os.path.exists(csv_path):
        return previous
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return previous
    figures = {"train_loss": rows[-1]["loss"], "train_top1": rows[-1]["top1"],
               "images_per_sec": rows[-1]["images_per_sec"]}
    return dict(previous, **{name: float(value) for name, value in figures.items() if value})


def _create_ema_weights(model, strategy):
    ema_weights = [
        tf.Variable(tf.zeros(w.shape, "float32"), trainable=False,
                    name=f"ema/{w.path.replace('/', '_')}")
        for w in model.weights
    ]
    _copy_per_device(strategy, ema_weights, model.weights)
    return ema_weights


class _EmaSwap:
    """Within `with`, the model holds the EMA weights; on exit, its own."""

    def __init__(self, strategy, model, ema_weights):
        self.strategy = strategy
        self.model = model
        self.ema_weights = ema_weights
        self.saved = None

    def swap_in(self):
        if self.ema_weights is None:
            return
        if self.saved is None:
            with self.strategy.scope():
                self.saved = [tf.Variable(tf.zeros(w.shape, w.dtype), trainable=False)
                              for w in self.model.weights]
        _copy_per_device(self.strategy, self.saved, self.model.weights)
        _copy_per_device(self.strategy, self.model.weights, self.ema_weights)

    def swap_out(self):
        if self.ema_weights is not None:
            _copy_per_device(self.strategy, self.model.weights, self.saved)

    def __enter__(self):
        self.swap_in()
        return self

    def __exit__(self, *exc_info):
        self.swap_out()
        return False


class _Throughput:
    """Training images per second over this process's steps, leaving out
    the first call of the loop (which traces and compiles it)."""

    def __init__(self):
        self.images = 0
        self.seconds = 0.0
        self.first = None

    def add(self, images, seconds):
        if self.first is None:
            self.first = (images, seconds)
            return
        self.images += images
        self.seconds += seconds

    def images_per_sec(self):
        if self.seconds > 0:
            return self.images / self.seconds
        if self.first and self.first[1] > 0:
            return self.first[0] / self.first[1]
        return None


def _train_epoch(train_loop, iterator, steps_per_epoch, config, epoch, chief,
                 checkpoint_dir, throughput, train_split):
    interactive = sys.stdout.isatty()
    verbose = (1 if interactive else 2) if chief else 0
    progbar = keras.utils.Progbar(steps_per_epoch, verbose=verbose,
                                  stateful_metrics=["loss", "top1"])
    # Piped output (nohup, CI, Kubernetes) gets no live bar: print a line every
    # progress_seconds instead, so a long epoch still shows it is alive.
    progress = _ProgressLines(config, epoch, steps_per_epoch) if chief and not interactive else None
    totals = np.zeros(3, dtype=np.float64)
    step = 0
    while step < steps_per_epoch:
        num_steps = min(config.steps_per_loop, steps_per_epoch - step)
        started = time.perf_counter()
        try:
            sums = train_loop(iterator, tf.constant(num_steps)).numpy()
        except tf.errors.OutOfRangeError:
            # The training data repeats, so it only ends if it yields nothing.
            raise UserError(
                f"The training split{_of_source(train_split)} yielded no batch of "
                f"{config.batch_size} images: its images are unreadable (see the skipped "
                "files above) or fewer than one batch."
            ) from None
        throughput.add(num_steps * config.batch_size, time.perf_counter() - started)
        totals += sums
        step += num_steps
        if not np.isfinite(sums[0]):
            raise _diverged(f"the loss is {sums[0]} at epoch {epoch + 1}, step {step}",
                            checkpoint_dir)
        progbar.update(step, [("loss", totals[0] / totals[2]), ("top1", totals[1] / totals[2])])
        if progress:
            progress.update(step, totals)
    return dict(loss=totals[0] / totals[2], top1=totals[1] / totals[2])


class _ProgressLines:
    """Within an epoch, one line (step, images/s, loss, top-1) per
    `config.progress_seconds`."""

    def __init__(self, config, epoch, steps_per_epoch):
        self.interval = config.progress_seconds
        self.batch_size = config.batch_size
        self.prefix = f"Epoch {epoch + 1}/{config.epochs} step"
        self.steps_per_epoch = steps_per_epoch
        self.last_time = time.perf_counter()
        self.last_step = 0

    def update(self, step, totals):
        now = time.perf_counter()
        if now - self.last_time < self.interval or step == self.steps_per_epoch:
            return
        images_per_sec = (step - self.last_step) * self.batch_size / (now - self.last_time)
        print(f"{self.prefix} {step}/{self.steps_per_epoch} - {images_per_sec:.1f} images/s - "
              f"loss: {totals[0] / totals[2]:.4f} - top1: {totals[1] / totals[2]:.4f}",
              flush=True)
        self.last_time, self.last_step = now, step


def _of_source(split):
    return f" of {split.source}" if split.source else ""


def _diverged(what, checkpoint_dir):
    return TrainingDiverged(
        f"Training stopped: {what}. The last good checkpoint is in {checkpoint_dir}; "
        "lower --lr or add --warmup_epochs."
    )


def _first_batch(split):
    return dataclasses.replace(
        split, dataset_fn=lambda *arguments: split.dataset_fn(*arguments).take(1))


def _check_finite(loss, what, epoch, checkpoint_dir):
    """Raise `TrainingDiverged` unless the model's `loss` after `epoch` is
    finite, before the epoch is checkpointed. The training loss is computed
    before each update, so a last update that breaks the model leaves it
    finite; weights can also be finite and still overflow float32 at the
    logits."""
    if not np.isfinite(loss):
        raise _diverged(f"the {what} is {loss} after epoch {epoch + 1}", checkpoint_dir)


def _write_summaries(writers, row, epoch):
    _write_scalars(writers["train"], epoch, {
        "epoch_loss": row["loss"], "epoch_top1": row["top1"],
        "learning_rate": row["learning_rate"], "images_per_sec": row["images_per_sec"],
    })
    if "val_top1" in row:
        _write_scalars(writers["validation"], epoch, {
            "epoch_loss": row["val_loss"], "epoch_top1": row["val_top1"],
            "epoch_top5": row["val_top5"],
        })


def _write_scalars(writer, step, scalars):
    # tf.summary.scalar needs the tensorboard package; tf.summary.write with
    # the scalars plugin's metadata writes the same events without it.
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    with writer.as_default(step=step):
        for tag, value in scalars.items():
            tf.summary.write(tag, tf.constant(float(value), tf.float32), metadata=metadata)
    writer.flush()


def latest_checkpoint(path):
    """The newest training checkpoint in `path`: a `model_dir`, its
    checkpoints folder, or a checkpoint itself; None if there is none."""
    for directory in (os.path.join(path, CHECKPOINT_SUBDIR), path):
        latest = tf.train.latest_checkpoint(directory)
        if latest:
            return latest
    return path if tf.io.gfile.exists(f"{path}.index") else None


def restore_model_weights(model, path):
    """Load into `model` the weights of the newest training checkpoint in
    `path` (see `latest_checkpoint`), the EMA where the run kept one (as
    `train` evaluates and returns it). Returns the checkpoint's path; raises
    `UserError` if there is none or it doesn't fit `model`."""
    checkpoint_path = latest_checkpoint(path)
    if checkpoint_path is None:
        raise UserError(f"No training checkpoint in {path}.")
    problem = None
    logger = tf.get_logger()
    level = logger.level
    # A failed restore lists every value it did not restore when it is
    # garbage-collected; the one line below says what matters.
    logger.setLevel("ERROR")
    try:
        status = tf.train.Checkpoint(model=model).restore(checkpoint_path)
        status.expect_partial()  # the optimizer and epoch counter are not wanted
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError) as error:
        problem = _first_line(error)
    finally:
        gc.collect()
        logger.setLevel(level)
    if problem:
        raise UserError(
            f"The checkpoint {checkpoint_path} does not fit this model (another architecture, "
            f"or a classifier for another number of classes?): {problem}")
    reader = tf.train.load_checkpoint(checkpoint_path)
    ema_keys = [f"ema/{index}/.ATTRIBUTES/VARIABLE_VALUE" for index in range(len(model.weights))]
    if all(reader.has_tensor(key) for key in ema_keys):
        for weight, key in zip(model.weights, ema_keys):
            weight.assign(tf.cast(reader.get_tensor(key), weight.dtype))
    return checkpoint_path


def evaluate_model(model, val_split, batch_size, strategy=None):
    """Top-1/top-5 of `model` (logits or probabilities) on one pass of
    `val_split`, across `strategy`'s replicas. Build the model in the
    strategy's scope."""
    strategy = strategy or tf.distribute.get_strategy()
    return make_evaluate(
        model, strategy, _distribute(strategy, val_split, batch_size, repeat=False),
        val_split.num_examples)()
