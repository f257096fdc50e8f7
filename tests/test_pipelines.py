"""pipelines: the paper's training and eval views (§4, §5.3) and the sources.

All data is generated here: folders of PNG and JPEG files, TFRecords, and
TFDS datasets mocked with `tfds.testing.mock_data`.
"""

import io
import os
import re
import struct

import numpy as np
import pytest
from PIL import Image

import keras_resnext
import keras_resnext.kernels.images
import pipelines
from pipelines import cifar, imagenet
from pipelines.tfrecords import count_tfrecords
from tfrecord_files import corrupt_record_data, tf_example, write_tfrecords

import tensorflow as tf  # noqa: E402  After keras_resnext, which sets TF's options.

MEAN_RGB = np.array(keras_resnext.preprocessing.IMAGENET_MEAN_RGB) * 255.0
STD_RGB = np.array(keras_resnext.preprocessing.IMAGENET_STD_RGB) * 255.0


# ----------------------------------------------------------------------------
# Generated images


def encode(pixels, image_format="PNG", mode=None, **options):
    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def textured_pixels(height, width, seed=0):
    """A smooth random picture with fine noise: any misalignment shows."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


def identity_pixels(index, label, height, width):
    """A flat colour that says which image it is (red) and its class (green)."""
    return np.full((height, width, 3), (10 * index + 5, 40 * label + 20, 128), np.uint8)


def identities(images):
    """(index, label) of flat `identity_pixels` images after normalisation."""
    pixels = np.asarray(images).mean(axis=(1, 2)) * STD_RGB + MEAN_RGB
    return [(int(round((r - 5) / 10)), int(round((g - 20) / 40))) for r, g, _ in pixels]


def unnormalise(images):
    return np.asarray(images) * STD_RGB + MEAN_RGB


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


# Classes are created out of order; labels must follow the sorted names.
FOLDER_CLASSES = {"cat": (4, 2), "ant": (3, 3), "bee": (5, 2)}  # train, val counts
FOLDER_FORMATS = [("png", "PNG"), ("PNG", "PNG"), ("jpg", "JPEG"), ("JPEG", "JPEG")]


def make_identity_folder(root, classes=FOLDER_CLASSES, height=50, width=70):
    """ROOT/{train,val}/<class>/ of flat identity images in mixed formats.

    Returns {split: {(index, label)}} of what each split holds.
    """
    class_names = sorted(classes)
    contents = {"train": set(), "val": set()}
    for name, counts in classes.items():
        label = class_names.index(name)
        for split, count in zip(("train", "val"), counts):
            for _ in range(count):
                index = len(contents[split])
                extension, image_format = FOLDER_FORMATS[index % len(FOLDER_FORMATS)]
                data = encode(identity_pixels(index, label, height, width), image_format,
                              **({"quality": 95} if image_format == "JPEG" else {}))
                write(os.path.join(root, split, name, f"{index:03d}.{extension}"), data)
                contents[split].add((index, label))
    write(os.path.join(root, "train", class_names[0], "notes.txt"), b"not an image")
    return contents


@pytest.fixture(scope="module")
def identity_folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("identity_folder"))
    return root, make_identity_folder(root)


def pass_of(dataset):
    """One pass as (list of batch sizes, images, labels)."""
    sizes, images, labels = [], [], []
    for image_batch, label_batch in dataset:
        sizes.append(int(label_batch.shape[0]))
        images.append(image_batch.numpy())
        labels.append(label_batch.numpy())
    return sizes, np.concatenate(images), np.concatenate(labels)


# ----------------------------------------------------------------------------
# The training crop (§4: scale and aspect-ratio augmentation)


def sample_windows(height, width, count, **ranges):
    seeds = tf.data.Dataset.range(count).map(lambda i: tf.stack([i, 7]))
    windows = seeds.map(
        lambda seed: imagenet.sample_crop_window(tf.constant([height, width]), seed, **ranges)
    )
    return windows.batch(count).get_single_element().numpy()


# The largest in-range crop of 33x97 is 33x44: 45% of the area.
@pytest.mark.parametrize("height,width,largest_area", [
    (375, 500, 1.0), (500, 375, 1.0), (64, 64, 1.0), (33, 97, 44 / 97),
])
def test_crop_window_area_and_aspect_ratio_ranges(height, width, largest_area):
    windows = sample_windows(height, width, 400)
    top, left, crop_height, crop_width = windows.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + crop_height <= height).all() and (left + crop_width <= width).all()
    area = crop_height * crop_width / (height * width)
    assert area.min() >= 0.08 and area.max() <= 1.0
    # Integer sides: the width is round(height * ratio), off by up to half a pixel.
    ratio = crop_width / crop_height
    slack = 0.5 / crop_height
    assert (ratio >= 3 / 4 - slack).all() and (ratio <= 4 / 3 + slack).all()
    # The samples spread over the ranges rather than sitting at one corner.
    assert area.min() < 0.2 and area.max() > 0.7 * largest_area
    assert ratio.min() < 0.85 and ratio.max() > 1.2
    assert len({tuple(w) for w in windows}) > 300


def test_crop_window_falls_back_to_the_center_square():
    # 10x1001: no window of >= 8% of the area has an aspect ratio <= 4/3.
    windows = sample_windows(10, 1001, 20)
    np.testing.assert_array_equal(windows, np.tile([0, 495, 10, 10], (20, 1)))
    windows = sample_windows(1001, 10, 20)
    np.testing.assert_array_equal(windows, np.tile([495, 0, 10, 10], (20, 1)))


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_train_crop_decodes_exactly_the_sampled_window(image_format):
    pixels = textured_pixels(60, 90)
    data = encode(pixels, image_format, **({"quality": 90} if image_format == "JPEG" else {}))
    whole = tf.io.decode_image(data, channels=3).numpy()
    for seed in ([1, 2], [3, 4], [5, 6]):
        top, left, height, width = imagenet.sample_crop_window([60, 90], seed).numpy()
        crop = imagenet.decode_random_crop(tf.constant(data), seed).numpy()
        np.testing.assert_array_equal(crop, whole[top:top + height, left:left + width])


def test_train_view_is_reproducible_from_its_seed_and_flips():
    data = encode(textured_pixels(80, 100), "JPEG", quality=90)
    views = [imagenet.preprocess_for_train(data, 64, seed=[s, 0]).numpy() for s in range(12)]
    assert views[0].shape == (64, 64, 3) and views[0].dtype == np.float32
    np.testing.assert_array_equal(views[0], imagenet.preprocess_for_train(data, 64, seed=[0, 0]))
    assert not np.allclose(views[0], views[1])
    # A flat image crops to itself; only the flip can change a left/right ramp.
    ramp = np.tile(np.linspace(0, 250, 40, dtype=np.uint8)[None, :, None], (40, 1, 3))
    ramp_data = encode(ramp, "PNG")
    first_columns = {
        bool(unnormalise(imagenet.preprocess_for_train(ramp_data, 16, seed=[s, 1]))[0, 0, 0]
             > unnormalise(imagenet.preprocess_for_train(ramp_data, 16, seed=[s, 1]))[0, -1, 0])
        for s in range(12)
    }
    assert first_columns == {False, True}


def test_color_jitter_only_scales_a_flat_gray_image():
    # Contrast and saturation blend with the image's own gray, so a flat gray
    # image changes by the brightness factor alone, within [0.6, 1.4].
    gray = tf.fill([8, 8, 3], 100.0)
    values = []
    for s in range(20):
        jittered = imagenet.random_color_jitter(gray, tf.constant([s, 3])).numpy()
        np.testing.assert_allclose(jittered, jittered[0, 0, 0], rtol=1e-5)
        values.append(jittered[0, 0, 0])
    assert 60.0 <= min(values) < 95.0 and 105.0 < max(values) <= 140.0


def test_pca_lighting_shifts_colors_along_imagenet_eigenvectors():
    seeds = tf.data.Dataset.range(2000).map(lambda i: tf.stack([i, 11]))
    shifts = seeds.map(
        lambda seed: imagenet.random_pca_lighting(tf.zeros([2, 2, 3]), seed)
    ).batch(2000).get_single_element().numpy()
    np.testing.assert_allclose(shifts, shifts[:, :1, :1, :].repeat(2, 1).repeat(2, 2))
    eigenvectors = np.array(imagenet.LIGHTING_EIGENVECTORS)
    eigenvalues = np.array(imagenet.LIGHTING_EIGENVALUES)
    expected = (255 * imagenet.LIGHTING_STD) ** 2 * (
        eigenvectors @ np.diag(eigenvalues ** 2) @ eigenvectors.T
    )
    np.testing.assert_allclose(np.cov(shifts[:, 0, 0, :].T), expected, rtol=0.15, atol=0.02)


def test_color_augmentations_are_off_by_default():
    data = encode(textured_pixels(50, 50), "PNG")
    plain = imagenet.preprocess_for_train(data, 32, seed=[4, 4])
    jittered = imagenet.preprocess_for_train(data, 32, seed=[4, 4], color_jitter=True,
                                             pca_lighting=True)
    assert not np.allclose(plain, jittered)


# ----------------------------------------------------------------------------
# The eval view (§4: shorter side 256, centre 224)


def test_eval_view_is_keras_resnext_preprocess_for_eval():
    assert imagenet.preprocess_for_eval is keras_resnext.kernels.images.preprocess_for_eval


def pil_eval_view(data, image_size, resize_size):
    """An independent eval view: PIL's antialiased bilinear resize, numpy crop."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = resize_size / min(image.size)
    width, height = round(image.width * scale), round(image.height * scale)
    resized = np.asarray(image.resize((width, height), Image.BILINEAR), np.float64)
    top, left = (height - image_size) // 2, (width - image_size) // 2
    crop = resized[top:top + image_size, left:left + image_size]
    return (crop - MEAN_RGB) / STD_RGB


