"""A real, small end-to-end training run on generated data, with its numbers.

Writes a `folder:` dataset of four 32x32 pattern classes (horizontal stripes,
vertical stripes, disks, checkerboards) in random colours, so neither colour
nor position gives the class away, then runs `train/cifar.py` on it in a
subprocess and prints the command, the epochs, the final top-1/top-5 and the
training images/s from `metrics.json`.

    python benchmarks/train_synthetic.py --workdir /tmp/shapes
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("checkerboard", "disk", "horizontal_stripes", "vertical_stripes")


def pattern(name, rng, size=32):
    """A boolean foreground mask of one class, at a random scale and phase."""
    rows, cols = np.mgrid[0:size, 0:size]
    period = rng.integers(4, 9)
    phase = rng.integers(0, period)
    if name == "horizontal_stripes":
        return (rows + phase) % period < period / 2
    if name == "vertical_stripes":
        return (cols + phase) % period < period / 2
    if name == "checkerboard":
        return ((rows + phase) // (period // 2 + 1) + (cols + phase) // (period // 2 + 1)) % 2 == 0
    centre = rng.uniform(8, size - 8, 2)
    radius = rng.uniform(5, 12)
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < radius ** 2


def write_dataset(root, train_per_class, val_per_class, seed=0):
    # TensorFlow's PNG encoder: the `.[cpu]` install has it, and no Pillow.
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in CLASSES:
            directory = os.path.join(root, split, name)
            os.makedirs(directory, exist_ok=True)
            for index in range(count):
                foreground, background = rng.uniform(0, 255, (2, 3))
                while np.abs(foreground - background).sum() < 150:
                    foreground, background = rng.uniform(0, 255, (2, 3))
                mask = pattern(name, rng)[..., None]
                image = np.where(mask, foreground, background) + rng.normal(0, 20, (32, 32, 3))
                png = tf.io.encode_png(np.clip(image, 0, 255).astype("uint8"))
                with open(os.path.join(directory, f"{index:05d}.png"), "wb") as f:
                    f.write(png.numpy())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/keras_resnext_shapes")
    parser.add_argument("--train_per_class", type=int, default=500)
    parser.add_argument("--val_per_class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.2,
                        help="for a batch of 128, as train/cifar.py's --lr")
    parser.add_argument("--model_flags", default="--depth=11 --cardinality=4 --width=8")
    args = parser.parse_args()

    data = os.path.join(args.workdir, "data")
    if not os.path.isdir(data):
        write_dataset(data, args.train_per_class, args.val_per_class)
    model_dir = os.path.join(args.workdir, f"model-{int(time.time())}")
    command = [sys.executable, os.path.join(REPO_ROOT, "train", "cifar.py"),
               f"--dataset=folder:{data}", f"--model_dir={model_dir}",
               f"--epochs={args.epochs}", f"--batch_size={args.batch_size}", f"--lr={args.lr}",
               "--validation_freq=1", *args.model_flags.split()]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    with open(os.path.join(model_dir, "metrics.json")) as f:
        metrics = json.load(f)
    print(f"{metrics['epochs_completed']} epochs, {len(CLASSES)} classes, "
          f"{args.train_per_class * len(CLASSES)} train / {metrics['eval_examples']} val images: "
          f"top1 {metrics['top1']:.4f}, top5 {metrics['top5']:.4f}, "
          f"{metrics['images_per_sec']:.0f} training images/s, {seconds:.0f} s in all.")


if __name__ == "__main__":
    main()
