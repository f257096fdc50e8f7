"""ResNeXt ("Aggregated Residual Transformations for Deep Neural Networks",
Xie et al., CVPR 2017) for Keras 3."""

import os as _os
import sys as _sys

# TensorFlow's CPU kernels differentiate grouped convolutions only with oneDNN,
# which TF 2.21 leaves off on AMD CPUs, and oneDNN is also the fast path. The
# switch is read once, when TensorFlow loads: set it only if TF isn't loaded
# yet and the user hasn't chosen. Either way training works (see layers.py).
if "tensorflow" not in _sys.modules:
    _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from keras_resnext import layers  # noqa: E402
from keras_resnext.complexity import bottleneck_width, count_flops  # noqa: E402
from keras_resnext.models import (  # noqa: E402
    ResNeXt,
    ResNeXt29,
    ResNeXt50,
    ResNeXt101,
    ResNeXt152,
)
from keras_resnext.preprocessing import (  # noqa: E402
    decode_predictions,
    preprocess_for_eval,
    preprocess_input,
)
from keras_resnext.presets import PRESETS, build  # noqa: E402
from keras_resnext.reformulate import reformulate  # noqa: E402
from keras_resnext.weights import load_weights  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name):
    # TensorFlow-only, so imported on first use: `import keras_resnext` must work
    # where TensorFlow isn't installed.
    if name == "export_saved_model":
        from keras_resnext.export import export_saved_model

        return export_saved_model
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
    "layers",
    "load_weights",
    "preprocess_for_eval",
    "preprocess_input",
    "reformulate",
]
