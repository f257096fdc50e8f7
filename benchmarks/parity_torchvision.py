"""Logit parity with torchvision: the same weights and input, fp32, eval mode.

For each model, `torchvision_reference.py` runs under a Python that has torch
and torchvision (`--torch_python`); it writes a randomised checkpoint (random
weights, randomised BN statistics and affine parameters) as .pth and
.safetensors, a random input and torchvision's logits. This script loads each
file through `weights=` and through `keras_resnext.convert`'s .weights.h5 and
compares the logits:

    python benchmarks/parity_torchvision.py --torch_python /work/torchvenv/bin/python \\
        --models resnext50_32x4d,resnet50,resnext101_32x8d,resnext101_64x4d

`max_abs` is the largest absolute logit difference, `relative` that divided by
the largest absolute torchvision logit. Only `--torch_python` needs torch:
this interpreter reads the .pth without it.
"""

import os
import subprocess
import sys
import tempfile
import time

import keras_resnext as kr  # before TensorFlow, for its oneDNN switch
import numpy as np
from absl import app, flags

from keras_resnext.convert import convert

_MODELS = flags.DEFINE_list(
    "models", ["resnext50_32x4d"], "torchvision model names, each also a keras_resnext preset."
)
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python", sys.executable, "A Python interpreter with torch and torchvision."
)
_BATCH = flags.DEFINE_integer("batch", 2, "Images per comparison.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input height and width.")

REFERENCE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "torchvision_reference.py")


def torchvision_reference(name, out_dir):
    subprocess.run(
        [_TORCH_PYTHON.value, REFERENCE_SCRIPT, name, out_dir,
         "--batch", str(_BATCH.value), "--image_size", str(_IMAGE_SIZE.value)],
        check=True,
        # The other interpreter has its own packages; don't lend it ours.
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    images = np.load(os.path.join(out_dir, "input.npy")).transpose(0, 2, 3, 1)
    return images, np.load(os.path.join(out_dir, f"{name}_logits.npy"))


def keras_logits(name, weights_path, images):
    model = kr.build(name, weights=weights_path, classifier_activation=None,
                     input_shape=images.shape[1:])
    return np.asarray(model(images, training=False))


def report(name, source, logits, reference, seconds):
    error = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
    scale = np.abs(reference).max()
    print(f"{name:18s} {source:12s} max_abs={error.max():.3e} relative={error.max() / scale:.3e} "
          f"(max |logit| {scale:.3g}, top-1 agree "
          f"{np.mean(logits.argmax(-1) == reference.argmax(-1)):.0%}, {seconds:.1f}s)")


def main(argv):
    del argv
    for name in _MODELS.value:
        with tempfile.TemporaryDirectory() as out_dir:
            images, reference = torchvision_reference(name, out_dir)
            checkpoint = os.path.join(out_dir, f"{name}.safetensors")
            converted = os.path.join(out_dir, f"{name}.weights.h5")
            convert(checkpoint, converted, name)
            sources = {"safetensors": checkpoint, "weights.h5": converted,
                       "pth": os.path.join(out_dir, f"{name}.pth")}
            for source, path in sources.items():
                start = time.perf_counter()
                logits = keras_logits(name, path, images)
                report(name, source, logits, reference, time.perf_counter() - start)


if __name__ == "__main__":
    app.run(main)
