"""The epoch loop: `train` (setup, restore, epochs, final metrics) and
`evaluate_model`.

One loop serves every `tf.distribute` strategy (default, one device,
mirrored, multi-worker, TPU): `strategy.run` over a Keras model and optimizer
inside a `tf.function`. Keras' own `model.fit` fails under
MultiWorkerMirroredStrategy in Keras 3 (keras#20585, tensorflow#72388), and
its BackupAndRestore has every worker write into one folder; the loop here
checkpoints with `tf.train.CheckpointManager`, the chief into `model_dir`
and the other workers into throwaway folders, so nothing races.
"""

import dataclasses
import json
import os
import random
import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from keras_resnext.preprocessing import outputs_probabilities
from keras_resnext.training import run_dir
from keras_resnext.training.checkpoints import Checkpoints, run_settings
from keras_resnext.training.distribute import (
    check_workers_agree, distribute_split, make_average_local_state, worker_info)
from keras_resnext.training.errors import UserError, diverged
from keras_resnext.training.recipe import (
    MIXED_PRECISION_POLICIES, EmaSwap, build_optimizer, create_ema_weights)
from keras_resnext.training.steps import (
    Throughput, epoch_iterator, make_evaluate, make_train_loop, train_epoch)


@dataclasses.dataclass(frozen=True)
class InputSplit:
    """The training loop's input for one split: `dataset_fn(per_replica_batch_size,
    input_context)` returns one pass of `(images, labels)` batches for that
    worker (input_context may be None), and the split has `num_examples`.
    (`pipelines.SplitInfo` describes a split of a source: its classes, size
    and preprocessing.)"""

    dataset_fn: Callable
    num_examples: int
    source: Optional[str] = None  # what it is read from, for error messages


@dataclasses.dataclass
class TrainResult:
    metrics: dict
    model: keras.Model


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
    with run_dir.lock_for_run(config.model_dir, strategy):
        run = _TrainingRun(model_fn, train_split, val_split, config, strategy, log or print)
        run.restore()
        run.train_epochs()
        return run.final_result()


