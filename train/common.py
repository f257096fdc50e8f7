"""What `train/imagenet.py` and `train/cifar.py` share: flags, the flags ->
run description step, and the run itself (data, model, training, export).

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
    from keras_resnext.applications import eval_transform
    from keras_resnext.export import export_saved_model
    from keras_resnext.weights import load_weights

FLAGS = flags.FLAGS

DEFAULT_DATASETS = {"imagenet": "imagenette/160px-v2", "cifar": "cifar10"}
DEFAULT_PRESETS = {"imagenet": "resnext50_32x4d", "cifar": "resnext29_8x64d"}
# Where TFDS downloads these datasets from, to test for a network quickly
# instead of waiting out TFDS' download retries.
TFDS_DOWNLOAD_HOSTS = {"imagenette": "s3.amazonaws.com", "cifar10": "www.cs.toronto.edu",
                       "cifar100": "www.cs.toronto.edu"}
TFDS_FALLBACK_HOST = "storage.googleapis.com"
NETWORK_PROBE_SECONDS = 5


def define_flags(family):
    """Define the training flags with `family`'s ("imagenet"/"cifar") defaults."""
    recipe = training.RECIPES[family]
    default_image_size, _ = eval_transform(family)
    family_presets = sorted(n for n, p in kr.PRESETS.items() if p["family"] == family)
    flags.DEFINE_string(
        "model", None,
        f"A preset ({', '.join(family_presets)}, or any of keras_resnext.PRESETS). Default "
        f"{DEFAULT_PRESETS[family]} unless --depth/--cardinality/--width are given.")
    flags.DEFINE_integer("depth", None, "Network depth (50/101/152; CIFAR 9n+2).", lower_bound=11)
    flags.DEFINE_integer("cardinality", None, "C, the number of paths per block.", lower_bound=1)
    flags.DEFINE_integer("width", None, "d, the bottleneck width of each path.", lower_bound=1)
    flags.DEFINE_string(
        "dataset", DEFAULT_DATASETS[family],
        "A TFDS name (or tfds:NAME), folder:ROOT (ROOT/train/<class>/*, ROOT/val/<class>/*) "
        "or tfrecord:PATTERN ({split} in the glob).")
    flags.DEFINE_string("data_dir", None, "TFDS data directory.")
    flags.DEFINE_string("manual_dir", None, "TFDS manual download directory (imagenet2012 tars).")
    flags.DEFINE_enum("preprocessing", None, ["imagenet", "cifar"],
                      "Input views; default chosen by the dataset (cifar for 32x32 images).")
    flags.DEFINE_integer("tfrecord_label_offset", 1, "Subtracted from TFRecord labels.")
    flags.DEFINE_integer("tfrecord_num_classes", 1000, "Classes of a tfrecord: dataset.",
                         lower_bound=1)
    flags.DEFINE_string("model_dir", None, "Checkpoints, logs, CSV and metrics.json go here; "
                        "rerunning the same command resumes from it.")
    flags.DEFINE_integer("batch_size", recipe.batch_size,
                         "Global batch size, split across all replicas.", lower_bound=1)
    flags.DEFINE_integer("epochs", recipe.epochs, "Training epochs.", lower_bound=1)
    flags.DEFINE_float(
        "lr", recipe.learning_rate,
        f"Learning rate for a global batch of {recipe.reference_batch_size}; scaled linearly "
        "with --batch_size.", lower_bound=0)
    flags.DEFINE_float("momentum", recipe.momentum, "SGD momentum.", lower_bound=0,
                       upper_bound=0.999)
    flags.DEFINE_boolean("nesterov", recipe.nesterov, "Nesterov momentum, as the official code.")
    flags.DEFINE_float("weight_decay", recipe.weight_decay,
                       "Coupled L2 added to every parameter's gradient.", lower_bound=0)
    flags.DEFINE_integer("image_size", default_image_size,
                         "Training and evaluation crop size.", lower_bound=8)
    flags.DEFINE_integer(
        "resize_size", None,
        "Eval: shorter side before the centre crop (ImageNet-style), e.g. 256 or 232. "
        "Default 256/224 of --image_size.", lower_bound=8)
    flags.DEFINE_float("warmup_epochs", 0.0, "Linear learning-rate warmup (large batches).",
                       lower_bound=0)
    flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing.", lower_bound=0, upper_bound=0.99)
    flags.DEFINE_enum("mixed_precision", "none", list(training.MIXED_PRECISION_POLICIES),
                      "Compute dtype: float16 (with loss scaling) or bfloat16.")
    flags.DEFINE_enum("strategy", "default", list(training.STRATEGIES),
                      "tf.distribute strategy; multi_worker reads TF_CONFIG.")
    flags.DEFINE_string("tpu", None, "TPU name or grpc:// address for --strategy tpu.")
    flags.DEFINE_string("weights", None, "Initial weights (.weights.h5, torchvision .pth, "
                        ".safetensors, or a training checkpoint: a model_dir, its checkpoints "
                        "folder or a ckpt-N), e.g. for fine-tuning; a weights file's classifier "
                        "of another size starts fresh. A checkpoint in --model_dir takes "
                        "precedence.")
    flags.DEFINE_string("export_dir", None, "At the end, export a TF Serving SavedModel to "
                        "EXPORT_DIR/<version>.")
    flags.DEFINE_integer("steps_per_epoch", None, "Default: training examples // batch size.",
                         lower_bound=1)
    flags.DEFINE_integer("steps_per_loop", 1, "Training steps per tf.function call (higher "
                         "for TPUs).", lower_bound=1)
    flags.DEFINE_integer("validation_freq", 1, "Evaluate every N epochs (0: only at the end).",
                         lower_bound=0)
    flags.DEFINE_integer("seed", None, "Random seed.")
    flags.DEFINE_boolean("deterministic", False, "Reproducible input order and augmentation.")
    flags.DEFINE_enum("lr_schedule", "step", list(training.LR_SCHEDULES),
                      "step: /10 at the recipe's epochs (§4); cosine: cosine decay.")
    flags.DEFINE_float("ema_decay", None, "Keep an exponential moving average of the weights "
                       "with this decay (e.g. 0.9999) and evaluate/export it.",
                       lower_bound=0, upper_bound=0.999999)
    flags.DEFINE_boolean(
        "eval_only", False, "Evaluate on the val split (top-1/top-5): --weights (a weights file "
        "or a checkpoint folder), else the latest checkpoint in --model_dir.")
    flags.DEFINE_float(
        "progress_seconds", training.TrainConfig.progress_seconds,
        "When the output is not a terminal (a file, a CI log), print a progress line (step, "
        "images/s, loss) this often within an epoch.", lower_bound=0)


