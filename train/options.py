"""Every option of the training CLIs, declared once.

Each `Option` names its flag, its type, its default and help (either may
depend on the family, "imagenet" or "cifar") and where its value goes: a
field of `Run`, a `training.config_from_recipe` override, or both.
`train/common.py` defines the flags from `OPTIONS`; `Run` and `run_from_flags`
follow from it too. The training options' defaults are the recipe's values
(`training.RECIPES`) or, where a recipe says nothing, `TrainConfig`'s.
"""

import dataclasses
from typing import Callable, Optional, Union

import keras_resnext as kr
from keras_resnext import training
from keras_resnext.transforms import EVAL_VIEWS, INTERPOLATIONS

DEFAULT_DATASETS = {"imagenet": "imagenette/160px-v2", "cifar": "cifar10"}
DEFAULT_PRESETS = {"imagenet": "resnext50_32x4d", "cifar": "resnext29_8x64d"}

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
    choices: tuple = ()
    bounds: dict = dataclasses.field(default_factory=dict)

    def flag_arguments(self, family):
        """The keyword arguments of `flags.DEFINE_<kind>` for `family`."""
        arguments = dict(name=self.name, default=_for(self.default, family),
                         help=_for(self.help, family), **self.bounds)
        if self.kind == "enum":
            arguments["enum_values"] = list(self.choices)
        return arguments


def _for(value, family):
    return value(family) if callable(value) else value


def _recipe(field):
    """The family's recipe value of `field`."""
    return lambda family: getattr(training.RECIPES[family], field)


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
    Option("batch_size", "integer", _recipe("batch_size"),
           "Global batch size, split across all replicas.", goes_to=BOTH,
           bounds=dict(lower_bound=1)),
    Option("epochs", "integer", _recipe("epochs"), "Training epochs.", goes_to=(TRAINING,),
           bounds=dict(lower_bound=1)),
    Option("lr", "float", _recipe("learning_rate"),
           lambda family: (f"Learning rate for a global batch of "
                           f"{training.RECIPES[family].reference_batch_size}; scaled linearly "
                           "with --batch_size."),
           goes_to=(TRAINING,), setting="base_learning_rate", bounds=dict(lower_bound=0)),
    Option("momentum", "float", _recipe("momentum"), "SGD momentum.", goes_to=(TRAINING,),
           bounds=dict(lower_bound=0, upper_bound=0.999)),
    Option("nesterov", "boolean", _recipe("nesterov"), "Nesterov momentum, as the official code.",
           goes_to=(TRAINING,)),
    Option("weight_decay", "float", _recipe("weight_decay"),
           "Coupled L2 added to every parameter's gradient.", goes_to=(TRAINING,),
           bounds=dict(lower_bound=0)),
    Option("image_size", "integer",
           lambda family: kr.applications.eval_transform(family)[0],
           "Training and evaluation crop size.", bounds=dict(lower_bound=8)),
    Option("resize_size", "integer", None,
           "Eval: shorter side before the centre crop (ImageNet-style), e.g. 256 or 232. "
           "Default the weights' eval transform, else 256/224 of --image_size.",
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
    Option("warmup_epochs", "float", _config_default("warmup_epochs"),
           "Linear learning-rate warmup (large batches).", goes_to=(TRAINING,),
           bounds=dict(lower_bound=0)),
    Option("label_smoothing", "float", _config_default("label_smoothing"), "Label smoothing.",
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
    Option("lr_schedule", "enum", _config_default("lr_schedule"),
           "step: /10 at the recipe's epochs (§4); cosine: cosine decay.", goes_to=(TRAINING,),
           choices=training.LR_SCHEDULES),
    Option("ema_decay", "float", _config_default("ema_decay"),
           "Keep an exponential moving average of the weights with this decay (e.g. 0.9999) "
           "and evaluate/export it.", goes_to=(TRAINING,),
           bounds=dict(lower_bound=0, upper_bound=0.999999)),
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
    + [("training_overrides", dict, dataclasses.field(default_factory=dict))],
    frozen=True)
Run.__module__ = __name__
Run.__doc__ = ("One invocation of a training CLI, from its flags: the family, the `RUN` "
               "options, and the `TRAINING` ones as `config_from_recipe` overrides.")


def run_from(family, values):
    """The `Run` that parsed flag `values` (absl's FLAGS) describe."""
    return Run(
        family=family,
        **{option.name: values[option.name].value for option in _RUN_OPTIONS},
        training_overrides={option.setting or option.name: values[option.name].value
                            for option in _TRAINING_OPTIONS},
    )