@pytest.mark.parametrize("height,width,image_size,resize_size", [
    (333, 400, 224, 256),   # downscale, landscape, odd crop offset
    (300, 217, 224, 256),   # upscale, portrait
    (256, 257, 224, 256),   # no resize
    (420, 390, 320, 366),   # the 320 test of Table 5
])
def test_eval_view_matches_pil_resize_and_center_crop(height, width, image_size, resize_size):
    data = encode(textured_pixels(height, width, seed=height), "PNG")
    ours = imagenet.preprocess_for_eval(data, image_size, resize_size).numpy()
    reference = pil_eval_view(data, image_size, resize_size)
    assert ours.shape == (image_size, image_size, 3) and ours.dtype == np.float32
    # PIL rounds its resize to uint8: half a level, plus float differences.
    difference = np.abs(ours - reference) * STD_RGB
    assert difference.max() < 1.5 and difference.mean() < 0.5


def test_default_resize_keeps_the_224_over_256_proportion():
    assert keras_resnext.applications.eval_transform("imagenet", 224) == (224, 256)
    assert keras_resnext.applications.eval_transform("imagenet", 320) == (320, 366)


def test_cmyk_jpeg_and_png_named_jpeg_decode_like_pil(tmp_path):
    pixels = textured_pixels(64, 64)
    cmyk = encode(pixels, "JPEG", mode="CMYK", quality=95)
    assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"
    png = encode(pixels, "PNG")
    for data, tolerance in ((cmyk, 3.0), (png, 1.5)):
        ours = imagenet.preprocess_for_eval(data, 56, 64).numpy()
        difference = np.abs(ours - pil_eval_view(data, 56, 64)) * STD_RGB
        assert difference.mean() < tolerance
        train_view = imagenet.preprocess_for_train(data, 32, seed=[1, 1]).numpy()
        assert train_view.shape == (32, 32, 3) and np.isfinite(train_view).all()


