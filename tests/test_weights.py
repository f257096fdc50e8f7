"""Loading torchvision/timm checkpoints and Keras files through `weights=`.

The checkpoints here are written by this file from our own models, in
torchvision's key names and layouts (stated independently below), so the
mapping is proven without torch. Tests that need torch skip without it.
"""

import os
import pickle
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
from safetensors.numpy import save_file

import keras_resnext as kr
from keras_resnext import weights as kr_weights

SMALL = dict(cardinality=2, width=4, input_shape=(64, 64, 3), classes=7)
CIFAR = dict(depth=11, cardinality=2, width=4, classes=5)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randomise_batch_norms(model, seed):
    """Fresh BNs are the identity; random ones make any mix-up visible."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.name.endswith("_bn"):
            channels = layer.weights[0].shape[0]
            layer.set_weights([
                rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.2, channels),
                rng.normal(0, 0.2, channels), rng.uniform(0.5, 2.0, channels),
            ])
    return model


def torchvision_state_dict(model):
    """`model`'s weights under torchvision's ResNet names, in PyTorch's layouts."""
    state = {}

    def conv(module, layer):
        kernel = model.get_layer(layer).get_weights()[0]  # [kh, kw, in/groups, out]
        state[f"{module}.weight"] = kernel.transpose(3, 2, 0, 1)  # [out, in/groups, kh, kw]

    def batch_norm(module, layer):
        gamma, beta, mean, variance = model.get_layer(layer).get_weights()
        state.update({
            f"{module}.weight": gamma, f"{module}.bias": beta,
            f"{module}.running_mean": mean, f"{module}.running_var": variance,
            f"{module}.num_batches_tracked": np.array(100, dtype=np.int64),
        })

    conv("conv1", "conv1_conv")
    batch_norm("bn1", "conv1_bn")
    layer_names = {layer.name for layer in model.layers}
    for stage, blocks in enumerate(model.stage_depths, start=1):
        for block in range(blocks):
            torch_block, keras_block = f"layer{stage}.{block}", f"conv{stage + 1}_block{block + 1}"
            for part in (1, 2, 3):
                conv(f"{torch_block}.conv{part}", f"{keras_block}_{part}_conv")
                batch_norm(f"{torch_block}.bn{part}", f"{keras_block}_{part}_bn")
            if f"{keras_block}_0_conv" in layer_names:
                conv(f"{torch_block}.downsample.0", f"{keras_block}_0_conv")
                batch_norm(f"{torch_block}.downsample.1", f"{keras_block}_0_bn")
    if model.include_top:
        kernel, bias = model.get_layer("predictions").get_weights()
        state["fc.weight"], state["fc.bias"] = kernel.T, bias  # [out, in]
    return {name: np.ascontiguousarray(value) for name, value in state.items()}


def weights_by_layer(model):
    return {layer.name: layer.get_weights() for layer in model.layers if layer.weights}


def assert_same_weights(model, reference, skip=()):
    expected = weights_by_layer(reference)
    loaded = weights_by_layer(model)
    for name, tensors in loaded.items():
        if name in skip:
            continue
        for got, want in zip(tensors, expected[name]):
            np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.fixture(scope="module")
def source():
    """A small ResNeXt-50 (2x4d) with random BNs, its outputs and its checkpoint files."""
    model = randomise_batch_norms(kr.ResNeXt50(**SMALL, classifier_activation=None), seed=1)
    images = np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype("float32")
    return model, images, np.asarray(model(images, training=False))


@pytest.fixture(scope="module")
def safetensors_file(source, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("checkpoints") / "resnext50_2x4d.safetensors")
    save_file(torchvision_state_dict(source[0]), path)
    return path


def write_safetensors(state, tmp_path, name="edited.safetensors"):
    path = str(tmp_path / name)
    save_file(state, path)
    return path


# The mapping, as a table of torchvision's names --------------------------------


