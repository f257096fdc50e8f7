"""Every option of the training CLIs, declared once.

Each `Option` names its flag, its type, its default and help (either may
depend on the family, "imagenet" or "cifar") and where its value goes: a
field of `Run`, a `training.config_from_recipe` override, or both.
`train/common.py` defines the flags from `OPTIONS`; `Run` and `run_from_flags`
follow from it too. The training options' defaults are the recipe's values
(`training.RECIPES`) or, where a recipe says nothing, `TrainConfig`'s.

`--recipe` picks the recipe (default "paper", the family's own): an option
whose default is `FromRecipe(field)` shows the paper's value in --help and,
unless given on the command line, takes the chosen recipe's.
"""

import dataclasses
from typing import Callable, Optional, Union

import keras_resnext as kr
from keras_resnext import training
from keras_resnext.transforms import EVAL_VIEWS, INTERPOLATIONS

DEFAULT_DATASETS = {"imagenet": "imagenette/160px-v2", "cifar": "cifar10"}
DEFAULT_PRESETS = {"imagenet": "resnext50_32x4d", "cifar": "resnext29_8x64d"}

NO_AUTO_AUGMENT = "none"  # --auto_augment none switches a recipe's policy off
RUN = "run"  # a field of `Run`
TRAINING = "training"  # an override for `training.config_from_recipe`


@dataclasses.dataclass(frozen=True)
class Option:
    """One CLI option. `default` and `help` may be functions of the family.
    `goes_to` holds `RUN`, `TRAINING` or both; `setting` is the override's
    name where it is not the flag's. `kind` is an absl flag type ("string",
    "integer", "float", "boolean", "enum"); `choices` are an enum's values;
    `bounds` go to absl as they are (lower_bound, upper_bound)."""

    name: str
    kind: str
    default: Union[object, Callable]
    help: Union[str, Callable]
    goes_to: tuple = (RUN,)
    setting: Optional[str] = None
    choices: Union[tuple, Callable] = ()
    bounds: dict = dataclasses.field(default_factory=dict)

    def flag_arguments(self, family):
        """The keyword arguments of `flags.DEFINE_<kind>` for `family`."""
        arguments = dict(name=self.name, default=_for(self.default, family),
                         help=_for(self.help, family), **self.bounds)
        if self.kind == "enum":
            arguments["enum_values"] = list(_for(self.choices, family))
        return arguments


def _for(value, family):
    return value(family) if callable(value) else value


@dataclasses.dataclass(frozen=True)
class FromRecipe:
    """A default taken from the recipe's `field`: called with a family, the
    paper recipe's value (what --help shows)."""

    field: str

    def __call__(self, family):
        return getattr(training.RECIPES[family], self.field)


def _recipe_names(family):
    return (training.PAPER,) + (training.NAMED_RECIPES if family == "imagenet" else ())


def _config_default(field):
    return training.TrainConfig.__dataclass_fields__[field].default


def _model_help(family):
    family_presets = sorted(n for n, p in kr.PRESETS.items() if p["family"] == family)
    return (f"A preset ({', '.join(family_presets)}, or any of keras_resnext.PRESETS). Default "
            f"{DEFAULT_PRESETS[family]} unless --depth/--cardinality/--width are given.")


BOTH = (RUN, TRAINING)

