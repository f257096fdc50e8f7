"""The eval transform travels with the weights (issue 11): `EvalTransform`,
its config round trips, timm's pretrained_cfg, and what preprocess_for_eval,
export, predict and --eval_only apply."""

import json

import keras
import numpy as np
import pytest

import keras_resnext as kr
from keras_resnext.transforms import (
    FAMILY_EVAL_TRANSFORMS, EvalTransform, model_eval_transform, resolve_eval_transform)

BICUBIC_TIMM = EvalTransform(16, 18, "bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))

# timm's pretrained_cfg of resnext50_32x4d.a1h_in1k, as its Hugging Face
# config.json holds it (the keys preprocessing reads, and a few others).
TIMM_A1H_CONFIG = {
    "architecture": "resnext50_32x4d",
    "num_classes": 1000,
    "pretrained_cfg": {
        "tag": "a1h_in1k",
        "custom_load": False,
        "input_size": [3, 224, 224],
        "test_input_size": [3, 288, 288],
        "fixed_input_size": False,
        "interpolation": "bicubic",
        "crop_pct": 0.95,
        "test_crop_pct": 1.0,
        "crop_mode": "center",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "num_classes": 1000,
        "pool_size": [7, 7],
        "first_conv": "conv1",
        "classifier": "fc",
        "origin_url": "https://github.com/huggingface/pytorch-image-models",
        "paper_ids": "arXiv:2110.00476",
    },
}


def tiny_model(**arguments):
    return kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3, input_shape=(16, 16, 3),
                        **arguments)


# ----------------------------------------------------------------------------
# The transform as data