# ----------------------------------------------------------------------------
# CIFAR (§5.3: pad 4, random 32x32 crop, flip)


def test_cifar_eval_is_the_normalised_image():
    pixels = textured_pixels(32, 32)
    np.testing.assert_allclose(
        cifar.preprocess_for_eval(encode(pixels)).numpy(),
        (pixels - MEAN_RGB) / STD_RGB, atol=1e-5,
    )


def test_cifar_train_translates_by_up_to_4_and_flips_with_mean_padding():
    pixels = textured_pixels(32, 32)
    normalised = (pixels - MEAN_RGB) / STD_RGB
    padded = np.pad(normalised, ((4, 4), (4, 4), (0, 0)))  # zero = the mean colour
    candidates = {
        (dy, dx, flip): (padded[dy:dy + 32, dx:dx + 32][:, ::-1] if flip
                         else padded[dy:dy + 32, dx:dx + 32])
        for dy in range(9) for dx in range(9) for flip in (False, True)
    }
    seen = set()
    for s in range(40):
        view = cifar.preprocess_for_train(encode(pixels), seed=[s, 5]).numpy()
        matches = [key for key, c in candidates.items() if np.allclose(view, c, atol=1e-5)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert {flip for _, _, flip in seen} == {False, True}
    assert len({(dy, dx) for dy, dx, _ in seen}) > 15


# ----------------------------------------------------------------------------
# build_dataset on folders


def test_folder_source_describes_sorted_classes_and_counts(identity_folder):
    root, contents = identity_folder
    info = pipelines.describe_source(f"folder:{root}", "train")
    assert info.class_names == ("ant", "bee", "cat")
    assert info.num_classes == 3
    assert info.num_examples == len(contents["train"]) == 12
    assert info.preprocessing == "imagenet"
    assert pipelines.describe_source(f"folder:{root}", "val").num_examples == 7


def test_eval_yields_every_example_once_with_a_partial_last_batch(identity_folder):
    root, contents = identity_folder
    dataset = pipelines.build_dataset(f"folder:{root}", "val", batch_size=3, training=False,
                                      image_size=32)
    assert dataset.element_spec[0].shape.as_list() == [None, 32, 32, 3]
    assert dataset.element_spec[0].dtype == tf.float32
    assert dataset.element_spec[1].dtype == tf.int32
    sizes, images, labels = pass_of(dataset)
    assert sizes == [3, 3, 1]
    found = identities(images)
    assert sorted(found) == sorted(contents["val"])
    # Each image's own green channel says which class folder it came from.
    assert [label for _, label in found] == labels.tolist()
    # Deterministic: a second pass is the same.
    np.testing.assert_array_equal(pass_of(dataset)[1], images)


def test_eval_batches_are_keras_resnext_eval_views(tmp_path):
    data = encode(textured_pixels(90, 70), "JPEG", quality=90)
    write(str(tmp_path / "val" / "a" / "photo.jpg"), data)
    for image_size, resize_size in ((48, 56),
                                    keras_resnext.applications.eval_transform("imagenet", 64)):
        _, images, _ = pass_of(pipelines.build_dataset(
            f"folder:{tmp_path}", "val", 2, False, image_size=image_size,
            resize_size=None if image_size == 64 else resize_size,
        ))
        np.testing.assert_array_equal(
            images[0], imagenet.preprocess_for_eval(data, image_size, resize_size)
        )


def test_training_pass_is_full_batches_of_shuffled_examples(identity_folder):
    root, contents = identity_folder
    dataset = pipelines.build_dataset(f"folder:{root}", "train", batch_size=5, training=True,
                                      image_size=24)
    assert dataset.element_spec[0].shape.as_list() == [5, 24, 24, 3]
    orders = []
    for _ in range(3):
        sizes, images, labels = pass_of(dataset)
        assert sizes == [5, 5]  # 12 examples, remainder dropped
        found = identities(images)
        assert set(found) <= contents["train"] and len(set(found)) == 10
        assert [label for _, label in found] == labels.tolist()
        orders.append(found)
    assert orders[0] != orders[1] or orders[1] != orders[2]


def test_deterministic_training_is_reproducible_from_the_seed(identity_folder):
    root, _ = identity_folder
    source = f"folder:{root}"

    def two_passes(seed):
        dataset = pipelines.build_dataset(source, "train", 4, True, image_size=24,
                                          deterministic=True, seed=seed)
        return [pass_of(dataset)[1] for _ in range(2)]

    first, second = two_passes(3), two_passes(3)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], first[1])  # each pass reshuffles and re-crops
    assert not np.array_equal(first[0], two_passes(4)[0])


