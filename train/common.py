"""What `train/imagenet.py` and `train/cifar.py` share: the flags (declared
in `train/options.py`), the flags -> `Run` step, and the run itself (data,
model, training, export).

The library does the work: `pipelines` reads data, `keras_resnext.training`
trains, `keras_resnext.export` writes SavedModels.
"""

import contextlib
import dataclasses
import json
import os
import re
import socket
import sys
import tempfile
import warnings

# Before TensorFlow loads: hide its INFO start-up lines, so an error is the one
# line a user reads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

# The glog prefix of a C++ log line: severity, date, time, thread id.
_GLOG_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ ")


@contextlib.contextmanager
def _each_stderr_line_once():
    """Write the process's stderr (file descriptor 2, C++ included) of the
    block once it ends, each distinct line once.

    TensorFlow's wheel links its core twice, into libtensorflow_framework.so.2
    and into the profiler's _pywrap_profiler_plugin.so, and each copy logs
    the oneDNN banner when it loads, before any log level applies
    (TF_CPP_MIN_LOG_LEVEL hides neither): every command printed it twice.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            seen = set()
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                key = _GLOG_PREFIX.sub("", line)
                if key not in seen:
                    seen.add(key)
                    sys.stderr.write(line)
            sys.stderr.flush()


with _each_stderr_line_once():
    from absl import app, flags, logging

    import keras_resnext as kr  # before TensorFlow, see keras_resnext/__init__
    import pipelines
    from keras_resnext import training
    from keras_resnext.export import export_saved_model
    from keras_resnext.transforms import family_eval_transform, model_eval_transform
    from keras_resnext.weights import load_weights
    from keras_resnext.weights.fetch import is_path as is_weights_path
    from keras_resnext.weights.fetch import resolve as resolve_weights
    from pipelines.augment import parse_auto_augment
    from train import options
    from train.options import DEFAULT_PRESETS

FLAGS = flags.FLAGS

# Where TFDS downloads these datasets from, to test for a network quickly
# instead of waiting out TFDS' download retries.
TFDS_DOWNLOAD_HOSTS = {"imagenette": "s3.amazonaws.com", "cifar10": "www.cs.toronto.edu",
                       "cifar100": "www.cs.toronto.edu", "coco": "images.cocodataset.org",
                       "voc": "host.robots.ox.ac.uk"}
LOCAL_SOURCES = "folder:ROOT or tfrecord:PATTERN"
TFDS_FALLBACK_HOST = "storage.googleapis.com"
NETWORK_PROBE_SECONDS = 5

_DEFINE = {"string": flags.DEFINE_string, "integer": flags.DEFINE_integer,
           "float": flags.DEFINE_float, "boolean": flags.DEFINE_boolean,
           "enum": flags.DEFINE_enum}


def define_flags(family, selected_options=options.OPTIONS):
    """Define the training flags (`options.OPTIONS`, or `selected_options`)
    with `family`'s ("imagenet"/"cifar") defaults."""
    # Defined from this module, so that absl files them under train.common,
    # whose key flags train/<family>.py adopts for --helpshort.
    for option in selected_options:
        _DEFINE[option.kind](**option.flag_arguments(family))


Run = options.Run


def run_from_flags(family):
    """The `Run` the parsed flags describe."""
    return options.run_from(family, FLAGS)


# --------------------------------------------------------------------------
# The run


def execute(run):
    """Train (or evaluate) and export as `run` says; returns the metrics."""
    check_flags(run)
    with _no_empty_model_dir_left(run.model_dir):
        return _execute(run)


def check_flags(run):
    """Raise `UserError` for flags that can't work, before any data is read."""
    if not run.eval_only and not run.model_dir:
        raise training.UserError("--model_dir is required for training.")
    if run.eval_only and not (run.weights or run.model_dir):
        raise training.UserError("--eval_only evaluates --weights, or the latest checkpoint "
                                 "in --model_dir; pass one of them.")
    if (run.weights and is_weights_path(run.weights)
            and not (os.path.exists(run.weights) or _is_checkpoint(run.weights))):
        try:
            resolve_weights(run.weights, None)  # a mistyped weights name: list the names
        except ValueError as error:
            raise training.UserError(f"--weights {run.weights}: {error}") from None
        raise training.UserError(f"--weights {run.weights}: no such file or folder.")
    warmup, epochs = run.training_overrides["warmup_epochs"], run.training_overrides["epochs"]
    if not run.eval_only and warmup >= epochs:
        source = "" if "warmup_epochs" in run.recipe_overrides else f" (--recipe {run.recipe}'s)"
        raise training.UserError(f"--warmup_epochs {warmup:g}{source} must be less than "
                                 f"--epochs {epochs}; lower it or train longer.")
    if run.auto_augment is not None:
        try:
            parse_auto_augment(run.auto_augment)
        except ValueError as error:
            raise training.UserError(f"--auto_augment: {error}") from None
    if run.resize_size is not None and run.crop_pct is not None:
        raise training.UserError("--resize_size and --crop_pct both set the eval resize; "
                                 "give one of them.")
    _architecture(run)


