"""SavedModels for TF Serving: encoded images in, top-k classes out.

`export_saved_model(model, base_dir)` writes `base_dir/<version>/`, the
layout TF Serving polls, with two signatures:

- `serving_default`: `image_bytes` (tf.string [N], JPEG/PNG/GIF/BMP/WebP), each
  decoded and cropped by `keras_resnext.preprocess_for_eval` with the model's
  `EvalTransform` (`keras_resnext.transforms.model_eval_transform`: the one
  its weights record, else its family's), the same eval view the datasets use;
- `serving_preprocessed`: `images` (float32 [N, size, size, 3]), already
  preprocessed.

Both return `probabilities` [N, classes], `classes` (int32 [N, k]),
`scores` [N, k], `class_names` (string [N, k]), `valid` (bool [N]) and
`error` (string [N]). One bad image fails alone: a file that is not an
image, whose header is malformed, that has more than `max_pixels` pixels
(read from its header, before decoding) or that the decoder rejects gets
`valid` false, an `error` line such as "image 2: not a JPEG, PNG, GIF, BMP
or WebP image", zero probabilities and scores, classes -1 and empty class names;
the other images are classified as usual. An empty batch, or
`serving_preprocessed` images of the wrong shape, fail the whole request
with InvalidArgumentError. The SavedModel also records its eval transform:
`eval_image_size`, `eval_resize_size`, `eval_interpolation`, `eval_mean`,
`eval_std`, `eval_transform` (its config as JSON), `preprocessing`,
`max_pixels`, `class_names` and `dtype` are variables of the loaded object,
and a third signature, `metadata`, returns them.

`dtype="bfloat16"` (the default for a model built under Keras'
`mixed_bfloat16` policy) exports a bfloat16 serving graph: the signatures
still take float32 images and return float32 probabilities, the weights are
stored in float32, and the layers compute in bfloat16 as that policy has them
(batch norm statistics in float32), with the classifier and its softmax in
float32. Its grouped convolutions run on TensorFlow's own kernel, which takes
bfloat16 with oneDNN on and off.

Serving is single-crop: a ten-crop view (`pipelines.build_dataset(...,
eval_view="ten_crop")`) costs ten forward passes per request for a few
tenths of a point of top-1, and its crops depend on the whole image, so a
client could not send it preprocessed either.

TensorFlow only; `keras_resnext` imports this module on first use of
`keras_resnext.export_saved_model`, so `import keras_resnext` works without it.
"""

import json
import os
import re
import shutil

import keras
import tensorflow as tf

from keras_resnext import preprocessing
from keras_resnext.preprocessing import outputs_probabilities
from keras_resnext.kernels.images import header_problem, preprocess_for_eval, read_image_header
from keras_resnext.transforms import resolve_eval_transform

SERVING_SIGNATURE = "serving_default"
PREPROCESSED_SIGNATURE = "serving_preprocessed"
METADATA_SIGNATURE = "metadata"
PREPROCESSING_NAME = "keras_resnext.preprocess_for_eval"
_VERSION_PATTERN = re.compile(r"^[0-9]+$")
# 64 megapixels (8000x8000) holds every camera photo in common use; decoded,
# it is 192 MB of uint8, so one request cannot take the server down.
DEFAULT_MAX_PIXELS = 64_000_000
# The serving dtype -> the Keras policy its model is rebuilt under.
SERVING_DTYPE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
CLASSIFIER_LAYER = "predictions"


def default_class_names(num_classes):
    """ImageNet's names for a 1000-class head, else "0", "1", ..."""
    classes = preprocessing.imagenet_classes()
    if num_classes == len(classes):
        return [name for _, name in classes]
    return [str(index) for index in range(num_classes)]


def next_version(base_dir):
    """One more than the largest integer-named version folder (1 if none)."""
    if not os.path.isdir(base_dir):
        return 1
    versions = [int(name) for name in os.listdir(base_dir) if _VERSION_PATTERN.match(name)]
    return max(versions, default=0) + 1