@pytest.mark.parametrize("module, layer", [
    ("conv1", "conv1_conv"),
    ("bn1", "conv1_bn"),
    ("layer1.0.conv1", "conv2_block1_1_conv"),
    ("layer1.0.bn2", "conv2_block1_2_bn"),
    ("layer1.0.downsample.0", "conv2_block1_0_conv"),
    ("layer1.0.downsample.1", "conv2_block1_0_bn"),
    ("layer3.22.conv3", "conv4_block23_3_conv"),
    ("layer4.2.bn3", "conv5_block3_3_bn"),
    ("fc", "predictions"),
])
def test_torchvision_modules_map_to_keras_layers_and_back(module, layer):
    assert kr_weights.keras_layer_for(module) == layer
    assert kr_weights.torch_module_for(layer) == module


def test_modules_outside_resnet_map_to_nothing():
    assert kr_weights.keras_layer_for("layer1.0.se.fc1") is None
    assert kr_weights.keras_layer_for("head.fc") is None
    assert kr_weights.torch_module_for("conv2_block1_sum") is None


@pytest.mark.slow
def test_resnext50_32x4d_has_exactly_torchvisions_tensors_and_converts(tmp_path):
    """Facts from torchvision 0.29's resnext50_32x4d: 320 state-dict entries, 53 of
    them num_batches_tracked; then the CLI converts it to a .weights.h5."""
    model = kr.build("resnext50_32x4d")
    state = torchvision_state_dict(model)
    assert len(state) == 320
    assert sum(name.endswith("num_batches_tracked") for name in state) == 53
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer1.0.conv2.weight"].shape == (128, 4, 3, 3)
    assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert state["layer2.0.conv2.weight"].shape == (256, 8, 3, 3)
    assert state["fc.weight"].shape == (1000, 2048)

    randomise_batch_norms(model, seed=3)
    checkpoint = write_safetensors(torchvision_state_dict(model), tmp_path, "tv.safetensors")
    converted = str(tmp_path / "resnext50_32x4d.weights.h5")
    result = subprocess.run(
        [sys.executable, "-m", "keras_resnext.convert", checkpoint, converted,
         "--model", "resnext50_32x4d"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1000 classes" in result.stdout
    assert_same_weights(kr.build("resnext50_32x4d", weights=converted), model)


def test_convert_cli_names_a_missing_source_in_one_line(tmp_path):
    from keras_resnext import convert

    missing = str(tmp_path / "nowhere.pth")
    with pytest.raises(SystemExit) as exit_:
        convert.main([missing, str(tmp_path / "out.weights.h5"), "--model", "resnext50_32x4d"])
    assert exit_.value.code == f"convert: Weights file not found: {missing}"


# Round trips ----------------------------------------------------------------


def test_safetensors_round_trip_is_exact(source, safetensors_file):
    model, images, outputs = source
    loaded = kr.ResNeXt50(**SMALL, classifier_activation=None, weights=safetensors_file)
    assert_same_weights(loaded, model)
    np.testing.assert_array_equal(np.asarray(loaded(images, training=False)), outputs)


def test_data_parallel_prefix_is_stripped(source, tmp_path):
    state = {f"module.{name}": value for name, value in torchvision_state_dict(source[0]).items()}
    loaded = kr.ResNeXt50(**SMALL, weights=write_safetensors(state, tmp_path))
    assert_same_weights(loaded, source[0])


@pytest.fixture(scope="module")
def cifar_source():
    """A small CIFAR ResNeXt: torchvision's names fit its 3 stages as well."""
    model = randomise_batch_norms(kr.ResNeXt29(**CIFAR, classifier_activation=None), seed=4)
    images = np.random.default_rng(5).normal(size=(2, 32, 32, 3)).astype("float32")
    return model, images, np.asarray(model(images, training=False))


@pytest.mark.parametrize("block_form", ["a", "b"])
def test_form_a_and_b_models_load_through_form_c(cifar_source, tmp_path, block_form):
    model, images, outputs = cifar_source
    path = write_safetensors(torchvision_state_dict(model), tmp_path)
    loaded = kr.ResNeXt29(**CIFAR, classifier_activation=None, block_form=block_form,
                          weights=path)
    assert loaded.block_form == block_form
    np.testing.assert_allclose(np.asarray(loaded(images, training=False)), outputs,
                               rtol=1e-5, atol=1e-5)


def test_weights_h5_round_trip_is_exact(source, tmp_path):
    model, images, outputs = source
    path = str(tmp_path / "small.weights.h5")
    model.save_weights(path)
    loaded = kr.ResNeXt50(**SMALL, classifier_activation=None, weights=path)
    np.testing.assert_array_equal(np.asarray(loaded(images, training=False)), outputs)
    headless = kr.ResNeXt50(**SMALL, include_top=False, weights=path)
    assert_same_weights(headless, model)


def test_cifar_weights_h5_loads_into_same_model_and_other_form(cifar_source, tmp_path):
    model, images, outputs = cifar_source
    path = str(tmp_path / "cifar.h5")  # detected by content, not by name
    model.save_weights(str(tmp_path / "cifar.weights.h5"))
    os.rename(str(tmp_path / "cifar.weights.h5"), path)
    same = kr.ResNeXt29(**CIFAR, classifier_activation=None, weights=path)
    np.testing.assert_array_equal(np.asarray(same(images, training=False)), outputs)
    form_b = kr.ResNeXt29(**CIFAR, classifier_activation=None, block_form="b", weights=path)
    np.testing.assert_allclose(np.asarray(form_b(images, training=False)), outputs,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_form", ["c", "b"])
def test_weights_h5_saved_after_training_loads(tmp_path, block_form):
    # A compiled, trained model also saves its optimizer's variables.
    model = kr.ResNeXt29(**CIFAR, classifier_activation=None)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    images = np.random.default_rng(6).normal(size=(2, 32, 32, 3)).astype("float32")
    model.train_on_batch(images, np.array([0, 1]))
    path = str(tmp_path / "trained.weights.h5")
    model.save_weights(path)
    loaded = kr.ResNeXt29(**CIFAR, classifier_activation=None, block_form=block_form,
                          weights=path)
    np.testing.assert_allclose(np.asarray(loaded(images, training=False)),
                               np.asarray(model(images, training=False)), rtol=1e-5, atol=1e-5)


# Heads ----------------------------------------------------------------------


def test_other_classes_skip_the_classifier_with_a_warning(source, safetensors_file):
    model = kr.ResNeXt50(**dict(SMALL, classes=3))
    fresh_head = model.get_layer("predictions").get_weights()
    with pytest.warns(UserWarning, match="has a 7-class classifier and .* 3 classes: the "
                                         "classifier was not loaded"):
        kr_weights.load_weights(model, safetensors_file)
    assert_same_weights(model, source[0], skip={"predictions"})
    for got, want in zip(model.get_layer("predictions").get_weights(), fresh_head):
        np.testing.assert_array_equal(got, want)


def test_include_top_false_drops_the_classifier(source, safetensors_file, recwarn):
    model = kr.ResNeXt50(**SMALL, include_top=False, pooling="avg", weights=safetensors_file)
    assert "predictions" not in {layer.name for layer in model.layers}
    assert_same_weights(model, source[0])
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)
                and "classifier" in str(w.message)]


def test_checkpoint_without_classifier_warns_and_loads_the_backbone(source, tmp_path):
    state = torchvision_state_dict(source[0])
    del state["fc.weight"], state["fc.bias"]
    with pytest.warns(UserWarning, match="has no classifier; .*'predictions' layer keeps"):
        model = kr.ResNeXt50(**SMALL, weights=write_safetensors(state, tmp_path))
    assert_same_weights(model, source[0], skip={"predictions"})


def test_weights_h5_with_other_classes_loads_the_backbone(source, tmp_path):
    path = str(tmp_path / "small.weights.h5")
    source[0].save_weights(path)
    with pytest.warns(UserWarning, match="has a 7-class classifier"):
        model = kr.ResNeXt50(**dict(SMALL, classes=2), weights=path)
    assert_same_weights(model, source[0], skip={"predictions"})


# Refusals -------------------------------------------------------------------


@pytest.fixture(scope="module")
def target():
    return kr.ResNeXt50(**SMALL)


def assert_untouched(model, before):
    for name, tensors in weights_by_layer(model).items():
        for got, want in zip(tensors, before[name]):
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_shape_mismatch_names_the_tensor_and_both_shapes(source, safetensors_file):
    wider = kr.ResNeXt50(**dict(SMALL, cardinality=4))
    before = weights_by_layer(wider)
    with pytest.raises(ValueError) as error:
        kr_weights.load_weights(wider, safetensors_file)
    message = str(error.value)
    assert message.startswith(f"{safetensors_file} does not fit resnext50_4x4d; nothing was loaded")
    assert ("layer1.0.conv1.weight is [8, 64, 1, 1] in the file, "
            "the model needs [16, 64, 1, 1]") in message
    assert "The file holds a resnext50_2x4d (stage depths (3, 4, 6, 3)" in message
    assert_untouched(wider, before)


def test_weights_h5_of_another_architecture_is_refused_untouched(source, tmp_path):
    path = str(tmp_path / "small.weights.h5")
    source[0].save_weights(path)
    wider = kr.ResNeXt50(**dict(SMALL, cardinality=4))
    before = weights_by_layer(wider)
    with pytest.raises(ValueError, match=f"{path} does not fit resnext50_4x4d; nothing was "
                                         r"loaded: .* value.shape=\(1, 1, 64, 8\)"):
        kr_weights.load_weights(wider, path)
    assert_untouched(wider, before)


def test_missing_and_unexpected_keys_are_listed(source, target, tmp_path):
    state = torchvision_state_dict(source[0])
    del state["layer2.0.bn1.running_var"]
    del state["layer4.2.conv3.weight"]
    state["layer1.0.se.fc1.weight"] = np.zeros((4, 4), "float32")
    state["head.extra"] = np.zeros(3, "float32")
    path = write_safetensors(state, tmp_path)
    before = weights_by_layer(target)
    with pytest.raises(ValueError) as error:
        kr_weights.load_weights(target, path)
    message = str(error.value)
    assert "2 missing from the file: layer2.0.bn1.running_var, layer4.2.conv3.weight" in message
    assert "2 in the file that" in message
    assert "layer1.0.se.fc1.weight" in message and "head.extra" in message
    assert_untouched(target, before)


def test_imagenet_weights_raise_pointing_to_the_readme():
    with pytest.raises(ValueError, match="hosts no weight files.*Pretrained weights"):
        kr.ResNeXt50(**SMALL, weights="imagenet")


def test_unrecognised_and_missing_files_are_named(target, tmp_path):
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=f"Unrecognised weights file {junk}"):
        kr_weights.load_weights(target, str(junk))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((20).to_bytes(8, "little") + b'{"not": "a header"}  ')
    with pytest.raises(ValueError, match=f"Could not read {broken} as a .safetensors file"):
        kr_weights.load_weights(target, str(broken))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        kr_weights.load_weights(target, str(tmp_path / "nowhere.pth"))


