"""The detection input (pipelines/detection.py) and COCO box AP
(keras_resnext/training/box_ap.py), without keras-hub."""

import contextlib
import io
import json
import os
import re

import numpy as np
import pytest

from detection_data import CLASS_NAMES, write_coco_folder
from keras_resnext.training.box_ap import box_iou, coco_box_ap
from pipelines import detection


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    return root, write_coco_folder(root)


def test_coco_folder_describes_its_splits(coco_root):
    root, written = coco_root
    for split in ("train", "val"):
        info = detection.describe_detection_source(f"coco:{root}", split)
        assert info.class_names == CLASS_NAMES  # category ids 3, 7, 11 -> labels 0, 1, 2
        assert info.num_examples == len(written[split][0])


def test_coco_folder_boxes_follow_the_resize(coco_root):
    root, written = coco_root
    images, objects = written["val"]
    dataset = detection.build_detection_dataset(f"coco:{root}", "val", 4, training=False,
                                                image_size=64)
    batch_images, targets = next(iter(dataset))
    assert batch_images.shape == (4, 64, 64, 3)
    boxes, labels = targets["boxes"].numpy(), targets["labels"].numpy()
    for index, (xywh, classes) in enumerate(objects):
        expected = [[y / 2, x / 2, (y + h) / 2, (x + w) / 2] for x, y, w, h in xywh]
        np.testing.assert_allclose(boxes[index, :len(classes)], expected, atol=1e-4)
        np.testing.assert_array_equal(labels[index, :len(classes)], classes)
        assert (boxes[index, len(classes):] == -1).all()
        assert (labels[index, len(classes):] == -1).all()
    # The image is resized, not cropped: the last-drawn rectangle's centre keeps its colour.
    x, y, w, h = objects[0][0][-1]
    np.testing.assert_allclose(batch_images[0].numpy()[(y + h // 2) // 2, (x + w // 2) // 2],
                               images[0][y + h // 2, x + w // 2], atol=1.0)


def test_a_wide_image_is_padded_below_and_its_boxes_scaled():
    image = np.zeros((50, 100, 3), np.uint8)
    image[10:30, 20:60] = 255
    resized, boxes = detection.resize_and_pad(image, np.array([[0.2, 0.2, 0.6, 0.6]],
                                                              np.float32), 40)
    np.testing.assert_allclose(boxes.numpy(), [[4, 8, 12, 24]])  # 40/100 of the pixels
    assert resized.shape == (40, 40, 3)
    assert float(np.abs(resized.numpy()[20:]).max()) == 0.0  # rows 20.. are padding
    assert resized.numpy()[6, 12].min() > 250  # inside the box


def test_flip_moves_boxes_with_the_pixels():
    image = np.zeros((8, 8, 3), np.uint8)
    image[0:4, 0:2] = 255
    boxes = np.array([[0.0, 0.0, 0.5, 0.25]], np.float32)
    seen = set()
    for seed in range(20):
        flipped, flipped_boxes = detection.random_horizontal_flip(image, boxes, seed=seed)
        y0, x0, y1, x1 = (flipped_boxes.numpy()[0] * 8).round().astype(int)
        assert flipped.numpy()[y0:y1, x0:x1].min() == 255
        seen.add(x0)
    assert seen == {0, 6}


def test_training_batches_are_full_and_flipped(coco_root):
    root, _ = coco_root
    dataset = detection.build_detection_dataset(f"coco:{root}", "train", 3, training=True,
                                                image_size=32, seed=0)
    batches = list(dataset)
    assert [b[0].shape[0] for b in batches] == [3, 3]  # 8 images: the partial batch is dropped


def test_an_image_without_objects_keeps_one_padding_row(tmp_path):
    root = str(tmp_path)
    write_coco_folder(root, splits=(("val", 2),))
    path = os.path.join(root, "annotations", "instances_val.json")
    with open(path) as f:
        document = json.load(f)
    document["annotations"] = []
    with open(path, "w") as f:
        json.dump(document, f)
    _, targets = next(iter(detection.build_detection_dataset(
        f"coco:{root}", "val", 2, training=False, image_size=32)))
    assert targets["boxes"].shape == (2, 1, 4)
    assert (targets["labels"].numpy() == -1).all()


@pytest.mark.parametrize("damage, message", [
    ("no_annotations", "no file matching"),
    ("image_missing", "which is not in"),
    ("not_json", "not COCO instances JSON"),
    ("no_folder", "no such folder"),
])
def test_missing_files_are_one_line_errors(tmp_path, damage, message):
    root = str(tmp_path / "coco")
    write_coco_folder(root, splits=(("val", 2),))
    if damage == "no_annotations":
        os.remove(os.path.join(root, "annotations", "instances_val.json"))
    elif damage == "image_missing":
        os.remove(os.path.join(root, "val", "000002.png"))
    elif damage == "not_json":
        with open(os.path.join(root, "annotations", "instances_val.json"), "w") as f:
            f.write("{}")
    else:
        root = str(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=message) as raised:
        detection.read_coco_split(root, "val")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("damage", [
    lambda document: document["annotations"][0].pop("bbox"),
    lambda document: document["annotations"][0].update(bbox=[1, 2, 3]),
    lambda document: document["annotations"][0].pop("image_id"),
    lambda document: document["images"][0].pop("height"),
    lambda document: document.update(images=["000001.png"]),
    lambda document: document["categories"][0].pop("name"),
], ids=["no_bbox", "three_numbers", "no_image_id", "no_height", "image_not_a_record",
        "category_without_name"])
def test_malformed_records_are_one_line_errors_naming_the_file(tmp_path, damage):
    root = str(tmp_path / "coco")
    write_coco_folder(root, splits=(("val", 2),))
    path = os.path.join(root, "annotations", "instances_val.json")
    with open(path) as f:
        document = json.load(f)
    damage(document)
    with open(path, "w") as f:
        json.dump(document, f)
    malformed = (r"^" + re.escape(path)
                 + ": ((annotation 1|image 1|the image list) is malformed|not COCO instances JSON)")
    with pytest.raises(ValueError, match=malformed) as raised:
        detection.read_coco_split(root, "val")
    assert "\n" not in str(raised.value)


def test_images_in_subfolders_of_the_split_folder_are_found(tmp_path):
    root = str(tmp_path / "coco")
    write_coco_folder(root, splits=(("val", 2),))
    path = os.path.join(root, "annotations", "instances_val.json")
    with open(path) as f:
        document = json.load(f)
    os.makedirs(os.path.join(root, "val", "part"))
    os.rename(os.path.join(root, "val", "000001.png"), os.path.join(root, "val", "part", "a.png"))
    document["images"][0]["file_name"] = "part/a.png"
    with open(path, "w") as f:
        json.dump(document, f)
    assert detection.read_coco_split(root, "val").image_paths[0] == os.path.join(
        root, "val", "part", "a.png")


@pytest.mark.parametrize("training", [False, True])
def test_unreadable_images_are_skipped_and_named_as_the_classification_pipeline_does(
        tmp_path, capfd, training):
    root = str(tmp_path / "coco")
    write_coco_folder(root, splits=(("val", 4),))
    corrupt = os.path.join(root, "val", "000002.png")
    with open(corrupt, "wb") as f:
        f.write(b"not an image")
    dataset = detection.build_detection_dataset(f"coco:{root}", "val", 1, training=training,
                                                image_size=32, seed=0)
    for _ in range(2):  # every pass skips it and says so
        assert sum(1 for _ in dataset) == 3
        assert (f"skipped 1 unreadable image(s) in this pass of coco:{root} val, including: "
                f"{corrupt}") in capfd.readouterr().err


def test_the_coco_download_layout_is_found(tmp_path):
    root = str(tmp_path)
    write_coco_folder(root, splits=(("val2017", 1),))
    # The download names its splits train2017/val2017; ours are train/val.
    assert detection.read_coco_split(root, "val").image_paths[0].endswith(
        os.path.join("val2017", "000001.png"))


def test_sources_parse():
    assert detection.parse_detection_source("coco/2017") == ("tfds", "coco/2017")
    assert detection.parse_detection_source("voc/2007:5.0.0") == ("tfds", "voc/2007:5.0.0")
    assert detection.parse_detection_source("coco:/data/coco") == ("coco", "/data/coco")
    with pytest.raises(ValueError, match="Unknown detection source"):
        detection.parse_detection_source("folder:/x")


# --------------------------------------------------------------------------
# COCO box AP


def test_box_iou():
    np.testing.assert_allclose(box_iou([[0, 0, 10, 10]], [[0, 0, 10, 5], [20, 20, 30, 30]]),
                               [[0.5, 0.0]])


def test_ap_of_a_hand_computed_case():
    # Image 1: one ground-truth box, found exactly (0.9) and again at IoU 0.5 (0.8, a
    # duplicate: a false positive). Image 2: one box, found at IoU 0.82 (0.7).
    ground_truths = [([[0, 0, 10, 10]], [0]), ([[0, 0, 10, 10]], [0])]
    detections = [([[0, 0, 10, 10], [0, 0, 10, 5]], [0.9, 0.8], [0, 0]),
                  ([[0, 0, 10, 8.2]], [0.7], [0])]
    # Thresholds 0.50..0.80: TP, FP, TP -> precision 1 up to recall 0.5 (51 of the 101
    # recall points), then 2/3. Thresholds 0.85..0.95: TP, FP, FP -> 1 up to 0.5, then 0.
    loose = (51 + 50 * 2 / 3) / 101
    strict = 51 / 101
    ap = coco_box_ap(detections, ground_truths)
    assert ap["AP50"] == pytest.approx(loose)
    assert ap["AP75"] == pytest.approx(loose)
    assert ap["AP"] == pytest.approx((7 * loose + 3 * strict) / 10)


def test_ap_is_perfect_for_the_ground_truth_and_zero_for_the_wrong_class():
    ground_truths = [([[0, 0, 10, 10], [5, 5, 20, 20]], [0, 1])]
    exact = [([[0, 0, 10, 10], [5, 5, 20, 20]], [0.9, 0.8], [0, 1])]
    assert coco_box_ap(exact, ground_truths) == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0}
    swapped = [([[0, 0, 10, 10], [5, 5, 20, 20]], [0.9, 0.8], [1, 0])]
    assert coco_box_ap(swapped, ground_truths)["AP"] == 0.0
    assert coco_box_ap([([], [], [])], [([], [])])["AP"] is None


def test_ap_agrees_with_pycocotools():
    coco = pytest.importorskip("pycocotools.coco", reason="pycocotools is an optional "
                               "cross-check (pip install pycocotools)")
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    ground_truths, detections, gt_json, dt_json = [], [], [], []
    for image_id in range(1, 21):
        corners = rng.uniform(0, 80, (4, 2))
        gt = np.concatenate([corners, corners + rng.uniform(10, 40, (4, 2))], axis=1)
        gt_labels = rng.integers(0, 3, 4)
        dt = np.concatenate([gt, gt[:2]]) + rng.normal(0, 4, (6, 4))
        dt = np.concatenate([np.minimum(dt[:, :2], dt[:, 2:]), np.maximum(dt[:, :2], dt[:, 2:])],
                            axis=1)  # COCO ignores boxes of negative area
        dt_labels = np.concatenate([gt_labels, rng.integers(0, 3, 2)])
        dt_labels[rng.uniform(size=6) < 0.2] = 2
        scores = rng.uniform(size=6)
        ground_truths.append((gt, gt_labels))
        detections.append((dt, scores, dt_labels))
        for box, label in zip(gt, gt_labels):
            y0, x0, y1, x1 = box
            gt_json.append(dict(id=len(gt_json) + 1, image_id=image_id, category_id=int(label),
                                bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0),
                                iscrowd=0))
        for box, label, score in zip(dt, dt_labels, scores):
            y0, x0, y1, x1 = box
            dt_json.append(dict(image_id=image_id, category_id=int(label), score=float(score),
                                bbox=[x0, y0, x1 - x0, y1 - y0]))
    reference = coco.COCO()
    reference.dataset = dict(images=[dict(id=i) for i in range(1, 21)], annotations=gt_json,
                             categories=[dict(id=i) for i in range(3)])
    with contextlib.redirect_stdout(io.StringIO()):
        reference.createIndex()
        evaluation = COCOeval(reference, reference.loadRes(dt_json), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    ours = coco_box_ap(detections, ground_truths)
    assert ours["AP"] == pytest.approx(evaluation.stats[0], abs=1e-6)
    assert ours["AP50"] == pytest.approx(evaluation.stats[1], abs=1e-6)
    assert ours["AP75"] == pytest.approx(evaluation.stats[2], abs=1e-6)


class _FakeTFDSBuilder:
    """What `pipelines.detection` reads of a TFDS detection builder: its
    features, splits and `as_dataset` (images encoded, as SkipDecoding leaves
    them), for one 64x128 image with a crowd (COCO) or difficult (VOC) box."""

    def __init__(self, ignored_feature):
        import tensorflow as tf

        image = np.zeros((64, 128, 3), np.uint8)
        self.record = {
            "image": tf.io.encode_png(image),
            "objects": {"bbox": tf.constant([[0.5, 0.25, 1.0, 0.5], [0.0, 0.0, 0.5, 0.5]]),
                        "label": tf.constant([4, 7], tf.int64),
                        ignored_feature: tf.constant([False, True])}}
        self.info = type("Info", (), {})()
        self.info.features = {"objects": dict.fromkeys(["bbox", "label", ignored_feature])}
        self.calls = []

    def as_dataset(self, split, shuffle_files, read_config, decoders):
        import tensorflow as tf

        self.calls.append(split)
        return tf.data.Dataset.from_tensors(self.record)


@pytest.mark.parametrize("name, ignored_feature", [("coco/2017", "is_crowd"),
                                                   ("voc/2007", "is_difficult")])
def test_tfds_records_become_pixel_boxes_without_crowds(monkeypatch, name, ignored_feature):
    builder = _FakeTFDSBuilder(ignored_feature)
    monkeypatch.setattr(detection, "_tfds_builder", lambda location, data_dir: builder)
    images, targets = next(iter(detection.build_detection_dataset(name, "val", 1, training=False,
                                                                  image_size=64)))
    assert builder.calls == ["validation"]
    assert images.shape == (1, 64, 64, 3)
    # 64x128 becomes 32x64 (then padded): normalised yxyx times (32, 64, 32, 64).
    np.testing.assert_allclose(targets["boxes"].numpy(), [[[16, 16, 32, 32]]])
    np.testing.assert_array_equal(targets["labels"].numpy(), [[4]])


def test_a_tfds_dataset_without_boxes_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mnist has no objects/bbox and objects/label features"):
        detection.describe_detection_source("mnist", "val", data_dir=str(tmp_path))
