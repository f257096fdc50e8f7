"""A ResNeXt as the backbone of keras-hub's RetinaNet, with no adapter code:
keras-hub reads `pyramid_outputs` and `inputs` of our model (issue 12)."""

import json
import os
import types
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_resnext as kr
from detection_data import import_keras_hub, rectangles, yxyx_batch

keras_hub = import_keras_hub()

from keras_resnext.training import detection  # noqa: E402  (needs keras_hub)

IMAGE_SIZE = 128
NUM_CLASSES = 3


def tiny_encoder(**options):
    return kr.ResNeXt((1, 1, 1, 1), cardinality=2, width=4, include_top=False,
                      input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), **options)


@pytest.fixture(scope="module")
def data():
    images, objects = rectangles(8, IMAGE_SIZE, IMAGE_SIZE, seed=0)
    return np.stack(images).astype("float32"), yxyx_batch(objects)


@pytest.fixture(scope="module")
def trained(data):
    """The detector as the issue writes it, with torchvision's fine-tuning
    backbone (frozen batch norm, the last 3 stages trained), trained for a few
    steps; and the encoder's weights before training."""
    keras.utils.set_random_seed(0)
    encoder = tiny_encoder(freeze_batch_norm=True, trainable_stages=3)
    before = {weight.path: weight.numpy() for weight in encoder.weights}
    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=encoder, min_level=3, max_level=7, use_p5=False,
        image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    model = keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone, num_classes=NUM_CLASSES, bounding_box_format="yxyx",
        preprocessor=keras_hub.models.RetinaNetObjectDetectorPreprocessor(
            image_converter=detection.image_converter(IMAGE_SIZE)))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    images, targets = data
    history = model.fit(images, targets, batch_size=4, epochs=6, shuffle=False, verbose=0)
    return model, history.history["loss"], before


def test_the_backbone_reads_our_pyramid():
    encoder = tiny_encoder()
    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=encoder, min_level=3, max_level=7, use_p5=False,
        image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    features = backbone(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), "float32"))
    assert {level: tuple(f.shape) for level, f in features.items()} == {
        f"P{level}": (1, IMAGE_SIZE // 2 ** level, IMAGE_SIZE // 2 ** level, 256)
        for level in range(3, 8)}
    # The encoder's own weights, shared, not copied.
    encoder_ids = {id(w) for w in encoder.weights}
    assert encoder_ids <= {id(w) for w in backbone.weights}


@pytest.mark.slow
def test_retinanet_trains_on_rectangles(trained, data):
    model, losses, _ = trained
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses
    predicted = model.predict(data[0][:2], verbose=0)
    assert predicted["boxes"].shape == (2, 100, 4)
    assert predicted["confidence"].shape == (2, 100)


@pytest.mark.slow
def test_frozen_parts_of_the_backbone_stay_put_under_fit(trained):
    model, _, before = trained
    after = {weight.path: weight.numpy() for weight in model.backbone.image_encoder.weights}
    moved = {path for path in before if not np.array_equal(before[path], after[path])}
    assert moved, "nothing in the backbone trained"
    for path in moved:
        # Only the kernels of conv3..conv5 (trainable_stages=3) move; no BN weight or
        # statistic does, and nothing of the stem (conv1) or conv2.
        assert path.split("/")[0].startswith(("conv3_", "conv4_", "conv5_")), path
        assert "bn" not in path.split("/")[0], path


@pytest.mark.slow
def test_keras_file_round_trip(trained, data, tmp_path):
    model, _, _ = trained
    path = str(tmp_path / "retinanet.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    images = data[0][:2]
    expected, actual = model(images), loaded(images)
    for name in ("bbox_regression", "cls_logits"):
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-4, atol=1e-4)
    encoder = loaded.backbone.image_encoder
    assert isinstance(encoder, kr.ResNeXt)
    assert (encoder.freeze_batch_norm, encoder.trainable_stages) == (True, 3)
    assert len(encoder.trainable_weights) == len(model.backbone.image_encoder.trainable_weights)


@pytest.mark.slow
def test_saved_model_serves_the_detections(trained, data, tmp_path):
    model, _, _ = trained
    path = detection.export_detector(model, str(tmp_path / "export"), IMAGE_SIZE,
                                     ("red", "green", "blue"))
    assert path.endswith(os.path.join("export", "1"))
    served = tf.saved_model.load(path).signatures["serving_default"](
        images=tf.constant(data[0][:2]))
    expected = model.predict(data[0][:2], verbose=0)
    np.testing.assert_array_equal(served["num_detections"], expected["num_detections"])
    count = int(expected["num_detections"][0])
    np.testing.assert_allclose(served["boxes"][0, :count], expected["boxes"][0, :count],
                               rtol=1e-3, atol=1e-2)
    with open(os.path.join(path, "assets.extra", "class_names.json")) as f:
        assert json.load(f) == ["red", "green", "blue"]


def test_a_diverged_run_names_the_detection_clis_warmup_flag():
    # train/detection.py has --warmup_steps, not the classification CLIs' --warmup_epochs.
    logger = detection._EpochLogger(optimizer=None, completed=None,
                                    checkpoints=types.SimpleNamespace(directory="ckpts"),
                                    csv_path=None, writers=None, images_per_epoch=8)
    logger.started = 0.0
    with pytest.raises(kr.training.UserError) as error:
        logger.on_epoch_end(1, {"loss": float("nan")})
    assert str(error.value).endswith("lower --lr or add --warmup_steps."), str(error.value)


def test_evaluating_a_pipeline_of_unknown_length_does_not_warn_of_interrupted_training(data):
    # The detection pipeline skips unreadable images, so its length is unknown;
    # Keras' predict then warns "Your input ran out of data; interrupting training".
    images, targets = data
    dataset = tf.data.Dataset.from_tensor_slices((images[:2], {
        name: value[:2] for name, value in targets.items()})).filter(lambda *_: True).batch(2)
    assert dataset.cardinality() == tf.data.UNKNOWN_CARDINALITY
    model = detection.build_retinanet(tiny_encoder(), NUM_CLASSES, IMAGE_SIZE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ap = detection.evaluate_detector(model, dataset)
    assert ap["eval_images"] == 2
    assert not [w for w in caught if "ran out of data" in str(w.message)]


@pytest.mark.parametrize("flags, key", [(None, "P5"), ((False, False, True), "P4"),
                                        ((False, True, True), "P3")])
def test_keras_hubs_deeplab_segments_at_the_input_size_on_a_dilated_encoder(flags, key):
    # DeepLabV3 upsamples by 2**level of its key: a dilated encoder whose
    # stride-8 conv5 was still called "P5" gave 4x the input size, silently,
    # and its stride-8 "P3" was conv3's map, not the dilated conv5's.
    encoder = kr.ResNeXt((1, 1, 1, 1), cardinality=2, width=4, include_top=False,
                         input_shape=(64, 64, 3), replace_stride_with_dilation=flags)
    assert encoder.pyramid_outputs[key] is encoder.get_layer("conv5_block1_out").output
    backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=encoder, spatial_pyramid_pooling_key=key, low_level_feature_key="P2",
        upsampling_size=2 ** (int(key[1:]) - 2), dilation_rates=[6, 12, 18])
    segmenter = keras_hub.models.DeepLabV3ImageSegmenter(backbone=backbone, num_classes=3)
    assert tuple(segmenter(np.zeros((1, 64, 64, 3), "float32")).shape) == (1, 64, 64, 3)
