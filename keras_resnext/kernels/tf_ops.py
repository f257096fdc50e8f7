"""TensorFlow functions behind our layers. TensorFlow is imported lazily,
inside the functions."""

import contextlib
import functools
import threading
import weakref

from keras_resnext.kernels import avx2
from keras_resnext.kernels.avx2 import choice as avx2_choice

_scope = threading.local()
# graph -> {name of a call op of `_behind_function_boundary`: the function}, so
# `fold_into_conv` can call it again with another kernel.
_boundary_calls = weakref.WeakKeyDictionary()
_avx2_first_use = threading.Lock()
# Channels per group the AVX2 op has kernels for.
NATIVE_GROUP_WIDTHS = (4, 8, 16, 32)


@contextlib.contextmanager
def native_kernels(enabled=True):
    """Lets grouped convolutions traced inside use the AVX2 op (if `enabled`).

    The op is a library of ours that TF Serving and a bare TensorFlow don't
    have, so it goes only into graphs that are run here and never saved:
    Keras' train/test/predict steps (see `layers.NativeKernelSteps`) and the
    training loop. Eager calls use it too; any other `tf.function` gets
    TensorFlow's op.
    """
    depth = getattr(_scope, "depth", 0)
    _scope.depth = depth + 1 if enabled else 0
    try:
        yield
    finally:
        _scope.depth = depth


def _in_native_scope():
    return bool(getattr(_scope, "depth", 0))


def native_grouped_gradient_available(dtype="float32"):
    """Whether TensorFlow can differentiate its native grouped conv here.

    The CPU kernels refuse grouped gradients ("Gradients for grouped
    convolutions are not supported on CPU") except oneDNN's, which exist for
    float32 only; cuDNN has them for every dtype.
    """
    return _gpu_visible() or (_onednn_enabled() and dtype == "float32")


@functools.lru_cache(maxsize=None)
def _onednn_enabled():
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


@functools.lru_cache(maxsize=None)
def _gpu_visible():
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def grouped_conv2d(inputs, kernel, strides, padding, dilation_rate):
    """NHWC grouped convolution with the AVX2 op where it applies, else
    TensorFlow's native kernel; never XLA."""
    import tensorflow as tf

    padding = padding.upper()
    strides = list(strides)
    dilations = list(dilation_rate)
    kernel = tf.convert_to_tensor(kernel)
    x, pads = _strip_zero_padding(inputs)
    pads = _add_same_padding(pads, x, strides[0]) if padding == "SAME" else pads
    # Padding first: a shape the op can't pad for is never timed.
    if pads is not None and _avx2_op_applies(inputs, kernel, strides, dilations):
        return _avx2_conv(x, kernel, strides[0], pads)
    native_gradient = native_grouped_gradient_available(tf.as_dtype(inputs.dtype).name)
    if dilations != [1, 1] and not native_gradient:
        return _dilated_as_space_to_batch(inputs, kernel, strides, padding, dilations)
    if native_gradient:
        conv = _grouped_conv2d_with_native_gradient
    else:
        conv = _grouped_conv2d_with_split_gradient
    if not (tf.executing_eagerly() or _grappler_fuses_grouped_convs_here() or _in_xla_context()):
        conv = _behind_function_boundary(conv, tuple(strides), padding, tuple(dilations))
        y = conv(inputs, kernel)
        _boundary_calls.setdefault(y.graph, {})[y.op.name] = conv
        return y
    return conv(inputs, kernel, strides, padding, dilations)


