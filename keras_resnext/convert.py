"""Convert a checkpoint to Keras' own `.weights.h5`, once.

    python -m keras_resnext.convert resnext50_32x4d-1a0047aa.pth \\
        resnext50_32x4d.weights.h5 --model resnext50_32x4d

SRC is a PyTorch state dict (.pth/.pt), a .safetensors file or a .weights.h5,
with torchvision's or timm's key names. The classifier is kept as SRC has it.
"""

import keras_resnext  # noqa: F401  (sets TensorFlow's switches before it loads)
from absl import app, flags

from keras_resnext import weights
from keras_resnext.presets import PRESETS

_MODEL = flags.DEFINE_enum(
    "model", None, sorted(PRESETS), "The preset whose architecture SRC holds."
)
flags.mark_flag_as_required("model")


def main(argv):
    if len(argv) != 3:
        raise app.UsageError(
            "Usage: python -m keras_resnext.convert SRC DST.weights.h5 --model NAME"
        )
    source, destination = argv[1:]
    try:
        model = weights.convert(source, destination, _MODEL.value)
    except (ValueError, OSError, ImportError) as error:
        raise SystemExit(f"convert: {error}") from None
    head = f"{model.classes} classes" if model.include_top else "no classifier"
    print(f"Wrote {destination}: {_MODEL.value}, {model.count_params():,} parameters, {head}.")


if __name__ == "__main__":
    app.run(main)
