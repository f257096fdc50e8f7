"""The AVX2 grouped convolution (keras_resnext/kernels/avx2): values and gradients
against TensorFlow's grouped kernel, its inference fusions, where models use
it, and the fallback when it can't be built."""

import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_resnext as kr
from conftest import pretrained_like_batch_norms
from test_native_cache import BUILDABLE, NEEDS_THE_OP
from keras_resnext.kernels import avx2, tf_ops

OP = tf_ops.avx2_op() if BUILDABLE else None
pytestmark = NEEDS_THE_OP
EMPTY = tf.zeros([0])


def test_builds_where_it_can():
    assert OP is not None


def grouped_reference(x, kernel, stride, padding, dilation):
    """TensorFlow's grouped convolution as one ungrouped tf.nn.conv2d per
    group, which every CPU build of TensorFlow has and can differentiate
    (without oneDNN its grouped kernel has no gradient)."""
    groups = x.shape[-1] // kernel.shape[2]
    return tf.concat([
        tf.nn.conv2d(xg, kg, stride, padding.upper(), dilations=dilation)
        for xg, kg in zip(tf.split(x, groups, axis=-1), tf.split(kernel, groups, axis=-1))
    ], axis=-1)



def reference(x, kernel, stride, pads):
    padded = tf.pad(x, [[0, 0], pads[0:2], pads[2:4], [0, 0]])
    return grouped_reference(padded, kernel, stride, "valid", 1)


def random(shape, seed):
    return tf.constant(np.random.default_rng(seed).normal(size=shape).astype("float32"))


# (channels per group, groups, stride, paddings, height, width): partial
# tiles, odd sizes, asymmetric and zero padding.
CASES = [
    (4, 4, 1, [1, 1, 1, 1], 9, 11),
    (4, 2, 2, [1, 1, 1, 1], 10, 13),
    (4, 6, 1, [0, 0, 0, 0], 7, 20),
    (8, 3, 1, [1, 1, 1, 1], 6, 31),
    (8, 2, 2, [0, 1, 0, 1], 11, 9),
    (8, 4, 1, [2, 0, 1, 2], 5, 15),
    (16, 2, 1, [1, 1, 1, 1], 7, 7),
    (16, 3, 2, [1, 1, 1, 1], 14, 15),
    (32, 2, 1, [1, 1, 1, 1], 7, 13),
    (32, 2, 2, [0, 1, 0, 1], 9, 14),
]


@pytest.mark.parametrize("group_width,groups,stride,pads,height,width", CASES)
def test_matches_tensorflows_grouped_convolution(group_width, groups, stride, pads, height,
                                                 width):
    channels = group_width * groups
    x = random([2, height, width, channels], 0)
    kernel = random([3, 3, group_width, channels], 1)
    expected = reference(x, kernel, stride, pads)
    got = OP(x, kernel, EMPTY, EMPTY, stride=stride, explicit_paddings=pads)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    scale, offset = random([channels], 2), random([channels], 3)
    fused = OP(x, kernel, scale, offset, stride=stride, explicit_paddings=pads, relu=True)
    np.testing.assert_allclose(fused, tf.nn.relu(expected * scale + offset), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("group_width,groups,stride,pads,height,width",
                         CASES[:2] + CASES[3:5] + CASES[6:9])
@pytest.mark.parametrize("fused", [False, True])
def test_gradients_match_tensorflows(group_width, groups, stride, pads, height, width, fused):
    channels = group_width * groups
    x = random([2, height, width, channels], 4)
    kernel = random([3, 3, group_width, channels], 5)
    scale, offset = random([channels], 6), random([channels], 7)
    dy = random(reference(x, kernel, stride, pads).shape, 8)

    def gradients(function):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel, scale, offset])
            y = function()
        return tape.gradient(y, [x, kernel, scale, offset], output_gradients=dy)

    if fused:
        got = gradients(lambda: OP(x, kernel, scale, offset, stride=stride,
                                   explicit_paddings=pads, relu=True))
        expected = gradients(lambda: tf.nn.relu(reference(x, kernel, stride, pads) * scale
                                                + offset))
    else:
        got = gradients(lambda: OP(x, kernel, EMPTY, EMPTY, stride=stride,
                                   explicit_paddings=pads))[:2]
        expected = gradients(lambda: reference(x, kernel, stride, pads))[:2]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def small_model():
    # Groups of 4, 8 and 16 channels, stride 1 then 2 and 2. Seeded, so the
    # inputs that put a ReLU input on its kink (see
    # test_training_gradients_match_tensorflows_kernel) stay the same.
    keras.utils.set_random_seed(0)
    model = kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=5, input_shape=(16, 16, 3))
    return pretrained_like_batch_norms(model)


def op_relu_flags(concrete_function):
    return [op.get_attr("relu") for op in concrete_function.graph.get_operations()
            if op.type == avx2.OP_NAME]


