"""`export_saved_model(..., dtype="bfloat16")`: a bfloat16 serving graph with
float32 images in and float32 probabilities out, served by a bare TensorFlow
with oneDNN on and off (TensorFlow's own grouped convolution takes bfloat16
either way; the AVX2 op is float32 only)."""


import numpy as np
import pytest

import keras_resnext as kr
from conftest import dtype_policy, pretrained_like_batch_norms
from test_portable_graphs import _result

tf = pytest.importorskip("tensorflow")
export = pytest.importorskip("keras_resnext.export")

# A bare TensorFlow, as TF Serving runs it: keras_resnext is never imported.
SERVE = r"""
import json, sys
import numpy as np
import tensorflow as tf
from tensorflow.python.util import _pywrap_util_port

directory, images_path = sys.argv[1:]
loaded = tf.saved_model.load(directory)
served = loaded.signatures["serving_preprocessed"](images=tf.constant(np.load(images_path)))
graph = loaded.signatures["serving_preprocessed"].graph.as_graph_def()
ops = [node for function in graph.library.function for node in function.node_def]
print("RESULT", json.dumps({
    "onednn": bool(_pywrap_util_port.IsMklEnabled()),
    "probabilities_dtype": served["probabilities"].dtype.name,
    "probabilities": served["probabilities"].numpy().tolist(),
    "dtype": loaded.signatures["metadata"]()["dtype"].numpy().decode(),
    "bfloat16_grouped_convs": sum(node.op == "Conv2D" and node.attr["T"].type == tf.bfloat16
                                  for node in ops),
    "batch_norms": sum(node.op.startswith("FusedBatchNorm") for node in ops),
}))
"""


def _model():
    model = kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3, input_shape=(16, 16, 3))
    return pretrained_like_batch_norms(model, affine=False)


@pytest.fixture
def images_path(tmp_path):
    path = str(tmp_path / "images.npy")
    np.save(path, np.random.default_rng(1).normal(0, 1, (4, 16, 16, 3)).astype("float32"))
    return path


def _served(python_subprocess, export_dir, images_path, onednn):
    served = _result(python_subprocess(SERVE, env={"TF_ENABLE_ONEDNN_OPTS": onednn},
                                       args=[export_dir, images_path]))
    assert served["onednn"] == (onednn == "1"), served
    return served


@pytest.mark.slow
@pytest.mark.parametrize("onednn", ["0", "1"])
def test_bfloat16_export_serves_float32_probabilities_within_1e2_of_float32(
        python_subprocess, tmp_path, images_path, onednn):
    model = _model()
    export_dir = kr.export_saved_model(model, str(tmp_path / "bf16"), dtype="bfloat16")
    served = _served(python_subprocess, export_dir, images_path, onednn)
    assert served["dtype"] == "bfloat16"
    assert served["probabilities_dtype"] == "float32"
    assert served["bfloat16_grouped_convs"] > 0, served
    # Folded into the convolutions (kernel x scale, BiasAdd): see tf_ops.fold_into_conv.
    assert served["batch_norms"] == 0, served
    expected = model.predict_on_batch(np.load(images_path))
    difference = np.max(np.abs(np.array(served["probabilities"]) - expected))
    assert 0 < difference < 1e-2, difference  # bfloat16 does differ, a little


def test_a_mixed_bfloat16_model_exports_bfloat16_and_float32_stays_the_default(
        python_subprocess, tmp_path, images_path):
    float32_model = _model()
    with dtype_policy("mixed_bfloat16"):
        mixed_model = _model()
    mixed_model.set_weights(float32_model.get_weights())
    assert export.serving_dtype(mixed_model) == "bfloat16"
    assert export.serving_dtype(float32_model) == "float32"
    assert export.serving_dtype(mixed_model, "float32") == "float32"
    mixed_dir = kr.export_saved_model(mixed_model, str(tmp_path / "mixed"))
    assert tf.saved_model.load(mixed_dir).signatures["metadata"]()["dtype"] == b"bfloat16"
    float32_dir = kr.export_saved_model(float32_model, str(tmp_path / "fp32"))
    served = _served(python_subprocess, float32_dir, images_path, "0")
    assert (served["dtype"], served["bfloat16_grouped_convs"]) == ("float32", 0)
    expected = float32_model.predict_on_batch(np.load(images_path))
    np.testing.assert_allclose(served["probabilities"], expected, atol=1e-5)


def test_an_unsupported_dtype_fails_in_one_line_before_writing(tmp_path):
    with pytest.raises(ValueError) as error:
        kr.export_saved_model(_model(), str(tmp_path / "fp16"), dtype="float16")
    assert str(error.value) == ("export_saved_model's dtype must be one of 'float32', "
                                "'bfloat16'; got 'float16'.")
    assert not (tmp_path / "fp16").exists()
