"""Loading weights into a built model through the builders' `weights=`.

Three formats, told apart by their contents rather than their names:

- Keras `.weights.h5` files saved from the same architecture (any block form);
- PyTorch state dicts (`.pth`/`.pt`, zip or legacy pickle), read with
  `torch.load(weights_only=True)` so that no code in them can run;
- `.safetensors` files, read with `safetensors.numpy` (no torch needed).

PyTorch and safetensors files use torchvision's (and timm's) ResNet/ResNeXt
names: `layer{N}.{i}` is our `conv{N+1}_block{i+1}`, `conv{k}`/`bn{k}` are
`_{k}_conv`/`_{k}_bn`, `downsample.0`/`.1` the projection `_0_conv`/`_0_bn`,
`fc` the `predictions` layer. They describe form c; a form a or b model is
loaded through a form-c twin and `reformulate`.

Nothing is half-loaded: every tensor is checked against the model before the
first one is assigned.
"""

import contextlib
import dataclasses
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile

import numpy as np

from keras_resnext.models import ResNeXt, default_name
from keras_resnext.reformulate import reformulate

KERAS = "keras"
TORCH = "torch"
SAFETENSORS = "safetensors"

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ZIP_SIGNATURE = b"PK\x03\x04"
_PICKLE_PROTOCOL_OPCODE = b"\x80"

# torch.nn.BatchNorm2d's tensors in the order of Keras' BatchNormalization
# weights: gamma, beta, moving_mean, moving_variance.
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")
_CONV_TENSORS = ("weight",)
_DENSE_TENSORS = ("weight", "bias")
_IGNORED_TENSORS = ("num_batches_tracked",)
# DataParallel/DistributedDataParallel, torch.compile and Lightning wrap the
# model and prefix every key.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# Training checkpoints (timm's, torchvision's references') nest the state dict.
_NESTED_STATE_KEYS = ("state_dict", "model")

_TORCH_STEM_AND_HEAD = {"conv1": "conv1_conv", "bn1": "conv1_bn", "fc": "predictions"}
_KERAS_STEM_AND_HEAD = {layer: module for module, layer in _TORCH_STEM_AND_HEAD.items()}
_TORCH_BLOCK_MODULE = re.compile(
    r"layer(?P<stage>\d+)\.(?P<block>\d+)\."
    r"(?:(?P<kind>conv|bn)(?P<part>[123])|downsample\.(?P<downsample>[01]))"
)
_KERAS_BLOCK_LAYER = re.compile(
    r"conv(?P<stage>\d+)_block(?P<block>\d+)_(?P<part>[0-3])_(?P<kind>conv|bn)"
)
_KERAS_DENSE_KERNEL = re.compile(r"layers/dense(?:_\d+)?/vars/0")
_LISTED = 12


@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str  # as the file calls it
    value: np.ndarray  # in Keras' layout
    torch_layout: bool  # whether the file stores it in PyTorch's layout


@dataclasses.dataclass
class _Checkpoint:
    path: str
    naming: str  # KERAS or TORCH
    block_form: str
    tensors: dict  # our layer name -> {weight index: _Tensor}
    unmatched: list  # names in the file that no layer of ours takes

    @property
    def classes(self):
        head = self.tensors.get("predictions", {})
        return head[0].value.shape[-1] if 0 in head else None


def load_weights(model, weights):
    """Load `weights` (a file path) into `model`, or raise naming the problem."""
    path = _weights_path(weights)
    file_format = detect_format(path)
    if file_format == KERAS:
        if _load_keras_in_place(model, path):
            return model
        checkpoint = _read_keras(path, model)
    else:
        checkpoint = _read_torch_layout(path, file_format)
    _load(model, checkpoint)
    return model


