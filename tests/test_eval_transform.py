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
