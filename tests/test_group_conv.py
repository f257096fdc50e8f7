"""`GroupConv2D`: Conv2D(groups) semantics, native TF kernel, no XLA anywhere."""

import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_resnext as kr
from conftest import dtype_policy
from keras_resnext.kernels import tf_ops


def block_diagonal(kernel, groups):
    """The dense [kh, kw, in, out] kernel equal to a grouped one."""
    kh, kw, in_per_group, out = kernel.shape
    out_per_group = out // groups
    dense = np.zeros((kh, kw, in_per_group * groups, out), kernel.dtype)
    for g in range(groups):
        dense[:, :, g * in_per_group:(g + 1) * in_per_group,
              g * out_per_group:(g + 1) * out_per_group] = \
            kernel[:, :, :, g * out_per_group:(g + 1) * out_per_group]
    return dense


def grouped_block(dense_gradient, groups, in_per_group):
    """The grouped-kernel slices of a dense kernel's gradient."""
    out = dense_gradient.shape[-1]
    out_per_group = out // groups
    return np.concatenate([
        dense_gradient[:, :, g * in_per_group:(g + 1) * in_per_group,
                       g * out_per_group:(g + 1) * out_per_group]
        for g in range(groups)
    ], axis=-1)


CASES = [
    dict(groups=4, filters=8, kernel_size=3, strides=1, padding="valid"),
    dict(groups=4, filters=16, kernel_size=3, strides=2, padding="valid"),
    dict(groups=2, filters=6, kernel_size=3, strides=1, padding="same"),
    dict(groups=8, filters=8, kernel_size=1, strides=2, padding="same"),
]


def forward_and_gradients(conv_fn, x, kernel, upstream):
    x = tf.constant(x)
    kernel = tf.Variable(kernel)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = conv_fn(x, kernel)
        loss = tf.reduce_sum(y * upstream)
    dx, dkernel = tape.gradient(loss, [x, kernel])
    return y.numpy(), dx.numpy(), dkernel.numpy()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "g{groups}_k{kernel_size}_s{strides}_{padding}".format(**c))
@pytest.mark.parametrize("path", ["layer", "split_gradient"])
def test_matches_block_diagonal_dense_conv(case, path):
    rng = np.random.default_rng(0)
    in_channels = 8
    x = rng.normal(size=(2, 9, 9, in_channels)).astype("float32")
    layer = kr.layers.GroupConv2D(
        case["filters"], case["kernel_size"], strides=case["strides"],
        padding=case["padding"], groups=case["groups"], use_bias=False,
    )
    layer.build(x.shape)
    kernel = rng.normal(size=layer.kernel.shape).astype("float32")
    dense = keras.layers.Conv2D(case["filters"], case["kernel_size"], strides=case["strides"],
                                padding=case["padding"], use_bias=False)
    dense.build(x.shape)
    y_shape = dense.compute_output_shape(x.shape)
    upstream = rng.normal(size=y_shape).astype("float32")

    if path == "layer":
        xt = tf.constant(x)
        layer.kernel.assign(kernel)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt)
            loss = tf.reduce_sum(y * upstream)
        dx, dkernel = tape.gradient(loss, [xt, layer.kernel.value])
        y, dx, dkernel = y.numpy(), dx.numpy(), dkernel.numpy()
    else:
        def conv(x, k):
            return tf_ops._grouped_conv2d_with_split_gradient(
                x, tf.convert_to_tensor(k), [case["strides"]] * 2,
                case["padding"].upper(), [1, 1])
        y, dx, dkernel = forward_and_gradients(conv, x, kernel, upstream)

    def reference(x, k):
        return tf.nn.conv2d(x, k, case["strides"], case["padding"].upper())
    y_ref, dx_ref, dk_ref = forward_and_gradients(
        reference, x, block_diagonal(kernel, case["groups"]), upstream)

    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        dkernel, grouped_block(dk_ref, case["groups"], in_channels // case["groups"]),
        rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_half_precision_trains_on_cpu(policy):
    # oneDNN has no half-precision grouped backward: the split gradient covers it.
    with dtype_policy(policy):
        model = kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3,
                             input_shape=(16, 16, 3))
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 1, (6, 16, 16, 3)).astype("float32")
    kernel = model.get_layer("conv2_block1_2_conv").kernel
    before = kernel.numpy().copy()
    losses = [float(model.train_on_batch(x, np.array([0, 1, 2, 0, 1, 2]))) for _ in range(3)]
    assert np.all(np.isfinite(losses))
    assert not np.allclose(before, kernel.numpy())


def test_is_a_conv2d_with_its_config_and_weights():
    layer = kr.layers.GroupConv2D(32, 3, groups=8, use_bias=False, name="g")
    assert isinstance(layer, keras.layers.Conv2D)
    layer.build((None, 8, 8, 16))
    assert tuple(layer.kernel.shape) == (3, 3, 2, 32)
    plain = keras.layers.Conv2D(32, 3, groups=8, use_bias=False, name="g")
    assert layer.get_config() == plain.get_config()
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is kr.layers.GroupConv2D and clone.groups == 8