def test_keras_steps_fuse_batch_norm_and_relu_into_the_op_and_other_graphs_do_not_use_it():
    model = small_model()
    x = random([3, 16, 16, 3], 9)
    plain = tf.function(lambda x: model(x, training=False))
    assert op_relu_flags(plain.get_concrete_function(x)) == []
    # Each of the three grouped convs is emitted bare, with BN, then with BN
    # and ReLU, and only the last is run.
    flags = op_relu_flags(tf.function(model.predict_step).get_concrete_function(x))
    assert sorted(flags) == [False] * 6 + [True] * 3
    np.testing.assert_allclose(model.predict_on_batch(x), plain(x), rtol=1e-5, atol=1e-6)
    # Eager calls use the op too, unfused.
    np.testing.assert_allclose(model(x, training=False), plain(x), rtol=1e-5, atol=1e-6)
    # XLA can't compile it.
    model.jit_compile = True
    assert op_relu_flags(tf.function(model.predict_step).get_concrete_function(x)) == []


def test_training_gradients_match_tensorflows_kernel():
    """The op's and TensorFlow's kernels round differently: ReLU inputs differ
    by up to ~1e-5 between the two traces. For ~3% of random inputs one of the
    model's ~600k ReLU inputs lies that close to 0 and falls on different
    sides of the kink in the two traces (float64 sides with either), which
    moves many gradient elements by ~1%. So gradients are compared for inputs
    whose ReLU masks agree; the ReLU inputs themselves must agree for all."""
    model = small_model()
    relus = [layer for layer in model.layers if isinstance(layer, keras.layers.ReLU)]
    probe = keras.Model(model.inputs, [model.outputs[0]] + [layer.input for layer in relus])
    labels = tf.constant([0, 1, 2, 3])

    def gradients(native, x):
        with tf.GradientTape() as tape:
            with tf_ops.native_kernels(enabled=native):
                logits, *relu_inputs = probe(x, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        return tape.gradient(loss, model.trainable_variables), relu_inputs

    native = tf.function(lambda x: gradients(True, x))
    reference = tf.function(lambda x: gradients(False, x))
    shape = tf.TensorSpec([4, 16, 16, 3])
    # Three forward convs, and the stride-1 one's input gradient.
    assert op_relu_flags(native.get_concrete_function(shape)) == [False] * 4
    compared = 0
    # With oneDNN on a Zen 4, input 11 puts one ReLU input across its kink.
    seeds = (11, 12, 13, 14)
    for seed in seeds:
        x = random(shape.shape, seed)
        got, got_relu_inputs = native(x)
        expected, expected_relu_inputs = reference(x)
        for g, e in zip(got_relu_inputs, expected_relu_inputs):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)
        if any(np.any((g > 0) != (e > 0))
               for g, e in zip(got_relu_inputs, expected_relu_inputs)):
            continue
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
        compared += 1
    assert compared >= 2, f"only {compared} of {len(seeds)} inputs gave both traces one ReLU mask"


def test_switch_and_failed_build_fall_back_to_tensorflows_kernel(python_subprocess, tmp_path):
    code = textwrap.dedent("""
        import warnings
        import numpy as np
        import keras_resnext as kr
        from keras_resnext.kernels import avx2
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            op = avx2.grouped_conv_op()
        model = kr.ResNeXt29(depth=11, cardinality=2, width=4, input_shape=(16, 16, 3))
        model.predict_on_batch(np.zeros([1, 16, 16, 3], "float32"))
        print("OP", op is None, [str(w.message) for w in caught])
    """)
    off = python_subprocess(code, env={avx2.SWITCH: "0"})
    assert off.returncode == 0, off.stderr[-2000:]
    assert "OP True []" in off.stdout
    broken = python_subprocess(code, env={"CXX": str(tmp_path / "no-such-compiler"),
                                          "KERAS_RESNEXT_CACHE": str(tmp_path / "cache")})
    assert broken.returncode == 0, broken.stderr[-2000:]
    assert "OP True" in broken.stdout
    assert "no-such-compiler failed to run" in broken.stdout


def sweep_cases(count, seed):
    """A "valid" conv on width 9, then a "same" stride-2 one on width 8 (whose
    last column, interior before, is padding now), then random shapes with
    few channel counts, so consecutive calls share the op's per-thread
    buffers."""
    yield dict(batch=1, height=9, width=9, group_width=4, groups=2, stride=1,
               padding="valid", dilation=1)
    yield dict(batch=1, height=8, width=8, group_width=4, groups=2, stride=2,
               padding="same", dilation=1)
    # An input smaller than the kernel; the op used to read past its buffers.
    yield dict(batch=1, height=2, width=2, group_width=4, groups=2, stride=2,
               padding="valid", dilation=1)
    rng = np.random.default_rng(seed)
    for _ in range(count):
        group_width = int(rng.choice([4, 8, 16, 32]))
        dilation = 2 if rng.random() < 0.1 else 1
        smallest = 5 if dilation == 2 else 1
        yield dict(batch=int(rng.integers(1, 4)),
                   height=int(rng.integers(smallest, 18)),
                   width=int(rng.integers(smallest, 18)),
                   group_width=group_width,
                   groups=int(rng.choice([2, 4] if group_width == 4 else [2, 3])),
                   stride=1 if dilation == 2 else int(rng.choice([1, 2])),
                   padding=str(rng.choice(["same", "valid"])),
                   dilation=dilation)


