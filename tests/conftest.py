import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

# Import the package before anything imports TensorFlow, as users are told to,
# so the in-process tests run with the oneDNN kernels the package arranges.
import keras_resnext  # noqa: E402,F401
from keras_resnext.kernels import avx2

# Tests of the AVX2 op (its values, gradients, the graphs it goes into) need it
# at every shape it supports, on any CPU, not only where it is the faster
# kernel here; subprocesses inherit the setting. tests/test_kernel_choice.py
# tests the automatic choice; KERAS_RESNEXT_NATIVE_KERNELS=1 runs every test
# with it (and =0 without the op).
os.environ.setdefault(avx2.SWITCH, avx2.ALWAYS)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pretrained_like_batch_norms(model, affine=True):
    """Gives each `kr.layers.BatchNormalization` moving statistics (and, with
    `affine`, gamma and beta) away from their initial values, as a trained
    model's are, so that each batch norm does something; seeded. Returns model."""
    import numpy as np

    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras_resnext.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.2, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, layer.moving_variance.shape))
            if affine:
                layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
                layer.beta.assign(rng.normal(0, 0.2, layer.beta.shape))
    return model


@contextlib.contextmanager
def dtype_policy(policy):
    """Keras' global dtype policy set to `policy` inside the block only."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def run_python(code, env=None, timeout=600, args=()):
    """Run `code` in a fresh interpreter, `args` as its sys.argv[1:]; return
    the CompletedProcess.

    `env` adds variables to this process's environment; a None value removes one.
    """
    full_env = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)  # None removes an inherited variable
        else:
            full_env[key] = value
    full_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env,
        timeout=timeout, cwd=REPO_ROOT,
    )


def run_until_line(command, env, line, timeout=300):
    """Start `command` (stdout and stderr merged), read its output until a line
    equal to `line` (stripped) or `timeout` seconds, then SIGKILL it, as a
    crash would. Returns the lines read."""
    process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.monotonic() + timeout
    try:
        for output in process.stdout:
            seen.append(output)
            if output.strip() == line or time.monotonic() > deadline:
                break
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    return seen


@pytest.fixture
def python_subprocess():
    return run_python