def test_runs_without_xla_in_graph_mode():
    layer = kr.layers.GroupConv2D(8, 3, groups=4, use_bias=False)

    @tf.function
    def call(x):
        return layer(x)

    graph = call.get_concrete_function(tf.TensorSpec([1, 8, 8, 8])).graph.as_graph_def()
    functions = list(graph.library.function)
    assert not any("_XlaMustCompile" in f.attr for f in functions)
    ops = {node.op for node in graph.node} | {n.op for f in functions for n in f.node_def}
    assert "Conv2D" in ops


def saved_model_has_xla_must_compile(model, path):
    model.export(path, format="tf_saved_model", verbose=False)
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        return b"_XlaMustCompile" in f.read()


def test_exported_saved_model_has_no_xla_function(tmp_path):
    ours = kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3, input_shape=(16, 16, 3))
    assert not saved_model_has_xla_must_compile(ours, str(tmp_path / "ours"))
    # The same graph with Keras' own grouped Conv2D carries the XLA function,
    # so the check above can fail.
    inputs = keras.Input((16, 16, 8))
    keras_grouped = keras.Model(inputs, keras.layers.Conv2D(8, 3, groups=4)(inputs))
    assert saved_model_has_xla_must_compile(keras_grouped, str(tmp_path / "keras"))


TRAIN_AFTER_TENSORFLOW = r"""
import os, sys
{first_import}
import numpy as np
import keras_resnext as kr
import keras
from keras_resnext.kernels import tf_ops
import tensorflow as tf
from tensorflow.python.util import _pywrap_util_port
print("env", os.environ.get("TF_ENABLE_ONEDNN_OPTS"), "onednn", _pywrap_util_port.IsMklEnabled(),
      "native", tf_ops.native_grouped_gradient_available())
model = kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3, input_shape=(16, 16, 3))
model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
rng = np.random.default_rng(0)
x = rng.uniform(0, 1, (6, 16, 16, 3)).astype("float32")
y = np.array([0, 1, 2, 0, 1, 2])
before = model.get_layer("conv2_block1_2_conv").kernel.numpy().copy()
losses = [float(model.train_on_batch(x, y)) for _ in range(5)]
after = model.get_layer("conv2_block1_2_conv").kernel.numpy()
assert np.all(np.isfinite(losses)), losses
assert not np.allclose(before, after), "grouped kernel did not train"
assert losses[-1] < losses[0], losses
path = sys.argv[1] if len(sys.argv) > 1 else {export_dir!r}
model.export(path, format="tf_saved_model", verbose=False)
with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    assert b"_XlaMustCompile" not in f.read()
print("trained", losses[0], losses[-1])
"""


@pytest.mark.slow
@pytest.mark.parametrize("first_import, env, onednn", [
    # TensorFlow loaded first makes its own choice for this CPU (off on AVX2-only
    # x86 such as AMD Zen 3, on with AVX-512); the package must leave it alone.
    ("import tensorflow", {"TF_ENABLE_ONEDNN_OPTS": None}, None),
    ("import keras", {"TF_ENABLE_ONEDNN_OPTS": None, "KERAS_BACKEND": "tensorflow"}, None),
    # What TensorFlow chooses on AVX2-only CPUs, forced, so every CPU tests it.
    ("import tensorflow", {"TF_ENABLE_ONEDNN_OPTS": "0"}, False),
    ("", {"TF_ENABLE_ONEDNN_OPTS": "0"}, False),
    # And a CPU without AVX2: no AVX2 op either.
    ("import tensorflow", {"TF_ENABLE_ONEDNN_OPTS": "0", "KERAS_RESNEXT_NATIVE_KERNELS": "0"},
     False),
], ids=["tensorflow_first", "keras_first", "tensorflow_first_onednn_off",
        "onednn_disabled_by_user", "onednn_off_no_avx2_op"])
def test_trains_on_cpu_with_tensorflows_onednn_choice(python_subprocess, tmp_path, first_import,
                                                      env, onednn):
    code = TRAIN_AFTER_TENSORFLOW.format(first_import=first_import,
                                         export_dir=str(tmp_path / "export"))
    result = python_subprocess(code, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    reported = re.search(r"env (\S+) onednn (\w+) native (\w+)", result.stdout)
    assert reported, result.stdout[-2000:]
    variable, enabled, native_gradient = reported.groups()
    if first_import:
        assert variable == str(env["TF_ENABLE_ONEDNN_OPTS"]), "the package changed TF's choice"
    if onednn is not None:
        assert enabled == str(onednn)
    # TensorFlow differentiates grouped convs natively exactly where oneDNN is on.
    assert native_gradient == enabled
    assert "trained" in result.stdout


@pytest.mark.slow
def test_import_sets_onednn_when_tensorflow_is_not_loaded(python_subprocess):
    code = (
        "import os, keras_resnext\n"
        "print('env', os.environ.get('TF_ENABLE_ONEDNN_OPTS'))\n"
        "from tensorflow.python.util import _pywrap_util_port\n"
        "print('onednn', _pywrap_util_port.IsMklEnabled())\n"
    )
    result = python_subprocess(code, env={"TF_ENABLE_ONEDNN_OPTS": None})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "onednn True" in result.stdout
