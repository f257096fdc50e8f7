"""The paper's other evaluation views (issue 13): fb.resnet.torch's ten crops
with probabilities averaged, timm's crop_pct, and Table 5's 320x320 single crop."""

import io
import os

import numpy as np
import pytest
from PIL import Image

import pipelines
from keras_resnext import training
from keras_resnext.kernels.images import preprocess_for_eval, resize_shorter_side
from keras_resnext.transforms import EvalTransform
from test_eval_transform import classifier_model

import tensorflow as tf  # noqa: E402  After keras_resnext, which sets TF's options.

CLASSES = 3
TRANSFORM = EvalTransform(16, 20, "bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def png(height, width, seed):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def normalised(pixels, transform):
    return (np.asarray(pixels) / 255.0 - np.array(transform.mean)) / np.array(transform.std)


def tiny_model():
    # Non-trivial BN statistics and a classifier that tells the crops apart.
    return classifier_model()


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory):
    """Non-square images (so the corners differ) in class folders; their
    bytes and labels in file order."""
    root = tmp_path_factory.mktemp("views")
    examples = []
    for label in range(CLASSES):
        directory = root / "val" / f"class_{label}"
        os.makedirs(directory)
        for index, (height, width) in enumerate(((23, 31), (40, 26))):
            data = png(height, width, seed=10 * label + index)
            (directory / f"{index}.png").write_bytes(data)
            examples.append((data, label))
    return str(root), examples


def test_ten_crop_is_the_centre_and_corners_of_the_image_and_its_mirror():
    data = png(23, 31, seed=0)
    crops = preprocess_for_eval(data, transform=TRANSFORM, view="ten_crop").numpy()
    assert crops.shape == (10, 16, 16, 3)
    resized = resize_shorter_side(tf.io.decode_png(data), 20, "bicubic").numpy()
    height, width = resized.shape[:2]  # 20 x 27
    by_hand = []
    for image in (resized, resized[:, ::-1]):
        top, left = (height - 16) // 2, (width - 16) // 2
        by_hand.append(image[top:top + 16, left:left + 16])
        for top, left in ((0, 0), (0, width - 16), (height - 16, 0), (height - 16, width - 16)):
            by_hand.append(image[top:top + 16, left:left + 16])
    np.testing.assert_allclose(crops, normalised(by_hand, TRANSFORM), atol=1e-5)
    # The first crop is the single-crop view.
    np.testing.assert_array_equal(crops[0], preprocess_for_eval(data, transform=TRANSFORM))


def test_ten_crop_dataset_yields_ten_crops_per_image(val_folder):
    root, examples = val_folder
    dataset = pipelines.build_dataset(f"folder:{root}", "val", 4, False, preprocessing="imagenet",
                                      eval_transform=TRANSFORM, eval_view="ten_crop")
    assert dataset.element_spec[0].shape.as_list() == [None, 10, 16, 16, 3]
    images = np.concatenate([batch.numpy() for batch, _ in dataset])
    expected = [preprocess_for_eval(data, transform=TRANSFORM, view="ten_crop").numpy()
                for data, _ in examples]
    np.testing.assert_array_equal(images, np.stack(expected))


def test_ten_crop_evaluation_averages_the_ten_single_crop_probabilities(val_folder):
    root, examples = val_folder
    model = tiny_model()

    def dataset_fn(batch_size, input_context):
        return pipelines.build_dataset(f"folder:{root}", "val", batch_size, False,
                                       preprocessing="imagenet", eval_transform=TRANSFORM,
                                       eval_view="ten_crop", input_context=input_context)

    metrics = training.evaluate_model(model, training.InputSplit(dataset_fn, len(examples)), 4)

    # By hand: each of the ten single crops through the model, softmax, mean.
    losses, hits = [], []
    for data, label in examples:
        crops = preprocess_for_eval(data, transform=TRANSFORM, view="ten_crop")
        single = [tf.nn.softmax(model(crop[None], training=False))[0].numpy() for crop in crops]
        averaged = np.mean(single, axis=0)
        losses.append(-np.log(averaged[label]))
        hits.append(np.argmax(averaged) == label)
    assert metrics["num_examples"] == len(examples)
    assert metrics["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert metrics["top1"] == pytest.approx(np.mean(hits))
    # The centre crop alone scores differently: the views are not the same.
    center = training.evaluate_model(model, training.InputSplit(
        lambda batch_size, context: pipelines.build_dataset(
            f"folder:{root}", "val", batch_size, False, preprocessing="imagenet",
            eval_transform=TRANSFORM), len(examples)), 4)
    assert center["loss"] != pytest.approx(metrics["loss"], rel=1e-3)


def test_crop_pct_resizes_to_floor_of_image_size_over_it(val_folder):
    root, examples = val_folder
    dataset = pipelines.build_dataset(f"folder:{root}", "val", 8, False, image_size=56,
                                      preprocessing="imagenet", crop_pct=0.9,
                                      interpolation="bicubic")
    images = np.concatenate([batch.numpy() for batch, _ in dataset])
    # floor(56 / 0.9) = 62 (round would give 62 too; 0.95 below tells them apart).
    np.testing.assert_array_equal(
        images[0], preprocess_for_eval(examples[0][0], 56, 62, interpolation="bicubic"))
    assert EvalTransform.from_crop_pct(224, 0.95).resize_size == 235  # round: 236


def test_table_5_320_view_is_the_centre_320_square_of_the_shorter_side_at_320():
    # fb.resnet.torch (issue #31, for the He et al. 2016 ResNet-200 320 test that
    # Table 5 follows): shorter side resized to 320, then the centre 320x320.
    pixels = np.random.default_rng(3).integers(0, 256, (320, 400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    view = preprocess_for_eval(buffer.getvalue(), image_size=320, resize_size=320).numpy()
    np.testing.assert_allclose(view, normalised(pixels[:, 40:360], EvalTransform(320, 320)),
                               atol=1e-5)


def test_ten_crop_and_crop_pct_are_refused_for_cifar_style_data(val_folder):
    root, _ = val_folder
    for options in (dict(eval_view="ten_crop"), dict(crop_pct=0.9)):
        with pytest.raises(ValueError, match="ImageNet-style eval options"):
            pipelines.build_dataset(f"folder:{root}", "val", 4, False, preprocessing="cifar",
                                    **options)
    with pytest.raises(ValueError, match="Unknown eval_view 'five_crop'"):
        pipelines.build_dataset(f"folder:{root}", "val", 4, False, eval_view="five_crop")


def test_training_validation_averages_crops_too(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(0, 1, (12, 16, 16, 3)).astype("float32")
    labels = rng.integers(0, CLASSES, 12).astype("int32")
    crops = rng.normal(0, 1, (6, 10, 16, 16, 3)).astype("float32")

    def split(inputs, targets, training_split):
        return training.InputSplit(
            lambda batch_size, context: tf.data.Dataset.from_tensor_slices(
                (inputs, targets)).batch(batch_size, drop_remainder=training_split),
            len(targets))

    config = training.TrainConfig(model_dir=str(tmp_path), epochs=1, batch_size=4,
                                  learning_rate=0.01, weight_decay=1e-4, steps_per_epoch=2,
                                  validation_freq=0,
                                  seed=1)
    val = split(crops, labels[:6], False)
    result = training.train(tiny_model, split(images, labels, True), val, config,
                            log=lambda *args, **kwargs: None)
    again = training.evaluate_model(result.model, val, 4)
    assert result.metrics["loss"] == pytest.approx(again["loss"], rel=1e-6)
    assert result.metrics["eval_examples"] == 6
