"""TensorFlow-only kernels. TensorFlow is imported lazily, inside the functions."""

import functools


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
    """NHWC grouped convolution with TensorFlow's native kernel, no XLA."""
    import tensorflow as tf

    padding = padding.upper()
    strides = list(strides)
    dilations = list(dilation_rate)
    kernel = tf.convert_to_tensor(kernel)
    if native_grouped_gradient_available(tf.as_dtype(inputs.dtype).name):
        return tf.nn.conv2d(
            inputs, kernel, strides, padding, dilations=dilations
        )
    return _grouped_conv2d_with_split_gradient(
        inputs, kernel, strides, padding, dilations
    )


def _grouped_conv2d_with_split_gradient(x, kernel, strides, padding, dilations):
    """Native grouped forward; backward as one ungrouped backprop per group.

    Used where the native grouped backward is missing: CPU without oneDNN,
    and half precision on CPU.
    The gradient is plain graph code, not jit-compiled, so exports stay free of
    `_XlaMustCompile`.
    """
    import tensorflow as tf

    strides4 = [1, *strides, 1]
    dilations4 = [1, *dilations, 1]

    @tf.custom_gradient
    def conv(x, kernel):
        y = tf.nn.conv2d(x, kernel, strides, padding, dilations=dilations)

        def grad(dy):
            groups = x.shape[-1] // kernel.shape[-2]
            x_groups = tf.split(x, groups, axis=-1)
            kernel_groups = tf.split(kernel, groups, axis=-1)
            dy_groups = tf.split(dy, groups, axis=-1)
            dx = [
                tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=tf.shape(xg),
                    filter=kg,
                    out_backprop=dyg,
                    strides=strides4,
                    padding=padding,
                    dilations=dilations4,
                )
                for xg, kg, dyg in zip(x_groups, kernel_groups, dy_groups)
            ]
            dkernel = [
                tf.raw_ops.Conv2DBackpropFilter(
                    input=xg,
                    filter_sizes=tf.shape(kg),
                    out_backprop=dyg,
                    strides=strides4,
                    padding=padding,
                    dilations=dilations4,
                )
                for xg, kg, dyg in zip(x_groups, kernel_groups, dy_groups)
            ]
            return tf.concat(dx, axis=-1), tf.concat(dkernel, axis=-1)

        return y, grad

    return conv(x, kernel)


def fused_batch_norm(layer, inputs, training):
    """NHWC batch norm of a Keras BN layer with `FusedBatchNormV3`."""
    import tensorflow as tf

    x = tf.convert_to_tensor(inputs)
    if x.dtype not in (tf.float16, tf.bfloat16, tf.float32):
        x = tf.cast(x, tf.float32)
    channels = x.shape[-1]
    scale = tf.convert_to_tensor(layer.gamma) if layer.scale else tf.ones([channels])
    offset = tf.convert_to_tensor(layer.beta) if layer.center else tf.zeros([channels])
    if training:
        empty = tf.constant([], tf.float32)
        y, batch_mean, batch_variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=scale, offset=offset, mean=empty, variance=empty,
            epsilon=layer.epsilon, exponential_avg_factor=1.0,
            data_format="NHWC", is_training=True,
        )
        momentum = layer.momentum
        layer.moving_mean.assign(
            layer.moving_mean * momentum + batch_mean * (1.0 - momentum)
        )
        layer.moving_variance.assign(
            layer.moving_variance * momentum + batch_variance * (1.0 - momentum)
        )
    else:
        y = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=scale, offset=offset,
            mean=tf.convert_to_tensor(layer.moving_mean),
            variance=tf.convert_to_tensor(layer.moving_variance),
            epsilon=layer.epsilon, exponential_avg_factor=1.0,
            data_format="NHWC", is_training=False,
        )[0]
    return tf.cast(y, layer.compute_dtype)
