"""Tiny synthetic detection data for the tests: images of coloured rectangles
on grey, each rectangle an object whose class is its colour, in memory or as
a COCO-format folder (`ROOT/annotations/instances_<split>.json`, `ROOT/<split>/`)."""

import json
import os

import numpy as np

COLOURS = ((230, 30, 30), (30, 200, 30), (40, 60, 230))  # class 0, 1, 2
CLASS_NAMES = ("red", "green", "blue")


def rectangles(count, height=128, width=128, seed=0, max_objects=2):
    """`count` uint8 images [height, width, 3] and, per image, its objects as
    ([x, y, w, h] pixel boxes, class ids)."""
    rng = np.random.default_rng(seed)
    images, objects = [], []
    for _ in range(count):
        image = np.full((height, width, 3), 128, np.uint8)
        boxes, labels = [], []
        for _ in range(rng.integers(1, max_objects + 1)):
            w, h = rng.integers(width // 4, width // 2), rng.integers(height // 4, height // 2)
            x, y = rng.integers(0, width - w), rng.integers(0, height - h)
            label = int(rng.integers(len(COLOURS)))
            image[y:y + h, x:x + w] = COLOURS[label]
            boxes.append([int(x), int(y), int(w), int(h)])
            labels.append(label)
        images.append(image)
        objects.append((boxes, labels))
    return images, objects


def yxyx_batch(objects, max_boxes=2):
    """keras-hub targets for `objects`: {"boxes": yxyx [n, max_boxes, 4],
    "labels": [n, max_boxes]}, padded with -1."""
    boxes = np.full((len(objects), max_boxes, 4), -1.0, np.float32)
    labels = np.full((len(objects), max_boxes), -1.0, np.float32)
    for index, (xywh, classes) in enumerate(objects):
        for row, ((x, y, w, h), label) in enumerate(zip(xywh, classes)):
            boxes[index, row] = (y, x, y + h, x + w)
            labels[index, row] = label
    return {"boxes": boxes, "labels": labels}


def write_coco_folder(root, splits=(("train", 8), ("val", 4)), height=128, width=128,
                      category_ids=(3, 7, 11)):
    """Write a COCO-format folder of rectangles (PNG images); category ids
    are sparse, as COCO's are. Returns {split: (images, objects)}."""
    from PIL import Image

    written = {}
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for seed, (split, count) in enumerate(splits):
        images, objects = rectangles(count, height, width, seed=seed)
        os.makedirs(os.path.join(root, split), exist_ok=True)
        document = {"images": [], "annotations": [],
                    "categories": [{"id": category, "name": name}
                                   for category, name in zip(category_ids, CLASS_NAMES)]}
        for image_id, (image, (boxes, labels)) in enumerate(zip(images, objects), start=1):
            file_name = f"{image_id:06d}.png"
            Image.fromarray(image).save(os.path.join(root, split, file_name))
            document["images"].append(
                {"id": image_id, "file_name": file_name, "height": height, "width": width})
            for box, label in zip(boxes, labels):
                document["annotations"].append({
                    "id": len(document["annotations"]) + 1, "image_id": image_id,
                    "category_id": category_ids[label], "bbox": box, "iscrowd": 0,
                    "area": box[2] * box[3]})
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(document, f)
        written[split] = (images, objects)
    return written


def import_keras_hub():
    """keras_hub; without it the calling test module is skipped, except in CI
    (CI=true), which installs the [hub] extra: there a missing keras-hub fails."""
    import pytest

    if os.environ.get("CI") == "true":
        import keras_hub

        return keras_hub
    return pytest.importorskip(
        "keras_hub", reason='keras-hub is not installed: pip install -e ".[hub]" && '
        'pip install --no-deps "keras-hub==0.32.*"')