def export_saved_model(model, base_dir, version=None, top_k=5, class_names=None,
                       image_size=None, resize_size=None, max_pixels=DEFAULT_MAX_PIXELS,
                       transform=None, dtype=None):
    """Write `model` as a TF Serving SavedModel into `base_dir/<version>`.

    Args:
        model: a Keras image classifier with one image input (channels
            last) and class scores out; softmax is added unless its
            `classifier_activation` is already "softmax".
        base_dir: the folder TF Serving watches (`--model_base_path`).
        version: an integer; default the next one after those in `base_dir`.
        top_k: how many classes each image returns (at most the classes).
        class_names: one name per class; default ImageNet's for 1000
            classes, else the class indices as strings.
        image_size, resize_size: override the eval transform's crop and
            resize sizes.
        max_pixels: `serving_default` refuses images whose header says
            they have more pixels than this, before decoding them. The
            decoded image takes 3 bytes a pixel, so this bounds the memory
            one request can claim.
        transform: the `keras_resnext.transforms.EvalTransform` (or its
            dict) to serve with; default the model's
            (`keras_resnext.transforms.model_eval_transform`).
        dtype: "float32" or "bfloat16", the dtype the serving graph computes
            in; default "bfloat16" for a model whose dtype policy computes in
            bfloat16 (`mixed_bfloat16`), else "float32". Inputs and outputs
            are float32 either way.

    The version is written to a temporary folder in `base_dir` and renamed
    into place, so TF Serving never sees half a model. Returns the path.
    """
    if not getattr(model, "include_top", True):
        raise ValueError("Export needs a classifier: build the model with include_top=True.")
    dtype = serving_dtype(model, dtype)
    num_classes = int(model.outputs[0].shape[-1])
    class_names = list(class_names) if class_names is not None else default_class_names(num_classes)
    if len(class_names) != num_classes:
        raise ValueError(
            f"The model has {num_classes} classes but {len(class_names)} class names were given."
        )
    transform = resolve_eval_transform(transform, model if transform is None else None,
                                       image_size=image_size, resize_size=resize_size or None)
    max_pixels = int(max_pixels)
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1; got {max_pixels}.")
    top_k = min(int(top_k), num_classes)
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1; got {top_k}.")

    version = next_version(base_dir) if version is None else int(version)
    if version < 1:
        raise ValueError(f"TF Serving versions are positive integers; got {version}.")
    final_path = os.path.join(base_dir, str(version))
    if os.path.exists(final_path):
        raise FileExistsError(f"SavedModel version {final_path} already exists.")
    os.makedirs(base_dir, exist_ok=True)

    module = ServingModule(_serving_copy(model, dtype), class_names, transform, top_k,
                           outputs_probabilities=outputs_probabilities(model),
                           max_pixels=max_pixels, dtype=dtype)
    signatures = {
        SERVING_SIGNATURE: module.serve_image_bytes.get_concrete_function(),
        PREPROCESSED_SIGNATURE: module.serve_images.get_concrete_function(),
        METADATA_SIGNATURE: module.describe.get_concrete_function(),
    }
    temporary = os.path.join(base_dir, f".tmp-{version}-{os.getpid()}")
    try:
        tf.saved_model.save(
            module, temporary, signatures=signatures,
            # Keras' custom gradients are for training; a serving graph without
            # them loads in TF Serving builds that lack their ops.
            options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
        )
        os.rename(temporary, final_path)
    finally:
        if os.path.exists(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
    return final_path


def serving_dtype(model, dtype=None):
    """The dtype `export_saved_model` serves `model` in: `dtype`, checked,
    or, when None, bfloat16 for a model that computes in it, else float32
    (a float16 model is served in float32, as before this option)."""
    if dtype is None:
        compute_dtype = getattr(getattr(model, "dtype_policy", None), "compute_dtype", None)
        return "bfloat16" if compute_dtype == "bfloat16" else "float32"
    if dtype not in SERVING_DTYPE_POLICIES:
        raise ValueError(f"export_saved_model's dtype must be one of "
                         f"{', '.join(map(repr, SERVING_DTYPE_POLICIES))}; got {dtype!r}.")
    return dtype


def _serving_copy(model, dtype):
    """A copy of `model` computing in `dtype` (float32 variables either way),
    outside any distribution strategy, so the SavedModel holds plain variables
    and runs anywhere."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(SERVING_DTYPE_POLICIES[dtype])
    try:
        copy = model.__class__.from_config(model.get_config())
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights(model.get_weights())
    if dtype != "float32":
        _classifier_in_float32(copy)
    return copy


def _classifier_in_float32(model):
    """The classifier (and its softmax) of a reduced-precision copy computes in
    float32, as Keras' mixed-precision guide has it: a bfloat16 softmax keeps
    three significant digits of each probability."""
    try:
        classifier = model.get_layer(CLASSIFIER_LAYER)
    except ValueError:  # another head: it keeps the model's policy
        return
    classifier.dtype_policy = keras.DTypePolicy("float32")


class ServingModule(tf.Module):
    """The exported object: the model, its eval transform and class names."""

    def __init__(self, model, class_names, transform, top_k,
                 outputs_probabilities, max_pixels=DEFAULT_MAX_PIXELS, dtype="float32"):
        super().__init__(name="keras_resnext_serving")
        self.model = model
        self.top_k = top_k
        self.outputs_probabilities = outputs_probabilities
        self.eval_image_size = tf.Variable(transform.image_size, trainable=False,
                                           name="eval_image_size")
        self.eval_resize_size = tf.Variable(transform.resize_size, trainable=False,
                                            name="eval_resize_size")
        self.eval_interpolation = tf.Variable(transform.interpolation, trainable=False,
                                              name="eval_interpolation")
        self.eval_mean = tf.Variable(transform.mean, dtype=tf.float32, trainable=False,
                                     name="eval_mean")
        self.eval_std = tf.Variable(transform.std, dtype=tf.float32, trainable=False,
                                    name="eval_std")
        self.eval_transform = tf.Variable(json.dumps(transform.get_config()), trainable=False,
                                          name="eval_transform")
        self.preprocessing = tf.Variable(PREPROCESSING_NAME, trainable=False,
                                         name="preprocessing")
        self.max_pixels = tf.Variable(max_pixels, dtype=tf.int64, trainable=False,
                                      name="max_pixels")
        self.class_names = tf.Variable(class_names, dtype=tf.string, trainable=False,
                                       name="class_names")
        self.dtype = tf.Variable(dtype, dtype=tf.string, trainable=False, name="dtype")
        self._transform = transform
        self._image_size = transform.image_size
        self._max_pixels = max_pixels
        self.serve_image_bytes = tf.function(
            self._serve_image_bytes,
            input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
        )
        # Loaded signatures do not check the shapes of their inputs (a
        # [N, 40, 40, 3] batch runs through a [None, 32, 32, 3] signature
        # and gives wrong classes), and a static shape lets the graph fold
        # our own check away; so the spatial size is checked in the graph.
        self.serve_images = tf.function(
            self._serve_images,
            input_signature=[tf.TensorSpec([None, None, None, None], tf.float32,
                                           name="images")],
        )
        self.describe = tf.function(self._describe, input_signature=[])

    def _serve_image_bytes(self, image_bytes):
        count = _assert_not_empty(image_bytes, "image_bytes")
        format_names, heights, widths = tf.map_fn(
            read_image_header, image_bytes,
            fn_output_signature=(tf.string, tf.int64, tf.int64),
        )
        problems = header_problem(format_names, heights, widths, self._max_pixels)
        decodable = tf.where(tf.equal(problems, ""))[:, 0]
        decoded, images = self._decode_each(tf.gather(image_bytes, decodable), decodable)
        problems = tf.tensor_scatter_nd_update(
            problems, decodable[:, None],
            tf.strings.join(["the ", tf.gather(format_names, decodable),
                             " data could not be decoded (corrupt, truncated or unsupported)"]))
        problems = tf.tensor_scatter_nd_update(
            problems, decoded[:, None], tf.fill(tf.shape(decoded), ""))
        # The model's graph fails on a batch of 0 images (with oneDNN on Zen 4).
        outputs = tf.cond(tf.size(decoded) > 0, lambda: self._classify(images),
                          self._no_classes)
        return _scatter_rows(outputs, decoded, count, problems)

    def _decode_each(self, image_bytes, indices):
        """`(indices, images)` of the images the decoder accepted.

        A decoder error inside `tf.map_fn` would fail the whole batch; a
        dataset with `ignore_errors` drops just that image. One image at a
        time, so one full-size decoded image is held at once.
        """
        image_size = self._image_size
        dataset = tf.data.Dataset.from_tensor_slices((indices, image_bytes)).map(
            lambda index, one: (index, preprocess_for_eval(one, transform=self._transform)),
        ).ignore_errors()
        nothing = tf.data.Dataset.from_tensors(
            (tf.zeros([0], tf.int64), tf.zeros([0, image_size, image_size, 3], tf.float32)))
        # batch() yields nothing when every image failed; then the empty batch.
        batches = dataset.batch(tf.maximum(tf.size(indices, out_type=tf.int64), 1))
        return batches.concatenate(nothing).take(1).get_single_element()

    def _serve_images(self, images):
        count = _assert_not_empty(images, "images")
        size = self._image_size
        shape = tf.shape(images)
        # Padded, so that a lower rank fails this check rather than the comparison
        # (a higher one fails ensure_shape below).
        spatial = tf.concat([shape, [0, 0, 0]], axis=0)[1:4]
        checked = tf.debugging.Assert(
            tf.equal(tf.size(shape), 4) & tf.reduce_all(tf.equal(spatial, [size, size, 3])),
            [f"serving_preprocessed takes float32 images of shape [N, {size}, {size}, 3] "
             "(see the metadata signature); got shape", shape], summarize=5,
        )
        with tf.control_dependencies([checked]):
            images = tf.ensure_shape(tf.identity(images), [None, size, size, 3])
        return _scatter_rows(self._classify(images), tf.range(count, dtype=tf.int64), count,
                             tf.fill([count], ""))

    def _classify(self, images):
        scores = tf.cast(self.model(images, training=False), tf.float32)
        probabilities = scores if self.outputs_probabilities else tf.nn.softmax(scores)
        top = tf.math.top_k(probabilities, k=self.top_k)
        return {
            "probabilities": probabilities,
            "classes": top.indices,
            "scores": top.values,
            "class_names": tf.gather(self.class_names, top.indices),
        }

    def _no_classes(self):
        num_classes = int(self.class_names.shape[0])
        return {
            "probabilities": tf.zeros([0, num_classes], tf.float32),
            "classes": tf.zeros([0, self.top_k], tf.int32),
            "scores": tf.zeros([0, self.top_k], tf.float32),
            "class_names": tf.zeros([0, self.top_k], tf.string),
        }

    def _describe(self):
        return {
            "image_size": tf.identity(self.eval_image_size),
            "resize_size": tf.identity(self.eval_resize_size),
            "interpolation": tf.identity(self.eval_interpolation),
            "mean": tf.identity(self.eval_mean),
            "std": tf.identity(self.eval_std),
            "eval_transform": tf.identity(self.eval_transform),
            "preprocessing": tf.identity(self.preprocessing),
            "max_pixels": tf.identity(self.max_pixels),
            "class_names": tf.identity(self.class_names),
            "dtype": tf.identity(self.dtype),
        }


def _assert_not_empty(batch, name):
    """The batch size, after failing clearly when it is 0."""
    count = tf.shape(batch, out_type=tf.int64)[0]
    checked = tf.debugging.Assert(
        count > 0, [f"{name} is an empty batch: send at least one image"])
    with tf.control_dependencies([checked]):
        return tf.identity(count)


def _scatter_rows(outputs, rows, count, problems):
    """`outputs` of the images at `rows` placed in a batch of `count`.

    Images without a row keep the failure values: zero probabilities and
    scores, class -1, class name "", `valid` false and their `problems`
    line, prefixed with their index in the batch.
    """
    fillers = {"probabilities": 0.0, "classes": -1, "scores": 0.0, "class_names": ""}
    placed = {}
    for key, values in outputs.items():
        shape = tf.concat([[count], tf.shape(values, out_type=tf.int64)[1:]], axis=0)
        empty = tf.fill(shape, tf.constant(fillers[key], values.dtype))
        placed[key] = tf.tensor_scatter_nd_update(empty, rows[:, None], values)
    placed["valid"] = tf.equal(problems, "")
    prefix = tf.strings.join(["image ", tf.strings.as_string(tf.range(count)), ": "])
    placed["error"] = tf.where(placed["valid"], "", tf.strings.join([prefix, problems]))
    return placed
