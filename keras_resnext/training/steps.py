"""The inner loop: the distributed train and eval steps, one epoch of
training steps, and its progress output."""

import sys
import time

import keras
import numpy as np
import tensorflow as tf

from keras_resnext.kernels import tf_ops
from keras_resnext.training.distribute import distribute_split
from keras_resnext.training.errors import UserError, diverged
from keras_resnext.training.recipe import (
    add_weight_decay, apply_decoupled_weight_decay, ema_decay_for_step, hard_labels,
    per_example_loss, weight_decay_rates)


def make_train_loop(model, optimizer, strategy, config, ema_weights=None,
                    steps_per_epoch=None):
    """A `tf.function(iterator, num_steps)` that runs `num_steps` training
    steps on `strategy` and returns the float32 sums
    `[loss, correct top-1, examples]` over them.

    Labels are class ids or soft targets (mixup/cutmix); top-1 counts the
    argmax of a soft target. Each replica's loss is its examples' summed
    loss over the global batch, so the replicas' gradients sum to the global
    mean; the optimizer all-reduces (sums) them. SGD's coupled L2 is added
    per replica as `rate / num_replicas * variable`, so that sum adds exactly
    `rate * variable`, each parameter group at its own rate (see
    `weight_decay_rates`); LAMB's decay is decoupled. The EMA is updated as
    `config.ema_convention` says, which needs the epoch's `steps_per_epoch`.
    """
    num_replicas = strategy.num_replicas_in_sync
    num_classes = model.output_shape[-1]
    variables = model.trainable_variables
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    model_weights = model.weights
    rates = weight_decay_rates(model, config)
    decoupled = config.optimizer != "sgd"
    steps_per_epoch = steps_per_epoch or config.steps_per_epoch or 1
    every_step_ema = config.ema_convention == "tensorflow" and config.ema_every_steps == 1

    def coupled_decay(gradients):
        # scale_loss(x) is x times the current loss scale (x itself without
        # loss scaling), so the decay stays in step with the scaled gradient.
        if all(rate == config.weight_decay for rate in rates):
            return add_weight_decay(
                gradients, variables, optimizer.scale_loss(config.weight_decay / num_replicas))
        scaled = {rate: optimizer.scale_loss(rate / num_replicas) for rate in set(rates)}
        return add_weight_decay(gradients, variables, [scaled[rate] for rate in rates])

    def update_ema(step):
        if every_step_ema:  # the original rule, kept to the bit
            decay = ema_decay_for_step(config, step, steps_per_epoch)[0]
            for average, weight in zip(ema_weights, model_weights):
                value = tf.cast(weight.value, average.dtype)
                average.assign(decay * average + (1.0 - decay) * value)
            return
        decay, update = ema_decay_for_step(config, step, steps_per_epoch)
        for average, weight in zip(ema_weights, model_weights):
            value = tf.cast(weight.value, average.dtype)
            average.assign(tf.where(update, decay * average + (1.0 - decay) * value, average))

    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            losses = per_example_loss(labels, logits, num_classes, config.label_smoothing,
                                      config.loss)
            loss = tf.nn.compute_average_loss(losses, global_batch_size=config.batch_size)
            scaled_loss = optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, variables)
        if decoupled:
            apply_decoupled_weight_decay(variables, rates, optimizer.learning_rate)
        else:
            gradients = coupled_decay(gradients)
        if loss_scaled and num_replicas > 1:
            gradients = _skip_everywhere_if_any_nonfinite(gradients)
        optimizer.apply(gradients, variables)
        if ema_weights is not None:
            update_ema(optimizer.iterations - 1)
        correct = tf.reduce_sum(tf.cast(
            tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32),
                     hard_labels(labels)), tf.float32))
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        return tf.stack([tf.reduce_sum(losses), correct, count])

    @tf.function
    def train_loop(iterator, num_steps):
        sums = tf.zeros([3], tf.float32)
        for _ in tf.range(num_steps):
            per_replica = strategy.run(_in_native_kernels(replica_step), args=next(iterator))
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


def _in_native_kernels(replica_fn):
    """`replica_fn` with the AVX2 grouped convolution allowed in what it traces
    (see `tf_ops.native_kernels`): these graphs run here and are never saved.
    The scope is per thread and MirroredStrategy runs each replica in its
    own, so it is entered inside the replica function."""
    def replica_fn_in_native_kernels(*args):
        with tf_ops.native_kernels():
            return replica_fn(*args)

    return replica_fn_in_native_kernels


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
        per_replica = strategy.run(_in_native_kernels(replica_step), args=batch)
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


def epoch_iterator(strategy, split, config, data_seed, epoch):
    # TensorFlow combines every random op's seed, given or not, with the
    # global seed, so the epoch's shuffles and augmentation seeds follow from
    # (data_seed, epoch) alone, however many epochs this process has run.
    tf.random.set_seed(int(np.random.SeedSequence([data_seed % 2**32, epoch]).generate_state(1)[0]))
    return iter(distribute_split(strategy, split, config.batch_size, repeat=True))


class Throughput:
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


def train_epoch(train_loop, iterator, steps_per_epoch, config, epoch, chief,
                checkpoint_dir, throughput, train_split):
    """Run one epoch's `steps_per_epoch` steps, `config.steps_per_loop` per
    call of `train_loop`; returns its mean loss and top-1."""
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
            raise diverged(f"the loss is {sums[0]} at epoch {epoch + 1}, step {step}",
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