OPTIONS = (
    # The network
    Option("model", "string", None, _model_help),
    Option("depth", "integer", None, "Network depth (50/101/152; CIFAR 9n+2).",
           bounds=dict(lower_bound=11)),
    Option("cardinality", "integer", None, "C, the number of paths per block.",
           bounds=dict(lower_bound=1)),
    Option("width", "integer", None, "d, the bottleneck width of each path.",
           bounds=dict(lower_bound=1)),
    # The data
    Option("dataset", "string", DEFAULT_DATASETS.get,
           "A TFDS name (or tfds:NAME), folder:ROOT (ROOT/train/<class>/*, ROOT/val/<class>/*) "
           "or tfrecord:PATTERN ({split} in the glob)."),
    Option("data_dir", "string", None, "TFDS data directory."),
    Option("manual_dir", "string", None, "TFDS manual download directory (imagenet2012 tars)."),
    Option("preprocessing", "enum", None,
           "Input views; default chosen by the dataset (cifar for 32x32 images).",
           choices=("imagenet", "cifar")),
    Option("tfrecord_label_offset", "integer", 1, "Subtracted from TFRecord labels."),
    Option("tfrecord_num_classes", "integer", 1000, "Classes of a tfrecord: dataset.",
           bounds=dict(lower_bound=1)),
    Option("model_dir", "string", None, "Checkpoints, logs, CSV and metrics.json go here; "
           "rerunning the same command resumes from it."),
    # The recipe
    Option("recipe", "enum", training.PAPER,
           lambda family: ("paper: the paper's recipe (§4)" if family == "imagenet" else
                           "paper: the official CIFAR recipe") + (
               "; torchvision_v2: torchvision's V2 weights' recipe; rsb_a3: timm's ResNet "
               "strikes back A3. A flag given overrides the recipe's value; the defaults "
               "shown are the paper's."
               if family == "imagenet" else "."),
           choices=_recipe_names),
    Option("batch_size", "integer", FromRecipe("batch_size"),
           "Global batch size, split across all replicas.", goes_to=BOTH,
           bounds=dict(lower_bound=1)),
    Option("epochs", "integer", FromRecipe("epochs"), "Training epochs.", goes_to=(TRAINING,),
           bounds=dict(lower_bound=1)),
    Option("lr", "float", FromRecipe("learning_rate"),
           lambda family: (f"Learning rate for the recipe's reference global batch (paper: "
                           f"{training.RECIPES[family].reference_batch_size}); scaled linearly "
                           "with --batch_size."),
           goes_to=(TRAINING,), setting="base_learning_rate", bounds=dict(lower_bound=0)),
    Option("optimizer", "enum", FromRecipe("optimizer"),
           "sgd (coupled L2 weight decay) or lamb (decoupled weight decay).",
           goes_to=(TRAINING,), choices=training.OPTIMIZERS),
    Option("momentum", "float", FromRecipe("momentum"), "SGD momentum.", goes_to=(TRAINING,),
           bounds=dict(lower_bound=0, upper_bound=0.999)),
    Option("nesterov", "boolean", FromRecipe("nesterov"), "Nesterov momentum, as the official code.",
           goes_to=(TRAINING,)),
    Option("weight_decay", "float", FromRecipe("weight_decay"),
           "Weight decay: for SGD coupled L2 added to every parameter's gradient, for LAMB "
           "decoupled.", goes_to=(TRAINING,), bounds=dict(lower_bound=0)),
    Option("norm_weight_decay", "float", FromRecipe("norm_weight_decay"),
           "Weight decay of BN gammas and betas (default: --weight_decay).",
           goes_to=(TRAINING,), bounds=dict(lower_bound=0)),
    Option("bias_weight_decay", "float", FromRecipe("bias_weight_decay"),
           "Weight decay of other layers' biases, e.g. the classifier's (default: "
           "--weight_decay).", goes_to=(TRAINING,), bounds=dict(lower_bound=0)),
    Option("loss", "enum", FromRecipe("loss"),
           "softmax: softmax cross-entropy; bce: per-class binary cross-entropy (timm).",
           goes_to=(TRAINING,), choices=training.LOSSES),
    Option("image_size", "integer",
           lambda family: kr.applications.eval_transform(family)[0],
           "Evaluation crop size, and the training crop size unless --train_image_size.",
           bounds=dict(lower_bound=8)),
    Option("train_image_size", "integer", FromRecipe("train_image_size"),
           "Training crop size, if not --image_size (e.g. 176 for torchvision's V2 recipe).",
           bounds=dict(lower_bound=8)),
    Option("resize_size", "integer", FromRecipe("resize_size"),
           "Eval: shorter side before the centre crop (ImageNet-style), e.g. 256 or 232. "
           "Default: with --eval_only the weights' eval transform, else the recipe's "
           "proportion (paper 256, torchvision_v2 232, rsb_a3 235 for a 224 crop).",
           bounds=dict(lower_bound=8)),
    Option("crop_pct", "float", None,
           "Eval (ImageNet-style), timm's crop fraction instead of --resize_size: resize the "
           "shorter side to floor(image_size / crop_pct).",
           bounds=dict(lower_bound=0.01, upper_bound=1.0)),
    Option("interpolation", "enum", None,
           "Eval resize (ImageNet-style, antialiased). Default the weights' eval transform, "
           "else bilinear.", choices=INTERPOLATIONS),
    Option("eval_view", "enum", "center",
           "Eval (ImageNet-style): center, the single centre crop; ten_crop, the centre and "
           "four corners and their mirrors (fb.resnet.torch), probabilities averaged.",
           choices=EVAL_VIEWS),
    Option("auto_augment", "string", FromRecipe("auto_augment"),
           "Per-image augmentation policy after the random crop and flip: "
           "trivial_augment_wide, a timm RandAugment string such as rand-m6-mstd0.5-inc1 "
           "(keys m, n, mstd, mmax, p, inc), or none (off)."),
    Option("random_erasing", "float", FromRecipe("random_erasing"),
           "Probability of erasing a random rectangle of each training image.",
           bounds=dict(lower_bound=0, upper_bound=1)),
    Option("mixup_alpha", "float", FromRecipe("mixup_alpha"),
           "Mixup's Beta(alpha, alpha); with --cutmix_alpha, one of the two per batch.",
           bounds=dict(lower_bound=0)),
    Option("cutmix_alpha", "float", FromRecipe("cutmix_alpha"), "CutMix's Beta(alpha, alpha).",
           bounds=dict(lower_bound=0)),
    Option("repeated_augmentations", "integer", FromRecipe("repeated_augmentations"),
           "Each training image this many times per epoch, differently augmented "
           "(torchvision's RASampler).", bounds=dict(lower_bound=1)),
    Option("warmup_epochs", "float", FromRecipe("warmup_epochs"),
           "Linear learning-rate warmup (large batches).", goes_to=(TRAINING,),
           bounds=dict(lower_bound=0)),
    Option("warmup_start_factor", "float", FromRecipe("warmup_start_factor"),
           "The warmup's first learning rate as a fraction of the peak (default: "
           "peak / warmup steps).", goes_to=(TRAINING,),
           bounds=dict(lower_bound=0, upper_bound=1)),
    Option("label_smoothing", "float", FromRecipe("label_smoothing"), "Label smoothing.",
           goes_to=(TRAINING,), bounds=dict(lower_bound=0, upper_bound=0.99)),
    Option("mixed_precision", "enum", _config_default("mixed_precision"),
           "Compute dtype: float16 (with loss scaling) or bfloat16.", goes_to=(TRAINING,),
           choices=tuple(training.MIXED_PRECISION_POLICIES)),
    # Devices
    Option("strategy", "enum", "default", "tf.distribute strategy; multi_worker reads TF_CONFIG.",
           choices=training.STRATEGIES),
    Option("tpu", "string", None, "TPU name or grpc:// address for --strategy tpu."),
    # Weights in and out
    Option("weights", "string", None,
           "Initial weights (.weights.h5, torchvision .pth, .safetensors, or a training "
           "checkpoint: a model_dir, its checkpoints folder or a ckpt-N), e.g. for fine-tuning; "
           "a weights file's classifier of another size starts fresh. A checkpoint in "
           "--model_dir takes precedence."),
    Option("export_dir", "string", None,
           "At the end, export a TF Serving SavedModel to EXPORT_DIR/<version>."),
    # The loop
    Option("steps_per_epoch", "integer", _config_default("steps_per_epoch"),
           "Default: training examples // batch size.", goes_to=(TRAINING,),
           bounds=dict(lower_bound=1)),
    Option("steps_per_loop", "integer", _config_default("steps_per_loop"),
           "Training steps per tf.function call (higher for TPUs).", goes_to=(TRAINING,),
           bounds=dict(lower_bound=1)),
    Option("validation_freq", "integer", _config_default("validation_freq"),
           "Evaluate every N epochs (0: only at the end).", goes_to=(TRAINING,),
           bounds=dict(lower_bound=0)),
    Option("seed", "integer", _config_default("seed"), "Random seed.", goes_to=BOTH),
    Option("deterministic", "boolean", False, "Reproducible input order and augmentation."),
    Option("lr_schedule", "enum", FromRecipe("lr_schedule"),
           "step: /10 at the recipe's epochs (§4); cosine: cosine decay.", goes_to=(TRAINING,),
           choices=training.LR_SCHEDULES),
    Option("ema_decay", "float", FromRecipe("ema_decay"),
           "Keep an exponential moving average of the weights with this decay (e.g. 0.9999) "
           "and evaluate/export it.", goes_to=(TRAINING,),
           bounds=dict(lower_bound=0, upper_bound=0.999999)),
    Option("ema_every_steps", "integer", FromRecipe("ema_every_steps"),
           "Update the EMA every N steps.", goes_to=(TRAINING,), bounds=dict(lower_bound=1)),
    Option("ema_convention", "enum", FromRecipe("ema_convention"),
           "tensorflow: --ema_decay per update, warming up as tf.train.ExponentialMovingAverage; "
           "torchvision: adjusted for batch, interval and epochs, copying the weights during "
           "warmup, as torchvision's references.", goes_to=(TRAINING,),
           choices=training.EMA_CONVENTIONS),
    Option("eval_only", "boolean", False,
           "Evaluate on the val split (top-1/top-5): --weights (a weights file or a checkpoint "
           "folder), else the latest checkpoint in --model_dir."),
    Option("progress_seconds", "float", _config_default("progress_seconds"),
           "When the output is not a terminal (a file, a CI log), print a progress line (step, "
           "images/s, loss) this often within an epoch.", goes_to=(TRAINING,),
           bounds=dict(lower_bound=0)),
)

