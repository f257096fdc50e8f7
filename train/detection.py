"""Train keras-hub's RetinaNet on a ResNeXt-FPN backbone (issue 12).

    python train/detection.py --model_dir runs/retinanet_x101          # TFDS coco/2017
    python train/detection.py --dataset voc/2007 --model_dir runs/voc
    python train/detection.py --dataset coco:/data/coco --model_dir runs/x

`coco:ROOT` is the COCO download's layout: ROOT/annotations/instances_train2017.json
with the images in ROOT/train2017/ (and val2017 alike). The defaults follow
torchvision's detection reference for RetinaNet: a ResNeXt-101 32x8d with
torchvision's ImageNet weights, frozen batch norm and the last 3 stages
trained; SGD momentum 0.9, lr 0.01 for batch 16, weight decay 1e-4, 26
epochs with lr /10 after 16 and 22, 1000 warmup steps. Needs the [hub] extra
(keras-hub). Rerunning the same command resumes from --model_dir.
"""

import dataclasses
import os
import sys
import types

if not __package__:  # run as `python train/detection.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from train import common  # noqa: E402  (first: it quiets TensorFlow's start-up)
from train.options import OPTIONS, Option  # noqa: E402

import keras_resnext as kr  # noqa: E402
from keras_resnext import training  # noqa: E402
from pipelines import detection as detection_data  # noqa: E402

try:
    from keras_resnext.training import detection  # noqa: E402
except ModuleNotFoundError as missing:
    if missing.name != "keras_hub":
        raise
    sys.exit('Error: train/detection.py needs keras-hub: pip install -e ".[hub]" && '
             'pip install --no-deps "keras-hub==0.32.*"')

FLAGS = flags.FLAGS
DEFAULT_BACKBONE = "resnext101_32x8d"  # torchvision's and Detectron2's X-101 32x8d
FAMILY = "imagenet"  # the backbone's: RetinaNet reads P3-P5, which CIFAR models lack
_DEFAULTS = detection.DetectionConfig(model_dir="")
_SHARED = {option.name: option for option in OPTIONS}

DETECTION_OPTIONS = (
    # The network
    Option("backbone", "string", None,
           f"A keras_resnext ImageNet preset (resnext50_32x4d, resnext101_32x8d, ...). Default "
           f"{DEFAULT_BACKBONE} unless --depth/--cardinality/--width are given."),
    _SHARED["depth"], _SHARED["cardinality"], _SHARED["width"],
    Option("weights", "string", "imagenet",
           "Backbone weights: a name the weights loader knows (imagenet) or a file "
           "(.weights.h5, torchvision .pth, .safetensors); empty for none. With weights, batch "
           "norm is frozen and only --trainable_stages train (torchvision's rule)."),
    Option("trainable_stages", "integer", 3,
           "With --weights: train the last K of [stem, conv2..conv5] (torchvision's "
           "trainable_backbone_layers); without, all train.",
           bounds=dict(lower_bound=0, upper_bound=5)),
    # The data
    Option("dataset", "string", "coco/2017",
           "coco/2017 or voc/2007 (TFDS), tfds:NAME, or coco:ROOT (ROOT/annotations/"
           "instances_<split>*.json, images in ROOT/<split>*/)."),
    _SHARED["data_dir"],
    Option("image_size", "integer", 1024,
           "Images are resized so the longer side is this, then padded to a square "
           "(torchvision: shorter side 800, longer at most 1333).", bounds=dict(lower_bound=32)),
    _SHARED["model_dir"],
    # The recipe
    Option("batch_size", "integer", _DEFAULTS.batch_size, "Global batch size.",
           bounds=dict(lower_bound=1)),
    Option("epochs", "integer", _DEFAULTS.epochs,
           "Training epochs; lr /10 after 16/26 and 22/26 of them.", bounds=dict(lower_bound=1)),
    Option("lr", "float", _DEFAULTS.learning_rate,
           f"Learning rate for a global batch of {_DEFAULTS.reference_batch_size}; scaled "
           "linearly with --batch_size.", bounds=dict(lower_bound=0)),
    Option("momentum", "float", _DEFAULTS.momentum, "SGD momentum.",
           bounds=dict(lower_bound=0, upper_bound=0.999)),
    Option("weight_decay", "float", _DEFAULTS.weight_decay, "Weight decay.",
           bounds=dict(lower_bound=0)),
    Option("warmup_steps", "integer", _DEFAULTS.warmup_steps, "Linear learning-rate warmup.",
           bounds=dict(lower_bound=0)),
    _SHARED["steps_per_epoch"], _SHARED["seed"],
    # Devices, and weights out
    _SHARED["strategy"], _SHARED["export_dir"],
)

