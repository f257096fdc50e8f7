"""ResNeXt as a detection and segmentation backbone (issue 12): the feature
pyramid, dilation, frozen batch norm and trainable stages."""

import numpy as np
import pytest

import keras
import keras_resnext as kr


def small_imagenet(**options):
    return kr.ResNeXt50(cardinality=2, width=4, include_top=False, input_shape=(64, 64, 3),
                        **options)


def small_cifar(**options):
    return kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3, input_shape=(16, 16, 3),
                        **options)


def spatial_strides(model):
    side = model.inputs[0].shape[1]
    return {level: side // tensor.shape[1] for level, tensor in model.pyramid_outputs.items()}


def test_imagenet_pyramid_levels_are_log2_of_the_stride():
    model = small_imagenet()
    assert spatial_strides(model) == {"P1": 2, "P2": 4, "P3": 8, "P4": 16, "P5": 32}
    channels = {level: t.shape[-1] for level, t in model.pyramid_outputs.items()}
    assert channels == {"P1": 64, "P2": 256, "P3": 512, "P4": 1024, "P5": 2048}
    # P1 is the stem conv after its ReLU (keras-hub's ResNetBackbone), P5 the last block.
    assert model.pyramid_outputs["P1"] is model.get_layer("conv1_relu").output
    assert model.pyramid_outputs["P5"] is model.get_layer("conv5_block3_out").output


def test_cifar_pyramid_names_its_three_stages_by_stride():
    assert spatial_strides(small_cifar()) == {"P0": 1, "P1": 2, "P2": 4}


def test_pyramid_outputs_exist_with_a_classifier_and_after_reformulate_and_round_trip(tmp_path):
    model = kr.ResNeXt50(cardinality=2, width=4, input_shape=(64, 64, 3), classes=5)
    assert list(model.pyramid_outputs) == ["P1", "P2", "P3", "P4", "P5"]
    assert list(kr.reformulate(small_cifar(), "b").pyramid_outputs) == ["P0", "P1", "P2"]
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert spatial_strides(loaded) == spatial_strides(model)


def test_feature_extractor_maps_the_input_to_the_levels_and_shares_weights():
    model = small_imagenet()
    features = kr.feature_extractor(model)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype("float32")
    maps = features.predict_on_batch(x)
    assert {level: m.shape for level, m in maps.items()} == {
        "P2": (2, 16, 16, 256), "P3": (2, 8, 8, 512), "P4": (2, 4, 4, 1024),
        "P5": (2, 2, 2, 2048)}
    np.testing.assert_allclose(maps["P5"], model.predict_on_batch(x), rtol=1e-5, atol=1e-5)
    assert {id(v) for v in features.weights} <= {id(v) for v in model.weights}


def test_feature_extractor_names_the_available_levels_for_an_unknown_one():
    with pytest.raises(ValueError, match=r"\['P5'\].*available: P0, P1, P2\.$"):
        kr.feature_extractor(small_cifar(), levels=("P1", "P5"))
