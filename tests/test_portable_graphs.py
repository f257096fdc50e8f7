"""Every graph the package makes runs with oneDNN on and off, with and without
the AVX2 op.

Without oneDNN, grappler fuses a grouped Conv2D with the inference batch norm
and ReLU after it into `_FusedConv2D`, whose kernel refuses groups: an
exported model then failed on every request, and so did `model.predict`
without the AVX2 op. Each configuration runs in a fresh process, since
TensorFlow reads the oneDNN switch once, when it loads.
"""

import json
import os

import numpy as np
import pytest

import keras_resnext as kr
from conftest import pretrained_like_batch_norms
from keras_resnext.kernels import avx2

tf = pytest.importorskip("tensorflow")

CONFIGURATIONS = [(onednn, native) for onednn in ("0", "1") for native in ("0", avx2.ALWAYS)]

# Runs in a process of its own with one oneDNN / AVX2-op configuration: every
# way the package's graphs are built, each compared with eager inference.
PACKAGE_GRAPHS = r"""
import json, sys
import numpy as np
import keras_resnext as kr
import keras
import tensorflow as tf
from tensorflow.python.util import _pywrap_util_port
from keras_resnext.kernels import avx2

model_path, images_path, export_dir, keras_export_dir = sys.argv[1:5]
model = keras.saving.load_model(model_path)
x = np.load(images_path)
expected = model(x, training=False).numpy()
labels = np.array([0, 1, 2, 0])
result = {"onednn": bool(_pywrap_util_port.IsMklEnabled()),
          "native": avx2.grouped_conv_op() is not None}

def agree(name, got):
    result[name] = float(np.max(np.abs(np.asarray(got) - expected)))

agree("predict", model.predict(x, verbose=0))
agree("predict_on_batch", model.predict_on_batch(x))
agree("tf_function", tf.function(lambda images: model(images, training=False))(x))
model.compile(loss="sparse_categorical_crossentropy")
result["evaluate_finite"] = bool(np.isfinite(model.evaluate(x, labels, verbose=0)))

kr.export_saved_model(model, export_dir, version=1)
model.export(keras_export_dir, format="tf_saved_model", verbose=False)
keras_exported = tf.saved_model.load(keras_export_dir)
agree("keras_export", keras_exported.serve(x))
# A user's own training step, last: training mode moves the BN statistics.
# Eager calls run the AVX2 op, tf.functions TensorFlow's kernel: they round
# differently, and a ReLU input within that of 0 may fall on different sides
# of the kink, which moves gradients ~1% (see test_native_conv). Gradients
# are compared where the ReLU masks agree; the ReLU inputs always.
relus = [layer for layer in model.layers if isinstance(layer, keras.layers.ReLU)]
probe = keras.Model(model.inputs, [model.outputs[0]] + [layer.input for layer in relus])

def loss_and_gradients(images):
    with tf.GradientTape() as tape:
        probabilities, *relu_inputs = probe(images, training=True)
        loss = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
    return tape.gradient(loss, model.trainable_variables), relu_inputs

eager_gradients, eager_relus = loss_and_gradients(tf.constant(x))
graph_gradients, graph_relus = tf.function(loss_and_gradients)(tf.constant(x))
result["relu_inputs"] = max(float(np.max(np.abs(a - b))) for a, b in zip(eager_relus, graph_relus))
result["relu_masks_agree"] = all(np.array_equal(a.numpy() > 0, b.numpy() > 0)
                                 for a, b in zip(eager_relus, graph_relus))
result["gradients"] = max(float(np.max(np.abs(a - b)))
                          for a, b in zip(eager_gradients, graph_gradients))

print("RESULT", json.dumps(result))
"""

