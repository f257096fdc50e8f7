"""Classify image files with an exported SavedModel.

    python -m keras_resnext.predict --saved_model exports/resnext img1.jpg img2.png

`--saved_model` is a version folder (`exports/resnext/3`) or the base folder
TF Serving watches, whose highest version is used. Prints the top classes
of each image with their probabilities; an image the model cannot read
(not an image, corrupt, over its pixel limit) gets an error line on stderr,
the others are still classified, and the exit status is 1.

Images get the eval transform the SavedModel records (the model's, see
`keras_resnext.export`). `--resize_size`, `--crop_pct`, `--interpolation`
(and `--image_size`, which must stay the exported size) change it: the
images are then preprocessed here and sent to `serving_preprocessed`.
"""

import collections
import json
import os
import sys

from absl import app, flags

from keras_resnext.export import (
    METADATA_SIGNATURE, PREPROCESSED_SIGNATURE, SERVING_SIGNATURE, next_version)
from keras_resnext.transforms import INTERPOLATIONS, EvalTransform

FLAGS = flags.FLAGS
flags.DEFINE_string("saved_model", None, "A SavedModel folder written by "
                    "keras_resnext.export_saved_model, or its base folder (latest version).")
flags.DEFINE_integer("top", 5, "Classes to print per image (at most those exported).",
                     lower_bound=1)
flags.DEFINE_integer("image_size", None, "Eval crop size; must be the exported one.",
                     lower_bound=1)
flags.DEFINE_integer("resize_size", None, "Shorter side before the centre crop.",
                     lower_bound=1)
flags.DEFINE_float("crop_pct", None, "timm-style crop fraction: resize to "
                   "floor(image_size / crop_pct).", lower_bound=0.01, upper_bound=1.0)
flags.DEFINE_enum("interpolation", None, list(INTERPOLATIONS), "Antialiased resize kernel.")
flags.mark_flag_as_required("saved_model")


class PredictError(Exception):
    """A bad path or file; printed as one line."""


Prediction = collections.namedtuple("Prediction", ["path", "top", "error"])
Prediction.__doc__ = """One image's `top` [(class_name, probability), ...], best first, or
its `error` line ("" when it was classified)."""


def resolve_saved_model(path):
    """`path` itself if it holds saved_model.pb, else its latest version."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    if not os.path.isdir(path):
        raise PredictError(f"--saved_model {path} does not exist.")
    latest = next_version(path) - 1
    candidate = os.path.join(path, str(latest))
    if latest < 1 or not os.path.isfile(os.path.join(candidate, "saved_model.pb")):
        raise PredictError(f"--saved_model {path} holds no saved_model.pb nor numbered versions.")
    return candidate


def exported_transform(loaded):
    """The `EvalTransform` a loaded SavedModel serves with. Exports that
    predate transforms recorded only the sizes (bilinear, ImageNet mean/std)."""
    metadata = loaded.signatures[METADATA_SIGNATURE]()
    if "eval_transform" in metadata:
        return EvalTransform.from_config(json.loads(metadata["eval_transform"].numpy()))
    return EvalTransform(int(metadata["image_size"]), int(metadata["resize_size"]))


def predict_files(saved_model_dir, paths, top=5, image_size=None, resize_size=None,
                  crop_pct=None, interpolation=None):
    """A `Prediction` for each of `paths`, in order, from one batch.

    With any of `image_size`, `resize_size`, `crop_pct`, `interpolation`,
    the exported eval transform with those fields changed is applied here
    (see `EvalTransform.with_overrides`).
    """
    import tensorflow as tf

    if resize_size is not None and crop_pct is not None:
        raise PredictError("--resize_size and --crop_pct both set the resize; give one of them.")
    for path in paths:
        if not os.path.isfile(path):
            raise PredictError(f"Image file {path} does not exist.")
    loaded = tf.saved_model.load(saved_model_dir)
    contents = []
    for path in paths:
        with open(path, "rb") as f:
            contents.append(f.read())
    overrides = dict(image_size=image_size, resize_size=resize_size, crop_pct=crop_pct,
                     interpolation=interpolation)
    if any(value is not None for value in overrides.values()):
        results = _classify_here(loaded, contents, overrides)
    else:
        results = _classify_served(loaded, contents)
    predictions = []
    for path, (error, names, scores) in zip(paths, results):
        if error:
            # "image 3: not a JPEG, ..." names the batch position; name the file.
            predictions.append(Prediction(path, [], f"{path}: {error.split(': ', 1)[-1]}"))
        else:
            predictions.append(Prediction(path, list(zip(names, scores))[:top], ""))
    return predictions


def _classify_served(loaded, contents):
    """`(error, class names, scores)` of each image, from `serving_default`."""
    import tensorflow as tf

    try:
        outputs = loaded.signatures[SERVING_SIGNATURE](image_bytes=tf.constant(contents))
    except tf.errors.InvalidArgumentError as error:
        # SavedModels exported before per-image errors fail the whole batch.
        raise PredictError(f"The batch failed: {error.message.splitlines()[-1]}") from None
    errors = (outputs["error"].numpy() if "error" in outputs
              else [b""] * len(contents))
    return [(error.decode("utf-8"), [name.decode("utf-8") for name in names], scores.tolist())
            for error, names, scores in zip(errors, outputs["class_names"].numpy(),
                                            outputs["scores"].numpy())]


def _classify_here(loaded, contents, overrides):
    """`(error, class names, scores)` of each image, preprocessed here with
    the exported transform changed by `overrides`, from `serving_preprocessed`."""
    import tensorflow as tf

    from keras_resnext.kernels.images import preprocess_for_eval

    exported = exported_transform(loaded)
    try:
        transform = exported.with_overrides(**overrides)
    except ValueError as error:
        raise PredictError(str(error)) from None
    if transform.image_size != exported.image_size:
        raise PredictError(
            f"--image_size {transform.image_size}: the SavedModel takes "
            f"{exported.image_size}x{exported.image_size} images; export it at that size.")
    max_pixels = int(loaded.signatures[METADATA_SIGNATURE]()["max_pixels"])
    results, images = [], []
    for index, data in enumerate(contents):
        try:
            images.append(preprocess_for_eval(tf.constant(data), transform=transform,
                                              max_pixels=max_pixels))
            results.append(None)
        except tf.errors.InvalidArgumentError as error:
            results.append((f"image {index}: {error.message.splitlines()[0]}", [], []))
    if images:
        outputs = loaded.signatures[PREPROCESSED_SIGNATURE](images=tf.stack(images))
        decoded = [index for index, result in enumerate(results) if result is None]
        for index, names, scores in zip(decoded, outputs["class_names"].numpy(),
                                        outputs["scores"].numpy()):
            results[index] = ("", [name.decode("utf-8") for name in names], scores.tolist())
    return results


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("Name at least one image file.")
    try:
        saved_model_dir = resolve_saved_model(FLAGS.saved_model)
        results = predict_files(saved_model_dir, paths, FLAGS.top, image_size=FLAGS.image_size,
                                resize_size=FLAGS.resize_size, crop_pct=FLAGS.crop_pct,
                                interpolation=FLAGS.interpolation)
    except PredictError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    for prediction in results:
        if prediction.error:
            print(f"Error: {prediction.error}", file=sys.stderr)
            continue
        print(prediction.path)
        for rank, (name, probability) in enumerate(prediction.top, start=1):
            print(f"  {rank}. {name:<30s} {probability:.4f}")
    return 1 if any(prediction.error for prediction in results) else 0


if __name__ == "__main__":
    app.run(main)