@contextlib.contextmanager
def _no_empty_model_dir_left(model_dir):
    existed = not model_dir or os.path.exists(model_dir)
    try:
        yield
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                os.rmdir(model_dir)  # only if empty: nothing of a run is lost
        raise


def _execute(run):
    # Multi-worker and TPU strategies must exist before other TensorFlow work.
    strategy = training.create_strategy(run.strategy, run.tpu)
    check_dataset_available(run)
    with _as_user_errors():
        val_info = _describe(run, "val")
        train_info = None if run.eval_only else _describe(run, "train")
    class_names = list(val_info.class_names)
    preprocessing = run.preprocessing or val_info.preprocessing
    transform = eval_transform_of(run, preprocessing)
    recipe = training.recipe_named(run.family, run.recipe)

    def model_fn():
        with _as_user_errors():
            model = build_model(run, num_classes=len(class_names))
            if run.weights:
                _load_initial_weights(model, run.weights)
            if model.eval_transform is not None:
                # The initial weights' view is replaced by the one this run
                # validates and exports with.
                model.eval_transform = transform
        return model

    if run.eval_only:
        with strategy.scope():
            with _as_user_errors():
                model = build_model(run, num_classes=len(class_names))
            evaluated = _load_weights_to_evaluate(model, run)
        # The view the weights record, unless flags change it.
        transform = eval_transform_of(run, preprocessing, model)
        val_split = training.InputSplit(
            _dataset_fn(run, "val", preprocessing, transform, len(class_names)),
            val_info.num_examples, source=run.dataset)
        print(f"Eval view: {transform.describe(run.eval_view)}.", flush=True)
        metrics = training.evaluate_model(model, val_split, run.batch_size, strategy)
        metrics.update(eval_transform=transform.get_config(), eval_view=run.eval_view)
        print(f"{evaluated} on {run.dataset} val ({metrics['num_examples']} of "
              f"{metrics['num_examples_expected']} images): "
              f"top1 {metrics['top1']:.4f} - top5 {metrics['top5']:.4f}", flush=True)
        if run.model_dir and training.is_chief(strategy):
            os.makedirs(run.model_dir, exist_ok=True)
            with open(os.path.join(run.model_dir, "eval_metrics.json"), "w") as f:
                json.dump(metrics, f, indent=2)
    else:
        config = training.config_from_recipe(
            recipe, run.model_dir, input_settings=tuple(_input_settings(run).items()),
            **run.training_overrides)
        val_split = training.InputSplit(
            _dataset_fn(run, "val", preprocessing, transform, len(class_names)),
            val_info.num_examples, source=run.dataset)
        train_split = training.InputSplit(
            _dataset_fn(run, "train", preprocessing, transform, len(class_names)),
            train_info.num_examples, source=run.dataset)
        _print_recipe(run, recipe)
        _print_run(run, config, train_info, val_info, strategy)
        print(f"Eval view: {transform.describe(run.eval_view)}.", flush=True)
        result = training.train(model_fn, train_split, val_split, config, strategy)
        metrics, model = result.metrics, result.model
    if run.export_dir and training.is_chief(strategy):
        path, exported = training.export_once(
            run.model_dir, run.export_dir, metrics.get("epochs_completed"),
            lambda: export_saved_model(model, run.export_dir, class_names=class_names,
                                       transform=transform))
        print(f"Exported SavedModel to {path}" if exported else
              f"{path} already exported this run; not exporting it again.", flush=True)
    training.wait_for_all_workers(strategy)
    return metrics


def _load_initial_weights(model, weights):
    """A weights file, or the latest checkpoint of a folder (a --model_dir or
    its checkpoints)."""
    if _is_checkpoint(weights):
        training.restore_model_weights(model, weights)
    else:
        load_weights(model, weights)


def _is_checkpoint(weights):
    """Whether --weights names a training checkpoint: a folder holding one
    (a --model_dir or its checkpoints) or one checkpoint's path prefix."""
    return os.path.isdir(weights) or os.path.exists(f"{weights}.index")


