"""Convert a checkpoint to Keras' own `.weights.h5`, once.

    python -m keras_resnext.convert resnext50_32x4d-1a0047aa.pth \\
        resnext50_32x4d.weights.h5 --model resnext50_32x4d

SRC is a PyTorch state dict (.pth/.pt), a .safetensors file or a .weights.h5,
with torchvision's or timm's key names, or what `weights=` also takes: a
weights name (imagenet, IMAGENET1K_V1), a URL or hf://OWNER/REPO. The
classifier is kept as SRC has it.
"""

# argparse, not absl flags: this module lives in the library, and absl's global
# flag registry would clash with the training CLIs' flags in one process.
import argparse
import os

from keras_resnext.applications import PRESETS, build
from keras_resnext.weights import fetch, loading, readers


def convert(source, destination, preset):
    """Write the checkpoint `source` as a Keras `.weights.h5` for `preset`.

    The classifier is kept as the checkpoint has it (its number of classes, or
    none). Returns the loaded model, with block form c.
    """
    if not os.fspath(destination).endswith(".weights.h5"):
        raise ValueError(f"The destination must end in .weights.h5; got {destination}.")
    path = readers.weights_path(fetch.resolve(source, preset).local_path())
    file_format = readers.detect_format(path)
    checkpoint = None
    if file_format == readers.KERAS:
        classes, _ = readers.keras_file_summary(path)
    else:
        checkpoint = readers.read_torch_layout(path, file_format)
        classes = checkpoint.classes
    model = build(
        preset,
        include_top=classes is not None,
        classes=classes or 1000,
        classifier_activation=None,
    )
    if checkpoint is None:
        loading.load_weights(model, path)
    else:
        loading.load_tensors(model, checkpoint)
    model.save_weights(os.fspath(destination))
    return model


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m keras_resnext.convert",
        description="Convert a PyTorch, safetensors or Keras checkpoint to a .weights.h5.",
    )
    parser.add_argument("source", metavar="SRC", help="the checkpoint to read")
    parser.add_argument("destination", metavar="DST.weights.h5", help="the file to write")
    parser.add_argument("--model", required=True, choices=sorted(PRESETS),
                        help="the preset whose architecture SRC holds")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        model = convert(args.source, args.destination, args.model)
    except (ValueError, OSError, ImportError) as error:
        raise SystemExit(f"convert: {error}") from None
    head = f"{model.classes} classes" if model.include_top else "no classifier"
    print(f"Wrote {args.destination}: {args.model}, {model.count_params():,} parameters, "
          f"{head}.")


if __name__ == "__main__":
    main()
