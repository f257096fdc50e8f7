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


@pytest.mark.parametrize("levels", [None, 3, (), ("P2", 3)])
def test_feature_extractor_refuses_levels_that_are_not_level_names(levels):
    # A ValueError naming the argument, not a TypeError from deep inside.
    with pytest.raises(ValueError, match=r"^`levels` must be .*available: P0, P1, P2\.$"):
        kr.feature_extractor(small_cifar(), levels=levels)


# --- Dilation (torchvision's replace_stride_with_dilation) ---------------------


def dilation_rates(model):
    return {layer.name: layer.dilation_rate[0] for layer in model.layers
            if layer.name.endswith("_2_conv")}


@pytest.mark.parametrize("flags, strides", [
    ((False, False, True), {"P1": 2, "P2": 4, "P3": 8, "P4": 16}),
    ((False, True, True), {"P1": 2, "P2": 4, "P3": 8}),
])
def test_dilation_sets_the_output_stride_and_levels_stay_log2_of_the_stride(flags, strides):
    # keras-hub's consumers compute scales from the level: DeepLabV3 upsampled
    # a dilated "P5" (stride 8) by 32 when levels kept their stage's name.
    model = small_imagenet(replace_stride_with_dilation=flags)
    assert spatial_strides(model) == strides
    deepest = model.pyramid_outputs[max(strides, key=strides.get)]
    assert deepest is model.get_layer("conv5_block3_out").output


def test_dilation_follows_torchvisions_make_layer():
    # torchvision: the first block of a dilated stage keeps the previous
    # dilation (its stride becomes 1), the later ones take the new dilation.
    model = kr.ResNeXt((2, 2, 2, 2), cardinality=2, width=4, include_top=False,
                       input_shape=(64, 64, 3), replace_stride_with_dilation=(False, True, True))
    assert dilation_rates(model) == {
        "conv2_block1_2_conv": 1, "conv2_block2_2_conv": 1,
        "conv3_block1_2_conv": 1, "conv3_block2_2_conv": 1,
        "conv4_block1_2_conv": 1, "conv4_block2_2_conv": 2,
        "conv5_block1_2_conv": 2, "conv5_block2_2_conv": 4,
    }
    assert model.get_layer("conv4_block1_2_conv").strides == (1, 1)
    assert model.get_layer("conv4_block1_0_conv").strides == (1, 1)  # projection, stride 1
    assert model.get_layer("conv5_block2_2_pad").padding == ((4, 4), (4, 4))


@pytest.mark.parametrize("block_form", ["a", "b"])
def test_dilated_forms_a_and_b_compute_form_c(block_form):
    model = kr.ResNeXt29(depth=11, cardinality=2, width=4, classes=3, input_shape=(16, 16, 3),
                         replace_stride_with_dilation=(True, True))
    other = kr.reformulate(model, block_form)
    assert other.get_layer("conv4_block1_path2_2_conv").dilation_rate == (2, 2)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(other.predict_on_batch(x), model.predict_on_batch(x),
                               rtol=1e-4, atol=1e-6)


def test_dilation_flags_are_checked():
    with pytest.raises(ValueError, match=r"must be 3 booleans, one per stage after the first"):
        small_imagenet(replace_stride_with_dilation=(True, True))
    with pytest.raises(ValueError, match=r"must be 2 booleans"):
        small_cifar(replace_stride_with_dilation=(False, False, True))




