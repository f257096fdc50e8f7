"""Training recipes: the paper's (§4) and two later published ones, their
settings, the learning-rate schedule, the losses, weight decay per parameter
group, the optimizers and the weights' EMA."""

import dataclasses
import math
from typing import Optional

import keras
import tensorflow as tf

from keras_resnext.training.distribute import copy_per_device
from keras_resnext.training.errors import UserError

LR_SCHEDULES = ("step", "cosine")
OPTIMIZERS = ("sgd", "lamb")
LOSSES = ("softmax", "bce")
# How `ema_decay` is read: "tensorflow" as tf.train.ExponentialMovingAverage
# (with its num_updates warm-up), "torchvision" as references/classification
# (the decay adjusted for batch, update interval and epochs; see `ema_decay_per_update`).
EMA_CONVENTIONS = ("tensorflow", "torchvision")
MIXED_PRECISION_POLICIES = {
    "none": "float32",
    "float16": "mixed_float16",
    "bfloat16": "mixed_bfloat16",
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A published training recipe. `learning_rate` is for a global batch of
    `reference_batch_size` and scales linearly with the batch; the step
    schedule divides it by 10 at each fraction of `epochs` in `decay_at`.

    The fields after `nesterov` default to the paper's choices; the input
    ones (`train_image_size` to `repeated_augmentations`) are for the input
    pipeline, the rest for `TrainConfig`. None means "as the paper": the
    eval image size for training, the eval resize of
    `keras_resnext.applications.eval_transform`, `weight_decay` for a group.
    """

    batch_size: int
    learning_rate: float
    reference_batch_size: int
    weight_decay: float
    epochs: int
    decay_at: tuple
    momentum: float = 0.9
    nesterov: bool = True
    optimizer: str = "sgd"
    loss: str = "softmax"
    lr_schedule: str = "step"
    warmup_epochs: float = 0.0
    warmup_start_factor: Optional[float] = None
    label_smoothing: float = 0.0
    norm_weight_decay: Optional[float] = None
    bias_weight_decay: Optional[float] = None
    ema_decay: Optional[float] = None
    ema_every_steps: int = 1
    ema_convention: str = "tensorflow"
    train_image_size: Optional[int] = None
    resize_size: Optional[int] = None
    auto_augment: Optional[str] = None
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    repeated_augmentations: int = 1


RECIPES = {
    # §4 and fb.resnet.torch: lr 0.1 per 256, /10 at epochs 30, 60, 90 of 100.
    "imagenet": Recipe(batch_size=256, learning_rate=0.1, reference_batch_size=256,
                       weight_decay=1e-4, epochs=100, decay_at=(0.3, 0.6, 0.9)),
    # The official CIFAR recipe: batch 128, lr 0.1, wd 5e-4, 300 epochs,
    # /10 at 50% and 75% of training.
    "cifar": Recipe(batch_size=128, learning_rate=0.1, reference_batch_size=128,
                    weight_decay=5e-4, epochs=300, decay_at=(0.5, 0.75)),
    # torchvision's V2 weights (resnet50 80.858, resnext50_32x4d 81.198):
    # references/classification/README.md's ResNet command, 8 GPUs x 128,
    # with train.py's defaults for the rest (--opt sgd: momentum 0.9, no
    # Nesterov; --lr-warmup-decay 0.01; EMA every 32 steps at 0.99998); see
    # the README's recipe table for each source.
    "torchvision_v2": Recipe(
        batch_size=1024, learning_rate=0.5, reference_batch_size=1024, weight_decay=2e-5,
        epochs=600, decay_at=(), nesterov=False, lr_schedule="cosine", warmup_epochs=5,
        warmup_start_factor=0.01, label_smoothing=0.1, norm_weight_decay=0.0,
        ema_decay=0.99998, ema_every_steps=32, ema_convention="torchvision",
        train_image_size=176, resize_size=232, auto_augment="trivial_augment_wide",
        random_erasing=0.1, mixup_alpha=0.2, cutmix_alpha=1.0, repeated_augmentations=4),
    # timm's "ResNet strikes back" A3 (arXiv 2110.00476, Table 1): LAMB and
    # BCE at batch 2048, 100 epochs at 160 px, tested at 224 with crop_pct
    # 0.95 (timm's floor(224 / 0.95) = 235 resize). timm's optimizer factory
    # leaves biases and norm parameters undecayed (filter_bias_and_bn).
    # warmup_start_factor: timm's default --warmup-lr 1e-5 over lr 8e-3.
    "rsb_a3": Recipe(
        batch_size=2048, learning_rate=8e-3, reference_batch_size=2048, weight_decay=0.02,
        epochs=100, decay_at=(), optimizer="lamb", loss="bce", lr_schedule="cosine",
        warmup_epochs=5, warmup_start_factor=1e-5 / 8e-3, norm_weight_decay=0.0,
        bias_weight_decay=0.0, train_image_size=160, resize_size=235,
        auto_augment="rand-m6-mstd0.5-inc1", mixup_alpha=0.1, cutmix_alpha=1.0),
}
# `--recipe` names: "paper" is the family's own recipe.
PAPER = "paper"
NAMED_RECIPES = ("torchvision_v2", "rsb_a3")
# The input settings that change what training sees (the eval resize does not).
INPUT_SETTINGS = ("train_image_size", "auto_augment", "random_erasing", "mixup_alpha",
                  "cutmix_alpha", "repeated_augmentations")


def recipe_named(family, name):
    """The `Recipe` that `--recipe name` selects for `family`."""
    if name in (None, PAPER):
        return RECIPES[family]
    if name not in NAMED_RECIPES:
        raise UserError(f"--recipe {name}: choose one of {PAPER}, {', '.join(NAMED_RECIPES)}.")
    return RECIPES[name]


def _describe_setting(recipe, field):
    value = getattr(recipe, field)
    if field == "learning_rate":
        return f"lr {value:g} per {recipe.reference_batch_size} images"
    if field == "lr_schedule":
        if value == "step":
            return "step schedule, lr /10 at " + ", ".join(
                f"{fraction:.0%}" for fraction in recipe.decay_at) + " of the epochs"
        return f"{value} schedule"
    if field == "ema_decay":
        if value is None:
            return "EMA none"
        return (f"EMA decay {value:g} every {recipe.ema_every_steps} step(s), "
                f"{recipe.ema_convention} convention")
    if value is None:
        return f"{field} {_PAPER_DEFAULTS.get(field, 'none')}"
    if isinstance(value, float):
        return f"{field} {value:g}"
    return f"{field} {value}"


# What None means, in words.
_PAPER_DEFAULTS = {
    "warmup_start_factor": "1/warmup steps",
    "norm_weight_decay": "weight_decay's",
    "bias_weight_decay": "weight_decay's",
    "train_image_size": "the eval crop",
    "resize_size": "256 for a 224 crop",
}

# Settings shown together with another: the lr with its reference batch, the
# step boundaries with the schedule, the EMA decay with its interval and
# convention.
_SHOWN_WITH_ANOTHER = ("reference_batch_size", "decay_at", "ema_every_steps", "ema_convention")


def recipe_differences(name, recipe, paper, overrides=None):
    """One line per setting in which `recipe` differs from `paper`, e.g.
    "recipe torchvision_v2: lr 0.5 per 1024 images (paper: 0.1 per 256)".
    `overrides` maps a `Recipe` field to the flag that replaces it in this
    run ("--epochs 2"), which its line then names."""
    overrides = overrides or {}
    lines = []
    for field in dataclasses.fields(Recipe):
        field = field.name
        if field in _SHOWN_WITH_ANOTHER:
            continue
        mine, theirs = _describe_setting(recipe, field), _describe_setting(paper, field)
        if mine != theirs:
            # "lr 0.5 per 1024 images (paper: 0.1 per 256)": the paper's value
            # without the words the two share.
            shared = _shared_prefix(mine.split(), theirs.split())
            theirs_rest = " ".join(theirs.split()[shared:]).replace(" images", "")
            line = f"recipe {name}: {mine} ({PAPER}: {theirs_rest})"
            if field in overrides:
                line += f"; {overrides[field]} overrides it"
            lines.append(line)
    return lines


def _shared_prefix(a, b):
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs besides the model and the data.

    `learning_rate` is the peak rate for this global `batch_size` (already
    scaled; see `config_from_recipe`). `lr_decay_epochs` are the step
    schedule's boundaries in epochs. `weight_decay` is coupled L2 for SGD,
    added to the gradient of every parameter (see `add_weight_decay`), and
    decoupled for LAMB; `norm_weight_decay` (BN gammas and betas) and
    `bias_weight_decay` (other layers' biases) replace it for their groups.
    `warmup_start_factor` None warms up from `peak / warmup_steps` (the
    paper-era default), else from `peak * warmup_start_factor`.
    `input_settings` records the input pipeline's recipe settings (name,
    value) pairs, so that a resume can check them.
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
    ema_every_steps: int = 1
    ema_convention: str = "tensorflow"
    optimizer: str = "sgd"
    loss: str = "softmax"
    warmup_start_factor: Optional[float] = None
    norm_weight_decay: Optional[float] = None
    bias_weight_decay: Optional[float] = None
    input_settings: tuple = ()
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
        _check(self.ema_every_steps >= 1,
               f"ema_every_steps must be at least 1; got {self.ema_every_steps}.")
        _check(self.ema_convention in EMA_CONVENTIONS,
               f"ema_convention must be one of {', '.join(EMA_CONVENTIONS)}; "
               f"got {self.ema_convention!r}.")
        _check(self.optimizer in OPTIMIZERS,
               f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}.")
        _check(self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}.")
        _check(self.warmup_start_factor is None or 0 <= self.warmup_start_factor <= 1,
               f"warmup_start_factor must be in [0, 1]; got {self.warmup_start_factor}.")
        for group in ("norm_weight_decay", "bias_weight_decay"):
            rate = getattr(self, group)
            _check(rate is None or rate >= 0, f"{group} must be >= 0; got {rate}.")
        _check(self.steps_per_epoch is None or self.steps_per_epoch >= 1,
               f"steps_per_epoch must be at least 1; got {self.steps_per_epoch}.")
        _check(self.steps_per_loop >= 1, f"steps_per_loop must be at least 1; got {self.steps_per_loop}.")
        _check(self.validation_freq >= 0, f"validation_freq must be >= 0; got {self.validation_freq}.")
        _check(self.progress_seconds >= 0,
               f"progress_seconds must be >= 0; got {self.progress_seconds}.")


def _check(condition, message):
    if not condition:
        raise UserError(message)


_RECIPE_TRAINING_FIELDS = (
    "optimizer", "loss", "lr_schedule", "warmup_epochs", "warmup_start_factor",
    "label_smoothing", "norm_weight_decay", "bias_weight_decay", "ema_decay",
    "ema_every_steps", "ema_convention")


def config_from_recipe(recipe, model_dir, **overrides):
    """A `TrainConfig` following `recipe` (a `Recipe` or a `RECIPES` key).

    `overrides` replace recipe values: `batch_size`, `epochs`,
    `base_learning_rate` (the rate for the recipe's reference batch) and any
    `TrainConfig` field. The peak rate is `base_learning_rate * batch_size /
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
        **{name: getattr(recipe, name) for name in _RECIPE_TRAINING_FIELDS},
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
    `peak / warmup_steps` to `peak` (Goyal et al., for large batches), or
    with `warmup_start_factor` from `peak * warmup_start_factor` (torchvision's
    LinearLR `start_factor`, per step here where torchvision steps per epoch).
    """

    def __init__(self, peak_learning_rate, steps_per_epoch, epochs, kind="step",
                 decay_epochs=(), decay_rate=0.1, warmup_epochs=0.0,
                 warmup_start_factor=None):
        self.peak_learning_rate = float(peak_learning_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.epochs = int(epochs)
        self.kind = kind
        self.decay_epochs = tuple(float(epoch) for epoch in decay_epochs)
        self.decay_rate = float(decay_rate)
        self.warmup_epochs = float(warmup_epochs)
        self.warmup_start_factor = (None if warmup_start_factor is None
                                    else float(warmup_start_factor))

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
        if self.warmup_start_factor is None:
            warming = peak * (step + 1.0) / warmup_steps
        else:
            start = self.warmup_start_factor
            warming = peak * (start + (1.0 - start) * step / warmup_steps)
        return tf.where(step < warmup_steps, warming, decayed)

    def get_config(self):
        return dict(peak_learning_rate=self.peak_learning_rate,
                    steps_per_epoch=self.steps_per_epoch, epochs=self.epochs,
                    kind=self.kind, decay_epochs=list(self.decay_epochs),
                    decay_rate=self.decay_rate, warmup_epochs=self.warmup_epochs,
                    warmup_start_factor=self.warmup_start_factor)


def build_optimizer(config, steps_per_epoch):
    """The recipe's optimizer on its schedule, with no built-in weight decay
    (the loop adds it: coupled L2 for SGD, decoupled for LAMB, per group),
    and dynamic loss scaling for float16.

    SGD: (Nesterov) momentum. LAMB: Keras' `Lamb` (You et al.; Adam's
    moments, then each tensor's step scaled by ||w|| / ||step||) with timm's
    epsilon 1e-6. timm's own LAMB differs: it adds the decay inside the
    trust ratio, skips the ratio for undecayed tensors and clips the global
    gradient norm at 1.0 (see the README's recipe table)."""
    schedule = RecipeSchedule(
        config.learning_rate, steps_per_epoch, config.epochs, config.lr_schedule,
        config.lr_decay_epochs, config.lr_decay_rate, config.warmup_epochs,
        config.warmup_start_factor,
    )
    if config.optimizer == "lamb":
        optimizer = keras.optimizers.Lamb(learning_rate=schedule, epsilon=1e-6)
    else:
        optimizer = keras.optimizers.SGD(
            learning_rate=schedule, momentum=config.momentum, nesterov=config.nesterov
        )
    if config.mixed_precision == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def per_example_loss(labels, logits, num_classes, label_smoothing=0.0, loss="softmax"):
    """The loss per example, from logits, in float32.

    `labels` are class ids [batch] or soft targets [batch, num_classes] (one-hot
    or mixed by mixup/cutmix). Label smoothing mixes the targets with the
    uniform distribution, `(1 - s) * y + s / num_classes`, soft ones too (as
    torchvision's CrossEntropyLoss does with probability targets).
    "softmax": cross-entropy of the softmax. "bce": each class a binary
    problem, sigmoid cross-entropy averaged over the classes (timm's
    BinaryCrossEntropy, whose mean runs over batch and classes).
    """
    logits = tf.cast(logits, tf.float32)
    soft = len(labels.shape) == 2
    if loss == "softmax" and not soft and not label_smoothing:
        return tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(labels, tf.int32), logits=logits
        )
    targets = tf.cast(labels, tf.float32) if soft else tf.one_hot(labels, num_classes)
    if loss == "bce":
        if label_smoothing:
            targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
        return tf.reduce_mean(
            tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits), axis=-1)
    return keras.losses.categorical_crossentropy(
        targets, logits, from_logits=True, label_smoothing=label_smoothing
    )


def hard_labels(labels):
    """Class ids [batch] of class ids or of soft targets (their argmax), for
    top-1."""
    if len(labels.shape) == 2:
        return tf.argmax(labels, axis=-1, output_type=tf.int32)
    return tf.cast(labels, tf.int32)


NORM_LAYERS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
               keras.layers.GroupNormalization)


def weight_decay_rates(model, config):
    """Each of `model.trainable_variables`' weight decay: `norm_weight_decay`
    for normalization layers' gammas and betas, `bias_weight_decay` for the
    other layers' biases, `weight_decay` for the rest (kernels); a group's
    None is `weight_decay`. (torchvision's `--bias-weight-decay` also takes
    BN's beta; here BN's parameters are one group, as timm leaves both
    undecayed.)"""
    norm_rate = config.weight_decay if config.norm_weight_decay is None \
        else config.norm_weight_decay
    bias_rate = config.weight_decay if config.bias_weight_decay is None \
        else config.bias_weight_decay
    norm_variables = set()
    for layer in _all_layers(model):
        if isinstance(layer, NORM_LAYERS):
            norm_variables.update(id(v) for v in layer.trainable_variables)
    rates = []
    for variable in model.trainable_variables:
        if id(variable) in norm_variables:
            rates.append(norm_rate)
        elif variable.name == "bias":
            rates.append(bias_rate)
        else:
            rates.append(config.weight_decay)
    return rates


def _all_layers(layer):
    for child in getattr(layer, "layers", []):
        yield child
        yield from _all_layers(child)


def add_weight_decay(gradients, variables, weight_decay):
    """Coupled L2: `gradient + weight_decay * variable` for every parameter
    (`weight_decay` a number, or one per variable: see `weight_decay_rates`).

    This is the paper's weight decay: the official Torch code (optim.sgd's
    `weightDecay`) adds it to the gradient of every parameter, BN's gamma
    and beta and the classifier bias included, before momentum. Keras'
    `SGD(weight_decay=...)` instead shrinks weights by `lr * wd` after the
    momentum step (decoupled), a different optimiser at the same numbers.
    """
    if not isinstance(weight_decay, (list, tuple)):
        weight_decay = [weight_decay] * len(variables)
    return [
        gradient + tf.cast(rate, gradient.dtype) * tf.cast(variable, gradient.dtype)
        for gradient, variable, rate in zip(gradients, variables, weight_decay)
    ]


def apply_decoupled_weight_decay(variables, rates, learning_rate):
    """Decoupled decay, `variable -= learning_rate * rate * variable`, for
    each variable of non-zero `rate` (Keras' and AdamW's form), called in a
    replica context before the optimizer's step, as Keras applies its own.
    Each group gets its own rate, which Keras' `exclude_from_weight_decay`
    (all or nothing) can't give."""
    # strategy.extended.update takes TensorFlow's variables, not Keras' wrappers.
    decayed = [(getattr(variable, "value", variable), rate)
               for variable, rate in zip(variables, rates) if rate]
    if not decayed:
        return

    def decay(strategy):
        for variable, rate in decayed:
            factor = tf.cast(learning_rate * rate, variable.dtype)
            strategy.extended.update(
                variable, lambda v, f: v.assign_sub(f * v), args=(factor,), group=False)

    tf.distribute.get_replica_context().merge_call(decay)


def ema_decay_at(ema_decay, num_updates):
    """The EMA decay after `num_updates` steps: `min(decay, (1 + n) / (10 + n))`,
    as tf.train.ExponentialMovingAverage, so early averages forget the
    random initialisation quickly."""
    num_updates = tf.cast(num_updates, tf.float32)
    return tf.minimum(ema_decay, (1.0 + num_updates) / (10.0 + num_updates))


def ema_decay_per_update(config):
    """torchvision's adjusted EMA decay for one update (every
    `ema_every_steps` steps): `alpha = (1 - ema_decay) * batch_size *
    ema_every_steps / epochs`, capped at 1, and decay `1 - alpha`
    (references/classification/train.py, after pycls: it keeps the average's
    span in images independent of batch, interval and run length)."""
    adjust = config.batch_size * config.ema_every_steps / config.epochs
    alpha = min(1.0, (1.0 - config.ema_decay) * adjust)
    return 1.0 - alpha


def ema_decay_for_step(config, step, steps_per_epoch):
    """The EMA update after optimizer step `step` (0-based, the step just
    taken): its decay, and whether it happens at all.

    "tensorflow": every `ema_every_steps`-th step of an epoch, with
    `ema_decay_at(ema_decay, step + 1)`. "torchvision": at steps whose
    index within their epoch is a multiple of `ema_every_steps` (its `i %
    model_ema_steps == 0`), with `ema_decay_per_update`. The first update, each
    one in the warm-up epochs (`epoch < warmup_epochs`) and the first one
    after them copy the weights: torchvision's AveragedModel copies when its
    count is 0, which it resets after each warm-up update."""
    step = tf.cast(step, tf.int64)
    step_in_epoch = step % steps_per_epoch
    update = tf.equal(step_in_epoch % config.ema_every_steps, 0)
    if config.ema_convention == "tensorflow":
        return ema_decay_at(config.ema_decay, step + 1), update
    # The first step of the first epoch after warm-up is always an update.
    last_copy = math.ceil(config.warmup_epochs) * steps_per_epoch
    decay = tf.where(step <= last_copy, 0.0, ema_decay_per_update(config))
    return decay, update


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
