"""PyTorch checkpoints read without torch (`keras_resnext.weights.torch_zip`).

The files here are written by this test in the layout `torch.save` produces
(a zip of archive/data.pkl, archive/data/<key>, archive/byteorder and
archive/version; or the legacy single stream), with pickles spelled out
opcode by opcode as torch writes them, so CI needs no torch. Where torch is
installed, a test checks that torch reads these files the same way and that
we read torch's own files exactly as `torch.load(weights_only=True)` does.
"""

import os
import pickle
import struct
import sys
import zipfile

import numpy as np
import pytest

import keras_resnext as kr
from keras_resnext import weights as kr_weights
from keras_resnext.weights import torch_zip
from test_weights import assert_same_weights, randomise_batch_norms, torchvision_state_dict

TINY = dict(depth=11, cardinality=4, width=4, classes=3, input_shape=(16, 16, 3))
_STORAGE_TYPES = {
    np.dtype("float32"): "FloatStorage",
    np.dtype("float16"): "HalfStorage",
    np.dtype("int64"): "LongStorage",
    "bfloat16": "BFloat16Storage",
}


class Tensor:
    """A tensor as torch pickles it: a view (offset, size, stride) of a storage."""

    def __init__(self, key, offset, size, stride):
        self.key, self.offset, self.size, self.stride = key, offset, tuple(size), tuple(stride)


def contiguous(key, shape):
    strides = np.cumprod((1,) + tuple(shape)[:0:-1])[::-1] if shape else ()
    return Tensor(key, 0, shape, tuple(int(s) for s in strides))


def _plain(value):
    return pickle.dumps(value, protocol=2)[2:-1]  # without PROTO and STOP


def _global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def state_dict_pickle(tensors, storage_types, legacy=False):
    """An OrderedDict of tensors, pickled opcode by opcode as torch.save does.
    The legacy format's storage ids end with a view (None: the whole storage)."""
    out = [b"\x80\x02", _global("collections", "OrderedDict"), b")R("]
    for name, tensor in tensors.items():
        out += [
            _plain(name), _global("torch._utils", "_rebuild_tensor_v2"), b"((",
            _plain("storage"), _global("torch", storage_types[tensor.key][0]),
            _plain(tensor.key), _plain("cpu"), _plain(storage_types[tensor.key][1]),
            b"Nt" if legacy else b"t", b"Q",
            _plain(tensor.offset), _plain(tensor.size), _plain(tensor.stride), _plain(False),
            _global("collections", "OrderedDict"), b")R", b"tR",
        ]
    return b"".join(out + [b"u."])