def test_pth_is_read_without_torch(target, tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    with zipfile.ZipFile(path, "w") as archive:  # the layout of torch.save's files
        archive.writestr("model/data.pkl", pickle.dumps({}))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    with pytest.raises(ValueError, match=f"{path} does not fit .*missing from the file"):
        kr_weights.load_weights(target, str(path))


# With torch -----------------------------------------------------------------


class _RunsCode:
    """Unpickling this runs `touch MARKER`: what weights_only must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy_pickle", [False, True], ids=["zip", "legacy"])
def test_code_in_a_pth_is_refused_and_never_runs(target, tmp_path, legacy_pickle):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    payload = {"conv1.weight": torch.zeros(64, 3, 7, 7), "hook": _RunsCode(marker)}
    if legacy_pickle:
        with open(path, "wb") as file:
            pickle.dump(payload, file, protocol=2)
    else:
        torch.save(payload, path)
    before = weights_by_layer(target)
    with pytest.raises(ValueError, match=f"Refused {path} as unsafe.*nothing in it ran"):
        kr_weights.load_weights(target, str(path))
    assert not marker.exists()
    assert_untouched(target, before)


@pytest.mark.parametrize("nesting", [None, "state_dict", "model"])
def test_pth_round_trip_is_exact(source, tmp_path, nesting):
    torch = pytest.importorskip("torch")
    model, images, outputs = source
    state = {name: torch.from_numpy(value)
             for name, value in torchvision_state_dict(model).items()}
    path = tmp_path / "small.pth"
    torch.save(state if nesting is None else {nesting: state, "epoch": 90}, path)
    loaded = kr.ResNeXt50(**SMALL, classifier_activation=None, weights=str(path))
    np.testing.assert_array_equal(np.asarray(loaded(images, training=False)), outputs)
