"""torchvision's (and timm's) ResNet/ResNeXt names and layouts, and ours.

`layer{N}.{i}` is our `conv{N+1}_block{i+1}`, `conv{k}`/`bn{k}` are
`_{k}_conv`/`_{k}_bn`, `downsample.0`/`.1` the projection `_0_conv`/`_0_bn`,
`fc` the `predictions` layer. They describe form c.
"""

import re

import numpy as np

# torch.nn.BatchNorm2d's tensors in the order of Keras' BatchNormalization
# weights: gamma, beta, moving_mean, moving_variance.
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
_CONV_TENSORS = ("weight",)
_DENSE_TENSORS = ("weight", "bias")
IGNORED_TENSORS = ("num_batches_tracked",)
# DataParallel/DistributedDataParallel, torch.compile and Lightning wrap the
# model and prefix every key.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")

_TORCH_STEM_AND_HEAD = {"conv1": "conv1_conv", "bn1": "conv1_bn", "fc": "predictions"}
_KERAS_STEM_AND_HEAD = {layer: module for module, layer in _TORCH_STEM_AND_HEAD.items()}
_TORCH_BLOCK_MODULE = re.compile(
    r"layer(?P<stage>\d+)\.(?P<block>\d+)\."
    r"(?:(?P<kind>conv|bn)(?P<part>[123])|downsample\.(?P<downsample>[01]))"
)
KERAS_BLOCK_LAYER = re.compile(
    r"conv(?P<stage>\d+)_block(?P<block>\d+)_(?P<part>[0-3])_(?P<kind>conv|bn)"
)


def strip_wrapper_prefixes(state):
    """`state` without the prefix a wrapper put on every key."""
    for prefix in _WRAPPER_PREFIXES:
        if state and all(name.startswith(prefix) for name in state):
            return strip_wrapper_prefixes(
                {name[len(prefix):]: value for name, value in state.items()}
            )
    return state


def keras_layer_for(module):
    """Our layer name for a torchvision/timm ResNet module path, or None."""
    if module in _TORCH_STEM_AND_HEAD:
        return _TORCH_STEM_AND_HEAD[module]
    match = _TORCH_BLOCK_MODULE.fullmatch(module)
    if match is None:
        return None
    block = f"conv{int(match['stage']) + 1}_block{int(match['block']) + 1}"
    if match["downsample"] is not None:
        return f"{block}_0_{'conv' if match['downsample'] == '0' else 'bn'}"
    return f"{block}_{match['part']}_{match['kind']}"


def torch_module_for(layer):
    """The torchvision/timm module path of our layer `layer`, or None."""
    if layer in _KERAS_STEM_AND_HEAD:
        return _KERAS_STEM_AND_HEAD[layer]
    match = KERAS_BLOCK_LAYER.fullmatch(layer)
    if match is None:
        return None
    block = f"layer{int(match['stage']) - 1}.{int(match['block']) - 1}"
    if match["part"] == "0":
        return f"{block}.downsample.{0 if match['kind'] == 'conv' else 1}"
    return f"{block}.{match['kind']}{match['part']}"


def tensor_names(layer):
    """torch's names of our layer's tensors, in the order of its Keras weights."""
    if layer == "predictions":
        return _DENSE_TENSORS
    return _BN_TENSORS if layer.endswith("_bn") else _CONV_TENSORS


def to_keras_layout(value):
    """A tensor in PyTorch's layout, in Keras' layout."""
    if value.ndim == 4:  # conv [out, in / groups, kh, kw] -> [kh, kw, in / groups, out]
        return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:  # fc [out, in] -> Dense [in, out]
        return np.transpose(value)
    return value


def torch_shape(keras_shape):
    """The shape in PyTorch's layout of a tensor of `keras_shape`."""
    keras_shape = tuple(keras_shape)
    if len(keras_shape) == 4:
        kh, kw, in_channels, out_channels = keras_shape
        return (out_channels, in_channels, kh, kw)
    return keras_shape[::-1] if len(keras_shape) == 2 else keras_shape