def test_input_context_shards_partition_the_split(identity_folder):
    root, contents = identity_folder
    shards = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=pipeline_id, num_replicas_in_sync=2
        )
        dataset = pipelines.build_dataset(
            f"folder:{root}", "val", context.get_per_replica_batch_size(4), False,
            image_size=16, input_context=context,
        )
        sizes, images, _ = pass_of(dataset)
        assert max(sizes) <= 2
        shards.append(identities(images))
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(contents["val"])


def test_32x32_folders_get_cifar_preprocessing_unless_overridden(tmp_path):
    root = str(tmp_path)
    make_identity_folder(root, {"a": (3, 1), "b": (2, 1)}, height=32, width=32)
    assert pipelines.describe_source(f"folder:{root}", "train").preprocessing == "cifar"
    dataset = pipelines.build_dataset(f"folder:{root}", "val", 8, False)
    _, images, _ = pass_of(dataset)
    assert images.shape == (2, 32, 32, 3)
    dataset = pipelines.build_dataset(f"folder:{root}", "val", 8, False,
                                      preprocessing="imagenet")
    assert pass_of(dataset)[1].shape == (2, 224, 224, 3)
    with pytest.raises(ValueError, match="Unknown preprocessing 'vgg'"):
        pipelines.build_dataset(f"folder:{root}", "val", 8, False, preprocessing="vgg")
    with pytest.raises(ValueError, match="CIFAR-style"):
        pipelines.build_dataset(f"folder:{root}", "train", 8, True, color_jitter=True)


