"""The AVX2 op runs only the shapes where it was timed faster than TensorFlow's
kernel on this CPU (keras_resnext/kernels/avx2/choice.py): each shape is timed
once and the decision kept for later processes, a damaged decisions file is
timed anew, and KERAS_RESNEXT_NATIVE_KERNELS=always gives the op every shape."""

import concurrent.futures
import json
import textwrap
import types

import numpy as np
import pytest
import tensorflow as tf

import keras_resnext as kr
from keras_resnext.kernels import avx2, tf_ops
from keras_resnext.kernels.avx2 import choice
from test_native_cache import BUILDABLE, NEEDS_THE_OP, fake_compiler

pytestmark = NEEDS_THE_OP
if BUILDABLE:
    tf_ops.avx2_op()  # loads the library whose SHA-256 names the decisions file
IMAGES = np.zeros([2, 16, 16, 3], "float32")


def tiny_model():
    """Grouped 3x3s with 4, 8 and 16 channels per group."""
    return kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3, input_shape=(16, 16, 3))


class FakeTimings:
    """Stands in for the timed calls and for the clock choice.measure reads:
    each call advances the clock by its milliseconds, `ms[group width]` =
    (ours, TensorFlow's); `timed` lists the shapes timed."""

    def __init__(self, ms):
        self.ms, self.now, self.timed = ms, 0.0, []

    def perf_counter(self):
        return self.now

    def calls(self, batch, height, width, channels, group_width, stride):
        self.timed.append((group_width, stride))
        return tuple(self._taking(ms) for ms in self.ms[group_width])

    def _taking(self, ms):
        def call():
            self.now += ms / 1e3
        return call


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The automatic choice, with its decisions in a folder of the test's own."""
    monkeypatch.setenv(avx2.SWITCH, "1")
    monkeypatch.setenv("KERAS_RESNEXT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_timings(monkeypatch, ms):
    timings = FakeTimings(ms)
    monkeypatch.setattr(tf_ops, "_timed_grouped_convs", timings.calls)
    monkeypatch.setattr(choice, "time", types.SimpleNamespace(perf_counter=timings.perf_counter))
    return timings


def op_group_widths(model):
    """Channels per group of the convolutions a Keras predict step gives the op."""
    graph = tf.function(model.predict_step).get_concrete_function(IMAGES).graph
    return sorted({op.inputs[1].shape[2] for op in graph.get_operations()
                   if op.type == avx2.OP_NAME})


def kept_decisions(onednn=None):
    path = choice.decisions_path(tf_ops._onednn_enabled() if onednn is None else onednn)
    return {key: record["use_op"] for key, record in choice.read_decisions(path).items()}


def test_a_shape_timed_slower_here_gets_tensorflows_kernel(cache, monkeypatch):
    timings = fake_timings(monkeypatch, {4: (1, 3), 8: (2, 5), 16: (4, 3)})
    assert op_group_widths(tiny_model()) == [4, 8]
    assert sorted(timings.timed) == [(4, 1), (8, 2), (16, 2)]
    assert sorted(kept_decisions().values()) == [False, True, True]
    # Known now: a second trace times nothing.
    assert op_group_widths(tiny_model()) == [4, 8]
    assert len(timings.timed) == 3


def test_always_gives_the_op_every_shape_it_supports_untimed(cache, monkeypatch):
    monkeypatch.setenv(avx2.SWITCH, avx2.ALWAYS)
    timings = fake_timings(monkeypatch, {4: (3, 1), 8: (3, 1), 16: (3, 1)})
    assert op_group_widths(tiny_model()) == [4, 8, 16]
    assert timings.timed == [] and not cache.exists()


def damage(path, how):
    text = path.read_text()
    if how == "truncated":
        path.write_text(text[:len(text) // 2])
    elif how == "not json":
        path.write_bytes(b"\x00garbage")
    else:  # a decision changed by hand: the checksum no longer matches
        kept = json.loads(text)
        for record in kept["decisions"].values():
            record["use_op"] = not record["use_op"]
        path.write_text(json.dumps(kept))


@pytest.mark.parametrize("how", ["truncated", "not json", "edited"])
def test_a_damaged_decisions_file_is_timed_anew_and_replaced(how, cache, monkeypatch):
    timings = fake_timings(monkeypatch, {4: (1, 3)})
    onednn = tf_ops._onednn_enabled()

    def decide():
        return choice.op_wins(4, 1, 18, 18, 16, onednn,
                              lambda batch: timings.calls(batch, 18, 18, 16, 4, 1))

    assert decide() and len(timings.timed) == 1
    (path,) = cache.glob("*.json")
    damage(path, how)
    monkeypatch.setattr(choice, "_decided", {})  # as a new process
    assert decide() and len(timings.timed) == 2
    assert kept_decisions() == {choice.shape_key(4, 1, 18, 18, 16): True}


# A process of its own: the tiny model's predictions with the automatic
# choice, and how many shapes it timed.
PREDICT_AND_COUNT = textwrap.dedent("""
    import numpy as np
    import keras_resnext as kr
    from keras_resnext.kernels.avx2 import choice

    timed = []
    measure = choice.measure
    choice.measure = lambda *calls: timed.append(1) or measure(*calls)
    model = kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3, input_shape=(16, 16, 3))
    model.predict_on_batch(np.zeros([2, 16, 16, 3], "float32"))
    print("TIMED", len(timed))
""")


@pytest.mark.slow
def test_each_shape_is_timed_once_for_all_processes(tmp_path, monkeypatch, python_subprocess):
    # Two processes meet the same three shapes at once, with real timings.
    compiler, _ = fake_compiler(tmp_path)
    cache = tmp_path / "cache"
    env = {"CXX": str(compiler), "KERAS_RESNEXT_CACHE": str(cache), avx2.SWITCH: "1"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: python_subprocess(PREDICT_AND_COUNT, env=env), range(2)))
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    assert sum(int(run.stdout.split("TIMED")[1]) for run in runs) == 3
    # A third process (this one, loading the same library) times nothing and
    # follows the kept decisions.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    decisions = kept_decisions()
    timings = fake_timings(monkeypatch, {})
    expected = sorted(int(key.split()[0]) for key, use_op in decisions.items() if use_op)
    assert len(decisions) == 3 and op_group_widths(tiny_model()) == expected
    assert timings.timed == []


def trace_grouped_conv(input_spec, padding):
    kernel = tf.zeros([3, 3, 4, 32])

    @tf.function(input_signature=[input_spec])  # AutoGraph on, as users' are
    def conv(x):
        with tf_ops.native_kernels():
            return tf_ops.grouped_conv2d(x, kernel, [1, 1], padding, [1, 1])

    return conv.get_concrete_function().graph


def test_a_same_conv_of_unknown_size_the_op_cannot_pad_is_not_timed(cache, monkeypatch):
    timings = fake_timings(monkeypatch, {4: (1, 3)})
    graph = trace_grouped_conv(tf.TensorSpec([None, None, None, 32]), "same")
    assert not any(op.type == avx2.OP_NAME for op in graph.get_operations())
    assert timings.timed == [] and not cache.exists()


def test_timing_inside_a_users_tf_function_is_not_autograph_converted(cache, monkeypatch):
    from tensorflow.python.autograph.core import ag_ctx

    timings = fake_timings(monkeypatch, {4: (1, 3)})
    statuses = []
    timed_calls = timings.calls
    monkeypatch.setattr(tf_ops, "_timed_grouped_convs", lambda *shape: (
        statuses.append(ag_ctx.control_status_ctx().status), timed_calls(*shape))[1])
    graph = trace_grouped_conv(tf.TensorSpec([2, 8, 8, 32]), "same")
    assert any(op.type == avx2.OP_NAME for op in graph.get_operations())
    assert statuses == [ag_ctx.Status.DISABLED]


def test_the_switch_takes_any_case_and_spaces_and_warns_of_unknown_values(monkeypatch):
    monkeypatch.setattr(avx2, "_unknown_switches", set(), raising=False)
    for value, enabled, always in ((" ALWAYS ", True, True), (" 1 ", True, False),
                                   ("True", True, False), ("OFF", False, False)):
        monkeypatch.setenv(avx2.SWITCH, value)
        assert (avx2.enabled(), avx2.always()) == (enabled, always), value
    monkeypatch.setenv(avx2.SWITCH, "never")
    with pytest.warns(RuntimeWarning, match="KERAS_RESNEXT_NATIVE_KERNELS='never' is none of"):
        assert (avx2.enabled(), avx2.always()) == (True, False)


def test_a_cache_folder_that_cannot_be_locked_still_decides(cache, monkeypatch):
    import errno

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(choice.fcntl, "flock", no_locks)
    timings = fake_timings(monkeypatch, {4: (1, 3)})
    with pytest.warns(RuntimeWarning, match=r"can't lock .*\.lock \(\[Errno 37\]"):
        assert choice.op_wins(4, 1, 8, 8, 32, False, lambda batch: timings.calls(
            batch, 8, 8, 32, 4, 1))
    assert list(kept_decisions(onednn=False).values()) == [True]