DILATED_GROUPED_CONV = r"""
import numpy as np, tensorflow as tf
from keras_resnext.kernels import tf_ops
rng = np.random.default_rng(0)
results = []
for groups, padding, shape, rate in [(4, "valid", (2, 13, 11, 16), 2), (4, "same", (2, 13, 11, 16), 2),
                                     (8, "same", (1, 12, 12, 64), 4), (1, "valid", (1, 9, 10, 8), 2)]:
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    kernel = rng.normal(size=(3, 3, shape[-1] // groups, shape[-1])).astype("float32")
    size = 2 * rate + 1
    k = tf.constant(kernel)

    def per_group(x, k, dilations, padding=padding):
        return tf.concat([tf.nn.conv2d(xg, kg, 1, padding.upper(), dilations=dilations)
                          for xg, kg in zip(tf.split(x, groups, -1), tf.split(k, groups, -1))], -1)

    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, k])
        y = tf_ops.grouped_conv2d(x, k, (1, 1), padding, (rate, rate))
        loss = tf.reduce_sum(y * y)
        # The same function as an undilated conv whose kernel has zeros between
        # the taps: its gradient exists on every CPU.
        stuffed = tf.scatter_nd([[i * rate, j * rate] for i in range(3) for j in range(3)],
                                tf.reshape(k, [9, *k.shape[2:]]), [size, size, *k.shape[2:]])
        y_stuffed = per_group(x, stuffed, 1)
        loss_stuffed = tf.reduce_sum(y_stuffed * y_stuffed)
    forward = float(tf.reduce_max(tf.abs(y - per_group(x, k, rate))))
    gradients = [float(tf.reduce_max(tf.abs(a - b)) / tf.reduce_max(tf.abs(b)))
                 for a, b in zip(tape.gradient(loss, [x, k]), tape.gradient(loss_stuffed, [x, k]))]
    results.append((groups, padding, forward, *gradients))
print("RESULTS", results)
"""


@pytest.mark.parametrize("onednn", ["1", "0"])
def test_dilated_grouped_conv_matches_per_group_convolutions(python_subprocess, onednn):
    # Forward against per-group tf.nn.conv2d with dilations; gradients against
    # the undilated conv with a zero-stuffed kernel. Without oneDNN TensorFlow's
    # CPU kernels can't differentiate dilated convs at all: tf_ops then goes
    # through space-to-batch.
    result = python_subprocess(DILATED_GROUPED_CONV, env={"TF_ENABLE_ONEDNN_OPTS": onednn})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = eval(result.stdout.split("RESULTS", 1)[1])
    for groups, padding, forward, dx, dkernel in rows:
        assert forward < 1e-4, (groups, padding)
        assert dx < 1e-5 and dkernel < 1e-5, (groups, padding, dx, dkernel)


# --- Frozen batch norm and trainable stages -------------------------------------


def batch_norm_state(model):
    return {variable.path: np.array(variable) for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization) for variable in layer.weights}


def colour_batch(num_examples=8, size=16, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, num_examples).astype("int32")
    images = rng.normal(0.0, 0.5, (num_examples, size, size, 3)).astype("float32")
    images[np.arange(num_examples), :, :, labels] += 1.0
    return images, labels


def assert_unchanged(before, after):
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)


def test_frozen_batch_norm_normalizes_with_moving_statistics_in_training():
    model = small_cifar(freeze_batch_norm=True)
    images, _ = colour_batch()
    np.testing.assert_allclose(np.asarray(model(images, training=True)),
                               np.asarray(model(images, training=False)), rtol=1e-5, atol=1e-6)
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert layers and not any(layer.trainable_weights for layer in layers)
    # Every conv and the classifier still train.
    assert len(model.trainable_weights) == len(
        [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]) + 2


def test_frozen_batch_norm_does_not_move_under_fit():
    model = small_cifar(freeze_batch_norm=True)
    before = batch_norm_state(model)
    kernel = np.array(model.get_layer("conv2_block1_2_conv").kernel)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    model.fit(*colour_batch(), batch_size=4, epochs=2, verbose=0)
    assert_unchanged(before, batch_norm_state(model))
    assert not np.array_equal(np.array(model.get_layer("conv2_block1_2_conv").kernel), kernel)


def test_frozen_batch_norm_and_stages_do_not_move_in_our_training_loop(tmp_path):
    tf = pytest.importorskip("tensorflow")
    training = pytest.importorskip("keras_resnext.training")
    from keras_resnext.training.steps import make_train_loop

    model = small_cifar(freeze_batch_norm=True, trainable_stages=1, classifier_activation=None)
    config = training.TrainConfig(model_dir=str(tmp_path), epochs=1, batch_size=4,
                                  learning_rate=0.1, weight_decay=5e-4, steps_per_epoch=2,
                                  validation_freq=0, seed=1)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    before = batch_norm_state(model)
    frozen_kernel = np.array(model.get_layer("conv3_block1_2_conv").kernel)
    kernel = np.array(model.get_layer("conv4_block1_2_conv").kernel)
    dataset = tf.data.Dataset.from_tensor_slices(colour_batch()).batch(4).repeat()
    make_train_loop(model, optimizer, tf.distribute.get_strategy(), config)(
        iter(dataset), tf.constant(2))
    assert_unchanged(before, batch_norm_state(model))
    np.testing.assert_array_equal(np.array(model.get_layer("conv3_block1_2_conv").kernel),
                                  frozen_kernel)
    assert not np.array_equal(np.array(model.get_layer("conv4_block1_2_conv").kernel), kernel)