def _dilated_as_space_to_batch(x, kernel, strides, padding, dilations):
    """A dilated convolution as an undilated one over the space-to-batch
    rearranged input (as `tf.nn.atrous_conv2d` computed it): TensorFlow's CPU
    kernels without oneDNN have no dilated backprop ("Current CPU
    implementations do not yet support dilation rates larger than 1")."""
    import tensorflow as tf

    if strides != [1, 1]:
        raise ValueError(f"A dilated convolution takes stride 1; got strides {strides}.")
    if padding == "SAME":
        # Stride 1: TensorFlow's SAME pads (k - 1) * dilation, the extra one after.
        pads = [(size - 1) * rate for size, rate in zip(kernel.shape[:2], dilations)]
        x = tf.pad(x, [[0, 0], *([p // 2, p - p // 2] for p in pads), [0, 0]])
    # Pad H and W up to multiples of the dilation; the extra rows come off the end.
    size = tf.shape(x)[1:3]
    extra = tf.math.floormod(-size, dilations)
    fill = tf.stack([tf.zeros_like(extra), extra], axis=1)
    y = tf.space_to_batch_nd(x, dilations, fill)
    y = grouped_conv2d(y, kernel, [1, 1], "valid", [1, 1])
    return tf.batch_to_space(y, dilations, fill)


def _grappler_fuses_grouped_convs_here():
    """Whether grappler may fuse a grouped Conv2D traced now with the batch
    norm and ReLU after it.

    Grappler's remapper turns Conv2D + inference FusedBatchNorm (+ ReLU) into
    `_FusedConv2D` whether or not the kernel behind it takes groups: oneDNN's
    and cuDNN's do, TensorFlow's own CPU kernel refuses them ("Fused conv
    implementation does not support grouped convolutions for now"), and that
    is the one a TensorFlow without oneDNN runs, TF Serving on AVX2-only x86
    included. Only graphs that are run here and never saved (the scope of
    `native_kernels`) may let it fuse, and only where this process's kernel
    takes groups.
    """
    return _in_native_scope() and (_onednn_enabled() or _gpu_visible())


@functools.lru_cache(maxsize=None)
def _behind_function_boundary(conv, strides, padding, dilations):
    """`conv` as a function of its own that TensorFlow never inlines, so no
    graph optimiser sees the convolution next to the ops that follow it: the
    SavedModel runs with any TensorFlow build, oneDNN on or off."""
    import tensorflow as tf

    @tf.function(autograph=False, experimental_attributes={"_noinline": True})
    def grouped_conv2d(inputs, kernel):
        return conv(inputs, kernel, list(strides), padding, list(dilations))

    return grouped_conv2d


def _grouped_conv2d_with_native_gradient(x, kernel, strides, padding, dilations):
    import tensorflow as tf

    return tf.nn.conv2d(x, kernel, strides, padding, dilations=dilations)


def _avx2_conv(x, kernel, stride, pads, scale=None, offset=None, relu=False):
    """The AVX2 op; without scale and offset it applies no affine map."""
    import tensorflow as tf

    if scale is None:
        scale = offset = tf.zeros([0], tf.float32)
    return avx2_op()(x, kernel, scale, offset, stride=stride, explicit_paddings=pads,
                     relu=relu)


def avx2_op():
    """The AVX2 op's Python function with its gradient registered, or None
    where the op can't be used here."""
    # One thread loads the op and registers its gradient; the others wait for
    # its answer (a second RegisterGradient would raise).
    with _avx2_first_use:
        return _avx2_op_with_gradient()


@functools.lru_cache(maxsize=None)
def _avx2_op_with_gradient():
    op = avx2.grouped_conv_op()
    if op is not None:
        import tensorflow as tf

        tf.RegisterGradient(avx2.OP_NAME)(avx2_op_gradient)
    return op


def _avx2_op_applies(x, kernel, strides, dilations):
    """Whether the AVX2 op may and can run this convolution here and, unless
    `KERAS_RESNEXT_NATIVE_KERNELS=always`, beats TensorFlow's kernel at it on
    this CPU (timed the first time the shape is seen: avx2/choice.py)."""
    import tensorflow as tf

    if getattr(_scope, "timing_tensorflow", False):
        return False
    if not (tf.executing_eagerly() or _in_native_scope()):
        return False
    kh, kw, group_width, filters = kernel.shape
    channels = x.shape[-1]
    if (
        x.dtype != tf.float32
        or kernel.dtype != tf.float32
        or (kh, kw) != (3, 3)
        or group_width not in NATIVE_GROUP_WIDTHS
        or filters != channels
        or filters % 8
        or strides[0] != strides[1]
        or strides[0] not in (1, 2)
        or tuple(dilations) != (1, 1)
        or _gpu_visible()
        or _in_xla_context()
    ):
        return False
    if avx2_op() is None:
        return False
    if avx2.always():
        return True
    # A size unknown at trace time is timed at a middle stage's.
    height, width = (28 if size is None else size for size in x.shape[1:3])
    with tf.init_scope():  # times eagerly, outside the graph being traced
        # Not AutoGraph's to convert (a user's tf.function would warn about json, os).
        return tf.autograph.experimental.do_not_convert(avx2_choice.op_wins)(
            group_width, strides[0], height, width, channels, _onednn_enabled(),
            lambda batch: _timed_grouped_convs(batch, height, width, channels, group_width,
                                               strides[0]))


def _timed_grouped_convs(batch, height, width, channels, group_width, stride):
    """(ours, tensorflows), calls for avx2/choice.py: a grouped 3x3 with
    inference batch norm and ReLU on random data, by the AVX2 op with both
    fused in, and by what this module and grappler make of it without the op
    in a Keras step (oneDNN's fused conv, or TensorFlow's grouped kernel)."""
    import tensorflow as tf

    seeds = iter(range(8))

    def random(shape):
        return tf.random.stateless_normal(shape, [next(seeds), 0])

    x = random([batch, height, width, channels])
    kernel = random([3, 3, group_width, channels])
    scale, offset, mean = (random([channels]) for _ in range(3))
    variance = tf.abs(random([channels])) + 0.5
    pads = _add_same_padding([0, 0, 0, 0], x, stride)
    folded_scale, folded_offset = inference_affine(mean, variance, 1e-5, scale, offset)

    @tf.function(autograph=False)
    def tensorflows(x):
        with native_kernels():
            y = grouped_conv2d(x, kernel, [stride, stride], "same", [1, 1])
            return tf.nn.relu(fused_batch_norm(y, scale, offset, 1e-5, mean, variance)[0])

    _scope.timing_tensorflow = True
    try:
        tensorflows = tensorflows.get_concrete_function(x)
    finally:
        _scope.timing_tensorflow = False
    op = avx2_op()
    return (lambda: op(x, kernel, folded_scale, folded_offset, stride=stride,
                       explicit_paddings=pads, relu=True),
            lambda: tensorflows(x))


def _in_xla_context():
    from tensorflow.python.framework import ops
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())


def _strip_zero_padding(x):
    """(x, [0, 0, 0, 0]), or, when x is a graph tensor made by zero-padding H
    and W only, (the unpadded tensor, [top, bottom, left, right]): the op pads
    as it reads, so the padded copy is never made."""
    import tensorflow as tf

    op = getattr(x, "op", None) if not tf.executing_eagerly() else None
    if op is None or op.type not in ("Pad", "PadV2"):
        return x, [0, 0, 0, 0]
    paddings = tf.get_static_value(op.inputs[1])
    if op.type == "PadV2" and tf.get_static_value(op.inputs[2]) != 0:
        return x, [0, 0, 0, 0]
    if paddings is None or paddings.shape != (4, 2) or paddings[0].any() or paddings[3].any():
        return x, [0, 0, 0, 0]
    return op.inputs[0], [int(p) for p in paddings[1:3].reshape(-1)]


def _add_same_padding(pads, x, stride):
    sizes = x.shape[1:3]
    if None in sizes:
        return None
    pads = list(pads)
    for axis, size in enumerate(sizes):
        size += pads[2 * axis] + pads[2 * axis + 1]
        total = max((-(-size // stride) - 1) * stride + 3 - size, 0)
        pads[2 * axis] += total // 2
        pads[2 * axis + 1] += total - total // 2
    return pads


def fuse_into_conv(x, affine=None, relu=False):
    """At inference, fold a per-channel `x * scale + offset` (`affine()`
    gives them) and/or a ReLU that follow an AVX2 grouped conv into that op:
    one pass over memory instead of three, as grappler does for oneDNN's.
    None if x isn't such an op's output or already has that part fused."""
    import tensorflow as tf

    op = getattr(x, "op", None) if not tf.executing_eagerly() else None
    if op is None or op.type != avx2.OP_NAME or op.get_attr("relu"):
        return None
    scale, offset = op.inputs[2], op.inputs[3]
    if affine is not None:
        if scale.shape.num_elements() != 0:
            return None
        scale, offset = affine()
    elif not relu:
        return None
    return _avx2_conv(op.inputs[0], op.inputs[1], op.get_attr("stride"),
                      op.get_attr("explicit_paddings"), scale, offset, relu=relu)


def inference_affine(mean, variance, epsilon, gamma=None, beta=None):
    """Inference batch norm as `x * scale + offset`: (scale, offset)."""
    import tensorflow as tf

    scale = tf.math.rsqrt(tf.convert_to_tensor(variance) + epsilon)
    if gamma is not None:
        scale *= gamma
    offset = -tf.convert_to_tensor(mean) * scale
    if beta is not None:
        offset += beta
    return scale, offset


def fold_into_conv(x, affine):
    """At inference in half precision, fold a per-channel `x * scale + offset`
    (`affine()` gives them, float32) into the TensorFlow convolution that made
    x: the kernel times scale, then a `BiasAdd` of offset.

    Grappler's remapper fuses a float32 Conv2D + FusedBatchNorm into one
    oneDNN op but leaves bfloat16 ones apart ("not supported for bf16"), so
    batch norm would be a pass of its own after every convolution. Conv2D +
    BiasAdd (+ ReLU, + the residual Add) it fuses in bfloat16 too. None if x
    isn't such a convolution's output, or its kernel is much larger than x.
    """
    import tensorflow as tf

    if tf.executing_eagerly():
        return None
    conv = _conv_behind(x)
    if conv is None:
        return None
    # IdentityN(y, inputs, kernel), Conv2D(inputs, kernel), call(inputs, kernel)
    inputs, kernel = x.op.inputs[-2:]
    outputs = x.shape.num_elements()
    if outputs is not None and kernel.shape.num_elements() > 2 * outputs:
        # Rescaling the kernel is a pass over it on every call. Where that
        # outweighs a pass over the output (a small batch in the late stages)
        # batch norm stays apart; with the batch unknown (exports) it folds.
        return None
    scale, offset = affine()
    if kernel.op.type == "Cast" and kernel.op.inputs[0].dtype == tf.float32:
        # The policy's cast of the float32 kernel: scale before rounding.
        kernel = kernel.op.inputs[0]
    kernel = tf.cast(tf.cast(kernel, tf.float32) * scale, inputs.dtype)
    strides, dilations = conv.get_attr("strides"), conv.get_attr("dilations")
    padding = conv.get_attr("padding").decode()
    if x.op.type == "Conv2D":
        y = tf.raw_ops.Conv2D(input=inputs, filter=kernel, strides=strides, padding=padding,
                              explicit_paddings=conv.get_attr("explicit_paddings"),
                              data_format="NHWC", dilations=dilations)
    elif x.op.type == "IdentityN":
        y = _grouped_conv2d_with_split_gradient(inputs, kernel, strides[1:3], padding,
                                                dilations[1:3])
    else:
        y = _boundary_calls[x.graph][x.op.name](inputs, kernel)
    return tf.nn.bias_add(y, tf.cast(offset, y.dtype))


def _conv_behind(x):
    """The NHWC Conv2D op whose output x is: bare, under our split gradient or
    behind our function boundary, with the same inputs as x.op; else None."""
    op = getattr(x, "op", None)
    if op is None or x.value_index != 0:
        return None
    if op.type == "IdentityN" and len(op.inputs) == 3:
        # tf.custom_gradient's IdentityN(y, x, kernel) around y = Conv2D(x, kernel).
        conv = op.inputs[0].op
        if conv.type != "Conv2D" or list(conv.inputs) != list(op.inputs[1:]):
            return None
    elif op.name in _boundary_calls.get(op.graph, {}):
        conv = _boundary_calls[op.graph][op.name]
        conv = _only_conv2d(conv.get_concrete_function(*op.inputs).graph)
    else:
        conv = op
    if conv is None or conv.type != "Conv2D" or conv.get_attr("data_format") != b"NHWC":
        return None
    if conv.get_attr("padding") == b"EXPLICIT" and op is not conv:
        return None
    return conv


def _only_conv2d(graph):
    convs = [op for op in graph.get_operations() if op.type == "Conv2D"]
    return convs[0] if len(convs) == 1 else None


def avx2_op_gradient(op, dy):
    import tensorflow as tf

    x, kernel, scale, offset = op.inputs
    stride = op.get_attr("stride")
    pads = op.get_attr("explicit_paddings")
    affine = scale.shape.num_elements() != 0
    d_scale = d_offset = None
    if affine or op.get_attr("relu"):
        # A fused inference graph differentiated (saliency maps, frozen-BN
        # fine-tuning): recompute the bare convolution.
        raw = _avx2_conv(x, kernel, stride, pads)
        if op.get_attr("relu"):
            dy = tf.where(op.outputs[0] > 0, dy, tf.zeros_like(dy))
        if affine:
            d_scale = tf.reduce_sum(dy * raw, axis=[0, 1, 2])
            d_offset = tf.reduce_sum(dy, axis=[0, 1, 2])
            dy = dy * scale
    dx, dkernel = _avx2_conv_backprop(x, kernel, dy, stride, pads)
    return dx, dkernel, d_scale, d_offset


def _avx2_conv_backprop(x, kernel, dy, stride, pads):
    import tensorflow as tf

    groups = x.shape[-1] // kernel.shape[2]
    padded = tf.pad(x, [[0, 0], pads[0:2], pads[2:4], [0, 0]]) if any(pads) else x
    if stride == 1 and max(pads) <= 2:
        # A stride-1 convolution's input gradient is the convolution of dy
        # with the kernel turned 180 degrees and transposed within each group.
        k = tf.reshape(kernel, [3, 3, kernel.shape[2], groups, -1])
        k = tf.reverse(tf.transpose(k, [0, 1, 4, 3, 2]), axis=[0, 1])
        k = tf.reshape(k, [3, 3, -1, kernel.shape[2] * groups])
        dx = _avx2_conv(dy, k, 1, [2 - p for p in pads])
    else:
        dx = _grouped_backprop_input(tf.shape(padded), kernel, dy, [stride] * 2, "VALID",
                                     [1, 1], groups)
        dx = _unpad(dx, pads, tf.shape(x))
    dkernel = _grouped_backprop_filter(padded, kernel, dy, [stride] * 2, "VALID", [1, 1],
                                       groups)
    return dx, dkernel


def _unpad(padded, pads, shape):
    import tensorflow as tf

    if not any(pads):
        return padded
    return tf.slice(padded, [0, pads[0], pads[2], 0], shape)


def _grouped_backprop_input(input_sizes, kernel, dy, strides, padding, dilations, groups):
    import tensorflow as tf

    strides4, dilations4 = [1, *strides, 1], [1, *dilations, 1]
    if native_grouped_gradient_available(dy.dtype.name):
        return tf.raw_ops.Conv2DBackpropInput(
            input_sizes=input_sizes, filter=kernel, out_backprop=dy, strides=strides4,
            padding=padding, dilations=dilations4)
    group_sizes = tf.concat([input_sizes[:3], [input_sizes[3] // groups]], axis=0)
    return tf.concat([
        tf.raw_ops.Conv2DBackpropInput(
            input_sizes=group_sizes, filter=kg, out_backprop=dyg, strides=strides4,
            padding=padding, dilations=dilations4)
        for kg, dyg in zip(tf.split(kernel, groups, axis=-1), tf.split(dy, groups, axis=-1))
    ], axis=-1)


def _grouped_backprop_filter(x, kernel, dy, strides, padding, dilations, groups):
    import tensorflow as tf

    strides4, dilations4 = [1, *strides, 1], [1, *dilations, 1]
    if native_grouped_gradient_available(dy.dtype.name):
        return tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=tf.shape(kernel), out_backprop=dy, strides=strides4,
            padding=padding, dilations=dilations4)
    return tf.concat([
        tf.raw_ops.Conv2DBackpropFilter(
            input=xg, filter_sizes=tf.shape(kg), out_backprop=dyg, strides=strides4,
            padding=padding, dilations=dilations4)
        for xg, kg, dyg in zip(tf.split(x, groups, axis=-1), tf.split(kernel, groups, axis=-1),
                               tf.split(dy, groups, axis=-1))
    ], axis=-1)


def _grouped_conv2d_with_split_gradient(x, kernel, strides, padding, dilations):
    """Native grouped forward; backward as one ungrouped backprop per group.

    Used where the native grouped backward is missing: CPU without oneDNN,
    and half precision on CPU.
    The gradient is plain graph code, not jit-compiled, so exports stay free of
    `_XlaMustCompile`.
    """
    import tensorflow as tf

    @tf.custom_gradient
    def conv(x, kernel):
        y = tf.nn.conv2d(x, kernel, strides, padding, dilations=dilations)

        def grad(dy):
            groups = x.shape[-1] // kernel.shape[-2]
            dx = _grouped_backprop_input(tf.shape(x), kernel, dy, strides, padding,
                                         dilations, groups)
            dkernel = _grouped_backprop_filter(x, kernel, dy, strides, padding, dilations,
                                               groups)
            return dx, dkernel

        return y, grad

    return conv(x, kernel)


def fused_batch_norm(x, scale, offset, epsilon, mean=None, variance=None):
    """NHWC batch norm with `FusedBatchNormV3`: x normalized by `mean` and
    `variance`, or, where they are None (training), by the batch's own.

    `scale` or `offset` None stands for ones or zeros. Returns `(y, mean,
    variance)`: in training the batch's mean and its unbiased variance (what
    PyTorch's moving variance tracks), else the ones given. y is float32
    unless x is float16 or bfloat16.
    """
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    if x.dtype not in (tf.float16, tf.bfloat16, tf.float32):
        x = tf.cast(x, tf.float32)
    channels = x.shape[-1]
    scale = tf.ones([channels]) if scale is None else tf.convert_to_tensor(scale)
    offset = tf.zeros([channels]) if offset is None else tf.convert_to_tensor(offset)
    training = mean is None
    if training:
        mean = variance = tf.constant([], tf.float32)
    return tuple(tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset,
        mean=tf.convert_to_tensor(mean), variance=tf.convert_to_tensor(variance),
        epsilon=epsilon, exponential_avg_factor=1.0,
        data_format="NHWC", is_training=training,
    )[:3])