def _storage_bytes(values):
    if isinstance(values, tuple):  # ("bfloat16", float32 values that bfloat16 holds exactly)
        return (np.asarray(values[1], "<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return np.asarray(values, values.dtype.newbyteorder("<")).tobytes()


def _storage_type(values):
    if isinstance(values, tuple):
        return "BFloat16Storage", len(values[1])
    return _STORAGE_TYPES[values.dtype], values.size


def write_torch_zip(path, tensors, storages, data_pkl=None):
    """`storages`: key -> flat numpy array, or ("bfloat16", float32 array)."""
    types = {key: _storage_type(values) for key, values in storages.items()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl or state_dict_pickle(tensors, types))
        archive.writestr("archive/byteorder", "little")
        for key, values in storages.items():
            archive.writestr(f"archive/data/{key}", _storage_bytes(values))
        archive.writestr("archive/version", "3\n")
    return str(path)


def write_legacy(path, tensors, storages):
    """PyTorch's pre-1.6 format: header pickles, the state dict, its keys, the storages."""
    types = {key: _storage_type(values) for key, values in storages.items()}
    with open(path, "wb") as file:
        pickle.dump(0x1950A86A20F9469CFC6C, file, protocol=2)
        pickle.dump(1001, file, protocol=2)
        pickle.dump(dict(protocol_version=1001, little_endian=True,
                         type_sizes=dict(short=2, int=4, long=4)), file, protocol=2)
        file.write(state_dict_pickle(tensors, types, legacy=True))
        pickle.dump(list(storages), file, protocol=2)
        for key, values in storages.items():
            file.write(types[key][1].to_bytes(8, "little") + _storage_bytes(values))
    return str(path)


@pytest.fixture(scope="module")
def mixed():
    """Every dtype, a transposed (strided) tensor and one storage shared at two offsets."""
    grid = np.arange(12, dtype=np.float32) * 0.5 - 2
    halves = np.array([0.5, -1.25, 3.0, 65504.0], np.float16)
    bfloat16 = np.array([1.5, -0.09375, 2.0**127, 0.0], np.float32)  # exact in bfloat16
    counts = np.array([100, -7, 2**40], np.int64)
    storages = {"0": grid, "1": halves, "2": ("bfloat16", bfloat16), "3": counts}
    tensors = {
        "conv.weight": contiguous("0", (3, 4)),
        "conv.weight_t": Tensor("0", 0, (4, 3), (1, 4)),
        "shared.head": Tensor("0", 2, (2, 2), (2, 1)),
        "shared.tail": Tensor("0", 8, (4,), (1,)),
        "half": contiguous("1", (4,)),
        "bf16": contiguous("2", (2, 2)),
        "bn.num_batches_tracked": Tensor("3", 0, (), ()),
        "counts": Tensor("3", 1, (2,), (1,)),
    }
    expected = {
        "conv.weight": grid.reshape(3, 4),
        "conv.weight_t": grid.reshape(3, 4).T,
        "shared.head": grid[2:6].reshape(2, 2),
        "shared.tail": grid[8:12],
        "half": halves,
        "bf16": bfloat16.reshape(2, 2),
        "bn.num_batches_tracked": np.array(100, np.int64),
        "counts": counts[1:],
    }
    return tensors, storages, expected


def assert_exactly(got, expected):
    assert list(got) == list(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)


@pytest.mark.parametrize("writer", [write_torch_zip, write_legacy], ids=["zip", "legacy"])
def test_state_dict_is_read_exactly_without_torch(mixed, tmp_path, monkeypatch, writer):
    tensors, storages, expected = mixed
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    got = torch_zip.load(writer(tmp_path / "mixed.pth", tensors, storages))
    assert_exactly(got, expected)
    assert got["conv.weight_t"].flags.c_contiguous  # a copy, not a view of the file's bytes


def test_big_endian_storages_are_read(mixed, tmp_path):
    path = tmp_path / "big.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", state_dict_pickle(
            {"w": contiguous("0", (3,))}, {"0": ("FloatStorage", 3)}))
        archive.writestr("archive/byteorder", "big")
        archive.writestr("archive/data/0", np.array([1.5, -2, 7], ">f4").tobytes())
    np.testing.assert_array_equal(torch_zip.load(str(path))["w"], [1.5, -2, 7])


def _zero_crcs(path):
    """Every CRC-32 0, as torch.save writes under set_crc32_options(False)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        local_headers, offset = [info.header_offset for info in archive.infolist()], \
            archive.start_dir
    for header in local_headers:
        data[header + 14:header + 18] = bytes(4)
    while data[offset:offset + 4] == b"PK\x01\x02":  # the central directory's entries
        data[offset + 16:offset + 20] = bytes(4)
        offset += 46 + sum(struct.unpack("<HHH", data[offset + 28:offset + 34]))
    path.write_bytes(bytes(data))


def test_a_zip_saved_without_crcs_is_read_as_torch_reads_it(mixed, tmp_path):
    path = tmp_path / "no_crc.pth"
    write_torch_zip(path, *mixed[:2])
    _zero_crcs(path)
    assert_exactly(torch_zip.load(str(path)), mixed[2])


def test_a_corrupted_storage_fails_its_crc(mixed, tmp_path):
    path = tmp_path / "corrupted.pth"
    write_torch_zip(path, *mixed[:2])
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("archive/data/0")
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + 5] ^= 1  # no extra field here
    path.write_bytes(bytes(data))
    with pytest.raises(zipfile.BadZipFile, match="Bad CRC-32 for file 'archive/data/0'"):
        torch_zip.load(str(path))


@pytest.mark.parametrize("view", [Tensor("0", 10, (4,), (1,)), Tensor("0", 0, (3, 4), (5, 1))])
def test_a_tensor_past_its_storage_is_refused(tmp_path, view):
    path = write_torch_zip(tmp_path / "bad.pth", {"w": view}, {"0": np.zeros(12, np.float32)})
    with pytest.raises(ValueError, match="reaches past the end of storage 0"):
        torch_zip.load(path)


class _RunsCode:
    """Unpickling this runs a shell command or Python source that makes a marker file."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return (self.function, (self.argument,))


def _payloads(marker):
    return {
        "posix.system" if os.name == "posix" else "nt.system":
            _RunsCode(os.system, f"touch {marker}"),
        # Protocol 2 (torch's) spells builtins by their Python 2 module name.
        "__builtin__.eval": _RunsCode(eval, f"open({str(marker)!r}, 'w').close()"),
    }


@pytest.mark.parametrize("global_name", ["system", "eval"])
@pytest.mark.parametrize("layout", ["zip", "legacy", "zip_in_a_tensor"])
def test_code_is_refused_naming_the_global_and_never_runs(tmp_path, global_name, layout):
    marker = tmp_path / "code_ran"
    name, payload = next((name, payload) for name, payload in _payloads(marker).items()
                         if name.endswith(global_name))
    path = str(tmp_path / "evil.pth")
    if layout == "legacy":
        with open(path, "wb") as file:
            pickle.dump({"conv1.weight": payload}, file, protocol=2)
    elif layout == "zip":
        write_torch_zip(path, {}, {}, data_pkl=pickle.dumps({"hook": payload}, protocol=2))
    else:  # the call hides where a tensor's backward hooks go
        tensor = state_dict_pickle({"w": contiguous("0", (2,))}, {"0": ("FloatStorage", 2)})
        head, persistent_id, tail = tensor.partition(b"tQ")
        evil = head + persistent_id + tail.replace(
            _global("collections", "OrderedDict") + b")R", pickle.dumps(payload, protocol=2)[2:-1])
        write_torch_zip(path, {}, {"0": np.zeros(2, np.float32)}, data_pkl=evil)
    with pytest.raises(torch_zip.RefusedGlobal, match=f"refers to {name}") as refusal:
        torch_zip.load(path)
    assert refusal.value.global_name == name
    assert not marker.exists()


def test_refusal_through_load_weights_is_one_line_naming_file_and_global(tmp_path):
    marker = tmp_path / "code_ran"
    path = str(tmp_path / "evil.pth")
    write_torch_zip(path, {}, {}, data_pkl=pickle.dumps(
        {"hook": _payloads(marker)["__builtin__.eval"]}, protocol=2))
    with pytest.raises(ValueError) as error:
        kr_weights.load_weights(kr.ResNeXt29(**TINY), path)
    message = str(error.value)
    assert message.startswith(f"Refused {path} as unsafe") and "__builtin__.eval" in message
    assert "nothing in it ran" in message and "\n" not in message
    assert not marker.exists()


def test_a_pickle_that_is_not_a_torch_file_is_named(tmp_path):
    path = tmp_path / "plain.pth"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    with pytest.raises(ValueError, match=f"Could not read {path} as a PyTorch state dict: "
                                         "not a PyTorch checkpoint"):
        kr_weights.load_weights(kr.ResNeXt29(**TINY), str(path))


@pytest.fixture(scope="module")
def tiny():
    return randomise_batch_norms(kr.ResNeXt29(**TINY, classifier_activation=None), seed=7)


def torchvision_pth(model, path, writer=write_torch_zip):
    """`model`'s weights as a .pth of torchvision's names; every tensor its own storage."""
    state = torchvision_state_dict(model)
    storages = {str(i): value.ravel() for i, value in enumerate(state.values())}
    tensors = {name: contiguous(str(i), value.shape)
               for i, (name, value) in enumerate(state.items())}
    return writer(path, tensors, storages)


@pytest.mark.parametrize("writer", [write_torch_zip, write_legacy], ids=["zip", "legacy"])
def test_torchvision_pth_loads_end_to_end_without_torch(tiny, tmp_path, monkeypatch, writer):
    path = torchvision_pth(tiny, tmp_path / "tiny.pth", writer)
    monkeypatch.setitem(sys.modules, "torch", None)
    loaded = kr.ResNeXt29(**TINY, classifier_activation=None, weights=path)
    assert_same_weights(loaded, tiny)


# With torch ------------------------------------------------------------------


def _import_torch():
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed: parity with torch.load(weights_only=True) "
                    "not checked here (install the [torch] extra to run it)")
    return torch