# ----------------------------------------------------------------------------
# Bad input


@pytest.fixture(scope="module")
def folder_with_bad_files(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad_files"))
    contents = make_identity_folder(root, {"a": (3, 2), "b": (2, 2)}, height=40, width=40)
    good_jpeg = encode(textured_pixels(40, 40), "JPEG", quality=90)
    bad = {
        os.path.join(root, "train", "a", "empty.jpg"): b"",
        os.path.join(root, "train", "a", "truncated.JPEG"): good_jpeg[: len(good_jpeg) // 2],
        os.path.join(root, "train", "b", "garbage.png"): b"\x89PNG\r\n\x1a\n" + bytes(64),
    }
    # ImageNet's oddities, which must be read, not skipped.
    odd = {
        os.path.join(root, "train", "b", "cmyk.JPEG"):
            encode(identity_pixels(20, 1, 40, 40), "JPEG", mode="CMYK", quality=95),
        os.path.join(root, "train", "b", "png_named.JPEG"):
            encode(identity_pixels(21, 1, 40, 40), "PNG"),
    }
    for path, data in {**bad, **odd}.items():
        write(path, data)
    good = contents["train"] | {(20, 1), (21, 1)}
    return root, good, sorted(bad)


def test_unreadable_files_are_skipped_counted_and_named(folder_with_bad_files, capfd):
    root, good, bad_paths = folder_with_bad_files
    info = pipelines.describe_source(f"folder:{root}", "train")
    assert info.num_examples == len(good) + len(bad_paths)
    dataset = pipelines.build_dataset(f"folder:{root}", "train", 4, False, image_size=16)
    for _ in range(2):
        sizes, images, _ = pass_of(dataset)
        assert sorted(identities(images)) == sorted(good)
        assert sum(sizes) == len(good)
        report = capfd.readouterr().err
        assert f"skipped 3 unreadable image(s) in this pass of folder:{root} train" in report
        for path in bad_paths:
            assert path in report


def test_training_epochs_survive_unreadable_files(folder_with_bad_files, capfd):
    root, good, _ = folder_with_bad_files
    dataset = pipelines.build_dataset(f"folder:{root}", "train", 2, True, image_size=16)
    for _ in range(2):
        sizes, _, _ = pass_of(dataset)
        assert sum(sizes) == len(good) // 2 * 2
    assert "skipped 3 unreadable image(s)" in capfd.readouterr().err


def test_each_pass_reports_its_own_failures(tmp_path, capfd):
    make_identity_folder(str(tmp_path), {"a": (2, 0)}, height=16, width=16)
    repaired = str(tmp_path / "train" / "a" / "repaired.png")
    write(repaired, b"")
    dataset = pipelines.build_dataset(f"folder:{tmp_path}", "train", 4, False, image_size=8)
    assert len(pass_of(dataset)[1]) == 2
    assert f"skipped 1 unreadable image(s) in this pass of folder:{tmp_path} train, " \
           f"including: {repaired}" in capfd.readouterr().err
    write(repaired, encode(identity_pixels(7, 0, 16, 16)))
    assert sorted(identities(pass_of(dataset)[1])) == [(0, 0), (1, 0), (7, 0)]
    assert "unreadable" not in capfd.readouterr().err


def test_clean_passes_report_nothing(identity_folder, capfd):
    root, _ = identity_folder
    pass_of(pipelines.build_dataset(f"folder:{root}", "val", 4, False, image_size=16))
    assert "unreadable" not in capfd.readouterr().err


def test_missing_root_empty_split_and_differing_classes_name_the_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        pipelines.describe_source(f"folder:{missing}", "train")

    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "train" / "a" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=re.escape(str(empty / "train"))):
        pipelines.build_dataset(f"folder:{empty}", "train", 2, True)

    differing = tmp_path / "differing"
    make_identity_folder(str(differing), {"a": (1, 1), "b": (1, 1)})
    (differing / "val" / "b").rename(differing / "val" / "c")
    with pytest.raises(ValueError, match=re.escape(str(differing / "val"))) as error:
        pipelines.describe_source(f"folder:{differing}", "train")
    assert "only in train ['b'], only in val ['c']" in str(error.value)

    train_only = tmp_path / "train_only"
    make_identity_folder(str(train_only), {"a": (1, 0)})
    assert not (train_only / "val").exists()
    with pytest.raises(FileNotFoundError, match=re.escape(str(train_only))):
        pipelines.describe_source(f"folder:{train_only}", "val")
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        pipelines.describe_source(f"folder:{train_only}", "test")


def test_validation_directory_is_the_val_split(tmp_path):
    make_identity_folder(str(tmp_path), {"a": (1, 2)})
    (tmp_path / "val").rename(tmp_path / "validation")
    assert pipelines.describe_source(f"folder:{tmp_path}", "val").num_examples == 2


# ----------------------------------------------------------------------------
# TFRecords in the layout of TF's build_imagenet_data.py


@pytest.fixture(scope="module")
def tfrecord_directory(tmp_path_factory):
    """1-based labels in 0..4 train files (3 files) and validation (1 file)."""
    directory = str(tmp_path_factory.mktemp("tfrecords"))
    contents = {}
    for split, count, num_files in (("train", 10, 3), ("validation", 5, 1)):
        examples = [(encode(identity_pixels(i, i % 4, 36, 30), "PNG"), i % 4 + 1)
                    for i in range(count)]
        write_tfrecords(directory, split, num_files, examples)
        contents[split] = {(i, i % 4) for i in range(count)}
    return directory, contents


def test_tfrecord_labels_are_one_based_by_default(tfrecord_directory):
    directory, contents = tfrecord_directory
    source = f"tfrecord:{directory}/{{split}}-*"
    info = pipelines.describe_source(source, "val", tfrecord_num_classes=4)
    assert info.num_examples == 5 and info.class_names == ("0", "1", "2", "3")
    sizes, images, labels = pass_of(pipelines.build_dataset(
        source, "val", 2, False, image_size=16, tfrecord_num_classes=4,
    ))
    assert sizes == [2, 2, 1]
    found = identities(images)
    assert sorted(found) == sorted(contents["validation"])
    assert [label for _, label in found] == labels.tolist()


def test_tfrecord_label_offset_is_an_option(tfrecord_directory):
    directory, _ = tfrecord_directory
    _, images, labels = pass_of(pipelines.build_dataset(
        f"tfrecord:{directory}", "train", 4, False, image_size=16,
        tfrecord_label_offset=0, tfrecord_num_classes=5,
    ))
    assert labels.tolist() == [label + 1 for _, label in identities(images)]


def test_imagenet_tfrecords_have_1000_wordnet_classes(tfrecord_directory):
    directory, _ = tfrecord_directory
    info = pipelines.describe_source(f"tfrecord:{directory}", "train")
    assert info.num_classes == 1000 and info.num_examples == 10
    assert info.class_names[:2] == ("n01440764", "n01443537")


def test_tfrecord_label_out_of_range_names_the_file(tmp_path):
    examples = [(encode(identity_pixels(i, 0, 8, 8)), label) for i, label in enumerate([1, 3, 2])]
    (path,) = write_tfrecords(str(tmp_path), "validation", 1, examples)
    dataset = pipelines.build_dataset(f"tfrecord:{tmp_path}", "val", 8, False, image_size=8,
                                      tfrecord_num_classes=2)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=re.escape(f"Label 2 is outside [0, 2) in {path} record 1")):
        pass_of(dataset)