_RUN_OPTIONS = [option for option in OPTIONS if RUN in option.goes_to]
_TRAINING_OPTIONS = [option for option in OPTIONS if TRAINING in option.goes_to]

Run = dataclasses.make_dataclass(
    "Run",
    [("family", str)]
    + [(option.name, Optional[object]) for option in _RUN_OPTIONS]
    + [("training_overrides", dict, dataclasses.field(default_factory=dict)),
       ("recipe_overrides", dict, dataclasses.field(default_factory=dict))],
    frozen=True)
Run.__module__ = __name__
Run.__doc__ = ("One invocation of a training CLI, from its flags: the family, the `RUN` "
               "options, the `TRAINING` ones as `config_from_recipe` overrides, and "
               "`recipe_overrides`: the recipe fields that flags given replace, as "
               "{field: '--flag value'}.")


def run_from(family, values):
    """The `Run` that parsed flag `values` (absl's FLAGS) describe: each
    `FromRecipe` option not given on the command line takes the recipe's
    value."""
    recipe = training.recipe_named(family, values["recipe"].value if "recipe" in values
                                   else training.PAPER)
    resolved = {option.name: _value(option, values[option.name], recipe) for option in OPTIONS}
    recipe_overrides = {option.default.field: f"--{option.name} {values[option.name].value}"
                        for option in OPTIONS if isinstance(option.default, FromRecipe)
                        and _given(values, option.name)}
    # --crop_pct sets the eval resize too: it replaces a recipe's resize_size
    # (only a --resize_size given with it is a contradiction).
    if _given(values, "crop_pct") and not _given(values, "resize_size"):
        resolved["resize_size"] = None
        if recipe.resize_size is not None:
            recipe_overrides["resize_size"] = f"--crop_pct {values['crop_pct'].value}"
    return Run(
        family=family,
        **{option.name: resolved[option.name] for option in _RUN_OPTIONS},
        training_overrides={option.setting or option.name: resolved[option.name]
                            for option in _TRAINING_OPTIONS},
        recipe_overrides=recipe_overrides,
    )


def _given(values, name):
    return name in values and getattr(values[name], "present", False)


def resize_size_given(run):
    """Whether `run.resize_size` is the --resize_size flag's, not its recipe's."""
    return run.recipe_overrides.get("resize_size", "").startswith("--resize_size ")


def _value(option, flag, recipe):
    if isinstance(option.default, FromRecipe) and not getattr(flag, "present", False):
        return getattr(recipe, option.default.field)
    if option.name == "auto_augment" and flag.value == NO_AUTO_AUGMENT:
        return None
    return flag.value

