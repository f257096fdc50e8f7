"""`kr.layers.BatchNormalization`: Keras' BN semantics on TF's fused kernel."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_resnext as kr


def pair(seed=0, channels=6):
    rng = np.random.default_rng(seed)
    weights = [rng.uniform(0.5, 1.5, channels), rng.normal(0, 1, channels),
               rng.normal(0, 1, channels), rng.uniform(0.5, 2, channels)]
    ours = kr.layers.BatchNormalization(epsilon=1e-5, momentum=0.9)
    theirs = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9)
    for layer in (ours, theirs):
        layer.build((None, 5, 5, channels))
        layer.set_weights(weights)
    x = rng.normal(2, 3, (4, 5, 5, channels)).astype("float32")
    return ours, theirs, x


def test_inference_equals_keras():
    ours, theirs, x = pair()
    np.testing.assert_allclose(ours(x, training=False), theirs(x, training=False),
                               rtol=1e-5, atol=1e-5)


def test_training_normalises_with_batch_statistics_and_tracks_unbiased_variance():
    ours, theirs, x = pair(1)
    moving_mean, moving_variance = ours.moving_mean.numpy(), ours.moving_variance.numpy()
    np.testing.assert_allclose(ours(x, training=True), theirs(x, training=True),
                               rtol=1e-4, atol=1e-4)
    n = x.shape[0] * x.shape[1] * x.shape[2]
    batch_mean = x.mean(axis=(0, 1, 2))
    unbiased = x.var(axis=(0, 1, 2)) * n / (n - 1)  # as PyTorch's running_var
    np.testing.assert_allclose(ours.moving_mean.numpy(),
                               0.9 * moving_mean + 0.1 * batch_mean, rtol=1e-5)
    np.testing.assert_allclose(ours.moving_variance.numpy(),
                               0.9 * moving_variance + 0.1 * unbiased, rtol=1e-5)


def test_gradients_equal_keras():
    ours, theirs, x = pair(2)
    upstream = np.random.default_rng(3).normal(size=x.shape).astype("float32")
    grads = []
    for layer in (ours, theirs):
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = tf.reduce_sum(layer(xt, training=True) * upstream)
        grads.append(tape.gradient(loss, [xt, layer.gamma.value, layer.beta.value]))
    for g_ours, g_theirs in zip(*grads):
        np.testing.assert_allclose(g_ours, g_theirs, rtol=1e-4, atol=1e-4)


def test_frozen_layer_uses_moving_statistics():
    ours, theirs, x = pair(4)
    ours.trainable = False
    before = ours.moving_mean.numpy().copy()
    np.testing.assert_allclose(ours(x, training=True), theirs(x, training=False),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ours.moving_mean.numpy(), before)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision(policy):
    layer = kr.layers.BatchNormalization(dtype=policy)
    x = tf.random.normal([2, 4, 4, 3], dtype=layer.compute_dtype)
    y = layer(x, training=True)
    assert y.dtype == layer.compute_dtype and layer.moving_mean.dtype == "float32"


def test_config_is_keras_config():
    ours = kr.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="bn")
    theirs = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="bn")
    assert ours.get_config() == theirs.get_config()
    assert isinstance(ours, keras.layers.BatchNormalization)


def test_inference_graph_uses_the_fused_kernel():
    # What lets grappler fold conv + BN + ReLU into one oneDNN op at inference.
    model = kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3, input_shape=(16, 16, 3))
    function = tf.function(lambda x: model(x, training=False))
    graph = function.get_concrete_function(tf.TensorSpec([1, 16, 16, 3])).graph
    ops = {node.op for node in graph.as_graph_def().node}
    assert "FusedBatchNormV3" in ops