def test_tfrecord_shards_partition_records_and_files(tfrecord_directory):
    directory, contents = tfrecord_directory
    for split, key, num_pipelines in (("val", "validation", 2), ("train", "train", 3)):
        found = []
        for pipeline_id in range(num_pipelines):
            context = tf.distribute.InputContext(num_pipelines, pipeline_id, num_pipelines)
            _, images, _ = pass_of(pipelines.build_dataset(
                f"tfrecord:{directory}", split, 4, False, image_size=8, input_context=context,
            ))
            assert len(images) > 0
            found += identities(images)
        assert sorted(found) == sorted(contents[key])


def test_unreadable_tfrecord_images_are_skipped_and_named(tmp_path, capfd):
    examples = [(encode(identity_pixels(0, 0, 8, 8)), 1), (b"not an image", 1),
                (encode(identity_pixels(2, 0, 8, 8)), 1)]
    (path,) = write_tfrecords(str(tmp_path), "train", 1, examples)
    _, images, _ = pass_of(pipelines.build_dataset(f"tfrecord:{tmp_path}", "train", 8, False,
                                                   image_size=8))
    assert sorted(identities(images)) == [(0, 0), (2, 0)]
    report = capfd.readouterr().err
    assert f"skipped 1 unreadable image(s) in this pass of tfrecord:{tmp_path} train" in report
    assert f"{path} record 1" in report
    assert count_tfrecords(path) == 3


