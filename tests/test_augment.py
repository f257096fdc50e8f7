"""pipelines.augment: the later recipes' training augmentations (issue 13).

TrivialAugment-wide and RandAugment per image, random erasing per image,
MixUp/CutMix per batch with soft labels that weigh what the pixels show, and
repeated augmentation spread over input pipelines; each reproducible from a
seed. All data is generated here, at 32-64 px.
"""

import io
import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

import keras_resnext
import pipelines
from pipelines import augment, imagenet
from tfrecord_files import write_tfrecords

import tensorflow as tf  # noqa: E402  After keras_resnext, which sets TF's options.

MEAN_RGB = np.array(keras_resnext.preprocessing.IMAGENET_MEAN_RGB) * 255.0
STD_RGB = np.array(keras_resnext.preprocessing.IMAGENET_STD_RGB) * 255.0
FILL = (124.0, 116.0, 104.0)


def textured_pixels(height, width, seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


def encode_png(pixels):
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def write_folder(root, classes, per_class, size=(40, 48)):
    """`root/train|val/class_<c>/<i>.png`, textured, each image its own."""
    for split in ("train", "val"):
        for label in range(classes):
            directory = os.path.join(root, split, f"class_{label}")
            os.makedirs(directory, exist_ok=True)
            for i in range(per_class):
                pixels = textured_pixels(*size, seed=100 * label + i)
                Image.fromarray(pixels).save(os.path.join(directory, f"{i}.png"))
    return f"folder:{root}"


def unnormalise(images):
    return np.asarray(images) * STD_RGB + MEAN_RGB


def batches(dataset):
    return [(np.asarray(images), np.asarray(labels)) for images, labels in dataset]


# ----------------------------------------------------------------------------
# TrivialAugment-wide and RandAugment


# torchvision 0.29.1's TrivialAugmentWide._augmentation_space(31), read from
# torchvision/transforms/autoaugment.py: op -> (first, last magnitude of a
# linspace over the 31 bins, signed). Posterize and the magnitude-free ops
# are listed whole.
TORCHVISION_TRIVIAL_AUGMENT_WIDE = {
    "Identity": ([0.0], False),
    "ShearX": ((0.0, 0.99), True),
    "ShearY": ((0.0, 0.99), True),
    "TranslateX": ((0.0, 32.0), True),
    "TranslateY": ((0.0, 32.0), True),
    "Rotate": ((0.0, 135.0), True),
    "Brightness": ((0.0, 0.99), True),
    "Color": ((0.0, 0.99), True),
    "Contrast": ((0.0, 0.99), True),
    "Sharpness": ((0.0, 0.99), True),
    "Posterize": ([8, 8, 8, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 5, 5, 5, 5, 5, 4, 4, 4, 4, 4,
                   3, 3, 3, 3, 3, 2, 2, 2], False),
    "Solarize": ((255.0, 0.0), False),
    "AutoContrast": ([0.0], False),
    "Equalize": ([0.0], False),
}


def test_trivial_augment_wide_has_torchvisions_ops_and_31_bins():
    ours = augment.TrivialAugmentWide().magnitudes()
    assert list(ours) == list(TORCHVISION_TRIVIAL_AUGMENT_WIDE)
    for name, (expected, signed) in TORCHVISION_TRIVIAL_AUGMENT_WIDE.items():
        magnitudes, our_signed = ours[name]
        if isinstance(expected, tuple):
            expected = np.linspace(*expected, 31)
        np.testing.assert_allclose(magnitudes, expected, atol=1e-6, err_msg=name)
        assert our_signed == signed, name


def test_trivial_augment_wide_draws_every_op_and_bin_per_image():
    policy = augment.TrivialAugmentWide()
    choices = list(tf.data.Dataset.range(400).map(
        lambda i: policy.choose(tf.stack([i, 7]))
    ).as_numpy_iterator())
    ops = {int(op) for op, _ in choices}
    assert ops == set(range(14))
    rotations = {round(float(m), 3) for op, m in choices if int(op) == 5}
    assert any(m < 0 for m in rotations) and any(m > 0 for m in rotations)
    assert rotations <= {round(s * 4.5 * b, 3) for b in range(31) for s in (-1, 1)}


@pytest.mark.parametrize("spec", ["trivial_augment_wide", "rand-m6-mstd0.5-inc1"])
def test_auto_augment_is_random_per_image_and_fixed_by_its_seed(spec):
    policy = augment.parse_auto_augment(spec)
    image = tf.constant(textured_pixels(48, 40), tf.float32)
    augmented = tf.data.Dataset.range(24).map(
        lambda i: policy(image, tf.stack([i, 3]))
    )
    views = np.stack(list(augmented.as_numpy_iterator()))
    assert views.shape == (24, 48, 40, 3)
    assert views.min() >= 0 and views.max() <= 255
    np.testing.assert_array_equal(views, np.round(views))  # whole values, as PIL's.
    distinct = {view.tobytes() for view in views}
    assert len(distinct) >= 12, f"only {len(distinct)} different views of 24"
    again = policy(image, tf.constant([5, 3], tf.int64)).numpy()
    np.testing.assert_array_equal(again, views[5])


def test_rand_augment_string_is_timms():
    policy = augment.parse_auto_augment("rand-m6-mstd0.5-inc1")
    assert policy == augment.RandAugment(
        magnitude=6.0, num_layers=2, magnitude_std=0.5, magnitude_max=10.0,
        probability=0.5, increasing=True,
    )
    assert augment.parse_auto_augment("rand-m9-n3-mstd0.5-p0.7") == augment.RandAugment(
        magnitude=9.0, num_layers=3, magnitude_std=0.5, probability=0.7,
    )
    for bad in ("rand-n2", "rand-m6-x1", "augmix-m5", "autoaugment", "rand-mfoo"):
        with pytest.raises(ValueError, match="Unknown auto_augment") as error:
            augment.parse_auto_augment(bad)
        assert "\n" not in str(error.value)


def test_rand_augment_levels_map_to_timms_arguments():
    # timm's inc1 ops at level 10: Solarize at threshold 0 inverts everything,
    # Posterize keeps 0 bits, Brightness doubles or nearly blacks out.
    image = tf.constant(textured_pixels(32, 32), tf.float32)
    policy = augment.RandAugment(magnitude=10, increasing=True)
    level, plus = tf.constant(10.0), tf.constant(1.0)

    def apply(name, image, level):
        return policy._apply(augment.TIMM_RAND_OPS.index(name), image, level, plus)

    np.testing.assert_array_equal(apply("Solarize", image, level), 255 - image)
    np.testing.assert_array_equal(apply("Posterize", image, level), 0 * image)
    brighter = apply("Brightness", image, level)
    np.testing.assert_array_equal(brighter, np.clip(np.round(1.9 * image.numpy()), 0, 255))
    # TranslateXRel: level 5 of 10 moves by 0.45 * 5 / 10 of the width, 9 of 40 px.
    wide = tf.constant(textured_pixels(32, 40), tf.float32)
    moved = apply("TranslateXRel", wide, tf.constant(5.0)).numpy()
    np.testing.assert_allclose(moved[:, 9:], wide[:, :-9], atol=1)
    np.testing.assert_allclose(moved[:, :9], np.broadcast_to(FILL, (32, 9, 3)), atol=1)


def test_trivial_augment_wide_ops_match_torchvision(tmp_path):
    """Each op against torchvision's `_apply_op` on the same uint8 image.

    Needs an interpreter with torchvision in $TORCH_PYTHON (CI has none).
    """
    torch_python = os.environ.get("TORCH_PYTHON")
    if not torch_python or not os.path.exists(torch_python):
        pytest.skip("set TORCH_PYTHON to an interpreter with torchvision to compare")
    cases = [("Identity", 0.0), ("ShearX", 0.3), ("ShearY", -0.5), ("TranslateX", 12.0),
             ("TranslateY", -7.0), ("Rotate", 30.0), ("Rotate", -100.0), ("Brightness", 0.5),
             ("Color", -0.9), ("Contrast", 0.5), ("Contrast", -0.5), ("Sharpness", 0.9),
             ("Posterize", 3.0), ("Solarize", 127.5), ("AutoContrast", 0.0), ("Equalize", 0.0)]
    pixels = textured_pixels(48, 40)
    np.save(tmp_path / "image.npy", pixels)
    script = (
        "import json, sys, numpy as np\n"
        "from PIL import Image\n"
        "from torchvision.transforms import autoaugment, InterpolationMode\n"
        "image = Image.fromarray(np.load(sys.argv[1]))\n"
        "outputs = [np.asarray(autoaugment._apply_op(image, name, m, InterpolationMode.NEAREST,"
        " None)) for name, m in json.loads(sys.argv[2])]\n"
        "np.save(sys.argv[3], np.stack(outputs))\n"
    )
    subprocess.run([torch_python, "-c", script, str(tmp_path / "image.npy"), json.dumps(cases),
                    str(tmp_path / "theirs.npy")], check=True, capture_output=True)
    theirs = np.load(tmp_path / "theirs.npy").astype(np.float32)
    policy = augment.TrivialAugmentWide()
    image = tf.constant(pixels, tf.float32)
    names = list(policy.magnitudes())
    for (name, magnitude), expected in zip(cases, theirs):
        ours = policy.apply(names.index(name), tf.constant(magnitude), image).numpy()
        difference = np.abs(ours - expected)
        # PIL rounds its blends a little differently: at most one grey level.
        assert difference.max() <= 1 and difference.mean() < 0.5, (name, magnitude)


def test_training_view_takes_the_policies_by_name_after_the_crop():
    data = encode_png(textured_pixels(48, 56))
    seed = tf.constant([3, 4], tf.int64)
    plain = imagenet.augment_for_train(data, 32, seed).numpy()
    for spec in ("trivial_augment_wide", "rand-m9-n3-mstd0.5-p1"):
        view = imagenet.augment_for_train(data, 32, seed, auto_augment=spec).numpy()
        assert view.shape == (32, 32, 3) and 0 <= view.min() and view.max() <= 255
        again = imagenet.augment_for_train(data, 32, seed, auto_augment=spec).numpy()
        np.testing.assert_array_equal(view, again)
        assert not np.array_equal(view, np.clip(np.round(plain), 0, 255))


# ----------------------------------------------------------------------------
# Random erasing


def test_random_erasing_erases_one_rectangle_per_image_as_torchvision():
    image = tf.constant(textured_pixels(48, 40), tf.float32)
    fill = (1.0, 2.0, 3.0)  # never in a textured image
    erased = np.stack([
        augment.random_erasing(image, tf.constant([s, 0]), 1.0, fill).numpy() for s in range(40)
    ])
    masks = np.all(erased == fill, axis=-1)
    boxes = set()
    for mask, view in zip(masks, erased):
        rows, columns = np.nonzero(mask)
        height, width = np.ptp(rows) + 1, np.ptp(columns) + 1
        assert mask.sum() == height * width  # one solid rectangle
        # torchvision: area 2%-33% of the image, aspect 0.3-3.3, before rounding.
        rounding = height + width
        assert 0.02 * 48 * 40 - rounding <= height * width <= 0.33 * 48 * 40 + rounding
        assert 0.3 * width - 1 <= height <= 3.3 * width + 1
        np.testing.assert_array_equal(view[~mask], image.numpy()[~mask])
        boxes.add((rows.min(), columns.min(), height, width))
    assert len(boxes) >= 35  # a rectangle of its own per image
    untouched = augment.random_erasing(image, tf.constant([1, 0]), 0.0, fill)
    np.testing.assert_array_equal(untouched, image)
    sometimes = [augment.random_erasing(image, tf.constant([s, 1]), 0.3, fill).numpy()
                 for s in range(200)]
    rate = np.mean([np.any(np.all(view == fill, axis=-1)) for view in sometimes])
    assert 0.2 < rate < 0.4


# ----------------------------------------------------------------------------
# MixUp and CutMix


def flat_batch(batch_size=6, size=(12, 16)):
    """Image i is flat with value 10 * (i + 1); label i."""
    values = 10.0 * np.arange(1, batch_size + 1)
    images = np.broadcast_to(values[:, None, None, None], (batch_size, *size, 3))
    return tf.constant(images, tf.float32), tf.range(batch_size), values


def test_mixup_mixes_images_and_labels_by_one_lambda_per_batch():
    images, labels, values = flat_batch()
    weights = set()
    for s in range(20):
        mixed, targets = augment.mix_batch(images, labels, tf.constant([s, 2]),
                                           num_classes=8, mixup_alpha=0.2)
        mixed, targets = mixed.numpy(), targets.numpy()
        assert targets.shape == (6, 8) and targets.dtype == np.float32
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
        weight = targets[0, 0]
        for i in range(6):
            neighbour = (i - 1) % 6
            np.testing.assert_allclose(targets[i, i], weight, atol=1e-6)
            np.testing.assert_allclose(targets[i, neighbour], 1 - weight, atol=1e-6)
            np.testing.assert_allclose(
                mixed[i], weight * values[i] + (1 - weight) * values[neighbour], rtol=1e-5
            )
        weights.add(float(weight))
    assert len(weights) >= 18  # a new lambda per batch (Beta(0.2, 0.2) is often near 0 or 1)


def test_cutmix_labels_weigh_the_pasted_pixels():
    images, labels, values = flat_batch(size=(24, 20))
    clipped = 0
    for s in range(40):
        mixed, targets = augment.mix_batch(images, labels, tf.constant([s, 4]),
                                           num_classes=6, cutmix_alpha=1.0)
        mixed, targets = mixed.numpy(), targets.numpy()
        for i in range(6):
            neighbour = (i - 1) % 6
            pasted = mixed[i, ..., 0] == values[neighbour]
            assert np.all(pasted | (mixed[i, ..., 0] == values[i]))
            np.testing.assert_allclose(targets[i, neighbour], pasted.mean(), atol=1e-6)
            np.testing.assert_allclose(targets[i, i], 1 - pasted.mean(), atol=1e-6)
        rows, columns = np.nonzero(pasted)
        if rows.size and (rows.min() == 0 or columns.min() == 0
                          or rows.max() == 23 or columns.max() == 19):
            clipped += 1
    assert clipped > 0  # boxes at the border were clipped, and still weigh right


@pytest.mark.parametrize("switch_prob, cutmix_share", [(0.0, 0.0), (1.0, 1.0), (0.5, None)])
def test_one_of_mixup_and_cutmix_per_batch(switch_prob, cutmix_share):
    images, labels, values = flat_batch()
    kinds = []
    for s in range(30):
        # Mixup's alpha 1 keeps its lambda away from 0 and 1: its pixels are blends.
        mixed, _ = augment.mix_batch(images, labels, tf.constant([s, 6]), num_classes=6,
                                     mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=switch_prob)
        kinds.append(np.all(np.isin(mixed.numpy()[0], values[[0, 5]])))
    if cutmix_share is None:
        assert 5 < sum(kinds) < 25
    else:
        assert np.mean(kinds) == cutmix_share


# ----------------------------------------------------------------------------
# build_dataset


RECIPE_VIEW = dict(auto_augment="trivial_augment_wide", random_erasing=0.5, mixup_alpha=0.2,
                   cutmix_alpha=1.0)


def test_build_dataset_is_unchanged_with_every_augmentation_off(tmp_path):
    source = write_folder(tmp_path, classes=2, per_class=4)
    plain = pipelines.build_dataset(source, "train", 4, True, 32, deterministic=True, seed=5)
    off = pipelines.build_dataset(
        source, "train", 4, True, 32, deterministic=True, seed=5, auto_augment=None,
        random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, repeated_augmentations=1,
    )
    for (images, labels), (off_images, off_labels) in zip(batches(plain), batches(off)):
        np.testing.assert_array_equal(images, off_images)
        np.testing.assert_array_equal(labels, off_labels)
        assert labels.dtype == np.int32


def test_build_dataset_recipe_view_soft_labels_and_determinism(tmp_path):
    source = write_folder(tmp_path, classes=3, per_class=4)

    def two_epochs(seed, **options):
        dataset = pipelines.build_dataset(source, "train", 4, True, 32, deterministic=True,
                                          seed=seed, num_classes=5, **options)
        return batches(dataset) + batches(dataset)

    first = two_epochs(1, **RECIPE_VIEW)
    assert len(first) == 6
    for images, targets in first:
        assert images.shape == (4, 32, 32, 3) and images.dtype == np.float32
        assert targets.shape == (4, 5) and targets.dtype == np.float32
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
        assert np.all(targets[:, 3:] == 0)
        pixels = unnormalise(images)
        assert pixels.min() > -0.5 and pixels.max() < 255.5
    again = two_epochs(1, **RECIPE_VIEW)
    for (images, targets), (images_again, targets_again) in zip(first, again):
        np.testing.assert_array_equal(images, images_again)
        np.testing.assert_array_equal(targets, targets_again)
    assert not np.array_equal(first[0][0], first[3][0])  # the next epoch differs
    other_seed = two_epochs(2, **RECIPE_VIEW)
    assert not np.array_equal(first[0][0], other_seed[0][0])
    # Evaluation ignores them all.
    evaluation = pipelines.build_dataset(source, "val", 4, False, 32, **RECIPE_VIEW)
    plain = pipelines.build_dataset(source, "val", 4, False, 32)
    for (images, labels), (plain_images, plain_labels) in zip(batches(evaluation),
                                                              batches(plain)):
        np.testing.assert_array_equal(images, plain_images)
        np.testing.assert_array_equal(labels, plain_labels)
        assert labels.dtype == np.int32


def test_build_dataset_rejects_bad_augmentation_options_in_one_line(tmp_path):
    source = write_folder(tmp_path, classes=2, per_class=1)
    cifar_source = write_folder(tmp_path / "cifar", classes=2, per_class=1, size=(32, 32))
    cases = [
        (source, dict(auto_augment="autoaugment"), "Unknown auto_augment 'autoaugment'"),
        (source, dict(random_erasing=1.5), "random_erasing must be a probability"),
        (source, dict(mixup_alpha=-1.0), "mixup_alpha must be >= 0"),
        (source, dict(repeated_augmentations=0), "repeated_augmentations must be an integer"),
        (source, dict(mixup_alpha=0.2, num_classes=1), "num_classes=1 is fewer than the 2"),
        (cifar_source, dict(auto_augment="trivial_augment_wide"), "ImageNet-style augmentations"),
    ]
    for source_string, options, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            pipelines.build_dataset(source_string, "train", 2, True, **options)
        assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------
# Repeated augmentation


def one_pass_per_pipeline(source, repetitions, num_pipelines=2, seed=3, **options):
    """Per pipeline, one pass of (label, image) pairs, batch size 1."""
    passes = []
    for pipeline_id in range(num_pipelines):
        context = tf.distribute.InputContext(num_pipelines, pipeline_id, num_pipelines)
        dataset = pipelines.build_dataset(
            source, "train", 1, True, 32, input_context=context, seed=seed,
            repeated_augmentations=repetitions, **options,
        )
        passes.append([(int(labels[0]), images[0]) for images, labels in batches(dataset)])
    return passes


@pytest.mark.parametrize("repetitions", [2, 4])
def test_repeated_augmentation_spreads_copies_over_two_pipelines(tmp_path, repetitions):
    # Eight images, each its own class, so that a label names its image.
    source = write_folder(tmp_path, classes=8, per_class=1)
    passes = one_pass_per_pipeline(source, repetitions, deterministic=True)
    assert [len(views) for views in passes] == [4, 4]  # the pass keeps its length
    labels = [label for views in passes for label, _ in views]
    counts = {label: labels.count(label) for label in labels}
    assert len(counts) == 8 // repetitions
    assert set(counts.values()) == {repetitions}
    for label in counts:
        # The copies of an image are shared out between the pipelines...
        per_pipeline = [sum(1 for lab, _ in views if lab == label) for views in passes]
        assert per_pipeline == [repetitions // 2] * 2
        # ...and each copy is augmented differently.
        copies = [image.tobytes() for views in passes for lab, image in views if lab == label]
        assert len(set(copies)) == repetitions


def test_repeated_augmentation_without_a_seed_still_agrees_between_pipelines(tmp_path):
    source = write_folder(tmp_path, classes=8, per_class=1)
    passes = one_pass_per_pipeline(source, 2, seed=None)
    labels = [label for views in passes for label, _ in views]
    assert sorted(labels.count(label) for label in set(labels)) == [2] * 4


def test_repeated_augmentation_over_tfrecords(tmp_path):
    examples = [(encode_png(textured_pixels(40, 48, seed=i)), i + 1) for i in range(8)]
    write_tfrecords(str(tmp_path), "train", 3, examples)
    source = f"tfrecord:{tmp_path}"
    options = dict(tfrecord_num_classes=8)
    passes = one_pass_per_pipeline(source, 2, deterministic=True, **options)
    labels = [label for views in passes for label, _ in views]
    assert sorted(labels.count(label) for label in set(labels)) == [2] * 4
    with pytest.raises(ValueError, match="needs deterministic=True") as error:
        one_pass_per_pipeline(source, 2, deterministic=False, **options)
    assert "\n" not in str(error.value)
