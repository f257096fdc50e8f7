"""Weights files into built models: `load_weights`, behind the builders' `weights=`.

`readers` reads Keras `.weights.h5`, PyTorch state dicts and `.safetensors`
files (told apart by their contents); `names` maps torchvision's and timm's
ResNet/ResNeXt names onto ours; `loading` checks every tensor against the
model, then assigns them all. `catalog` lists the named weights ("imagenet",
torchvision's "IMAGENET1K_V1"/"IMAGENET1K_V2") as data; `fetch` turns names,
URLs and hf://OWNER/REPO into files in Keras' cache.
"""

from keras_resnext.weights.fetch import HashMismatch, WeightsUnavailable
from keras_resnext.weights.loading import load_weights
from keras_resnext.weights.names import keras_layer_for, torch_module_for
from keras_resnext.weights.readers import KERAS, SAFETENSORS, TORCH, detect_format

__all__ = [
    "HashMismatch",
    "KERAS",
    "SAFETENSORS",
    "TORCH",
    "WeightsUnavailable",
    "detect_format",
    "keras_layer_for",
    "load_weights",
    "torch_module_for",
]