def write_corrupt_validation_file(directory, size=8, num_records=32, corrupt_index=20):
    examples = [(encode(identity_pixels(i, 0, size, size)), 1) for i in range(num_records)]
    (path,) = write_tfrecords(directory, "validation", 1, examples)
    corrupt_record_data(path, corrupt_index)
    return path


def test_a_corrupt_tfrecord_is_reported_by_file_and_index_and_counted(tmp_path, capfd):
    path = write_corrupt_validation_file(str(tmp_path))
    source = f"tfrecord:{tmp_path}"
    assert pipelines.describe_source(source, "val", tfrecord_num_classes=2).num_examples == 32
    dataset = pipelines.build_dataset(source, "val", 8, False, image_size=8,
                                      tfrecord_num_classes=2)
    for _ in range(2):  # every pass reports its own losses
        sizes, images, _ = pass_of(dataset)
        # TFRecord files cannot be read past a corrupt record: 0-19 remain.
        assert sorted(index for index, _ in identities(images)) == list(range(20))
        report = capfd.readouterr().err
        assert (f"lost 12 record(s) in this pass of {source} val to 1 corrupt record(s)"
                in report), report
        assert f"{path} record 20 (records 20-31 of 32 lost)" in report


def test_a_corrupt_tfrecord_leaves_the_other_files_whole(tmp_path, capfd):
    examples = [(encode(identity_pixels(i, 0, 8, 8)), 1) for i in range(12)]
    first, second = write_tfrecords(str(tmp_path), "train", 2, examples)
    corrupt_record_data(first, 2)  # the first file holds examples 0, 2, 4, ...
    for shards in (1, 3):  # files interleaved, and every file read by every shard
        found = []
        for shard in range(shards):
            context = tf.distribute.InputContext(shards, shard, shards)
            found += identities(pass_of(pipelines.build_dataset(
                f"tfrecord:{tmp_path}", "train", 12, False, image_size=8,
                input_context=context))[1])
        assert sorted(index for index, _ in found) == [0, 1, 2, 3, 5, 7, 9, 11]
        assert f"{first} record 2 (records 2-5 of 6 lost)" in capfd.readouterr().err


def test_a_tfrecord_file_without_its_record_lengths_names_the_file_and_record(tmp_path):
    examples = [(encode(identity_pixels(i, 0, 8, 8)), 1) for i in range(3)]
    (path,) = write_tfrecords(str(tmp_path), "validation", 1, examples)
    with open(path, "rb") as f:
        data = f.read()
    record_2 = len(data) - (8 + 4 + len(tf_example(examples[2][0], 1)) + 4)
    truncated = data[:-5]
    length_corrupt = data[:record_2] + struct.pack("<Q", 1 << 40) + data[record_2 + 8:]
    for broken in (truncated, length_corrupt):
        with open(path, "wb") as f:
            f.write(broken)
        with pytest.raises(ValueError, match=re.escape(f"TFRecord file {path} ends inside "
                                                       f"record 2 (at byte {record_2})")):
            pipelines.describe_source(f"tfrecord:{tmp_path}", "val")


def test_tfrecord_pattern_errors_name_the_pattern(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/train-*")):
        pipelines.describe_source(f"tfrecord:{tmp_path}/train-*", "train")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}/validation-*")):
        pipelines.describe_source(f"tfrecord:{tmp_path}", "val")


# ----------------------------------------------------------------------------
# TFDS sources, mocked offline