# torchvision 0.29.1's counts of trainable tensors and parameters in
# `_resnet_fpn_extractor(backbone, K).body` for each trainable_layers K, where
# backbone = ResNet(Bottleneck, [1, 1, 1, 1], groups=2, width_per_group=4,
# norm_layer=...), computed with /work/torchvenv by TORCHVISION_TRAINABLE_COUNTS
# below (test_trainable_counts_recomputed_with_torchvision reruns it where
# torchvision is installed). FrozenBatchNorm2d (resnet_fpn_backbone's default)
# keeps gamma and beta as buffers, so they aren't counted; BatchNorm2d's are.
TORCHVISION_TRAINABLE = {
    "FrozenBatchNorm2d": {0: (0, 0), 1: (4, 2312192), 2: (8, 2890240), 3: (12, 3034752),
                          4: (16, 3053984), 5: (17, 3063392)},
    "BatchNorm2d": {0: (0, 0), 1: (12, 2320640), 2: (24, 2902912), 3: (36, 3049536),
                    4: (48, 3069824), 5: (51, 3079360)},
}
FREEZE_BATCH_NORM = {"FrozenBatchNorm2d": True, "BatchNorm2d": False}

TORCHVISION_TRAINABLE_COUNTS = r"""
import json, torch
from torchvision.models.resnet import ResNet, Bottleneck
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d
counts = {}
for norm in (FrozenBatchNorm2d, torch.nn.BatchNorm2d):
    counts[norm.__name__] = {}
    for k in range(6):
        backbone = ResNet(Bottleneck, [1, 1, 1, 1], groups=2, width_per_group=4, norm_layer=norm)
        trainable = [p for p in _resnet_fpn_extractor(backbone, k).body.parameters()
                     if p.requires_grad]
        counts[norm.__name__][k] = (len(trainable), sum(p.numel() for p in trainable))
print("COUNTS", json.dumps(counts))
"""


def trainable_counts(model):
    return (len(model.trainable_weights),
            sum(int(np.prod(variable.shape)) for variable in model.trainable_weights))


def torchvision_backbone_twin(**options):
    return kr.ResNeXt((1, 1, 1, 1), cardinality=2, width=4, include_top=False,
                      input_shape=(64, 64, 3), **options)


@pytest.mark.parametrize("norm", list(TORCHVISION_TRAINABLE))
def test_trainable_stages_count_as_torchvisions_trainable_layers(norm):
    for k, expected in TORCHVISION_TRAINABLE[norm].items():
        model = torchvision_backbone_twin(trainable_stages=k,
                                          freeze_batch_norm=FREEZE_BATCH_NORM[norm])
        assert trainable_counts(model) == expected, (norm, k)


def torch_python():
    """An interpreter with torchvision: this one, or $KERAS_RESNEXT_TORCH_PYTHON."""
    import importlib.util
    import os
    import sys

    if os.environ.get("KERAS_RESNEXT_TORCH_PYTHON"):
        return os.environ["KERAS_RESNEXT_TORCH_PYTHON"]
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision isn't importable here (CI has no torch); set "
                    "KERAS_RESNEXT_TORCH_PYTHON to a Python that has it")
    return sys.executable


def run_torch(code, *args):
    import os
    import subprocess

    # The other interpreter has its own packages; don't lend it ours.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([torch_python(), "-c", code, *args], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_trainable_counts_recomputed_with_torchvision():
    import json

    counts = json.loads(run_torch(TORCHVISION_TRAINABLE_COUNTS).split("COUNTS", 1)[1])
    assert {norm: {int(k): tuple(v) for k, v in by_k.items()} for norm, by_k in counts.items()} \
        == TORCHVISION_TRAINABLE


def test_frozen_stages_do_not_move_under_fit():
    model = small_cifar(trainable_stages=1)  # conv4 (CIFAR's last) and the head train
    frozen = {v.path: np.array(v) for layer in model.layers
              if layer.name.startswith(("conv1_", "conv2_", "conv3_")) for v in layer.weights}
    trained = np.array(model.get_layer("conv4_block1_2_conv").kernel)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    model.fit(*colour_batch(), batch_size=4, epochs=2, verbose=0)
    assert_unchanged(frozen, {v.path: np.array(v) for v in model.weights})
    assert not np.array_equal(np.array(model.get_layer("conv4_block1_2_conv").kernel), trained)