class _TrainingRun:
    """One call of `train`: its model, optimizer and EMA, checkpoints, logs
    and the per-epoch evaluation."""

    def __init__(self, model_fn, train_split, val_split, config, strategy, log):
        self.train_split, self.val_split = train_split, val_split
        self.config, self.strategy = config, strategy
        self.chief, task_id, self.num_workers = worker_info(strategy)
        self.log = log  # every worker's
        self.say = log if self.chief else (lambda *args, **kwargs: None)
        if config.seed is not None:
            keras.utils.set_random_seed(config.seed)
        self.steps_per_epoch = (config.steps_per_epoch
                                or train_split.num_examples // config.batch_size)
        if self.steps_per_epoch < 1:
            raise UserError(
                f"The training split has {train_split.num_examples} examples, fewer than one "
                f"global batch of {config.batch_size}; lower --batch_size."
            )
        os.makedirs(config.model_dir, exist_ok=True)
        self._build_model_and_optimizer(model_fn)
        self.checkpoints = Checkpoints(tf.train.Checkpoint(**self._checkpointed_state()),
                                       config.model_dir, self.chief, task_id,
                                       config.max_checkpoints)
        self.csv_path = os.path.join(config.model_dir, run_dir.CSV_LOG_NAME)
        self.throughput = Throughput()
        self.ema = EmaSwap(strategy, self.model, self.ema_weights)
        self.start_epoch = 0

    def _build_model_and_optimizer(self, model_fn):
        config, strategy = self.config, self.strategy
        previous_policy = keras.config.dtype_policy()
        keras.config.set_dtype_policy(MIXED_PRECISION_POLICIES[config.mixed_precision])
        try:
            with strategy.scope():
                self.model = model_fn()
                self.optimizer = build_optimizer(config, self.steps_per_epoch)
                self.optimizer.build(self.model.trainable_variables)
                self.ema_weights = (create_ema_weights(self.model, strategy)
                                    if config.ema_decay else None)
                self.completed_epochs = tf.Variable(0, dtype=tf.int64, trainable=False,
                                                    name="completed_epochs")
        finally:
            keras.config.set_dtype_policy(previous_policy)

    def _checkpointed_state(self):
        config = self.config
        self.run_settings = run_settings(config, self.steps_per_epoch)
        # Each epoch's input order and augmentation follow from this and the
        # epoch: --seed, else a random one, drawn at the run's start and kept by
        # its checkpoints, so that a resume repeats the uninterrupted run and two
        # unseeded runs don't share one data order.
        self.data_seed = tf.Variable(
            config.seed if config.seed is not None else random.SystemRandom().randrange(2**31),
            dtype=tf.int64, trainable=False, name="data_seed")
        state = dict(model=self.model, optimizer=self.optimizer,
                     completed_epochs=self.completed_epochs,
                     run_settings=tf.Variable(json.dumps(self.run_settings), trainable=False),
                     data_seed=self.data_seed)
        if self.ema_weights is not None:
            state["ema"] = self.ema_weights
        return state

    def restore(self):
        """Continue from the newest intact checkpoint, if any; every worker
        must find the same one."""
        config = self.config
        restored = self.checkpoints.restore_latest(self.run_settings, self.say)
        if config.seed is not None:
            self.data_seed.assign(config.seed)
        self.start_epoch = int(self.completed_epochs.numpy())
        check_workers_agree(self.strategy, self.start_epoch, "the last completed epoch")
        if restored:
            self.say(f"Restored {restored}: {self.start_epoch} of {config.epochs} epochs done, "
                     f"optimizer step {int(self.optimizer.iterations.numpy())}.")

    def train_epochs(self):
        """Train the epochs left, each followed by its evaluation (or a
        one-batch check), its CSV row and summaries, and its checkpoint."""
        config, strategy = self.config, self.strategy
        self.writers = None
        if self.chief:
            run_dir.truncate_csv_log(self.csv_path, self.start_epoch)
            self.writers = run_dir.create_summary_writers(config.model_dir)
        train_loop = make_train_loop(self.model, self.optimizer, strategy, config,
                                     self.ema_weights)
        average_local_state = make_average_local_state(strategy, self._local_state())
        self.evaluate = make_evaluate(
            CropAveraged(self.model), strategy,
            distribute_split(strategy, self.val_split, config.batch_size, repeat=False),
            self.val_split.num_examples)
        probe = make_evaluate(
            CropAveraged(self.model), strategy,
            distribute_split(strategy, _first_batch(self.val_split), config.batch_size,
                             repeat=False))
        self.last_train, self.final, iterator = {}, None, None
        for epoch in range(self.start_epoch, config.epochs):
            self.log(f"Epoch {epoch + 1}/{config.epochs}", flush=True)
            learning_rate = float(self.optimizer.learning_rate.numpy())
            # An epoch that is a pass (the default) starts its own, so a resumed
            # run repeats the uninterrupted one. Shorter --steps_per_epoch epochs
            # continue one stream: fresh passes would keep a shuffle buffer's
            # examples from the start of the data.
            if iterator is None or config.steps_per_epoch is None:
                iterator = epoch_iterator(strategy, self.train_split, config,
                                          int(self.data_seed.numpy()), epoch)
            started = time.perf_counter()
            self.last_train = train_epoch(
                train_loop, iterator, self.steps_per_epoch, config, epoch, self.chief,
                self.checkpoints.directory, self.throughput, self.train_split)
            seconds = time.perf_counter() - started
            average_local_state()
            row = dict(epoch=epoch + 1, learning_rate=learning_rate,
                       loss=self.last_train["loss"], top1=self.last_train["top1"],
                       seconds=seconds,
                       images_per_sec=self.steps_per_epoch * config.batch_size / seconds)
            self._evaluate_epoch(epoch, probe, row)
            if self.chief:
                run_dir.append_csv_row(self.csv_path, row)
                run_dir.write_summaries(self.writers, row, epoch + 1)
            self.completed_epochs.assign(epoch + 1)
            self.checkpoints.save(epoch + 1)

    def _local_state(self):
        local_state = list(self.model.non_trainable_weights)
        if self.ema_weights is not None:
            trainable = {id(w) for w in self.model.trainable_weights}
            local_state += [e for e, w in zip(self.ema_weights, self.model.weights)
                            if id(w) not in trainable]
        return local_state

    def _evaluate_epoch(self, epoch, probe, row):
        """At the validation cadence (and after the last epoch) evaluate into
        `row`; otherwise check the loss on one validation batch."""
        config = self.config
        last_epoch = epoch + 1 == config.epochs
        if last_epoch or (config.validation_freq and (epoch + 1) % config.validation_freq == 0):
            with self.ema:
                val = self.evaluate()
            _check_finite(val["loss"], "validation loss", epoch, self.checkpoints.directory)
            row.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
            self.say(f"val_loss: {val['loss']:.4f} - val_top1: {val['top1']:.4f} - "
                     f"val_top5: {val['top5']:.4f}", flush=True)
            self.final = val if last_epoch else None
        else:
            _check_finite(probe()["loss"], "loss on a validation batch", epoch,
                          self.checkpoints.directory)

    def final_result(self):
        """Evaluate the final weights (the EMA's, which the returned model
        keeps), write metrics.json and return the `TrainResult`."""
        config, strategy = self.config, self.strategy
        self.ema.swap_in()
        final = self.final if self.final is not None else self.evaluate()
        self.say(f"Final evaluation on {final['num_examples']} of "
                 f"{self.val_split.num_examples} examples: top1 {final['top1']:.4f} "
                 f"- top5 {final['top5']:.4f} - loss {final['loss']:.4f}", flush=True)
        # A rerun with nothing left to train keeps the training figures it found.
        previous = (run_dir.previous_training_figures(config.model_dir, self.csv_path)
                    if not self.last_train else {})
        metrics = dict(
            epochs_completed=int(self.completed_epochs.numpy()),
            top1=float(final["top1"]), top5=float(final["top5"]), loss=float(final["loss"]),
            eval_examples=final["num_examples"],
            eval_examples_expected=self.val_split.num_examples,
            images_per_sec=(self.throughput.images_per_sec()
                            or previous.get("images_per_sec")),
            num_workers=self.num_workers, num_replicas=strategy.num_replicas_in_sync,
            global_batch_size=config.batch_size, steps_per_epoch=self.steps_per_epoch,
            train_loss=_float_or_none(self.last_train.get("loss", previous.get("train_loss"))),
            train_top1=_float_or_none(self.last_train.get("top1", previous.get("train_top1"))),
            weights="ema" if self.ema_weights is not None else "trained",
        )
        if self.chief:
            for writer in (self.writers or {}).values():
                writer.close()
            run_dir.write_metrics(config.model_dir, metrics)
        return TrainResult(metrics=metrics, model=self.model)


def _float_or_none(value):
    return None if value is None else float(value)


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
        raise diverged(f"the {what} is {loss} after epoch {epoch + 1}", checkpoint_dir)


class CropAveraged:
    """`model` for evaluation batches of several crops per image, [batch,
    crops, height, width, 3] (`pipelines.build_dataset(eval_view="ten_crop")`):
    its probabilities averaged over each image's crops, returned as their log,
    so that the loss and top-k that `make_evaluate` computes from "logits"
    are those of the averaged probabilities (softmax gives them back).
    Batches of single images [batch, height, width, 3] pass through as they are.
    """

    def __init__(self, model):
        self.model = model
        self.output_shape = model.output_shape

    def __call__(self, images, training=False):
        if images.shape.rank != 5:
            return self.model(images, training=training)
        shape = tf.shape(images)
        crops = tf.reshape(images, tf.concat([[-1], shape[2:]], axis=0))
        outputs = tf.cast(self.model(crops, training=training), tf.float32)
        log_probabilities = (tf.math.log(tf.maximum(outputs, tf.float32.tiny))
                             if outputs_probabilities(self.model)
                             else tf.nn.log_softmax(outputs))
        log_probabilities = tf.reshape(log_probabilities, [shape[0], shape[1], -1])
        # log(mean(p)) without underflow.
        return (tf.reduce_logsumexp(log_probabilities, axis=1)
                - tf.math.log(tf.cast(shape[1], tf.float32)))


def evaluate_model(model, val_split, batch_size, strategy=None):
    """Top-1/top-5 of `model` (logits or probabilities) on one pass of
    `val_split`, across `strategy`'s replicas. Build the model in the
    strategy's scope. A split of several crops per image (ten-crop) is scored
    on the model's probabilities averaged over each image's crops
    (`CropAveraged`)."""
    strategy = strategy or tf.distribute.get_strategy()
    return make_evaluate(
        CropAveraged(model), strategy,
        distribute_split(strategy, val_split, batch_size, repeat=False),
        val_split.num_examples)()