def _as_numpy(torch, tensor):
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


@pytest.mark.parametrize("writer", [write_torch_zip, write_legacy], ids=["zip", "legacy"])
def test_torch_reads_our_files_as_we_do(mixed, tmp_path, writer):
    torch = _import_torch()
    tensors, storages, expected = mixed
    loaded = torch.load(writer(tmp_path / "ours.pth", tensors, storages), weights_only=True)
    assert_exactly({name: _as_numpy(torch, value) for name, value in loaded.items()}, expected)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torchs_files_read_as_torch_load_weights_only(tmp_path, zip_format):
    torch = _import_torch()
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    grid = torch.randn(6, 5)
    state = dict(module.state_dict())
    state.update({
        "half": torch.randn(3, 2).half(), "bf16": torch.randn(5).bfloat16(),
        "double": torch.randn(2, dtype=torch.float64), "ints": torch.arange(4, dtype=torch.int32),
        "transposed": grid.t(), "row": grid[2], "column": grid[:, 1],
        "parameter": torch.nn.Parameter(torch.ones(2)),
        "empty": torch.zeros(0, 3), "expanded": torch.arange(3.0).expand(2, 3),
    })
    path = tmp_path / "torch.pth"
    torch.save({"state_dict": state, "epoch": 3}, path, _use_new_zipfile_serialization=zip_format)
    reference = torch.load(path, map_location="cpu", weights_only=True)
    ours = torch_zip.load(str(path))
    assert ours["epoch"] == 3
    assert_exactly(ours["state_dict"], {name: _as_numpy(torch, value.detach())
                                        for name, value in reference["state_dict"].items()})