def test_backbone_options_survive_keras_round_trip(tmp_path):
    model = small_cifar(freeze_batch_norm=True, trainable_stages=3,
                        replace_stride_with_dilation=(False, True))
    path = str(tmp_path / "backbone.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert trainable_counts(loaded) == trainable_counts(model)
    assert loaded.get_config() == model.get_config()
    assert spatial_strides(loaded) == {"P0": 1, "P1": 2}
    assert loaded.pyramid_outputs["P1"] is loaded.get_layer("conv4_block1_out").output


@pytest.mark.parametrize("value", [6, -1, True, 2.0])
def test_trainable_stages_is_checked(value):
    with pytest.raises(ValueError, match=r"`trainable_stages` must be None \(all\) or 0 to 5"):
        small_imagenet(trainable_stages=value)


# --- Weights into backbones ----------------------------------------------------


def test_weights_load_into_backbones_with_every_option(tmp_path):
    source = small_cifar()
    images, labels = colour_batch()
    source.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    source.train_on_batch(images, labels)  # moving statistics away from 0/1
    path = str(tmp_path / "source.weights.h5")
    source.save_weights(path)
    options = dict(include_top=False, weights=path, freeze_batch_norm=True, trainable_stages=3,
                   drop_path_rate=0.1)
    dilated = small_cifar(replace_stride_with_dilation=(True, True), **options)
    expected = {layer.name: layer.get_weights() for layer in source.layers}
    for layer in dilated.layers:
        for value, want in zip(layer.get_weights(), expected[layer.name]):
            np.testing.assert_array_equal(value, want, err_msg=layer.name)
    # Undilated, the backbone computes the source's last features.
    np.testing.assert_allclose(
        small_cifar(**options).predict_on_batch(images),
        kr.feature_extractor(source, "P2").predict_on_batch(images)["P2"], rtol=1e-4, atol=1e-4)


# torchvision's ResNet with dilation, random weights and randomised BN, as .pth;
# writes its logits and its layer4 (our P5) output for the same input.
TORCHVISION_DILATED = r"""
import sys, numpy as np, torch, torchvision
from torchvision.models.resnet import ResNet, Bottleneck
out = sys.argv[1]
torch.manual_seed(0)
model = ResNet(Bottleneck, [2, 2, 2, 2], groups=2, width_per_group=4, num_classes=5,
               replace_stride_with_dilation=[False, True, True])
with torch.no_grad():
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5); m.bias.normal_(0, 0.2)
            m.running_mean.normal_(0, 0.2); m.running_var.uniform_(0.5, 2)
model.eval()
torch.save(model.state_dict(), out + "/dilated.pth")
x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
body = torchvision.models._utils.IntermediateLayerGetter(model, {"layer4": "P5"})
with torch.no_grad():
    logits, p5 = model(x), body(x)["P5"]
np.save(out + "/x.npy", x.numpy().transpose(0, 2, 3, 1))
np.save(out + "/logits.npy", logits.numpy())
np.save(out + "/p5.npy", p5.numpy().transpose(0, 2, 3, 1))
"""


def test_dilated_model_matches_torchvision(tmp_path):
    run_torch(TORCHVISION_DILATED, str(tmp_path))
    images = np.load(tmp_path / "x.npy")
    flags = (False, True, True)
    model = kr.ResNeXt((2, 2, 2, 2), cardinality=2, width=4, classes=5, input_shape=(64, 64, 3),
                       classifier_activation=None, replace_stride_with_dilation=flags)
    kr.load_weights(model, str(tmp_path / "dilated.pth"))
    np.testing.assert_allclose(np.asarray(model(images, training=False)),
                               np.load(tmp_path / "logits.npy"), rtol=1e-4, atol=1e-5)
    backbone = kr.ResNeXt((2, 2, 2, 2), cardinality=2, width=4, include_top=False,
                          input_shape=(64, 64, 3), replace_stride_with_dilation=flags,
                          freeze_batch_norm=True)
    kr.load_weights(backbone, str(tmp_path / "dilated.pth"))
    p5 = kr.feature_extractor(backbone, "P3")(images)["P3"]  # conv5 at stride 8
    np.testing.assert_allclose(np.asarray(p5), np.load(tmp_path / "p5.npy"), rtol=1e-4,
                               atol=1e-4)


# --- The same on JAX -----------------------------------------------------------

JAX_BACKBONES = r"""
import json, sys
import numpy as np, keras, keras_resnext as kr
assert keras.backend.backend() == "jax"
weights, inputs, folder = sys.argv[1:4]
results = {}

def strides(model):
    side = model.inputs[0].shape[1]
    return {level: side // t.shape[1] for level, t in model.pyramid_outputs.items()}

def small(**options):
    return kr.ResNeXt((1, 1, 1, 1), cardinality=2, width=4, include_top=False,
                      input_shape=(64, 64, 3), **options)

results["imagenet"] = strides(small())
for flags in ([False, False, True], [False, True, True]):
    results[str(flags)] = strides(small(replace_stride_with_dilation=flags))

dilated = kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3, input_shape=(16, 16, 3),
                       replace_stride_with_dilation=(True, True), freeze_batch_norm=True,
                       weights=weights)
x = np.load(inputs)
results["cifar"] = strides(dilated)
features = kr.feature_extractor(dilated, ["P0"]).predict_on_batch(x)
np.save(folder + "/jax_p0.npy", np.asarray(features["P0"]))
np.save(folder + "/jax_logits.npy", np.asarray(dilated.predict_on_batch(x)))

# Frozen BN and frozen stages (all but conv4, CIFAR's last) under fit.
model = kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3, input_shape=(16, 16, 3),
                     freeze_batch_norm=True, trainable_stages=1)
frozen_layers = [layer for layer in model.layers
                 if isinstance(layer, keras.layers.BatchNormalization)
                 or layer.name.startswith(("conv1_", "conv2_", "conv3_"))]
before = [np.array(v) for layer in frozen_layers for v in layer.weights]
kernel = np.array(model.get_layer("conv4_block1_2_conv").kernel)
model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
model.fit(x, np.arange(len(x)) % 3, batch_size=2, epochs=1, verbose=0)
after = [np.array(v) for layer in frozen_layers for v in layer.weights]
results["frozen_unchanged"] = len(before) > 0 and all(
    np.array_equal(a, b) for a, b in zip(before, after))
results["trained_moved"] = not np.array_equal(
    kernel, np.array(model.get_layer("conv4_block1_2_conv").kernel))

counts = {}
for k in range(6):
    model = small(trainable_stages=k, freeze_batch_norm=True)
    counts[k] = [len(model.trainable_weights),
                 sum(int(np.prod(v.shape)) for v in model.trainable_weights)]
results["counts"] = counts
print("RESULTS", json.dumps(results))
"""


@pytest.mark.slow
def test_backbone_options_on_jax(python_subprocess, tmp_path):
    import importlib.util
    import json

    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (CI tests TensorFlow and JAX)")
    model = small_cifar(replace_stride_with_dilation=(True, True), freeze_batch_norm=True)
    images, labels = colour_batch(4)
    weights = str(tmp_path / "dilated.weights.h5")
    model.save_weights(weights)
    inputs = str(tmp_path / "x.npy")
    np.save(inputs, images)
    result = python_subprocess(
        JAX_BACKBONES, env={"KERAS_BACKEND": "jax"},
        args=(weights, inputs, str(tmp_path)))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.split("RESULTS", 1)[1])
    assert results["imagenet"] == {"P1": 2, "P2": 4, "P3": 8, "P4": 16, "P5": 32}
    assert results["[False, False, True]"] == {"P1": 2, "P2": 4, "P3": 8, "P4": 16}
    assert results["[False, True, True]"] == {"P1": 2, "P2": 4, "P3": 8}
    assert results["cifar"] == {"P0": 1}
    np.testing.assert_allclose(np.load(tmp_path / "jax_logits.npy"),
                               model.predict_on_batch(images), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        np.load(tmp_path / "jax_p0.npy"),
        kr.feature_extractor(model, "P0").predict_on_batch(images)["P0"], rtol=1e-4, atol=1e-4)
    assert results["frozen_unchanged"] and results["trained_moved"]
    assert {int(k): tuple(v) for k, v in results["counts"].items()} == \
        TORCHVISION_TRAINABLE["FrozenBatchNorm2d"]