def _load_weights_to_evaluate(model, run):
    """Load what --eval_only scores into `model`; returns its path. Weights
    whose classifier the model can't take are refused: a fresh classifier
    would score chance."""
    if not run.weights:
        return training.restore_model_weights(model, run.model_dir)
    if _is_checkpoint(run.weights):
        return training.restore_model_weights(model, run.weights)
    with warnings.catch_warnings(record=True) as caught, _as_user_errors():
        warnings.simplefilter("always")
        load_weights(model, run.weights)
    for warning in caught:
        if "classifier" in str(warning.message):
            raise training.UserError(
                f"--eval_only needs a classifier for the dataset's {model.output_shape[-1]} "
                f"classes: {training.first_line(warning.message)}")
        warnings.warn_explicit(warning.message, warning.category, warning.filename,
                               warning.lineno)
    return run.weights


def _print_recipe(run, recipe):
    """With --recipe other than paper, one line per setting it changes."""
    if run.recipe != training.PAPER:
        for line in training.recipe_differences(run.recipe, recipe, training.RECIPES[run.family],
                                                run.recipe_overrides):
            print(line, flush=True)


def _train_image_size(run):
    if run.train_image_size is None:
        return run.image_size
    if "train_image_size" in run.recipe_overrides:
        return run.train_image_size
    # A recipe's training crop is for the family's eval crop (176 for 224):
    # it keeps that proportion at another --image_size.
    reference = family_eval_transform(run.family).image_size
    return max(8, round(run.train_image_size * run.image_size / reference))


def _input_settings(run):
    """The input pipeline's recipe settings in effect, which a resume must keep."""
    return {name: _train_image_size(run) if name == "train_image_size" else getattr(run, name)
            for name in training.INPUT_SETTINGS}


def _augmentations(run, num_classes):
    """The training pipeline's recipe augmentations, only those switched on, so
    that a pipeline without them is called as before."""
    names = ("auto_augment", "random_erasing", "mixup_alpha", "cutmix_alpha",
             "repeated_augmentations")
    off = {field.name: field.default for field in dataclasses.fields(training.Recipe)}
    arguments = {name: getattr(run, name) for name in names if getattr(run, name) != off[name]}
    if run.mixup_alpha or run.cutmix_alpha:
        arguments["num_classes"] = num_classes  # labels become mixed one-hot targets
    return arguments


def _print_run(run, config, train_info, val_info, strategy):
    print(
        f"{run.dataset}: {train_info.num_examples} train / {val_info.num_examples} val images, "
        f"{len(val_info.class_names)} classes; {strategy.num_replicas_in_sync} replica(s), "
        f"global batch {config.batch_size}, peak lr {config.learning_rate:g}, "
        f"weight decay {config.weight_decay:g}, {config.epochs} epochs.", flush=True)


def eval_transform_of(run, preprocessing, model=None):
    """The `EvalTransform` `run` evaluates (and exports) with: `model`'s (the
    one its weights record, else its family's) or the family's at
    --image_size, with --resize_size, --crop_pct and --interpolation applied.
    Those are for ImageNet-style views; CIFAR-style ones take the image as
    it is."""
    imagenet_style = preprocessing != "cifar"
    given = [f"--{name}" for name in ("crop_pct", "interpolation")
             if getattr(run, name) is not None]
    given += ["--eval_view ten_crop"] if run.eval_view != "center" else []
    if given and not imagenet_style:
        raise training.UserError(f"{', '.join(given)}: ImageNet-style eval options; "
                                 f"{run.dataset} uses CIFAR-style preprocessing.")
    resize_given = options.resize_size_given(run)
    if getattr(model, "eval_transform", None) is not None:
        # At --image_size: a model built for any input size (training and
        # evaluation crops differ) would otherwise keep the recorded size.
        base = model_eval_transform(model, run.image_size)
    elif run.resize_size is not None and not resize_given and imagenet_style:
        # A recipe's resize is for the family's crop (235 for 224): it keeps
        # that proportion at another --image_size, and yields to the view
        # the weights record.
        base = dataclasses.replace(family_eval_transform(preprocessing),
                                   resize_size=run.resize_size).at_size(run.image_size)
    else:
        base = family_eval_transform(preprocessing, run.image_size)
    if not imagenet_style:
        return base
    with _as_user_errors():
        return base.with_overrides(resize_size=run.resize_size if resize_given else None,
                                   crop_pct=run.crop_pct, interpolation=run.interpolation)


def _describe(run, split):
    return pipelines.describe_source(
        run.dataset, split, data_dir=run.data_dir, manual_dir=run.manual_dir,
        tfrecord_label_offset=run.tfrecord_label_offset,
        tfrecord_num_classes=run.tfrecord_num_classes)


def _dataset_fn(run, split, preprocessing, eval_transform, num_classes):
    training_split = split == "train"
    augmentations = _augmentations(run, num_classes) if training_split else {}

    def dataset_fn(per_replica_batch_size, input_context):
        return pipelines.build_dataset(
            run.dataset, split, per_replica_batch_size, training=training_split,
            image_size=_train_image_size(run) if training_split else run.image_size,
            eval_transform=eval_transform, eval_view=run.eval_view,
            preprocessing=preprocessing,
            data_dir=run.data_dir, manual_dir=run.manual_dir,
            tfrecord_label_offset=run.tfrecord_label_offset,
            tfrecord_num_classes=run.tfrecord_num_classes,
            deterministic=run.deterministic, seed=run.seed, input_context=input_context,
            **augmentations,
        )

    return dataset_fn


