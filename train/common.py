"""What `train/imagenet.py` and `train/cifar.py` share: the flags (declared
in `train/options.py`), the flags -> `Run` step, and the run itself (data,
model, training, export).

The library does the work: `pipelines` reads data, `keras_resnext.training`
trains, `keras_resnext.export` writes SavedModels.
"""

import contextlib
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
    from keras_resnext.applications import eval_transform
    from keras_resnext.export import export_saved_model
    from keras_resnext.weights import load_weights
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
    if run.weights and not (os.path.exists(run.weights) or _is_checkpoint(run.weights)):
        raise training.UserError(f"--weights {run.weights}: no such file or folder.")
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
    resize_size = _eval_resize_size(run, preprocessing)

    def model_fn():
        with _as_user_errors():
            model = build_model(run, num_classes=len(class_names))
            if run.weights:
                _load_initial_weights(model, run.weights)
        return model

    val_split = training.InputSplit(_dataset_fn(run, "val", preprocessing, resize_size),
                                    val_info.num_examples, source=run.dataset)
    if run.eval_only:
        with strategy.scope():
            with _as_user_errors():
                model = build_model(run, num_classes=len(class_names))
            evaluated = _load_weights_to_evaluate(model, run)
        metrics = training.evaluate_model(model, val_split, run.batch_size, strategy)
        print(f"{evaluated} on {run.dataset} val ({metrics['num_examples']} of "
              f"{metrics['num_examples_expected']} images): "
              f"top1 {metrics['top1']:.4f} - top5 {metrics['top5']:.4f}", flush=True)
        if run.model_dir and training.is_chief(strategy):
            os.makedirs(run.model_dir, exist_ok=True)
            with open(os.path.join(run.model_dir, "eval_metrics.json"), "w") as f:
                json.dump(metrics, f, indent=2)
    else:
        config = training.config_from_recipe(run.family, run.model_dir, **run.training_overrides)
        train_split = training.InputSplit(_dataset_fn(run, "train", preprocessing, resize_size),
                                          train_info.num_examples, source=run.dataset)
        _print_run(run, config, train_info, val_info, strategy)
        result = training.train(model_fn, train_split, val_split, config, strategy)
        metrics, model = result.metrics, result.model
    if run.export_dir and training.is_chief(strategy):
        path, exported = training.export_once(
            run.model_dir, run.export_dir, metrics.get("epochs_completed"),
            lambda: export_saved_model(model, run.export_dir, class_names=class_names,
                                       image_size=run.image_size, resize_size=resize_size))
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


def _print_run(run, config, train_info, val_info, strategy):
    print(
        f"{run.dataset}: {train_info.num_examples} train / {val_info.num_examples} val images, "
        f"{len(val_info.class_names)} classes; {strategy.num_replicas_in_sync} replica(s), "
        f"global batch {config.batch_size}, peak lr {config.learning_rate:g}, "
        f"weight decay {config.weight_decay:g}, {config.epochs} epochs.", flush=True)


def _eval_resize_size(run, preprocessing):
    _, resize_size = eval_transform(preprocessing, run.image_size)
    # --resize_size is for ImageNet-style views; CIFAR-style ones take the image as it is.
    if run.resize_size is not None and preprocessing != "cifar":
        return run.resize_size
    return resize_size


def _describe(run, split):
    return pipelines.describe_source(
        run.dataset, split, data_dir=run.data_dir, manual_dir=run.manual_dir,
        tfrecord_label_offset=run.tfrecord_label_offset,
        tfrecord_num_classes=run.tfrecord_num_classes)


def _dataset_fn(run, split, preprocessing, resize_size):
    def dataset_fn(per_replica_batch_size, input_context):
        return pipelines.build_dataset(
            run.dataset, split, per_replica_batch_size, training=split == "train",
            image_size=run.image_size, resize_size=resize_size, preprocessing=preprocessing,
            data_dir=run.data_dir, manual_dir=run.manual_dir,
            tfrecord_label_offset=run.tfrecord_label_offset,
            tfrecord_num_classes=run.tfrecord_num_classes,
            deterministic=run.deterministic, seed=run.seed, input_context=input_context,
        )

    return dataset_fn


def build_model(run, num_classes):
    """The network `run` names, with a logits head of `num_classes`."""
    builder, architecture = _architecture(run)
    return builder(**architecture, classes=num_classes,
                   input_shape=(run.image_size, run.image_size, 3), classifier_activation=None)


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
