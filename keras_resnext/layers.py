"""Our Keras layers (`kr.layers`, not `keras.layers`): on TensorFlow they call
the kernels in `keras_resnext.kernels`; on JAX and torch they are Keras' own.

`GroupConv2D` is Keras' `Conv2D(groups=C)` without the XLA detour on
TensorFlow. Keras 3 runs every grouped convolution on the TensorFlow backend inside a
`tf.function(jit_compile=True)`. On CPU that is 3-25x slower than TensorFlow's
own grouped kernel, and the `_XlaMustCompile` function it leaves in exported
SavedModels is rejected by TF Serving's GPU builds (tensorflow/serving#2214).

This layer keeps `Conv2D`'s arguments, weights and config, and on TensorFlow
calls a grouped kernel directly: our AVX2 op (see `kernels/avx2/`) for 3x3
convolutions with 4, 8, 16 or 32 channels per group on CPU, where it may run (see
`kernels.tf_ops.native_kernels`), else TensorFlow's native one (cuDNN on GPU,
oneDNN on CPU). On JAX and torch it is plain `Conv2D`.

`BatchNormalization` and `ReLU` fold into that AVX2 op at inference, and
`NativeKernelSteps` lets a model's Keras steps use it. `DropPathAdd` is a
block's residual sum with stochastic depth, Keras ops on every backend.
"""

import keras

from keras_resnext.kernels import tf_ops


@keras.saving.register_keras_serializable(package="keras_resnext")
class GroupConv2D(keras.layers.Conv2D):
    """A `keras.layers.Conv2D` whose grouped case runs natively on TensorFlow.

    Same constructor, weight layout `[kh, kw, in_channels / groups, filters]`
    and `get_config()` as `Conv2D`.
    """

    def convolution_op(self, inputs, kernel):
        if (
            (self.groups == 1 and tuple(self.dilation_rate) == (1, 1))
            or keras.backend.backend() != "tensorflow"
            or self.data_format != "channels_last"
        ):
            return super().convolution_op(inputs, kernel)
        return tf_ops.grouped_conv2d(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
        )


@keras.saving.register_keras_serializable(package="keras_resnext")
class BatchNormalization(keras.layers.BatchNormalization):
    """A `keras.layers.BatchNormalization` that runs TensorFlow's fused kernel.

    Keras 3 composes BN from elementwise ops. On TensorFlow this layer calls
    `FusedBatchNormV3` instead: one op forward and one backward, and at
    inference grappler folds it into the preceding convolution (oneDNN's
    fused conv + BN + ReLU), or this layer folds itself into our AVX2 grouped
    conv, or, in half precision, where grappler won't, into the convolution's
    kernel and a bias (`tf_ops.fold_into_conv`). Moving statistics follow PyTorch: the variance
    they track is the unbiased batch variance. Same arguments, weights and
    config as Keras' layer; other backends and unusual settings (masks,
    renorm, synchronized, axis other than last of 4-D) use Keras' own code.
    """

    def call(self, inputs, training=None, mask=None):
        if (
            keras.backend.backend() != "tensorflow"
            or mask is not None
            or self.renorm
            or self.synchronized
            or len(inputs.shape) != 4
            or self.axis not in (-1, 3)
        ):
            return super().call(inputs, training=training, mask=mask)
        training = bool(training) and self.trainable
        if not training:
            if self.compute_dtype == "float32":
                fused = tf_ops.fuse_into_conv(inputs, affine=self._inference_affine)
            else:
                fused = tf_ops.fold_into_conv(inputs, self._inference_affine)
            if fused is not None:
                return fused
        import tensorflow as tf

        scale = self.gamma if self.scale else None
        offset = self.beta if self.center else None
        if training:
            y, batch_mean, batch_variance = tf_ops.fused_batch_norm(
                inputs, scale, offset, self.epsilon)
            self._update_moving_statistics(batch_mean, batch_variance)
        else:
            y, _, _ = tf_ops.fused_batch_norm(inputs, scale, offset, self.epsilon,
                                              self.moving_mean, self.moving_variance)
        return tf.cast(y, self.compute_dtype)

    def _update_moving_statistics(self, batch_mean, batch_variance):
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + batch_mean * (1.0 - momentum))
        self.moving_variance.assign(
            self.moving_variance * momentum + batch_variance * (1.0 - momentum))

    def _inference_affine(self):
        return tf_ops.inference_affine(self.moving_mean, self.moving_variance, self.epsilon,
                                       self.gamma if self.scale else None,
                                       self.beta if self.center else None)


@keras.saving.register_keras_serializable(package="keras_resnext")
class ReLU(keras.layers.ReLU):
    """A `keras.layers.ReLU` that, at inference on TensorFlow, folds into the
    AVX2 grouped convolution before it (with its batch norm). Same arguments
    and config as Keras' layer."""

    def call(self, inputs):
        if (
            keras.backend.backend() == "tensorflow"
            and self.max_value is None
            and not self.negative_slope
            and not self.threshold
        ):
            fused = tf_ops.fuse_into_conv(inputs, relu=True)
            if fused is not None:
                return fused
        return super().call(inputs)


@keras.saving.register_keras_serializable(package="keras_resnext")
class DropPathAdd(keras.layers.Layer):
    """The sum of `[shortcut, branch]` with stochastic depth (Huang
    et al. 2016) on the residual branch, timm's `DropPath` before the sum: in
    training each example's branch is dropped with probability `rate` and kept
    ones are scaled by `1 / (1 - rate)`, so its expected value is unchanged; at
    inference it is `keras.layers.Add`. Keras 3 has no such layer.

    One layer in place of the block's `Add`, not one more before it: a
    `.weights.h5` file holds tensors by layer position, and an extra node on
    the branch would reorder the block's convolutions, so weights saved with
    and without stochastic depth would not load into each other.
    """

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(rate, bool) or not 0.0 <= rate < 1.0:
            raise ValueError(f"DropPathAdd `rate` must be in [0, 1); got {rate!r}.")
        self.rate = rate
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        if len(inputs) != 2:
            raise ValueError(f"DropPathAdd adds [shortcut, branch]; got {len(inputs)} inputs.")
        shortcut, branch = inputs
        if training and self.rate > 0:
            per_example = (keras.ops.shape(branch)[0],) + (1,) * (len(branch.shape) - 1)
            branch = keras.random.dropout(branch, self.rate, noise_shape=per_example,
                                          seed=self.seed_generator)
        return keras.ops.add(shortcut, branch)

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


class NativeKernelSteps:
    """A `keras.Model` mixin whose train, test and predict steps may use our
    AVX2 grouped convolution (unless the model is jit-compiled: XLA can't).

    Keras traces its steps into graphs that only run here, never saved, which
    is where `kernels.tf_ops.native_kernels` allows the op.
    """

    def train_step(self, *args, **kwargs):
        with tf_ops.native_kernels(enabled=not self.jit_compile):
            return super().train_step(*args, **kwargs)

    def test_step(self, *args, **kwargs):
        with tf_ops.native_kernels(enabled=not self.jit_compile):
            return super().test_step(*args, **kwargs)

    def predict_step(self, *args, **kwargs):
        with tf_ops.native_kernels(enabled=not self.jit_compile):
            return super().predict_step(*args, **kwargs)
