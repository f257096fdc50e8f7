"""The builders: keras.applications conventions, §4's architecture, serialisation."""

import inspect

import keras
import numpy as np
import pytest

import keras_resnext as kr

BUILDER_DEFAULTS = dict(
    cardinality=32, width=4, include_top=True, weights=None, input_tensor=None,
    input_shape=None, pooling=None, classes=1000, classifier_activation="softmax",
    block_form="c", name=None, replace_stride_with_dilation=None, freeze_batch_norm=False,
    trainable_stages=None, drop_path_rate=0.0, zero_init_last=False,
)


@pytest.mark.parametrize("builder", [kr.ResNeXt50, kr.ResNeXt101, kr.ResNeXt152])
def test_imagenet_builder_signature(builder):
    parameters = inspect.signature(builder).parameters
    assert list(parameters) == list(BUILDER_DEFAULTS)
    assert {k: p.default for k, p in parameters.items()} == BUILDER_DEFAULTS


def test_cifar_builder_signature():
    parameters = inspect.signature(kr.ResNeXt29).parameters
    assert list(parameters)[:4] == ["cardinality", "width", "classes", "depth"]
    defaults = {k: p.default for k, p in parameters.items()}
    assert defaults["cardinality"] == 8 and defaults["width"] == 64
    assert defaults["classes"] == 10 and defaults["depth"] == 29


def small_imagenet(**kwargs):
    arguments = dict(cardinality=4, width=4, classes=5, input_shape=(64, 64, 3))
    arguments.update(kwargs)
    return kr.ResNeXt50(**arguments)


def test_section_4_architecture():
    model = small_imagenet()
    stem = model.get_layer("conv1_conv")
    assert stem.kernel_size == (7, 7) and stem.strides == (2, 2) and stem.filters == 64
    assert model.get_layer("conv1_pad").padding == ((3, 3), (3, 3))
    pool = model.get_layer("pool1_pool")
    assert pool.pool_size == (3, 3) and pool.strides == (2, 2)
    for stage, blocks in zip((2, 3, 4, 5), (3, 4, 6, 3)):
        first = f"conv{stage}_block1"
        # Downsampling by the 3x3 of the first block of conv3..5 (fb.resnet.torch).
        expected_stride = (1, 1) if stage == 2 else (2, 2)
        assert model.get_layer(f"{first}_2_conv").strides == expected_stride
        assert model.get_layer(f"{first}_1_conv").strides == (1, 1)
        # Projection shortcut only where the shape changes (type B).
        assert model.get_layer(f"{first}_0_conv").strides == expected_stride
        for block in range(2, blocks + 1):
            with pytest.raises(ValueError):
                model.get_layer(f"conv{stage}_block{block}_0_conv")
        with pytest.raises(ValueError):
            model.get_layer(f"conv{stage}_block{blocks + 1}_1_conv")
        # Width doubles with each downsampling (§3.1 rule ii).
        filters = 64 * 2 ** (stage - 2)
        assert model.get_layer(f"{first}_3_conv").filters == 4 * filters
        assert model.get_layer(f"{first}_2_conv").filters == int(filters * 4 / 64) * 4
    assert model.output.shape == (None, 5)
    assert isinstance(model.get_layer("avg_pool"), keras.layers.GlobalAveragePooling2D)


def test_pytorch_parity_numerics():
    model = small_imagenet()
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            assert not layer.use_bias and layer.padding == "valid", layer.name
            if layer.kernel_size[0] > 1:
                assert isinstance(model.get_layer(layer.name[:-5] + "_pad"),
                                  keras.layers.ZeroPadding2D)
        if isinstance(layer, keras.layers.BatchNormalization):
            assert layer.epsilon == 1e-5 and layer.momentum == 0.9, layer.name


def test_he_initialisation():
    model = kr.ResNeXt50(cardinality=32, width=4, include_top=False, input_shape=(64, 64, 3))
    kernel = model.get_layer("conv4_block1_1_conv").kernel.numpy()
    fan_out = kernel.shape[0] * kernel.shape[1] * kernel.shape[3]
    assert kernel.std() == pytest.approx(np.sqrt(2.0 / fan_out), rel=0.05)
    assert np.all(model.get_layer("conv4_block1_1_bn").gamma.numpy() == 1)


def test_resnet_is_cardinality_one_width_64():
    model = kr.ResNeXt50(cardinality=1, width=64, include_top=False, input_shape=(64, 64, 3))
    assert model.name == "resnet50"
    conv = model.get_layer("conv2_block1_2_conv")
    assert type(conv) is keras.layers.Conv2D and conv.filters == 64
    assert model.get_layer("conv5_block1_2_conv").filters == 512
    assert kr.ResNeXt101(include_top=False).name == "resnext101_32x4d"


