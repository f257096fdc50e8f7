"""Builds and loads the AVX2 grouped-convolution op (grouped_conv.cc).

The op is compiled on first use against the installed TensorFlow, with the
system C++ compiler, and cached per source, TensorFlow version and flags:

- cache folder: `$KERAS_RESNEXT_CACHE`, else `~/.cache/keras_resnext`;
- compiler: `$CXX`, else `c++`;
- `KERAS_RESNEXT_NATIVE_KERNELS=0` turns the op off; `always` gives it every
  shape it supports; unset or `1`, it gets only the shapes where it beats
  TensorFlow's kernel on this CPU, measured once per shape (`choice.py`).

Each cached library has its SHA-256 beside it (`.so.sha256`); one that doesn't
match (a build cut short, a truncated copy) is rebuilt, never loaded.

Where it can't be built (no compiler, no AVX2/FMA, not Linux x86-64) the models
use TensorFlow's own grouped kernel, after one warning that says why.
"""

import functools
import hashlib
import os
import platform
import subprocess
import sys
import threading
import warnings

SWITCH = "KERAS_RESNEXT_NATIVE_KERNELS"
ALWAYS = "always"
OP_NAME = "KerasResnextGroupedConv2D"
_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = ("grouped_conv.cc", "grouped_conv_kernels.h")
_FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC", "-w")
_first_use = threading.Lock()
_library_digest = None


class BuildError(RuntimeError):
    pass


_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on", ALWAYS)
_unknown_switches = set()


def _switch():
    value = os.environ.get(SWITCH, "1").strip().lower()
    if value not in _OFF + _ON:
        if value not in _unknown_switches:
            _unknown_switches.add(value)
            warnings.warn(f"keras_resnext: {SWITCH}={os.environ[SWITCH]!r} is none of 0, 1, "
                          f"{ALWAYS}; taken as 1.", RuntimeWarning, stacklevel=3)
        return "1"
    return value


def enabled():
    return _switch() not in _OFF


def always():
    """Whether the switch gives the op every shape it supports, faster or not."""
    return _switch() == ALWAYS


def cpu_supported():
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        return False
    return {"avx2", "fma"} <= set(cpu_identity()[1].split())


@functools.lru_cache(maxsize=None)
def cpu_identity():
    """(model name, flags) of the first processor in /proc/cpuinfo; empty
    strings where there is none."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields.get("model name", ""), fields.get("flags", "")


def grouped_conv_op():
    """The op's Python function, or None where it can't be used here.

    Without a gradient: `kernels.tf_ops.avx2_op()` gives the op with its
    gradient registered.
    """
    # One thread builds and loads; the others wait for its answer.
    with _first_use:
        return _load_op()


@functools.lru_cache(maxsize=None)
def _load_op():
    if not enabled() or not cpu_supported():
        return None
    import tensorflow as tf

    global _library_digest
    try:
        path = build(tf)
        library = tf.load_op_library(path)
    except (BuildError, OSError, tf.errors.NotFoundError) as error:
        warnings.warn(
            f"keras_resnext: the AVX2 grouped convolution is unavailable ({error}); "
            f"using TensorFlow's grouped kernel. Set {SWITCH}=0 to skip the build.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    # build() has just checked the library against this checksum (or written it).
    _library_digest = _read(f"{path}.sha256")
    return library.keras_resnext_grouped_conv2d


def library_digest():
    """The SHA-256 of the op's library this process loaded, or None before
    `grouped_conv_op()` has loaded one."""
    return _library_digest


def cache_dir():
    return os.environ.get("KERAS_RESNEXT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_resnext"
    )


def build(tf):
    """Compiles the op for this TensorFlow if not cached; returns the .so path."""
    compiler = os.environ.get("CXX", "c++")
    command = [
        compiler, *_FLAGS, *tf.sysconfig.get_compile_flags(),
        os.path.join(_HERE, "grouped_conv.cc"),
        "-o", None,
        *tf.sysconfig.get_link_flags(),
    ]
    key = hashlib.sha256()
    for name in _SOURCES:
        with open(os.path.join(_HERE, name), "rb") as f:
            key.update(f.read())
    key.update(repr((tf.__version__, tf.__file__, command)).encode())
    folder = cache_dir()
    path = os.path.join(folder, f"grouped_conv-{key.hexdigest()[:16]}.so")
    checksum_path = f"{path}.sha256"
    expected = _read(checksum_path)
    if expected and expected == _sha256(path):
        return path
    os.makedirs(folder, exist_ok=True)
    # Concurrent builders each write their own files; the renames are atomic.
    # The library goes first: a reader between the two renames sees a
    # mismatch and builds again, never a wrong match.
    temporary = f"{path}.{os.getpid()}.tmp"
    temporary_checksum = f"{checksum_path}.{os.getpid()}.tmp"
    command[command.index(None)] = temporary
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise BuildError(f"{compiler} exited with {result.returncode}: {last}")
        with open(temporary_checksum, "w") as f:
            f.write(_sha256(temporary))
        os.replace(temporary, path)
        os.replace(temporary_checksum, checksum_path)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BuildError(f"{compiler} failed to run: {error}") from None
    finally:
        for leftover in (temporary, temporary_checksum):
            if os.path.exists(leftover):
                os.remove(leftover)
    return path


def _sha256(path):
    """The file's SHA-256 in hex, or None if it can't be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None
