"""Issue 13's regularisers as model options: stochastic depth (`drop_path_rate`,
timm's linear rule) and `zero_init_last` (torchvision's `zero_init_residual`)."""

import numpy as np
import pytest

import keras
import keras_resnext as kr
from keras_resnext.layers import DropPathAdd


def small_cifar(**options):
    return kr.ResNeXt29(depth=11, cardinality=2, width=4, classes=3, input_shape=(16, 16, 3),
                        **options)


def images(count=2, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (count, 16, 16, 3)).astype("float32")


def test_drop_path_rates_rise_linearly_over_blocks_as_timm():
    # timm/models/resnet.py make_blocks: block i of N gets rate * i / (N - 1),
    # and block 0 (rate 0) has no drop path.
    model = small_cifar(drop_path_rate=0.3)
    rates = {layer.name: layer.rate for layer in model.layers if isinstance(layer, DropPathAdd)}
    assert rates == {"conv3_block1_add": 0.3 * 1 / 2, "conv4_block1_add": 0.3 * 2 / 2}
    deeper = kr.ResNeXt((2, 1, 1, 1), cardinality=2, width=4, include_top=False,
                        input_shape=(32, 32, 3), drop_path_rate=0.2)
    np.testing.assert_allclose(
        [layer.rate for layer in deeper.layers if isinstance(layer, DropPathAdd)],
        [0.2 * i / 4 for i in range(1, 5)])


def test_drop_path_is_the_identity_at_inference():
    plain = small_cifar()
    dropped = small_cifar(drop_path_rate=0.5)
    dropped.set_weights(plain.get_weights())
    x = images()
    np.testing.assert_array_equal(dropped.predict_on_batch(x), plain.predict_on_batch(x))
    np.testing.assert_array_equal(np.asarray(dropped(x, training=False)),
                                  np.asarray(plain(x, training=False)))


def test_drop_path_keeps_whole_examples_at_the_keep_rate_scaled_by_one_over_keep():
    rate, count = 0.25, 4000
    layer = DropPathAdd(rate, seed=1)
    shortcut = np.zeros((count, 2, 2, 3), "float32")
    branch = np.ones((count, 2, 2, 3), "float32")
    y = np.asarray(layer([shortcut, branch], training=True))
    per_example = y.reshape(count, -1)
    # Each example's branch is kept or dropped whole.
    assert np.all(per_example == per_example[:, :1])
    assert set(np.unique(per_example)) <= {0.0, np.float32(1 / (1 - rate))}
    kept = np.mean(per_example[:, 0] > 0)
    assert abs(kept - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / count)
    assert abs(per_example.mean() - 1.0) < 0.05  # the expected value is unchanged
    np.testing.assert_array_equal(np.asarray(layer([shortcut, branch], training=False)), branch)


