"""A generated `folder:` dataset for CLI tests."""

import os

import numpy as np

COLOURS = [(200, 40, 40), (40, 180, 60), (50, 60, 210), (200, 200, 40)]


def write_image_folder(root, classes=3, train_per_class=8, val_per_class=3, size=32):
    """PNG files whose class is their colour: `root/{train,val}/class_<i>/<n>.png`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for index, colour in enumerate(COLOURS[:classes]):
            directory = os.path.join(root, split, f"class_{index}")
            os.makedirs(directory, exist_ok=True)
            for i in range(count):
                pixels = np.clip(rng.normal(colour, 40, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype("uint8")).save(os.path.join(directory, f"{i}.png"))
    return root
