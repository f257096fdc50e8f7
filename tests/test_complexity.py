"""Table 1, Table 2, Table 7 and torchvision's published figures."""

import numpy as np
import pytest

import keras_resnext as kr


def trainable_parameters(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


# torchvision's `num_params` (ImageNet) and the paper's Table 7 (CIFAR, 10 classes).
PUBLISHED_PARAMETERS = {
    "resnext50_32x4d": 25_028_904,
    "resnet50": 25_557_032,
    "resnext101_64x4d": 83_455_272,
    "resnext101_32x8d": 88_791_336,
    "resnext29_8x64d": 34_426_698,  # "34.4M"
    "resnext29_16x64d": 68_155_210,  # "68.1M"
}

# Multiply-adds at 224x224: Table 1 (4.1e9 / 4.2e9) and torchvision's metadata.
PUBLISHED_FLOPS = {"resnext50_32x4d": 4.23e9, "resnet50": 4.09e9}


@pytest.mark.parametrize("name", sorted(kr.PRESETS))
def test_preset_parameters_and_flops(name):
    model = kr.build(name)
    preset = kr.PRESETS[name]
    parameters = trainable_parameters(model)
    flops = kr.count_flops(model)
    assert parameters == preset["num_params"]
    assert flops / 1e9 == pytest.approx(preset["gflops"], abs=0.006)
    if name in PUBLISHED_PARAMETERS:
        assert parameters == PUBLISHED_PARAMETERS[name]
    if name in PUBLISHED_FLOPS:
        assert flops == pytest.approx(PUBLISHED_FLOPS[name], rel=0.01)


def test_table_7_paper_rounding():
    assert round(kr.PRESETS["resnext29_8x64d"]["num_params"] / 1e6, 1) == 34.4
    assert int(kr.PRESETS["resnext29_16x64d"]["num_params"] / 1e5) / 10 == 68.1


@pytest.mark.parametrize(
    "cardinality, width", [(1, 64), (2, 40), (4, 24), (8, 14), (32, 4)]
)
def test_table_2_bottleneck_width(cardinality, width):
    assert kr.bottleneck_width(cardinality) == width


def test_table_2_group_conv_width_and_template_parameters():
    # Table 2's third row and Eq. 4: every template stays near ResNet's ~70k.
    reference = 256 * 64 + 3 * 3 * 64 * 64 + 64 * 256
    for cardinality, group_width in [(1, 64), (2, 80), (4, 96), (8, 112), (32, 128)]:
        d = kr.bottleneck_width(cardinality)
        assert cardinality * d == group_width
        eq4 = cardinality * (256 * d + 3 * 3 * d * d + d * 256)
        assert abs(eq4 - reference) / reference < 0.05


def test_bottleneck_width_rejects_nonsense():
    with pytest.raises(ValueError, match="cardinality"):
        kr.bottleneck_width(0)


def test_block_template_parameters_match_eq_4():
    # conv2's non-first block of ResNeXt-50 32x4d is exactly Eq. 4's template.
    model = kr.ResNeXt50(include_top=False, input_shape=(64, 64, 3))
    convs = [model.get_layer(f"conv2_block2_{i}_conv") for i in (1, 2, 3)]
    parameters = sum(int(np.prod(c.kernel.shape)) for c in convs)
    assert parameters == 32 * (256 * 4 + 3 * 3 * 4 * 4 + 4 * 256)


def test_count_flops_needs_a_size_for_dynamic_models():
    model = kr.ResNeXt29(depth=11, cardinality=2, width=4, include_top=False)
    assert model.inputs[0].shape[1] is None
    with pytest.raises(ValueError, match="input_shape"):
        kr.count_flops(model)
    small = kr.count_flops(model, input_shape=(32, 32, 3))
    large = kr.count_flops(model, input_shape=(64, 64, 3))
    assert large == 4 * small


def test_count_flops_counts_groups_and_dense():
    model = kr.ResNeXt29(depth=11, cardinality=4, width=8, classes=10,
                         input_shape=(16, 16, 3))
    expected = 16 * 16 * 64 * 3 * 3 * 3  # stem
    in_channels, size = 64, 16
    for stage, filters in enumerate((64, 128, 256)):
        group_width = filters * 8 // 64 * 4
        out = filters * 4
        stride = 1 if stage == 0 else 2
        out_size = size // stride
        expected += size * size * in_channels * group_width  # 1x1
        expected += out_size * out_size * 9 * (group_width // 4) * group_width  # grouped 3x3
        expected += out_size * out_size * group_width * out  # 1x1
        expected += out_size * out_size * in_channels * out  # projection
        in_channels, size = out, out_size
    expected += 1024 * 10
    assert kr.count_flops(model) == expected