def write_tfds_metadata(data_dir, name, split_sizes, label_names=None):
    """Split sizes (and label names) as a prepared dataset would record them."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[size], num_bytes=0,
                            filename_template=None)
        for split, size in split_sizes.items()
    ]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
    if label_names:
        with open(os.path.join(builder.data_dir, "label.labels.txt"), "w") as f:
            f.write("\n".join(label_names) + "\n")


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def test_tfds_cifar10_is_cifar_style_and_val_is_test(tmp_path):
    import tensorflow_datasets as tfds

    data_dir = str(tmp_path)
    write_tfds_metadata(data_dir, "cifar10", {"train": 9, "test": 5}, CIFAR10_CLASSES)
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=data_dir):
        train = pipelines.describe_source("cifar10", "train", data_dir=data_dir)
        val = pipelines.describe_source("tfds:cifar10", "val", data_dir=data_dir)
        assert (train.num_examples, val.num_examples) == (9, 5)
        assert val.class_names == CIFAR10_CLASSES and val.preprocessing == "cifar"
        sizes, images, labels = pass_of(
            pipelines.build_dataset("cifar10", "val", 2, False, data_dir=data_dir)
        )
        assert sizes == [2, 2, 1] and images.shape[1:] == (32, 32, 3)
        assert labels.dtype == np.int32 and ((0 <= labels) & (labels < 10)).all()
        dataset = pipelines.build_dataset("cifar10", "train", 2, True, data_dir=data_dir)
        assert dataset.element_spec[0].shape.as_list() == [2, 32, 32, 3]
        assert pass_of(dataset)[0] == [2, 2]


@pytest.mark.parametrize("name", ["imagenette/160px-v2", "imagenet2012"])
def test_tfds_imagenet_style_sources(tmp_path, name):
    import tensorflow_datasets as tfds

    data_dir = str(tmp_path)
    write_tfds_metadata(data_dir, name, {"train": 4, "validation": 3})
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=data_dir):
        info = pipelines.describe_source(name, "val", data_dir=data_dir)
        assert info.num_examples == 3 and info.preprocessing == "imagenet"
        assert info.num_classes == (1000 if name == "imagenet2012" else 10)
        sizes, images, _ = pass_of(pipelines.build_dataset(
            name, "train", 2, True, image_size=64, data_dir=data_dir,
        ))
        assert sizes == [2] and images.shape == (2, 64, 64, 3)


def test_imagenet2012_needs_manual_dir_and_passes_it_to_tfds(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    with pytest.raises(ValueError, match="manual_dir") as error:
        pipelines.describe_source("imagenet2012", "train", data_dir=str(tmp_path))
    assert str(tmp_path) in str(error.value)

    received = []

    def record_download_config(builder, download_config=None, **kwargs):
        received.append(download_config.manual_dir)
        raise RuntimeError("stop after download_and_prepare")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        record_download_config)
    manual_dir = tmp_path / "ilsvrc2012"  # checked to hold something first
    manual_dir.mkdir()
    (manual_dir / "ILSVRC2012_img_val.tar").write_bytes(b"")
    with pytest.raises(RuntimeError, match="stop after"):
        pipelines.describe_source("imagenet2012", "train", data_dir=str(tmp_path / "tfds"),
                                  manual_dir=str(manual_dir))
    assert received == [str(manual_dir)]


def test_unknown_source_kind_is_an_error():
    with pytest.raises(ValueError, match="Unknown source kind 'fodler'"):
        pipelines.describe_source("fodler:/data", "train")


# ----------------------------------------------------------------------------
# Under tf.distribute, as the training CLI calls it


@pytest.mark.slow
def test_distribute_datasets_from_function_covers_the_split_once(identity_folder,
                                                                   python_subprocess):
    root, contents = identity_folder
    code = f"""
import keras_resnext, pipelines
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
dataset = strategy.distribute_datasets_from_function(
    lambda context: pipelines.build_dataset(
        "folder:{root}", "val", context.get_per_replica_batch_size(4), False,
        image_size=16, input_context=context))
images = []
for image_batch, _ in dataset:
    for replica_images in strategy.experimental_local_results(image_batch):
        images.append(replica_images.numpy())
images = np.concatenate(images)
pixels = images.mean(axis=(1, 2)) * np.array({list(STD_RGB)}) + np.array({list(MEAN_RGB)})
print(sorted(int(round((r - 5) / 10)) for r in pixels[:, 0]))
"""
    completed = python_subprocess(code, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = eval(completed.stdout.strip().splitlines()[-1])
    assert found == sorted(index for index, _ in contents["val"])