def convert(source, destination, preset):
    """Write the checkpoint `source` as a Keras `.weights.h5` for `preset`.

    The classifier is kept as the checkpoint has it (its number of classes, or
    none). Returns the loaded model, with block form c.
    """
    from keras_resnext.presets import build

    if not os.fspath(destination).endswith(".weights.h5"):
        raise ValueError(f"The destination must end in .weights.h5; got {destination}.")
    path = _weights_path(source)
    file_format = detect_format(path)
    checkpoint = None
    if file_format == KERAS:
        classes, _ = _keras_file_summary(path)
    else:
        checkpoint = _read_torch_layout(path, file_format)
        classes = checkpoint.classes
    model = build(
        preset,
        include_top=classes is not None,
        classes=classes or 1000,
        classifier_activation=None,
    )
    if checkpoint is None:
        load_weights(model, path)
    else:
        _load(model, checkpoint)
    model.save_weights(os.fspath(destination))
    return model


def detect_format(path):
    """KERAS, TORCH or SAFETENSORS, from the file's first bytes."""
    with open(path, "rb") as file:
        head = file.read(16)
    size = os.path.getsize(path)
    if head.startswith(_HDF5_SIGNATURE):
        return KERAS
    if head.startswith(_ZIP_SIGNATURE):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(name.endswith("data.pkl") for name in names):
            return TORCH
        if "model.weights.h5" in names:
            raise ValueError(
                f"{path} is a whole Keras model (.keras): load it with "
                f"keras.saving.load_model, or pass a .weights.h5 file as `weights`."
            )
    if head.startswith(_PICKLE_PROTOCOL_OPCODE):
        return TORCH  # PyTorch's legacy (pre-1.6) format is a plain pickle stream
    # safetensors: an 8-byte little-endian header length, then a JSON header.
    if len(head) > 8 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return SAFETENSORS
    raise ValueError(
        f"Unrecognised weights file {path}: expected a Keras .weights.h5, a PyTorch "
        f"state dict (.pth/.pt) or a .safetensors file."
    )


def _weights_path(weights):
    if isinstance(weights, str) and weights.lower() == "imagenet":
        raise ValueError(
            "weights='imagenet': keras_resnext hosts no weight files; download a "
            "checkpoint and pass its path (see the README's 'Pretrained weights')."
        )
    try:
        path = os.fspath(weights)
    except TypeError:
        raise TypeError(
            f"`weights` must be None or the path of a weights file; got {weights!r}."
        ) from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Weights file not found: {path}")
    return path


# PyTorch and safetensors files -------------------------------------------------


def _read_torch_layout(path, file_format):
    state = _read_torch(path) if file_format == TORCH else _read_safetensors(path)
    return _checkpoint_from_state_dict(path, _strip_wrapper_prefixes(state))


def _read_torch(path):
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"Reading the PyTorch file {path} needs torch: pip install keras-resnext[torch] "
            f"(or pass a .safetensors file, which needs no torch)."
        ) from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"Refused {path} as unsafe: it holds Python objects other than tensors, so "
            f"torch.load(weights_only=True) would not unpickle it and nothing in it ran"
            f"{_unpickling_reason(error)}. If you trust its author, re-save just its "
            f"state dict in PyTorch: torch.save(model.state_dict(), 'weights.pth')."
        ) from None
    state = _state_dict_in(loaded, path)
    return {
        name: (tensor.detach().float() if tensor.is_floating_point() else tensor).numpy()
        if isinstance(tensor, torch.Tensor) else tensor
        for name, tensor in state.items()
    }


def _unpickling_reason(error):
    for line in str(error).splitlines():
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return f" ({line.strip().rstrip('.')})"
    return ""


def _state_dict_in(loaded, path):
    if not isinstance(loaded, dict):
        raise ValueError(
            f"{path} holds a {type(loaded).__name__}, not a state dict (a dict of tensors)."
        )
    for key in _NESTED_STATE_KEYS:
        if isinstance(loaded.get(key), dict):
            return loaded[key]
    return loaded


