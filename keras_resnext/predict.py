"""Classify image files with an exported SavedModel.

    python -m keras_resnext.predict --saved_model exports/resnext img1.jpg img2.png

`--saved_model` is a version folder (`exports/resnext/3`) or the base folder
TF Serving watches, whose highest version is used. Prints the top classes
of each image with their probabilities; an image the model cannot read
(not an image, corrupt, over its pixel limit) gets an error line on stderr,
the others are still classified, and the exit status is 1.
"""

import collections
import os
import sys

from absl import app, flags

from keras_resnext.export import SERVING_SIGNATURE, next_version

FLAGS = flags.FLAGS
flags.DEFINE_string("saved_model", None, "A SavedModel folder written by "
                    "keras_resnext.export_saved_model, or its base folder (latest version).")
flags.DEFINE_integer("top", 5, "Classes to print per image (at most those exported).",
                     lower_bound=1)
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


def predict_files(saved_model_dir, paths, top=5):
    """A `Prediction` for each of `paths`, in order, from one batch."""
    import tensorflow as tf

    for path in paths:
        if not os.path.isfile(path):
            raise PredictError(f"Image file {path} does not exist.")
    loaded = tf.saved_model.load(saved_model_dir)
    serve = loaded.signatures[SERVING_SIGNATURE]
    contents = []
    for path in paths:
        with open(path, "rb") as f:
            contents.append(f.read())
    try:
        outputs = serve(image_bytes=tf.constant(contents))
    except tf.errors.InvalidArgumentError as error:
        # SavedModels exported before per-image errors fail the whole batch.
        raise PredictError(f"The batch failed: {error.message.splitlines()[-1]}") from None
    valid = outputs["valid"].numpy() if "valid" in outputs else [True] * len(paths)
    predictions = []
    for index, path in enumerate(paths):
        if not valid[index]:
            # "image 3: not a JPEG, ..." names the batch position; name the file.
            reason = outputs["error"][index].numpy().decode("utf-8").split(": ", 1)[-1]
            predictions.append(Prediction(path, [], f"{path}: {reason}"))
            continue
        names = [name.decode("utf-8") for name in outputs["class_names"][index].numpy()]
        scores = outputs["scores"][index].numpy().tolist()
        predictions.append(Prediction(path, list(zip(names, scores))[:top], ""))
    return predictions


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("Name at least one image file.")
    try:
        saved_model_dir = resolve_saved_model(FLAGS.saved_model)
        results = predict_files(saved_model_dir, paths, FLAGS.top)
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
