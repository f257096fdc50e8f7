"""Fig. 3: the three block forms are the same function (§3.3, §4)."""

import itertools

import keras
import numpy as np
import pytest

import keras_resnext as kr


def randomise_batch_norm(model, seed=0):
    """Non-trivial BN statistics and affine parameters, so equality means something."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([
                rng.uniform(0.5, 1.5, n), rng.normal(0, 0.5, n),
                rng.normal(0, 0.5, n), rng.uniform(0.5, 2.0, n),
            ])
    return model


def small_models():
    return {
        "cifar": lambda: kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=5,
                                      input_shape=(16, 16, 3), classifier_activation=None),
        "imagenet": lambda: kr.ResNeXt50(cardinality=3, width=2, classes=4,
                                         input_shape=(64, 64, 3),
                                         classifier_activation=None),
    }


@pytest.fixture(scope="module", params=sorted(small_models()))
def models_in_every_form(request):
    reference = randomise_batch_norm(small_models()[request.param]())
    return {form: kr.reformulate(reference, form) for form in "abc"}


def images(shape, seed=1):
    return np.random.default_rng(seed).uniform(-2, 2, (4, *shape)).astype("float32")


def test_forms_have_their_topology(models_in_every_form):
    a, b, c = (models_in_every_form[f] for f in "abc")
    assert a.block_form == "a" and b.block_form == "b" and c.block_form == "c"
    names_a = {layer.name for layer in a.layers}
    names_b = {layer.name for layer in b.layers}
    names_c = {layer.name for layer in c.layers}
    cardinality = c.cardinality
    # (a) C full paths summed; (b) C paths concatenated then one 1x1; (c) grouped.
    assert {f"conv2_block1_path{i}_3_conv" for i in range(1, cardinality + 1)} <= names_a
    assert "conv2_block1_sum" in names_a and "conv2_block1_3_conv" not in names_a
    assert "conv2_block1_concat" in names_b and "conv2_block1_path1_3_conv" not in names_b
    assert "conv2_block1_3_conv" in names_b
    assert isinstance(c.get_layer("conv2_block1_2_conv"), kr.layers.GroupConv2D)
    assert c.get_layer("conv2_block1_2_conv").groups == cardinality
    assert not any("path" in name for name in names_c)
    assert a.count_params() == b.count_params() == c.count_params()


@pytest.mark.parametrize("first, second", list(itertools.combinations("abc", 2)))
def test_forms_equal_in_inference(models_in_every_form, first, second):
    x = images(models_in_every_form["c"].image_shape)
    y1 = models_in_every_form[first].predict_on_batch(x)
    y2 = models_in_every_form[second].predict_on_batch(x)
    assert np.abs(y1).max() > 0.1
    np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("first, second", list(itertools.combinations("abc", 2)))
def test_forms_equal_in_training_mode(first, second):
    # Fresh models: a training-mode call updates BN's moving statistics.
    reference = randomise_batch_norm(small_models()["cifar"](), seed=3)
    m1, m2 = kr.reformulate(reference, first), kr.reformulate(reference, second)
    x = images(reference.image_shape, seed=5)
    y1 = keras.ops.convert_to_numpy(m1(x, training=True))
    y2 = keras.ops.convert_to_numpy(m2(x, training=True))
    np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)
    # The moving statistics moved identically, too.
    back1, back2 = kr.reformulate(m1, "c"), kr.reformulate(m2, "c")
    for w1, w2 in zip(back1.weights, back2.weights):
        np.testing.assert_allclose(np.asarray(w1), np.asarray(w2), rtol=1e-5, atol=1e-5)


def test_reformulate_round_trip_is_exact(models_in_every_form):
    c = models_in_every_form["c"]
    again = kr.reformulate(kr.reformulate(c, "a"), "c")
    for w1, w2 in zip(c.weights, again.weights):
        assert w1.path == w2.path
        np.testing.assert_array_equal(np.asarray(w1), np.asarray(w2))


def test_reformulate_keeps_the_head_and_config(models_in_every_form):
    c = models_in_every_form["c"]
    a = models_in_every_form["a"]
    config_c, config_a = c.get_config(), a.get_config()
    assert config_a.pop("block_form") == "a" and config_c.pop("block_form") == "c"
    assert config_a == config_c


def test_reformulate_rejects_foreign_models_and_forms():
    with pytest.raises(TypeError, match="keras_resnext"):
        kr.reformulate(keras.Sequential([keras.layers.Dense(2)]), "a")
    model = kr.ResNeXt29(depth=11, cardinality=2, width=4, input_shape=(16, 16, 3))
    with pytest.raises(ValueError, match="block_form"):
        kr.reformulate(model, "d")