def _read_safetensors(path):
    try:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
    except ImportError:
        raise ImportError(
            f"Reading {path} needs safetensors: pip install safetensors"
        ) from None
    try:
        return load_file(path)
    except (SafetensorError, TypeError, ValueError) as error:  # TypeError: e.g. bfloat16
        raise ValueError(f"Could not read {path} as a .safetensors file: {error}") from None


def _strip_wrapper_prefixes(state):
    for prefix in _WRAPPER_PREFIXES:
        if state and all(name.startswith(prefix) for name in state):
            return _strip_wrapper_prefixes(
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
    match = _KERAS_BLOCK_LAYER.fullmatch(layer)
    if match is None:
        return None
    block = f"layer{int(match['stage']) - 1}.{int(match['block']) - 1}"
    if match["part"] == "0":
        return f"{block}.downsample.{0 if match['kind'] == 'conv' else 1}"
    return f"{block}.{match['kind']}{match['part']}"


def _tensor_names(layer):
    if layer == "predictions":
        return _DENSE_TENSORS
    return _BN_TENSORS if layer.endswith("_bn") else _CONV_TENSORS


def _to_keras_layout(value):
    if value.ndim == 4:  # conv [out, in / groups, kh, kw] -> [kh, kw, in / groups, out]
        return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:  # fc [out, in] -> Dense [in, out]
        return np.transpose(value)
    return value


def _torch_shape(keras_shape):
    keras_shape = tuple(keras_shape)
    if len(keras_shape) == 4:
        kh, kw, in_channels, out_channels = keras_shape
        return (out_channels, in_channels, kh, kw)
    return keras_shape[::-1] if len(keras_shape) == 2 else keras_shape


def _checkpoint_from_state_dict(path, state):
    tensors, unmatched = {}, []
    for name, value in state.items():
        module, _, tensor_name = name.rpartition(".")
        if tensor_name in _IGNORED_TENSORS:
            continue
        layer = keras_layer_for(module)
        if (
            layer is None
            or tensor_name not in _tensor_names(layer)
            or not isinstance(value, np.ndarray)
        ):
            unmatched.append(name)
            continue
        index = _tensor_names(layer).index(tensor_name)
        tensors.setdefault(layer, {})[index] = _Tensor(
            name, _to_keras_layout(np.asarray(value)), torch_layout=True
        )
    return _Checkpoint(path, TORCH, "c", tensors, unmatched)


# Keras files ----------------------------------------------------------------


def _keras_file_summary(path):
    """The classes of a `.weights.h5`'s classifier (None when it has none) and
    its number of layer tensors. Files saved from a compiled model also hold the
    optimizer's and metrics' variables outside `layers/`; loading ignores them."""
    import h5py

    kernels, tensors = [], []

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            tensors.append(name)
            if _KERAS_DENSE_KERNEL.fullmatch(name) and len(item.shape) == 2:
                kernels.append(item.shape)

    with h5py.File(path, "r") as file:
        if "layers" not in file:
            raise ValueError(
                f"{path} is an HDF5 file but not a Keras 3 .weights.h5 (no 'layers' "
                f"group); save weights with Keras 3's model.save_weights(...)."
            )
        file["layers"].visititems(lambda name, item: visit(f"layers/{name}", item))
    classes = kernels[0][1] if len(kernels) == 1 else None
    return classes, len(tensors)


@contextlib.contextmanager
def _keras_weights_path(path):
    """`path` under a name that Keras' `load_weights` accepts (`*.weights.h5`)."""
    if path.endswith(".weights.h5"):
        yield path
        return
    directory = tempfile.mkdtemp()
    alias = os.path.join(directory, "checkpoint.weights.h5")
    try:
        try:
            os.symlink(os.path.abspath(path), alias)
        except OSError:
            shutil.copyfile(path, alias)
        yield alias
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _load_keras_in_place(model, path):
    """Load a `.weights.h5` saved from `model`'s own architecture and head
    straight into it, the common case, without building a twin. False when the
    file's head or number of tensors differ (another head or block form)."""
    _require_resnext(model)
    classes, file_tensors = _keras_file_summary(path)
    if classes != (model.classes if model.include_top else None):
        return False
    if len(model.weights) != file_tensors:
        return False
    snapshot = [variable.numpy() for variable in model.weights]
    failure = _keras_load(model, path)
    if failure is None:
        return True
    for variable, value in zip(model.weights, snapshot):
        variable.assign(value)
    raise ValueError(f"{path} does not fit {model.name}; nothing was loaded: {failure}")


def _keras_load(model, path):
    """Keras' own loading; None when every tensor of `model` was loaded, else why not."""
    with _keras_weights_path(path) as keras_path, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(keras_path)
        except (KeyError, ValueError) as error:
            return _first_lines(error)
    # Keras warns, rather than raises, when the file lacks a layer's tensors.
    return _first_lines(caught[0].message) if caught else None


def _read_keras(path, model):
    """The file's tensors, read through a twin of `model` with the file's head.

    A `.weights.h5` names tensors by position, not by layer, so it only reads
    into the architecture it was saved from: try `model`'s block form first,
    then the others, and accept a form only if every tensor in the file found
    its place. The twins take the failed attempts' partial loads.
    """
    _require_resnext(model)
    classes, file_tensors = _keras_file_summary(path)
    forms = [model.block_form] + [form for form in ("c", "a", "b") if form != model.block_form]
    config = dict(
        model.get_config(),
        include_top=classes is not None,
        classes=classes or model.classes,
    )
    failures = []
    for form in forms:
        twin = ResNeXt.from_config(dict(config, block_form=form))
        if len(twin.weights) != file_tensors:
            failures.append(f"form {form} has {len(twin.weights)} tensors")
            continue
        failure = _keras_load(twin, path)
        if failure:
            # Forms differ in their number of tensors (for C > 1): with the
            # count right, the architecture itself differs.
            failures.append(f"form {form}: {failure}")
            break
        tensors = {
            layer.name: {
                index: _Tensor(variable.path, np.asarray(variable.numpy()), torch_layout=False)
                for index, variable in enumerate(layer.weights)
            }
            for layer in twin.layers
            if layer.weights
        }
        return _Checkpoint(path, KERAS, form, tensors, [])
    raise ValueError(
        f"{path} does not fit {model.name}: the file holds {file_tensors} tensors "
        f"and no block form of this architecture reads it ({'; '.join(failures)})."
    )


def _first_lines(error):
    # Keras' messages go on to print whole variables.
    text = " ".join(str(error).split("Target variable:")[0].split())
    return text[:400]


# Checking and assigning -------------------------------------------------------


def _require_resnext(model):
    if not isinstance(model, ResNeXt):
        raise TypeError(
            f"keras_resnext loads weights into its own models; got {type(model).__name__}."
        )


def _load(model, checkpoint):
    _require_resnext(model)
    tensors, head_warning = _fit_head(model, checkpoint)
    target = model
    if checkpoint.block_form != model.block_form:
        target = ResNeXt.from_config(dict(model.get_config(), block_form=checkpoint.block_form))
    _check_fits(target, checkpoint, tensors)
    if head_warning:
        warnings.warn(head_warning, stacklevel=4)
    _assign(target, tensors)
    if target is not model:
        reformulated = reformulate(target, model.block_form)
        for layer in model.layers:
            if layer.weights:
                layer.set_weights(reformulated.get_layer(layer.name).get_weights())


def _fit_head(model, checkpoint):
    """The tensors to load, the file's classifier only where `model` takes it,
    and a warning to give when the classifier is left out."""
    tensors = dict(checkpoint.tensors)
    if not model.include_top:
        tensors.pop("predictions", None)
        return tensors, None
    if checkpoint.classes is None:
        return tensors, (
            f"{checkpoint.path} has no classifier; {model.name}'s 'predictions' layer "
            f"keeps its fresh initialisation."
        )
    if checkpoint.classes != model.classes:
        tensors.pop("predictions")
        return tensors, (
            f"{checkpoint.path} has a {checkpoint.classes}-class classifier and "
            f"{model.name} {model.classes} classes: the classifier was not loaded and "
            f"keeps its fresh initialisation (for fine-tuning)."
        )
    return tensors, None


def _check_fits(model, checkpoint, tensors):
    """Raise, listing every problem, unless `tensors` fill `model` exactly."""
    targets = {layer.name: layer.weights for layer in model.layers if layer.weights}
    skipped_head = "predictions" in targets and "predictions" not in tensors
    missing, mismatched = [], []
    for layer, variables in targets.items():
        if layer == "predictions" and skipped_head:
            continue
        given = tensors.get(layer, {})
        for index, variable in enumerate(variables):
            if index not in given:
                missing.append(_file_name(checkpoint, layer, index, variable))
            elif tuple(given[index].value.shape) != tuple(variable.shape):
                mismatched.append(_shape_mismatch(given[index], variable))
    unexpected = list(checkpoint.unmatched)
    for layer, given in tensors.items():
        count = len(targets.get(layer, ()))
        unexpected += [tensor.name for index, tensor in given.items() if index >= count]
    if not (missing or mismatched or unexpected):
        return
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} with other shapes: {_listing(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} missing from the file: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} in the file that {model.name} has no place "
                        f"for: {_listing(unexpected)}")
    holds = _describe(checkpoint)
    raise ValueError(
        f"{checkpoint.path} does not fit {model.name}; nothing was loaded. Tensors: "
        + "; ".join(problems) + "." + (f" The file holds {holds}." if holds else "")
    )


