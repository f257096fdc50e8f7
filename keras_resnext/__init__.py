"""ResNeXt ("Aggregated Residual Transformations for Deep Neural Networks",
Xie et al., CVPR 2017) for Keras 3."""

import importlib as _importlib
import os as _os
import sys as _sys

# TensorFlow's CPU kernels differentiate grouped convolutions only with oneDNN,
# which TF 2.21 leaves off on AMD CPUs, and oneDNN is also the fast path. The
# switch is read once, when TensorFlow loads: set it only if TF isn't loaded
# yet and the user hasn't chosen. Either way training works (see layers.py).
if "tensorflow" not in _sys.modules:
    _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from keras_resnext import layers  # noqa: E402
from keras_resnext.applications import (  # noqa: E402
    PRESETS,
    ResNeXt29,
    ResNeXt50,
    ResNeXt101,
    ResNeXt152,
    build,
)
from keras_resnext.backbones import feature_extractor  # noqa: E402
from keras_resnext.complexity import bottleneck_width, count_flops  # noqa: E402
from keras_resnext.models import ResNeXt  # noqa: E402
from keras_resnext.preprocessing import decode_predictions, preprocess_input  # noqa: E402
from keras_resnext.reformulate import reformulate  # noqa: E402
from keras_resnext.weights import load_weights  # noqa: E402

__version__ = "0.1.0"


# TensorFlow-only, so imported on first use (and left out of __all__):
# `import keras_resnext` must work where TensorFlow isn't installed.
_TENSORFLOW_ONLY = {
    "export_saved_model": "keras_resnext.export",
    "preprocess_for_eval": "keras_resnext.kernels.images",
}


def __getattr__(name):
    if name in _TENSORFLOW_ONLY:
        return getattr(_importlib.import_module(_TENSORFLOW_ONLY[name]), name)
    raise AttributeError(f"module 'keras_resnext' has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "ResNeXt",
    "ResNeXt29",
    "ResNeXt50",
    "ResNeXt101",
    "ResNeXt152",
    "bottleneck_width",
    "build",
    "count_flops",
    "decode_predictions",
    "feature_extractor",
    "layers",
    "load_weights",
    "preprocess_input",
    "reformulate",
]
