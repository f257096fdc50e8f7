"""The paper's recipe (§4): the published settings, the learning-rate
schedule, the loss, coupled weight decay, the optimizer and the weights' EMA."""

import dataclasses
import math
from typing import Optional

import keras
import tensorflow as tf

from keras_resnext.training.distribute import copy_per_device
from keras_resnext.training.errors import UserError

LR_SCHEDULES = ("step", "cosine")
MIXED_PRECISION_POLICIES = {
    "none": "float32",
    "float16": "mixed_float16",
    "bfloat16": "mixed_bfloat16",
}


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


def create_ema_weights(model, strategy):
    ema_weights = [
        tf.Variable(tf.zeros(w.shape, "float32"), trainable=False,
                    name=f"ema/{w.path.replace('/', '_')}")
        for w in model.weights
    ]
    copy_per_device(strategy, ema_weights, model.weights)
    return ema_weights


class EmaSwap:
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
        copy_per_device(self.strategy, self.saved, self.model.weights)
        copy_per_device(self.strategy, self.model.weights, self.ema_weights)

    def swap_out(self):
        if self.ema_weights is not None:
            copy_per_device(self.strategy, self.model.weights, self.saved)

    def __enter__(self):
        self.swap_in()
        return self

    def __exit__(self, *exc_info):
        self.swap_out()
        return False