def _file_name(checkpoint, layer, index, variable):
    if checkpoint.naming == TORCH:
        module = torch_module_for(layer)
        if module is not None:
            return f"{module}.{_tensor_names(layer)[index]}"
    return variable.path


def _shape_mismatch(tensor, variable):
    if tensor.torch_layout:
        file_shape = _torch_shape(tensor.value.shape)
        needed = _torch_shape(variable.shape)
    else:
        file_shape, needed = tuple(tensor.value.shape), tuple(variable.shape)
    return f"{tensor.name} is {list(file_shape)} in the file, the model needs {list(needed)}"


def _listing(items):
    shown = ", ".join(items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _describe(checkpoint):
    """The architecture a torchvision-layout checkpoint holds, e.g. 'a resnext101_32x8d
    (...)', or None when its stem or first grouped conv isn't there to tell."""
    if checkpoint.naming != TORCH:
        return None
    stem = checkpoint.tensors.get("conv1_conv", {}).get(0)
    group_conv = checkpoint.tensors.get("conv2_block1_2_conv", {}).get(0)
    if stem is None or group_conv is None or stem.value.ndim != 4 or group_conv.value.ndim != 4:
        return None
    blocks = {}
    for layer in checkpoint.tensors:
        match = _KERAS_BLOCK_LAYER.fullmatch(layer)
        if match:
            blocks.setdefault(int(match["stage"]), set()).add(int(match["block"]))
    stage_depths = tuple(len(blocks[stage]) for stage in sorted(blocks))
    # Kernels are [kh, kw, in / groups, out]; conv2's groups are int(64 * d / 64) = d wide.
    width = group_conv.value.shape[2]
    cardinality = group_conv.value.shape[3] // width
    depth = 3 * sum(stage_depths) + 2
    kernel = stem.value.shape[0]
    stem_name = "ImageNet" if kernel == 7 else f"{kernel}x{kernel}"
    classes = checkpoint.classes
    return (
        f"a {default_name(depth, cardinality, width)} (stage depths {stage_depths}, "
        f"cardinality {cardinality}, width {width}, {stem_name} stem, "
        + (f"{classes} classes)" if classes else "no classifier)")
    )


def _assign(model, tensors):
    for layer in model.layers:
        if layer.name in tensors:
            given = tensors[layer.name]
            layer.set_weights([given[index].value for index in range(len(layer.weights))])