@dataclasses.dataclass(frozen=True)
class Run:
    """One invocation of a training CLI, from its flags."""

    family: str
    dataset: str
    model: str = None
    depth: int = None
    cardinality: int = None
    width: int = None
    data_dir: str = None
    manual_dir: str = None
    preprocessing: str = None
    tfrecord_label_offset: int = 1
    tfrecord_num_classes: int = 1000
    model_dir: str = None
    image_size: int = 224
    resize_size: int = None
    strategy: str = "default"
    tpu: str = None
    weights: str = None
    export_dir: str = None
    eval_only: bool = False
    deterministic: bool = False
    seed: int = None
    batch_size: int = 256
    training_overrides: dict = dataclasses.field(default_factory=dict)


def run_from_flags(family):
    """The `Run` the parsed flags describe."""
    training_overrides = dict(
        epochs=FLAGS.epochs, base_learning_rate=FLAGS.lr, momentum=FLAGS.momentum,
        nesterov=FLAGS.nesterov, weight_decay=FLAGS.weight_decay,
        warmup_epochs=FLAGS.warmup_epochs, label_smoothing=FLAGS.label_smoothing,
        mixed_precision=FLAGS.mixed_precision, lr_schedule=FLAGS.lr_schedule,
        ema_decay=FLAGS.ema_decay, steps_per_epoch=FLAGS.steps_per_epoch,
        steps_per_loop=FLAGS.steps_per_loop, validation_freq=FLAGS.validation_freq,
        seed=FLAGS.seed, progress_seconds=FLAGS.progress_seconds,
    )
    return Run(
        family=family, dataset=FLAGS.dataset, model=FLAGS.model, depth=FLAGS.depth,
        cardinality=FLAGS.cardinality, width=FLAGS.width, data_dir=FLAGS.data_dir,
        manual_dir=FLAGS.manual_dir, preprocessing=FLAGS.preprocessing,
        tfrecord_label_offset=FLAGS.tfrecord_label_offset,
        tfrecord_num_classes=FLAGS.tfrecord_num_classes, model_dir=FLAGS.model_dir,
        image_size=FLAGS.image_size, resize_size=FLAGS.resize_size, strategy=FLAGS.strategy,
        tpu=FLAGS.tpu, weights=FLAGS.weights, export_dir=FLAGS.export_dir,
        eval_only=FLAGS.eval_only, deterministic=FLAGS.deterministic, seed=FLAGS.seed,
        batch_size=FLAGS.batch_size, training_overrides=training_overrides,
    )


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
                # Only if the run left nothing but its released lock: nothing
                # of a run is lost.
                if set(os.listdir(model_dir)) <= {training.LOCK_NAME}:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(model_dir, training.LOCK_NAME))
                    os.rmdir(model_dir)
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

    val_split = training.Split(_dataset_fn(run, "val", preprocessing, resize_size),
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
        config = training.config_from_recipe(
            run.family, run.model_dir, batch_size=run.batch_size, **run.training_overrides)
        train_split = training.Split(_dataset_fn(run, "train", preprocessing, resize_size),
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
                f"classes: {_first_line(warning.message)}")
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
        raise training.UserError(_first_line(error)) from error


def check_dataset_available(run):
    """Raise at once, naming --dataset, if a TFDS dataset would need a
    download this machine cannot make (instead of TFDS retrying for minutes)."""
    kind, _, location = run.dataset.partition(":")
    if kind in ("folder", "tfrecord"):
        return
    name = location if kind == "tfds" else run.dataset
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=run.data_dir)
    except Exception as error:  # TFDS raises several types for unknown names
        raise training.UserError(
            f"--dataset {run.dataset}: not a TFDS dataset ({_first_line(error)}); "
            "use a TFDS name, folder:ROOT or tfrecord:PATTERN.") from None
    if builder.is_prepared() or builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        return  # prepared, or prepared from --manual_dir without a download
    host = TFDS_DOWNLOAD_HOSTS.get(name.split("/")[0], TFDS_FALLBACK_HOST)
    if not _network_reachable(host):
        raise training.UserError(
            f"TFDS dataset {name} is not in {builder.data_dir} and {host} cannot be reached "
            "to download it; point --dataset at local data (folder:ROOT or "
            "tfrecord:PATTERN) or --data_dir at a prepared copy.")


def _network_reachable(host):
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy")):
        return True  # the proxy decides; let TFDS try
    try:
        socket.create_connection((host, 443), timeout=NETWORK_PROBE_SECONDS).close()
        return True
    except OSError:
        return False


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _parse_flags(argv):
    try:
        return FLAGS(argv)
    except flags.Error as error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(2)


def main(family):
    """Entry point of `train/<family>.py`, after `define_flags(family)`."""

    def run_main(argv):
        if len(argv) > 1:
            print(f"Error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
            return 2
        if not FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # hide TensorFlow's Python INFO lines
        try:
            execute(run_from_flags(family))
        except training.UserError as error:
            print(f"Error: {error}", file=sys.stderr, flush=True)
            return 1
        return 0

    app.run(run_main, flags_parser=_parse_flags)