def test_weights_saved_with_drop_path_load_into_a_model_without(tmp_path):
    # A .weights.h5 holds tensors by layer position: stochastic depth must not
    # reorder the layers, or training and inference models couldn't share files.
    trained = small_cifar(drop_path_rate=0.2, zero_init_last=True)
    trained.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    trained.train_on_batch(images(4), np.array([0, 1, 2, 0]))
    path = str(tmp_path / "trained.weights.h5")
    trained.save_weights(path)
    plain = small_cifar()
    plain.load_weights(path)
    for expected, loaded in zip(trained.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(loaded, expected)
    assert [layer.name for layer in plain.layers if layer.weights] == [
        layer.name for layer in trained.layers if layer.weights]


def residual_sums(model):
    """For every block: (shortcut, branch, block output) as a functional model's outputs."""
    outputs = {}
    for layer in model.layers:
        if layer.name.endswith("_add"):
            block = layer.name[:-len("_add")]
            shortcut, branch = layer.input
            outputs[block] = [shortcut, branch, model.get_layer(f"{block}_out").output]
    return keras.Model(model.inputs, outputs)


@pytest.mark.parametrize("block_form", ["a", "b", "c"])
def test_zero_init_last_makes_every_fresh_block_its_shortcut(block_form):
    model = small_cifar(zero_init_last=True, block_form=block_form)
    last = [layer for layer in model.layers if layer.name.endswith("_3_bn")]
    assert len(last) == 3 and all(not np.any(np.array(layer.gamma)) for layer in last)
    others = [layer for layer in model.layers
              if isinstance(layer, keras.layers.BatchNormalization) and layer not in last]
    assert all(np.all(np.array(layer.gamma) == 1) for layer in others)
    for block, (shortcut, branch, out) in residual_sums(model).predict_on_batch(images()).items():
        np.testing.assert_array_equal(branch, 0.0, err_msg=block)
        np.testing.assert_allclose(out, np.maximum(shortcut, 0.0), err_msg=block)


def test_without_zero_init_last_the_branches_start_nonzero():
    sums = residual_sums(small_cifar()).predict_on_batch(images())
    assert all(np.any(branch) for _, branch, _ in sums.values())


def test_regularisers_are_in_the_config_and_round_trip(tmp_path):
    model = small_cifar(drop_path_rate=0.1, zero_init_last=True)
    config = model.get_config()
    assert config["drop_path_rate"] == 0.1 and config["zero_init_last"] is True
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_config() == config
    np.testing.assert_array_equal(loaded.predict_on_batch(images()),
                                  model.predict_on_batch(images()))


def test_presets_take_every_model_option():
    options = dict(drop_path_rate=0.05, zero_init_last=True, freeze_batch_norm=True,
                   trainable_stages=2, replace_stride_with_dilation=[False, False, True])
    model = kr.build("resnext50_32x4d", include_top=False, input_shape=(32, 32, 3), **options)
    config = model.get_config()
    assert {key: config[key] for key in options} == options


@pytest.mark.parametrize("options, message", [
    (dict(drop_path_rate=1.0), r"`drop_path_rate` must be in \[0, 1\); got 1\.0\."),
    (dict(drop_path_rate=-0.1), r"`drop_path_rate` must be in \[0, 1\)"),
    (dict(zero_init_last="yes"), r"`zero_init_last` must be True or False; got 'yes'\."),
])
def test_regularisers_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        small_cifar(**options)


JAX_REGULARISERS = r"""
import json
import numpy as np, keras, keras_resnext as kr
from keras_resnext.layers import DropPathAdd
assert keras.backend.backend() == "jax"
results = {}
x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype("float32")
plain = kr.ResNeXt29(depth=11, cardinality=2, width=4, classes=3, input_shape=(16, 16, 3))
dropped = kr.ResNeXt29(depth=11, cardinality=2, width=4, classes=3, input_shape=(16, 16, 3),
                       drop_path_rate=0.5)
dropped.set_weights(plain.get_weights())
results["inference_identity"] = bool(np.array_equal(
    np.asarray(dropped.predict_on_batch(x)), np.asarray(plain.predict_on_batch(x))))
count, rate = 4000, 0.25
y = np.asarray(DropPathAdd(rate, seed=1)(
    [np.zeros((count, 2, 2, 3), "float32"), np.ones((count, 2, 2, 3), "float32")], training=True))
per_example = y.reshape(count, -1)
results["whole_examples"] = bool(np.all(per_example == per_example[:, :1]))
results["kept"] = float(np.mean(per_example[:, 0] > 0))
results["values"] = sorted(float(v) for v in np.unique(per_example))
model = kr.ResNeXt29(depth=11, cardinality=2, width=4, classes=3, input_shape=(16, 16, 3),
                     zero_init_last=True)
outputs = {}
for layer in model.layers:
    if layer.name.endswith("_add"):
        block = layer.name[:-len("_add")]
        outputs[block] = [*layer.input, model.get_layer(block + "_out").output]
sums = keras.Model(model.inputs, outputs).predict_on_batch(x)
results["shortcut_only"] = all(
    not np.any(branch) and np.allclose(out, np.maximum(shortcut, 0.0))
    for shortcut, branch, out in sums.values())
print("RESULTS", json.dumps(results))
"""


@pytest.mark.slow
def test_regularisers_on_jax(python_subprocess):
    import importlib.util
    import json

    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (CI tests TensorFlow and JAX)")
    result = python_subprocess(JAX_REGULARISERS, env={"KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.split("RESULTS", 1)[1])
    assert results["inference_identity"] and results["whole_examples"]
    assert abs(results["kept"] - 0.75) < 4 * np.sqrt(0.25 * 0.75 / 4000)
    np.testing.assert_allclose(results["values"], [0.0, 1 / 0.75], rtol=1e-6)
    assert results["shortcut_only"]