# A bare TensorFlow, as TF Serving runs it: keras_resnext is never imported.
SERVE = r"""
import json, sys
import numpy as np
import tensorflow as tf
from tensorflow.python.util import _pywrap_util_port

images_path, image_bytes_path, *export_dirs = sys.argv[1:]
images = tf.constant(np.load(images_path))
image_bytes = tf.constant(np.load(image_bytes_path, allow_pickle=False))
result = {"onednn": bool(_pywrap_util_port.IsMklEnabled()), "models": []}
for directory in export_dirs:
    loaded = tf.saved_model.load(directory)
    preprocessed = loaded.signatures["serving_preprocessed"](images=images)
    served = loaded.signatures["serving_default"](image_bytes=image_bytes)
    result["models"].append({
        "preprocessed": preprocessed["probabilities"].numpy().tolist(),
        "image_bytes": served["probabilities"].numpy().tolist(),
    })
print("RESULT", json.dumps(result))
"""


def _result(completed):
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert line, completed.stdout[-2000:]
    return json.loads(line[-1][len("RESULT "):])


def _model():
    # Groups of 2, 4 and 8 channels: the AVX2 op takes the last two only, so
    # with it on, both kinds of grouped convolution meet grappler.
    model = kr.ResNeXt29(depth=11, cardinality=4, width=2, classes=3,
                         input_shape=(16, 16, 3))
    return pretrained_like_batch_norms(model, affine=False)


def _png_bytes(count, size=16):
    rng = np.random.default_rng(1)
    return np.array([
        tf.io.encode_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).numpy()
        for _ in range(count)
    ], dtype=object)


@pytest.mark.slow
def test_every_graph_runs_with_onednn_on_and_off_with_and_without_the_avx2_op(
        python_subprocess, tmp_path):
    model = _model()
    model_path = str(tmp_path / "model.keras")
    model.save(model_path)
    x = np.random.default_rng(2).normal(0, 1, (4, 16, 16, 3)).astype("float32")
    images_path = str(tmp_path / "images.npy")
    np.save(images_path, x)
    encoded = _png_bytes(3)
    image_bytes_path = str(tmp_path / "image_bytes.npy")
    np.save(image_bytes_path, encoded.astype(bytes))

    export_dirs = []
    gradients_compared = 0
    for onednn, native in CONFIGURATIONS:
        name = f"onednn{onednn}_native{native}"
        export_dir, keras_export_dir = str(tmp_path / name), str(tmp_path / f"{name}_keras")
        result = _result(python_subprocess(
            PACKAGE_GRAPHS,
            env={"TF_ENABLE_ONEDNN_OPTS": onednn, "KERAS_RESNEXT_NATIVE_KERNELS": native,
                 "KERAS_BACKEND": "tensorflow"},
            args=[model_path, images_path, export_dir, keras_export_dir],
        ))
        assert result["onednn"] == (onednn == "1"), result
        if native == "0":
            assert not result["native"], result
        for graph in ("predict", "predict_on_batch", "tf_function", "keras_export"):
            assert result[graph] < 1e-5, (name, graph, result)
        assert result["evaluate_finite"], result
        assert result["relu_inputs"] < 1e-4, (name, result)
        if result["relu_masks_agree"]:
            assert result["gradients"] < 1e-4, (name, result)
            gradients_compared += 1
        export_dirs.append(os.path.join(export_dir, "1"))
    # A flip comes with ~1% of random models, per configuration with the op.
    assert gradients_compared >= 3, f"ReLU masks differed in {4 - gradients_compared} of 4"

    expected_preprocessed = model.predict_on_batch(x)
    export = pytest.importorskip("keras_resnext.export")
    expected_image_bytes = np.stack([
        kr.preprocess_for_eval(image, 16, 16) for image in encoded
    ])
    expected_image_bytes = model.predict_on_batch(expected_image_bytes)
    assert export.SERVING_SIGNATURE == "serving_default"
    for onednn in ("0", "1"):
        served = _result(python_subprocess(
            SERVE, env={"TF_ENABLE_ONEDNN_OPTS": onednn},
            args=[images_path, image_bytes_path, *export_dirs],
        ))
        assert served["onednn"] == (onednn == "1"), served
        for exported in served["models"]:
            np.testing.assert_allclose(exported["preprocessed"], expected_preprocessed,
                                       atol=1e-5)
            np.testing.assert_allclose(exported["image_bytes"], expected_image_bytes,
                                       atol=1e-5)
