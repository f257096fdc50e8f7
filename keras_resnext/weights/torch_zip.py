"""PyTorch state dicts read with numpy alone: no torch, and no code from the file runs.

`torch.save` writes a zip (since PyTorch 1.6): `<root>/data.pkl` pickles the
state dict, whose tensors point by key at raw storages in `<root>/data/<key>`.
Older files are one stream: three small header pickles, the state dict's
pickle, the list of storage keys, then each storage as an int64 element
count followed by its bytes.

Either way the pickle is read by an unpickler that admits only what a state
dict holds: ordered dicts, tensors rebuilt from storages of the dtypes below,
and torch's helpers for that, the names torch's own weights_only loader
admits. Any other global is refused by `find_class`, before anything is
constructed. Tensors come back as numpy arrays in their own dtype, except
bfloat16, which numpy lacks: it comes back as the float32 of the same value.
"""

import collections
import io
import math
import pickle
import struct
import zipfile
import zlib

import numpy as np

_BFLOAT16 = "bfloat16"
# The storage types a CNN's state dict uses; num_batches_tracked is int64.
_STORAGE_DTYPES = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "BFloat16Storage": _BFLOAT16,
    "LongStorage": "i8",
    "IntStorage": "i4",
    "BoolStorage": "?",
}
# A zip member's local header: signature, 22 bytes we skip, then the lengths of
# the name and extra fields that precede the member's data.
_LOCAL_HEADER = struct.Struct("<4s22xHH")
_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside what a state dict holds."""

    def __init__(self, module, name):
        self.global_name = f"{module}.{name}"
        super().__init__(f"it refers to {self.global_name}, which a state dict never holds")


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


class _Storage:
    """A storage the pickle refers to; its bytes are read once the pickle is done."""

    def __init__(self, storage_type, key, numel):
        self.dtype = storage_type.dtype
        self.key = str(key)
        self.numel = int(numel)
        self.values = None  # a flat numpy array, once read


class _TensorView:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor is rebuilt from something other than a storage")
    return _TensorView(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_ADMITTED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) not in _ADMITTED:
            raise RefusedGlobal(module, name)
        return _ADMITTED[(module, name)]

    def persistent_load(self, saved_id):
        # ('storage', storage_type, key, location, numel[, view_metadata]); the
        # location (a device) doesn't matter here: every storage is read to the CPU.
        if not (isinstance(saved_id, tuple) and saved_id[:1] == ("storage",)
                and len(saved_id) in (5, 6) and isinstance(saved_id[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {saved_id!r:.80}")
        if len(saved_id) == 6 and saved_id[5] is not None:
            raise pickle.UnpicklingError("storage views (PyTorch < 0.4) are not supported")
        _, storage_type, key, _, numel = saved_id[:5]
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type, key, numel)
        return self.storages[key]


def load(path):
    """The object `torch.save` wrote at `path`, with numpy arrays for tensors.

    Raises RefusedGlobal for a pickle that would construct anything else, and
    ValueError for a file that is not a PyTorch checkpoint.
    """
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    return _load_legacy(path)


def _load_zip(path):
    with zipfile.ZipFile(path) as archive, open(path, "rb") as file:
        names = archive.namelist()
        pickles = [name for name in names if name.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"expected one data.pkl in the zip, found {len(pickles)}")
        root = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{root}byteorder" in names:
            byteorder = bytes(_read_member(archive, file, f"{root}byteorder")).decode(
                "ascii").strip()
        unpickler = _StateDictUnpickler(io.BytesIO(_read_member(archive, file, pickles[0])))
        result = unpickler.load()
        for storage in unpickler.storages.values():
            raw = _read_member(archive, file, f"{root}data/{storage.key}")
            storage.values = _storage_values(raw, storage, byteorder)
    return _resolve(result)


def _read_member(archive, file, name):
    """A zip member's bytes. torch.save stores them uncompressed: those are read
    straight into a writable numpy buffer, one copy where zipfile's bytes took
    two. Their CRC-32 is checked unless it is 0, which torch writes when told
    not to compute it (torch.serialization.set_crc32_options(False)) and then
    doesn't check either."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # 0x1: encrypted
        return archive.read(name)
    file.seek(info.header_offset)
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(file.read(_LOCAL_HEADER.size))
    if signature != _LOCAL_HEADER_SIGNATURE:
        raise zipfile.BadZipFile(f"bad local header for {name}")
    file.seek(info.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
    buffer = np.empty(info.file_size, np.uint8)
    if file.readinto(buffer) != info.file_size:
        raise zipfile.BadZipFile(f"{name} is truncated")
    if info.CRC != 0 and zlib.crc32(buffer) != info.CRC:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {name!r}")
    return buffer


def _load_legacy(path):
    with open(path, "rb") as file:
        magic_number = _StateDictUnpickler(file).load()
        if magic_number != _LEGACY_MAGIC_NUMBER:
            raise ValueError(
                "not a PyTorch checkpoint (neither a zip nor a legacy torch.save stream)"
            )
        protocol_version = _StateDictUnpickler(file).load()
        if protocol_version != _LEGACY_PROTOCOL_VERSION:
            raise ValueError(f"unsupported legacy PyTorch format version {protocol_version!r}")
        sys_info = _StateDictUnpickler(file).load()
        byteorder = "little" if sys_info.get("little_endian", True) else "big"
        unpickler = _StateDictUnpickler(file)
        result = unpickler.load()
        keys = _StateDictUnpickler(file).load()
        for key in keys:
            storage = unpickler.storages[key]
            numel = int.from_bytes(file.read(8), byteorder)
            if numel != storage.numel:
                raise ValueError(
                    f"storage {key} holds {numel} elements, the pickle says {storage.numel}"
                )
            size = numel * _itemsize(storage.dtype)
            storage.values = _storage_values(file.read(size), storage, byteorder)
    return _resolve(result)


def _itemsize(dtype):
    return 2 if dtype == _BFLOAT16 else np.dtype(dtype).itemsize


def _storage_values(raw, storage, byteorder):
    prefix = "<" if byteorder == "little" else ">"
    dtype = np.dtype(prefix + ("u2" if storage.dtype == _BFLOAT16 else storage.dtype))
    if len(raw) < storage.numel * dtype.itemsize:
        raise ValueError(f"storage {storage.key} is truncated")
    return np.frombuffer(raw, dtype, count=storage.numel)


def _resolve(value):
    """`value` with each tensor view replaced by a numpy array of its own."""
    if isinstance(value, _TensorView):
        return _tensor_values(value)
    if isinstance(value, dict):
        resolved = type(value)((key, _resolve(item)) for key, item in value.items())
        if hasattr(value, "__dict__"):  # a state_dict()'s `_metadata`
            resolved.__dict__.update(value.__dict__)
        return resolved
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(item) for item in value)
    return value


