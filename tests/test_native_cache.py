"""First use of the AVX2 op: its compile cache survives damaged files, and
threads that use it at once all get it (and time its choice once)."""

import concurrent.futures
import os
import shutil
import stat
import textwrap

import pytest
import tensorflow as tf

from keras_resnext.kernels import avx2

# Skip only where the op can't be built or is switched off; where it can, a
# failed build fails test_native_conv's test_builds_where_it_can instead of
# skipping everything quietly. Shared by the op's test modules.
BUILDABLE = (avx2.enabled() and avx2.cpu_supported()
             and shutil.which(os.environ.get("CXX", "c++")) is not None)
NEEDS_THE_OP = pytest.mark.skipif(
    not BUILDABLE,
    reason=(f"{avx2.SWITCH}={os.environ.get(avx2.SWITCH)} turns the AVX2 op off"
            if not avx2.enabled() else "no AVX2 CPU or no C++ compiler here"))
pytestmark = NEEDS_THE_OP

# Prints the op's worst error against TensorFlow's grouped convolution.
CHECK_VALUES = textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    from keras_resnext.kernels import avx2, tf_ops

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=[2, 9, 7, 16]).astype("float32"))
    kernel = tf.constant(rng.normal(size=[3, 3, 4, 16]).astype("float32"))
    expected = tf.concat([tf.nn.conv2d(xg, kg, 1, "SAME") for xg, kg in
                          zip(tf.split(x, 4, -1), tf.split(kernel, 4, -1))], -1)
""")


def fake_compiler(tmp_path):
    """A stand-in for c++ that "compiles" by copying the op this session
    built, and logs each call, so rebuilds are instant and countable."""
    library = avx2.build(tf)
    log = tmp_path / "builds.log"
    script = tmp_path / "fake-c++"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        while [ "$#" -gt 0 ]; do
          if [ "$1" = "-o" ]; then out="$2"; fi
          shift
        done
        echo build >> '{log}'
        cp '{library}' "$out"
    """))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, log


def builds(log):
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_cached_library_is_rebuilt(damage, tmp_path, monkeypatch, python_subprocess):
    compiler, log = fake_compiler(tmp_path)
    cache = tmp_path / "cache"
    env = {"CXX": str(compiler), "KERAS_RESNEXT_CACHE": str(cache)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = avx2.build(tf)
    assert builds(log) == 1 and os.path.exists(f"{path}.sha256")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 if damage == "truncated" else 0)

    code = CHECK_VALUES + textwrap.dedent("""
        op = avx2.grouped_conv_op()
        got = op(x, kernel, tf.zeros([0]), tf.zeros([0]), stride=1,
                 explicit_paddings=[1, 1, 1, 1])
        print("WORST", float(np.max(np.abs(got - expected))))
    """)
    result = python_subprocess(code, env=env)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert float(result.stdout.split("WORST")[1]) < 1e-4
    assert builds(log) == 2
    assert sorted(os.listdir(cache)) == sorted([os.path.basename(path),
                                                os.path.basename(path) + ".sha256"])


THREADS = 8
FIRST_USE_TOGETHER = CHECK_VALUES + textwrap.dedent(f"""
    import threading

    barrier = threading.Barrier({THREADS})
    results, errors = [None] * {THREADS}, []

    def first_use(index):
        barrier.wait()
        try:
            results[index] = tf_ops.grouped_conv2d(x, kernel, [1, 1], "same", [1, 1])
        except Exception as error:
            errors.append(repr(error))

    threads = [threading.Thread(target=first_use, args=(i,)) for i in range({THREADS})]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert avx2.grouped_conv_op() is not None
    print("WORST", max(float(np.max(np.abs(y - expected))) for y in results))
    from keras_resnext.kernels.avx2 import choice
    print("DECIDED", len(choice.read_decisions(choice.decisions_path(tf_ops._onednn_enabled()))))
""")


def test_threads_using_the_op_for_the_first_time_together(tmp_path, python_subprocess):
    # Each try is a fresh process with an empty cache, so the threads meet
    # while the op is being built; before the fix nearly every try raised
    # "KeyError: Registering two gradient with name ...". With the automatic
    # choice, the threads also meet while the shape is timed: once.
    compiler, log = fake_compiler(tmp_path)

    def first_use(index):
        return python_subprocess(FIRST_USE_TOGETHER, env={
            "CXX": str(compiler), "KERAS_RESNEXT_CACHE": str(tmp_path / f"cache{index}"),
            avx2.SWITCH: "1"})

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        tries = list(pool.map(first_use, range(2)))
    for result in tries:
        assert result.returncode == 0, result.stderr[-2000:]
        assert float(result.stdout.split("WORST")[1].split()[0]) < 1e-4
        assert result.stdout.split("DECIDED")[1].split() == ["1"]
    assert builds(log) == len(tries)  # one per process, whatever its threads
