"""Reading weights files into `Checkpoint`s: our layer names to tensors in Keras' layout.

Three formats, told apart by their contents rather than their names:

- Keras `.weights.h5` files saved from the same architecture (any block form);
- PyTorch state dicts (`.pth`/`.pt`, zip or legacy pickle), read without torch
  by `torch_zip`, whose unpickler admits only what a state dict holds, so that
  no code in them can run;
- `.safetensors` files, read with `safetensors.numpy` (no torch needed).
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

from keras_resnext.models import ResNeXt
from keras_resnext.weights import names, torch_zip

KERAS = "keras"
TORCH = "torch"
SAFETENSORS = "safetensors"

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ZIP_SIGNATURE = b"PK\x03\x04"
_PICKLE_PROTOCOL_OPCODE = b"\x80"
# Training checkpoints (timm's, torchvision's references') nest the state dict.
_NESTED_STATE_KEYS = ("state_dict", "model")
_KERAS_DENSE_KERNEL = re.compile(r"layers/dense(?:_\d+)?/vars/0")


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str  # as the file calls it
    value: np.ndarray  # in Keras' layout
    torch_layout: bool  # whether the file stores it in PyTorch's layout


@dataclasses.dataclass
class Checkpoint:
    """A weights file's tensors under our layer names, not yet checked against a model."""

    path: str
    naming: str  # KERAS or TORCH
    block_form: str
    tensors: dict  # our layer name -> {weight index: Tensor}
    unmatched: list  # names in the file that no layer of ours takes

    @property
    def classes(self):
        head = self.tensors.get("predictions", {})
        return head[0].value.shape[-1] if 0 in head else None


def detect_format(path):
    """KERAS, TORCH or SAFETENSORS, from the file's first bytes."""
    with open(path, "rb") as file:
        head = file.read(16)
    size = os.path.getsize(path)
    if head.startswith(_HDF5_SIGNATURE):
        return KERAS
    if head.startswith(_ZIP_SIGNATURE):
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
        if any(member.endswith("data.pkl") for member in members):
            return TORCH
        if "model.weights.h5" in members:
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


def weights_path(weights):
    """The file `weights` names, or raise naming the problem."""
    try:
        path = os.fspath(weights)
    except TypeError:
        raise TypeError(
            f"`weights` must be None or the path of a weights file; got {weights!r}."
        ) from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Weights file not found: {path}")
    return path


# PyTorch and safetensors files ----------------------------------------------


def read_torch_layout(path, file_format):
    """A PyTorch or safetensors file, with torchvision's or timm's names, as a Checkpoint."""
    state = _read_torch(path) if file_format == TORCH else _read_safetensors(path)
    return _checkpoint_from_state_dict(path, names.strip_wrapper_prefixes(state))


def _read_torch(path):
    try:
        loaded = torch_zip.load(path)
    except torch_zip.RefusedGlobal as refusal:
        raise ValueError(
            f"Refused {path} as unsafe: it holds Python objects other than tensors "
            f"(it refers to {refusal.global_name}), so it was not unpickled and nothing in it "
            f"ran. If you trust its author, re-save just its state dict in PyTorch: "
            f"torch.save(model.state_dict(), 'weights.pth')."
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, RecursionError, zipfile.BadZipFile) as error:
        raise ValueError(f"Could not read {path} as a PyTorch state dict: {error}") from None
    state = _state_dict_in(loaded, path)
    return {
        name: value.astype(np.float32, copy=False) if isinstance(value, np.ndarray)
        and np.issubdtype(value.dtype, np.floating) else value
        for name, value in state.items()
    }


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


def _checkpoint_from_state_dict(path, state):
    tensors, unmatched = {}, []
    for name, value in state.items():
        module, _, tensor_name = name.rpartition(".")
        if tensor_name in names.IGNORED_TENSORS:
            continue
        layer = names.keras_layer_for(module)
        if (
            layer is None
            or tensor_name not in names.tensor_names(layer)
            or not isinstance(value, np.ndarray)
        ):
            unmatched.append(name)
            continue
        index = names.tensor_names(layer).index(tensor_name)
        tensors.setdefault(layer, {})[index] = Tensor(
            name, names.to_keras_layout(np.asarray(value)), torch_layout=True
        )
    return Checkpoint(path, TORCH, "c", tensors, unmatched)


# Keras files ----------------------------------------------------------------


def keras_file_summary(path):
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


def keras_load(model, path):
    """Keras' own loading; None when every tensor of `model` was loaded, else why not."""
    with _keras_weights_path(path) as keras_path, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(keras_path)
        except (KeyError, ValueError) as error:
            return _first_lines(error)
    # Keras warns, rather than raises, when the file lacks a layer's tensors.
    return _first_lines(caught[0].message) if caught else None


def read_keras(path, model):
    """The file's tensors, read through a twin of `model` (a ResNeXt) with the file's head.

    A `.weights.h5` names tensors by position, not by layer, so it only reads
    into the architecture it was saved from: try `model`'s block form first,
    then the others, and accept a form only if every tensor in the file found
    its place. The twins take the failed attempts' partial loads.
    """
    classes, file_tensors = keras_file_summary(path)
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
        failure = keras_load(twin, path)
        if failure:
            # Forms differ in their number of tensors (for C > 1): with the
            # count right, the architecture itself differs.
            failures.append(f"form {form}: {failure}")
            break
        tensors = {
            layer.name: {
                index: Tensor(variable.path, np.asarray(variable.numpy()), torch_layout=False)
                for index, variable in enumerate(layer.weights)
            }
            for layer in twin.layers
            if layer.weights
        }
        return Checkpoint(path, KERAS, form, tensors, [])
    raise ValueError(
        f"{path} does not fit {model.name}: the file holds {file_tensors} tensors "
        f"and no block form of this architecture reads it ({'; '.join(failures)})."
    )


def _first_lines(error):
    # Keras' messages go on to print whole variables.
    text = " ".join(str(error).split("Target variable:")[0].split())
    return text[:400]