def test_cifar_network_section_5_3():
    model = kr.ResNeXt29(depth=11, cardinality=8, width=64, input_shape=(32, 32, 3))
    assert model.name == "resnext11_8x64d"
    stem = model.get_layer("conv1_conv")
    assert stem.kernel_size == (3, 3) and stem.strides == (1, 1) and stem.filters == 64
    outputs = [model.get_layer(f"conv{s}_block1_out").output.shape[1:] for s in (2, 3, 4)]
    assert outputs == [(32, 32, 256), (16, 16, 512), (8, 8, 1024)]
    # The official code's d doubles with each stage: 8 x 64d -> 512, 1024, 2048 channels.
    assert [model.get_layer(f"conv{s}_block1_2_conv").filters for s in (2, 3, 4)] == [
        512, 1024, 2048]
    assert model.output.shape == (None, 10)
    assert kr.ResNeXt29(depth=20, cardinality=2, width=4).stage_depths == (2, 2, 2)


def test_include_top_pooling_and_input_tensor():
    features = small_imagenet(include_top=False, input_shape=None)
    assert features.output.shape == (None, None, None, 2048)
    pooled = small_imagenet(include_top=False, pooling="max")
    assert pooled.output.shape == (None, 2048)
    tensor = keras.Input((96, 96, 3))
    model = small_imagenet(input_tensor=tensor, input_shape=None)
    assert model.inputs[0] is tensor and model.output.shape == (None, 5)
    logits = small_imagenet(classifier_activation=None)
    assert logits.get_layer("predictions").activation is keras.activations.linear
    probabilities = small_imagenet().predict_on_batch(np.zeros((2, 64, 64, 3), "float32"))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_form="d"), "block_form"),
    (dict(pooling="mean"), "pooling"),
    (dict(cardinality=0), "cardinality"),
    (dict(width=2.5), "width"),
    (dict(classes=0), "classes"),
    (dict(input_shape=(64, 64)), "input_shape"),
    (dict(input_shape=(16, 16, 3)), "too small"),
    (dict(include_top="yes"), "include_top"),
    (dict(weights="imagenet"), "no weight files"),
    (dict(weights="/nonexistent/w.weights.h5"), "/nonexistent/w.weights.h5"),
])
def test_clear_errors(kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        small_imagenet(**kwargs)


def test_cifar_depth_must_be_9n_plus_2():
    with pytest.raises(ValueError, match="9n"):
        kr.ResNeXt29(depth=30)


def test_presets():
    assert {"resnext50_32x4d", "resnext101_32x4d", "resnext101_32x8d", "resnext101_64x4d",
            "resnext152_32x4d", "resnet50", "resnet101", "resnet152", "resnext29_8x64d",
            "resnext29_16x64d"} == set(kr.PRESETS)
    model = kr.build("resnext101_64x4d", include_top=False, input_shape=(64, 64, 3))
    assert model.name == "resnext101_64x4d"
    assert (model.cardinality, model.width, model.stage_depths) == (64, 4, (3, 4, 23, 3))
    assert model.depth == 101
    same = kr.build("resnext29_16x64d", cardinality=16, classes=100, include_top=False)
    assert same.cardinality == 16 and same.stem == "cifar" and same.depth == 29
    with pytest.raises(ValueError, match="cardinality=32"):
        kr.build("resnext50_32x4d", cardinality=64)
    with pytest.raises(ValueError, match="Known presets"):
        kr.build("resnext51")


def test_keras_file_round_trip_is_exact(tmp_path):
    model = kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3, input_shape=(16, 16, 3))
    x = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 3)).astype("float32")
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.train_on_batch(x, np.array([0, 2]))  # non-trivial BN statistics
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is kr.ResNeXt
    assert loaded.get_config() == model.get_config()
    np.testing.assert_array_equal(loaded.predict_on_batch(x), model.predict_on_batch(x))


def test_weights_h5_round_trip(tmp_path):
    model = small_imagenet()
    path = str(tmp_path / "small.weights.h5")
    model.save_weights(path)
    again = small_imagenet(weights=path)
    for w1, w2 in zip(model.weights, again.weights):
        np.testing.assert_array_equal(np.asarray(w1), np.asarray(w2))


def test_preprocess_input_is_imagenet_mean_std():
    x = np.array([[[[0.0, 127.5, 255.0]]]], "float32")
    y = keras.ops.convert_to_numpy(kr.preprocess_input(x))
    expected = (np.array([0.0, 0.5, 1.0]) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(y[0, 0, 0], expected, rtol=1e-6)
    uint8 = keras.ops.convert_to_numpy(kr.preprocess_input(x.astype("uint8")))
    assert uint8.dtype == np.float32


def test_decode_predictions():
    scores = np.zeros((2, 1000), "float32")
    scores[0, [0, 1, 2]] = [0.1, 0.7, 0.2]
    scores[1, 999] = 1.0
    decoded = kr.decode_predictions(scores, top=3)
    assert [entry[1] for entry in decoded[0]] == ["goldfish", "great white shark", "tench"]
    assert decoded[0][0] == ("n01443537", "goldfish", pytest.approx(0.7))
    assert decoded[1][0][:2] == ("n15075141", "toilet tissue")
    with pytest.raises(ValueError, match="1000"):
        kr.decode_predictions(np.zeros((1, 10)))