def test_transform_config_is_plain_json_and_round_trips():
    config = BICUBIC_TIMM.get_config()
    assert json.loads(json.dumps(config)) == config
    assert config == dict(image_size=16, resize_size=18, interpolation="bicubic",
                          mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    assert EvalTransform.from_config(config) == BICUBIC_TIMM
    assert BICUBIC_TIMM.crop_pct == pytest.approx(16 / 18)


def test_family_defaults_are_the_papers_views():
    assert FAMILY_EVAL_TRANSFORMS["imagenet"] == EvalTransform(224, 256, "bilinear")
    assert FAMILY_EVAL_TRANSFORMS["cifar"] == EvalTransform(32, 32)
    assert kr.applications.eval_transform("imagenet", 320) == (320, 366)


@pytest.mark.parametrize("fields,message", [
    (dict(image_size=224, resize_size=200), "resize_size .200. must be at least image_size"),
    (dict(image_size=224, resize_size=256, interpolation="nearest"), "interpolation"),
    (dict(image_size=224, resize_size=256, mean=(0.5, 0.5)), "mean must be 3 numbers"),
    (dict(image_size=0, resize_size=256), "image_size must be a positive integer"),
])
def test_bad_transforms_are_refused_in_one_line(fields, message):
    with pytest.raises(ValueError, match=message):
        EvalTransform(**fields)
    with pytest.raises(ValueError, match="unknown keys"):
        EvalTransform.from_config(dict(image_size=224, resize_size=256, crop=1))


def test_from_timm_config_follows_timms_eval_transform():
    # timm: resize = floor(image_size / crop_pct) = floor(224 / 0.95) = 235.
    assert EvalTransform.from_timm_config(TIMM_A1H_CONFIG) == EvalTransform(
        224, 235, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    # Its test size: 288 at test_crop_pct 1.0 (timm's 82.0% top-1 row).
    assert EvalTransform.from_timm_config(TIMM_A1H_CONFIG, use_test_size=True) == \
        EvalTransform(288, 288, "bicubic")
    # The bare pretrained_cfg works too; without test_crop_pct the test size
    # keeps crop_pct: floor(288 / 0.95) = 303.
    bare = dict(TIMM_A1H_CONFIG["pretrained_cfg"])
    del bare["test_crop_pct"]
    assert EvalTransform.from_timm_config(bare, use_test_size=True) == \
        EvalTransform(288, 303, "bicubic")
    with pytest.raises(ValueError, match="crop_mode 'squash' is not supported"):
        EvalTransform.from_timm_config(dict(bare, crop_mode="squash"))


def test_overrides_keep_the_proportion_or_follow_crop_pct():
    base = EvalTransform(224, 232, "bicubic", mean=(0.5, 0.5, 0.5))
    assert base.with_overrides() is base
    assert base.with_overrides(image_size=320) == EvalTransform(320, 331, "bicubic",
                                                                mean=(0.5, 0.5, 0.5))
    assert base.with_overrides(image_size=320, resize_size=320).resize_size == 320
    assert base.with_overrides(crop_pct=0.875).resize_size == 256
    assert base.with_overrides(interpolation="bilinear").interpolation == "bilinear"
    with pytest.raises(ValueError, match="not both"):
        base.with_overrides(resize_size=256, crop_pct=0.875)


# ----------------------------------------------------------------------------
# The model records it


def test_model_records_its_transform_and_round_trips_through_keras_file(tmp_path):
    model = tiny_model(eval_transform=BICUBIC_TIMM)
    assert model.eval_transform == BICUBIC_TIMM
    assert model.get_config()["eval_transform"] == BICUBIC_TIMM.get_config()
    path = str(tmp_path / "tiny.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.eval_transform == BICUBIC_TIMM
    assert model_eval_transform(loaded) == BICUBIC_TIMM
    assert kr.ResNeXt.from_config(model.get_config()).eval_transform == BICUBIC_TIMM


def test_model_without_a_transform_uses_its_familys_and_old_configs_load():
    model = tiny_model()
    assert model.get_config()["eval_transform"] is None
    old_config = {k: v for k, v in model.get_config().items() if k != "eval_transform"}
    assert kr.ResNeXt.from_config(old_config).eval_transform is None
    assert model_eval_transform(model) == EvalTransform(16, 16)  # CIFAR-style, at its size
    model.eval_transform = BICUBIC_TIMM.get_config()  # a dict is read as a transform
    assert model.eval_transform == BICUBIC_TIMM


def test_recorded_transform_follows_the_models_input_size():
    imagenet = kr.build("resnext50_32x4d", include_top=False, input_shape=(None, None, 3),
                        eval_transform=EvalTransform(224, 235, "bicubic"))
    assert model_eval_transform(imagenet) == EvalTransform(224, 235, "bicubic")
    assert model_eval_transform(imagenet, 288) == EvalTransform(288, 302, "bicubic")
    assert kr.applications.eval_transform(imagenet) == (224, 235)
    for builder in (kr.ResNeXt50, kr.ResNeXt101, kr.ResNeXt152):
        assert builder(include_top=False, input_shape=(64, 64, 3), cardinality=2, width=4,
                       eval_transform=BICUBIC_TIMM).eval_transform == BICUBIC_TIMM


def test_resolve_prefers_the_transform_then_the_model_then_the_paper():
    model = tiny_model(eval_transform=BICUBIC_TIMM)
    assert resolve_eval_transform() == EvalTransform(224, 256)
    assert resolve_eval_transform(model=model) == BICUBIC_TIMM
    assert resolve_eval_transform(model=model, resize_size=20).resize_size == 20
    assert resolve_eval_transform(BICUBIC_TIMM.get_config()) == BICUBIC_TIMM
    with pytest.raises(ValueError, match="not both"):
        resolve_eval_transform(BICUBIC_TIMM, model)


# ----------------------------------------------------------------------------
# The views it gives, against PIL (timm's and torchvision's eval resize)


def textured_png(height, width, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    pixels = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
    return encode_png(pixels)


def encode_png(pixels):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def pil_view(data, transform):
    """An independent view: PIL's resize (antialiased when reducing), numpy crop."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = transform.resize_size / min(image.size)
    width, height = round(image.width * scale), round(image.height * scale)
    kernel = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[transform.interpolation]
    resized = np.asarray(image.resize((width, height), kernel), np.float64)
    top, left = (height - transform.image_size) // 2, (width - transform.image_size) // 2
    crop = resized[top:top + transform.image_size, left:left + transform.image_size]
    return (crop / 255.0 - np.array(transform.mean)) / np.array(transform.std)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("height,width,image_size,resize_size", [
    (333, 400, 224, 256),  # downscale, landscape, odd crop offset
    (97, 131, 56, 64),     # downscale, small
    (40, 50, 56, 64),      # upscale
])
def test_eval_view_matches_pils_resize(interpolation, height, width, image_size, resize_size):
    transform = EvalTransform(image_size, resize_size, interpolation,
                              mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    data = textured_png(height, width, seed=height)
    ours = kr.preprocess_for_eval(data, transform=transform).numpy()
    # In pixel levels (0-255): PIL rounds its result to uint8, half a level,
    # plus float differences. Measured (AMD EPYC family 25 model 17, TF 2.21,
    # Pillow): bilinear max 1.00 / mean 0.30, bicubic max 1.41 / mean 0.25.
    difference = np.abs(ours - pil_view(data, transform)) * np.array(transform.std) * 255
    assert difference.max() < 1.5 and difference.mean() < 0.4


def test_preprocess_for_eval_takes_the_models_transform_and_old_arguments():
    data = textured_png(40, 52, seed=1)
    model = tiny_model(eval_transform=BICUBIC_TIMM)
    from_model = kr.preprocess_for_eval(data, model=model).numpy()
    np.testing.assert_array_equal(from_model, kr.preprocess_for_eval(data, transform=BICUBIC_TIMM))
    np.testing.assert_allclose(from_model, pil_view(data, BICUBIC_TIMM), atol=1.5 / 255 / 0.2)
    # The old positional call is the bilinear, ImageNet mean/std view.
    np.testing.assert_array_equal(
        kr.preprocess_for_eval(data, 16, 18),
        kr.preprocess_for_eval(data, transform=EvalTransform(16, 18, "bilinear")))


# ----------------------------------------------------------------------------
# Export and predict apply the model's transform


def classifier_model(**arguments):
    keras.utils.set_random_seed(0)
    model = tiny_model(classifier_activation=None, **arguments)
    rng = np.random.default_rng(0)
    for weight in model.non_trainable_weights:
        values = (rng.uniform(0.5, 1.5, weight.shape) if "variance" in weight.path
                  else rng.normal(0, 0.1, weight.shape))
        weight.assign(values.astype("float32"))
    classifier = model.get_layer("predictions")
    classifier.kernel.assign(rng.normal(0, 0.3, classifier.kernel.shape).astype("float32"))
    return model


def image_files(directory):
    paths = []
    for index, (height, width) in enumerate(((30, 44), (57, 41))):
        path = directory / f"{index}.png"
        path.write_bytes(textured_png(height, width, seed=index))
        paths.append(str(path))
    return paths


def probabilities_of(model, paths, transform):
    tf = pytest.importorskip("tensorflow")
    images = np.stack([kr.preprocess_for_eval(open(p, "rb").read(), transform=transform)
                       for p in paths])
    return tf.nn.softmax(model(images, training=False)).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model whose weights record BICUBIC_TIMM, exported with no
    transform arguments; its image files."""
    export = pytest.importorskip("keras_resnext.export")
    directory = tmp_path_factory.mktemp("exported")
    model = classifier_model(eval_transform=BICUBIC_TIMM)
    path = export.export_saved_model(model, str(directory / "models"))
    return model, path, image_files(directory)


def test_export_records_and_applies_the_models_transform(exported):
    tf = pytest.importorskip("tensorflow")
    model, path, paths = exported
    loaded = tf.saved_model.load(path)
    metadata = loaded.signatures["metadata"]()
    assert json.loads(metadata["eval_transform"].numpy()) == BICUBIC_TIMM.get_config()
    assert (int(metadata["image_size"]), int(metadata["resize_size"])) == (16, 18)
    assert metadata["interpolation"].numpy() == b"bicubic"
    np.testing.assert_allclose(metadata["mean"].numpy(), BICUBIC_TIMM.mean, rtol=1e-7)
    np.testing.assert_allclose(metadata["std"].numpy(), BICUBIC_TIMM.std, rtol=1e-7)
    served = loaded.signatures["serving_default"](
        image_bytes=tf.constant([open(p, "rb").read() for p in paths]))
    expected = probabilities_of(model, paths, BICUBIC_TIMM)
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=2e-6)
    bilinear = probabilities_of(model, paths, EvalTransform(16, 18))
    # The transform shows in the numbers: bilinear ones are far outside the tolerance.
    assert np.abs(bilinear - expected).max() > 5e-5


def test_predict_uses_the_exported_transform_unless_flags_change_it(exported):
    predict = pytest.importorskip("keras_resnext.predict")
    model, path, paths = exported
    for overrides, transform in (
            ({}, BICUBIC_TIMM),
            (dict(interpolation="bilinear", resize_size=22),
             EvalTransform(16, 22, "bilinear", BICUBIC_TIMM.mean, BICUBIC_TIMM.std)),
            (dict(crop_pct=0.8), EvalTransform(16, 20, "bicubic", BICUBIC_TIMM.mean,
                                               BICUBIC_TIMM.std))):
        expected = probabilities_of(model, paths, transform)
        for prediction, row in zip(predict.predict_files(path, paths, **overrides), expected):
            names, scores = zip(*prediction.top)
            best = np.argsort(-row, kind="stable")
            assert [int(name) for name in names] == best.tolist()
            np.testing.assert_allclose(scores, row[best], atol=2e-6)
    with pytest.raises(predict.PredictError, match="--image_size 32: the SavedModel takes 16x16"):
        predict.predict_files(path, paths, image_size=32)


def test_predict_cli_flags_change_the_transform(exported, python_subprocess):
    _, path, paths = exported
    command = ("import runpy, sys; sys.argv = ['predict'] + sys.argv[1:]; "
               "runpy.run_module('keras_resnext.predict', run_name='__main__')")
    runs = {}
    for flags in ((), ("--interpolation=bilinear", "--resize_size=22")):
        result = python_subprocess(command, args=(f"--saved_model={path}", *flags, *paths))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[flags] = result.stdout
    first, overridden = runs.values()
    assert paths[0] in first and "1. " in first and first != overridden
    result = python_subprocess(command, args=(f"--saved_model={path}", "--image_size=32", *paths))
    assert result.returncode == 1
    assert "Error: --image_size 32: the SavedModel takes 16x16 images" in result.stderr


# ----------------------------------------------------------------------------
# --eval_only evaluates with the weights' transform

# Loads --weights as named weights do (issue 11): the model then records the
# transform given as the first argument.
EVAL_ONLY_RUNNER = r"""
import json, runpy, sys
from train import common
from keras_resnext.transforms import EvalTransform

load_weights = common.load_weights
recorded = EvalTransform.from_config(json.loads(sys.argv[1]))

def load_weights_recording_a_transform(model, weights):
    load_weights(model, weights)
    model.eval_transform = recorded

common.load_weights = load_weights_recording_a_transform
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def expected_loss(model, examples, transform, view="center"):
    tf = pytest.importorskip("tensorflow")
    losses = []
    for data, label in examples:
        images = kr.preprocess_for_eval(data, transform=transform, view=view)
        images = images if view == "ten_crop" else images[None]
        probabilities = tf.nn.softmax(model(images, training=False)).numpy().mean(axis=0)
        losses.append(-np.log(probabilities[label]))
    return float(np.mean(losses))


@pytest.mark.slow
def test_eval_only_uses_the_weights_transform_unless_flags_change_it(tmp_path, python_subprocess):
    from conftest import REPO_ROOT

    model = classifier_model()
    weights = str(tmp_path / "tiny.weights.h5")
    model.save_weights(weights)
    examples = []
    for label in range(3):
        directory = tmp_path / "data" / "val" / f"class_{label}"
        directory.mkdir(parents=True)
        for index, (height, width) in enumerate(((30, 44), (57, 41))):
            data = textured_png(height, width, seed=10 * label + index)
            (directory / f"{index}.png").write_bytes(data)
            examples.append((data, label))
    common_flags = ("--eval_only", f"--weights={weights}", f"--dataset=folder:{tmp_path / 'data'}",
                    "--preprocessing=imagenet", "--image_size=16", "--depth=11",
                    "--cardinality=4", "--width=4", "--batch_size=4")
    recorded = json.dumps(BICUBIC_TIMM.get_config())
    changed = EvalTransform(16, 20, "bilinear", BICUBIC_TIMM.mean, BICUBIC_TIMM.std)
    for flags, transform, view in (
            ((), BICUBIC_TIMM, "center"),
            (("--interpolation=bilinear", "--crop_pct=0.8", "--eval_view=ten_crop"), changed,
             "ten_crop")):
        model_dir = tmp_path / f"eval_{view}"
        result = python_subprocess(
            EVAL_ONLY_RUNNER, args=(recorded, f"{REPO_ROOT}/train/cifar.py", *common_flags,
                                    *flags, f"--model_dir={model_dir}"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"Eval view: {transform.describe(view)}." in result.stdout
        metrics = json.loads((model_dir / "eval_metrics.json").read_text())
        assert metrics["eval_transform"] == transform.get_config()
        assert metrics["eval_view"] == view and metrics["num_examples"] == 6
        assert metrics["loss"] == pytest.approx(expected_loss(model, examples, transform, view),
                                                rel=1e-5)