def _tensor_values(view):
    values = view.storage.values
    if any(extent < 0 for extent in view.size) or any(step < 0 for step in view.stride):
        raise ValueError(f"a tensor on storage {view.storage.key} has a negative size or stride")
    if len(view.size) != len(view.stride):
        raise ValueError(f"a tensor on storage {view.storage.key} has mismatched size and stride")
    # as_strided reads memory unchecked: the tensor's last element must lie in its storage.
    last = view.offset + sum((extent - 1) * step for extent, step in zip(view.size, view.stride))
    if view.offset < 0 or (0 not in view.size and last >= values.size):
        raise ValueError(f"a tensor reaches past the end of storage {view.storage.key}")
    if (values.flags.writeable and values.dtype.isnative and view.offset == 0
            and view.storage.dtype != _BFLOAT16 and math.prod(view.size) == values.size
            and _is_contiguous(view.size, view.stride)):
        return values.reshape(view.size)  # the whole storage: share it, as torch does
    strided = np.lib.stride_tricks.as_strided(
        values[view.offset:] if 0 not in view.size else values[:0],
        shape=view.size,
        strides=[step * values.itemsize for step in view.stride],
        writeable=False,
    )
    array = np.array(strided, dtype=values.dtype.newbyteorder("="), order="C")
    if view.storage.dtype == _BFLOAT16:
        # bfloat16 is float32's upper half, so this is exact.
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _is_contiguous(size, stride):
    """Whether `stride` is the C-contiguous stride of `size` (extents of 1 take any)."""
    expected = 1
    for extent, step in reversed(list(zip(size, stride))):
        if extent != 1 and step != expected:
            return False
        expected *= extent
    return True