common.define_flags(FAMILY, DETECTION_OPTIONS)
flags.adopt_module_key_flags(common)

DetectionRun = dataclasses.make_dataclass(
    "DetectionRun", [option.name for option in DETECTION_OPTIONS], frozen=True)


def run_from_flags():
    return DetectionRun(**{option.name: FLAGS[option.name].value
                           for option in DETECTION_OPTIONS})


def check_flags(run):
    """Raise `UserError` for flags that can't work, before any data is read."""
    if not run.model_dir:
        raise training.UserError("--model_dir is required for training.")
    if run.strategy not in detection.DETECTION_STRATEGIES:
        raise training.UserError(
            f"--strategy {run.strategy}: detection trains with Keras' fit, on one machine; "
            f"use {', '.join(detection.DETECTION_STRATEGIES)}.")
    _backbone_builder(run)


def _backbone_builder(run):
    """The builder and arguments of the backbone --backbone (or --depth/
    --cardinality/--width) names, checked as the classification CLIs' --model."""
    given = any(value is not None for value in (run.depth, run.cardinality, run.width))
    name = run.backbone or (None if given else DEFAULT_BACKBONE)
    if kr.PRESETS.get(name, {}).get("family", FAMILY) != FAMILY:
        raise training.UserError(f"--backbone {name}: a CIFAR network has no P3-P5 pyramid; "
                                 "choose an ImageNet preset.")
    try:
        return common._architecture(types.SimpleNamespace(
            model=name, depth=run.depth, cardinality=run.cardinality, width=run.width,
            family=FAMILY))
    except training.UserError as error:
        raise training.UserError(str(error).replace("--model ", "--backbone ")) from None


def build_backbone(run):
    """The image encoder: our ResNeXt without its classifier. With weights,
    torchvision's detection backbone rule: frozen batch norm, the last
    `trainable_stages` stages trained."""
    builder, architecture = _backbone_builder(run)
    arguments = dict(architecture, include_top=False,
                     input_shape=(run.image_size, run.image_size, 3))
    if run.weights:
        arguments.update(weights=run.weights, freeze_batch_norm=True,
                         trainable_stages=run.trainable_stages)
    return builder(**arguments)


def execute(run):
    """Train, evaluate (COCO box AP) and export as `run` says; returns the metrics."""
    check_flags(run)
    strategy = training.create_strategy(run.strategy)
    _check_dataset_available(run)
    with common._as_user_errors():
        train_info = detection_data.describe_detection_source(run.dataset, "train",
                                                              data_dir=run.data_dir)
        val_info = detection_data.describe_detection_source(run.dataset, "val",
                                                            data_dir=run.data_dir)
    class_names = val_info.class_names
    config = detection.DetectionConfig(
        model_dir=run.model_dir, epochs=run.epochs, batch_size=run.batch_size,
        learning_rate=run.lr, momentum=run.momentum, weight_decay=run.weight_decay,
        warmup_steps=run.warmup_steps, steps_per_epoch=run.steps_per_epoch, seed=run.seed)
    print(f"{run.dataset}: {train_info.num_examples} train / {val_info.num_examples} val "
          f"images, {len(class_names)} classes; {strategy.num_replicas_in_sync} replica(s), "
          f"global batch {config.batch_size}, peak lr {config.scaled_learning_rate:g}, "
          f"{config.epochs} epochs.", flush=True)

    def model_fn():
        with common._as_user_errors():
            return detection.build_retinanet(build_backbone(run), len(class_names),
                                             run.image_size)

    result = detection.train_detector(
        model_fn, _split(run, "train", train_info), _split(run, "val", val_info), config,
        strategy)
    if run.export_dir:
        path, exported = training.export_once(
            run.model_dir, run.export_dir, result.metrics["epochs_completed"],
            lambda: detection.export_detector(result.model, run.export_dir, run.image_size,
                                              class_names))
        print(f"Exported SavedModel to {path}" if exported else
              f"{path} already exported this run; not exporting it again.", flush=True)
    return result.metrics


def _split(run, split, info):
    def dataset_fn(seed):
        return detection_data.build_detection_dataset(
            run.dataset, split, run.batch_size, training=split == "train",
            image_size=run.image_size, data_dir=run.data_dir, seed=seed)

    return detection.DetectionSplit(dataset_fn, info.num_examples)


def _check_dataset_available(run):
    try:
        kind, name = detection_data.parse_detection_source(run.dataset)
    except ValueError as error:
        raise training.UserError(f"--dataset {run.dataset}: {training.first_line(error)}") from None
    if kind == "tfds":
        common.check_tfds_available(run.dataset, name, run.data_dir, local_sources="coco:ROOT")


if __name__ == "__main__":
    common.main(FAMILY, lambda: execute(run_from_flags()))