def test_random_shapes_in_sequence_match_tensorflow(monkeypatch):
    assert OP is not None
    calls = []
    avx2_conv = tf_ops._avx2_conv
    monkeypatch.setattr(tf_ops, "_avx2_conv",
                        lambda *args, **kwargs: calls.append(1) or avx2_conv(*args, **kwargs))
    worst = 0.0
    space_to_batch = not tf_ops.native_grouped_gradient_available("float32")
    for index, case in enumerate(sweep_cases(40, seed=11)):
        channels = case["group_width"] * case["groups"]
        x = random([case["batch"], case["height"], case["width"], channels], 100 + index)
        kernel = random([3, 3, case["group_width"], channels], 200 + index)
        stride, padding, dilation = case["stride"], case["padding"], case["dilation"]
        before = len(calls)
        # Keras' Conv2D itself refuses inputs smaller than the kernel.
        smaller_than_kernel = padding == "valid" and min(case["height"], case["width"]) < 3
        if index % 2 and not smaller_than_kernel:
            layer = kr.layers.GroupConv2D(channels, 3, strides=stride, padding=padding,
                                          dilation_rate=dilation, groups=case["groups"],
                                          use_bias=False)
            layer.build(x.shape)
            layer.kernel.assign(kernel)
            run = lambda: layer(x)  # noqa: E731
        else:
            run = lambda: tf_ops.grouped_conv2d(  # noqa: E731
                x, kernel, [stride] * 2, padding, [dilation] * 2)
        # Inputs smaller than the kernel: TensorFlow's rule, (size - 3 +
        # stride) // stride, empty at 0 and an error below (see
        # test_inputs_smaller_than_the_kernel for why not the reference).
        sizes = [(size - 3 + stride) // stride for size in (case["height"], case["width"])]
        if smaller_than_kernel:
            if min(sizes) < 0:
                with pytest.raises(tf.errors.InvalidArgumentError, match="negative"):
                    run()
            else:
                assert run().shape == (case["batch"], *sizes, channels), case
        else:
            got = run()
            expected = grouped_reference(x, kernel, stride, padding, dilation)
            assert got.shape == expected.shape, case
            error = float(np.max(np.abs(got - expected), initial=0.0))
            worst = max(worst, error)
            assert error < 1e-4, (case, error)
        # Dilated: TensorFlow's kernel, except where it has no dilated backprop
        # (no oneDNN): there an undilated conv over the space-to-batch input,
        # which the op takes.
        assert len(calls) - before == (dilation == 1 or space_to_batch), case
    print(f"worst error {worst:.2e}")


# (input size, stride, padding before and after) -> output size, by
# TensorFlow's rule (size + padding - 3 + stride) // stride; None: its error.
SMALL_INPUTS = [
    (2, 2, (0, 0), 0), (2, 1, (0, 0), 0), (1, 2, (0, 0), 0), (1, 1, (0, 0), None),
    (1, 1, (1, 0), 0), (1, 1, (1, 1), 1), (2, 2, (0, 1), 1), (0, 2, (0, 0), 0),
]


@pytest.mark.parametrize("size,stride,pads,expected", SMALL_INPUTS)
def test_inputs_smaller_than_the_kernel(size, stride, pads, expected):
    # oneDNN's eager Conv2D (on by default on AVX-512 CPUs) gets these wrong
    # (a 2x2 input, stride 2, "VALID" gives a 2x2 output), hence the table.
    x = random([2, size, 5, 8], 12)
    kernel = random([3, 3, 4, 8], 13)
    explicit_paddings = [*pads, 1, 1]

    def call(x):
        return OP(x, kernel, EMPTY, EMPTY, stride=stride, explicit_paddings=explicit_paddings)

    if expected is None:
        with pytest.raises(tf.errors.InvalidArgumentError, match="negative"):
            call(x)
        return
    got = call(x)
    assert got.shape == (2, expected, (5 + 2 - 3 + stride) // stride, 8)
    if expected:
        padded = reference(x, kernel, stride, explicit_paddings)
        np.testing.assert_allclose(got, padded, rtol=1e-5, atol=1e-5)
    # Traced: with unknown sizes the same empty or full answer at run time;
    # with static ones TensorFlow's shape check, as tf.nn.conv2d traces.
    dynamic = tf.function(call).get_concrete_function(tf.TensorSpec([None, None, None, 8]))
    assert dynamic(x).shape == got.shape
    static = tf.function(call)
    if size + sum(pads) < 3:
        with pytest.raises(ValueError, match="Negative dimension size"):
            static.get_concrete_function(tf.TensorSpec(x.shape))
    else:
        assert tuple(static.get_concrete_function(tf.TensorSpec(x.shape)).output_shapes) \
            == got.shape