def build_model(run, num_classes):
    """The network `run` names, with a logits head of `num_classes`; any input
    size when training and evaluation crops differ."""
    builder, architecture = _architecture(run)
    side = run.image_size if _train_image_size(run) == run.image_size else None
    return builder(**architecture, classes=num_classes,
                   input_shape=(side, side, 3), classifier_activation=None)


def _architecture(run):
    """The builder and architecture arguments `run`'s --model/--depth/
    --cardinality/--width name, checked without building anything."""
    architecture = {key: value for key, value in
                    dict(depth=run.depth, cardinality=run.cardinality, width=run.width).items()
                    if value is not None}
    if run.model or not architecture:
        name = run.model or DEFAULT_PRESETS[run.family]
        if name not in kr.PRESETS:
            raise training.UserError(
                f"--model {name}: not a preset; choose one of {', '.join(sorted(kr.PRESETS))} "
                "or give --depth/--cardinality/--width.")
        preset = kr.PRESETS[name]
        for key, value in architecture.items():
            if value != preset[key]:
                raise training.UserError(
                    f"--model {name} has {key} {preset[key]}; --{key} {value} contradicts it.")
        return (lambda **arguments: kr.build(name, **arguments)), architecture
    default = kr.PRESETS[DEFAULT_PRESETS[run.family]]
    depth = architecture.pop("depth", default["depth"])
    try:
        builder = kr.applications.builder(run.family, depth)
    except ValueError as error:
        raise training.UserError(f"--depth {depth}: {error}") from None
    return builder, dict(cardinality=architecture.get("cardinality", default["cardinality"]),
                         width=architecture.get("width", default["width"]))


# --------------------------------------------------------------------------
# Failing fast and in one line


@contextlib.contextmanager
def _as_user_errors():
    """Report the ValueErrors and OSErrors of reading sources, building models
    and loading weights as UserErrors: one line, no traceback."""
    try:
        yield
    except training.UserError:
        raise
    except (ValueError, OSError) as error:
        raise training.UserError(training.first_line(error)) from error


def check_dataset_available(run):
    """Raise at once, naming --dataset, if a TFDS dataset would need a
    download this machine cannot make (instead of TFDS retrying for minutes)."""
    try:
        kind, name = pipelines.sources.parse_source(run.dataset)
    except ValueError as error:
        raise training.UserError(
            f"--dataset {run.dataset}: {training.first_line(error)}") from None
    if kind == "tfds":
        check_tfds_available(run.dataset, name, run.data_dir)


def check_tfds_available(dataset, name, data_dir, local_sources=LOCAL_SOURCES):
    """`check_dataset_available` for the TFDS dataset `name` that --dataset
    `dataset` names; `local_sources` are the CLI's other kinds of --dataset."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # TFDS raises several types for unknown names
        raise training.UserError(
            f"--dataset {dataset}: not a TFDS dataset ({training.first_line(error)}); "
            f"use a TFDS name or {local_sources}.") from None
    if builder.is_prepared() or builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        return  # prepared, or prepared from --manual_dir without a download
    host = TFDS_DOWNLOAD_HOSTS.get(name.split("/")[0], TFDS_FALLBACK_HOST)
    if not _network_reachable(host):
        raise training.UserError(
            f"TFDS dataset {name} is not in {builder.data_dir} and {host} cannot be reached "
            f"to download it; point --dataset at local data ({local_sources}) or --data_dir "
            "at a prepared copy.")


def _network_reachable(host):
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy")):
        return True  # the proxy decides; let TFDS try
    try:
        socket.create_connection((host, 443), timeout=NETWORK_PROBE_SECONDS).close()
        return True
    except OSError:
        return False


def _parse_flags(argv):
    try:
        return FLAGS(argv)
    except flags.Error as error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(2)


def main(family, execute_flags=None):
    """Entry point of `train/<family>.py`, after `define_flags(family)`.
    `execute_flags()` runs what the parsed flags say (default: `execute`)."""

    def run_main(argv):
        if len(argv) > 1:
            print(f"Error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
            return 2
        if not FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # hide TensorFlow's Python INFO lines
        try:
            if execute_flags is None:
                execute(run_from_flags(family))
            else:
                execute_flags()
        except training.UserError as error:
            print(f"Error: {error}", file=sys.stderr, flush=True)
            return 1
        return 0

    app.run(run_main, flags_parser=_parse_flags)
