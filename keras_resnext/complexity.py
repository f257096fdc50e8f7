"""Complexity accounting (§3.4): multiply-adds and Eq. 4's width rule."""

import math

import keras

from keras_resnext.models import require_positive_int


def bottleneck_width(cardinality, reference_width=64, block_channels=256):
    """The bottleneck width d that keeps a block's complexity (Eq. 4, Table 2).

    Solves C * (2 * block_channels * d + 9 * d^2) = 2 * block_channels * w + 9 * w^2
    for d, where w is the width of the cardinality-1 reference block, and
    rounds to the nearest integer (Table 2: C = 1, 2, 4, 8, 32 -> d = 64, 40,
    24, 14, 4; flooring would give 39, 23, 13, 3).
    """
    for value, what in ((cardinality, "cardinality"), (reference_width, "reference_width"),
                        (block_channels, "block_channels")):
        require_positive_int(value, what)
    reference = 2 * block_channels * reference_width + 9 * reference_width**2
    a, b, c = 9 * cardinality, 2 * block_channels * cardinality, -reference
    d = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    return max(1, round(d))


def count_flops(model, input_shape=None):
    """Multiply-adds of the conv and dense layers of `model` for one image.

    `input_shape` is (height, width, channels); it defaults to the model's
    input shape, which must then be fully known.
    """
    model_shape = tuple(model.inputs[0].shape[1:])
    if input_shape is None:
        if any(side is None for side in model_shape):
            raise ValueError(
                f"{model.name} has input shape {model_shape} with unknown size; "
                f"pass input_shape=(height, width, channels) to count_flops."
            )
        input_shape = model_shape
    input_shape = tuple(input_shape)
    if len(input_shape) != len(model_shape):
        raise ValueError(
            f"input_shape {input_shape} does not fit {model.name}'s input {model_shape}."
        )
    total = 0

    def record(operation, *args, **kwargs):
        nonlocal total
        if isinstance(operation, keras.Model) and hasattr(operation, "_run_through_graph"):
            total += count_flops(operation, tuple(args[0].shape[1:]))
        output = operation.compute_output_spec(*args, **kwargs)
        total += _layer_flops(operation, args[0], output)
        return output

    spec = keras.KerasTensor((1, *input_shape), dtype=model.inputs[0].dtype)
    model._run_through_graph([spec], call_fn=record)
    return total


def _layer_flops(layer, inputs, output):
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        in_channels = inputs.shape[-1]
        out_h, out_w, out_channels = output.shape[1:]
        return out_h * out_w * out_channels * kh * kw * in_channels // layer.groups
    if isinstance(layer, keras.layers.Dense):
        return math.prod(output.shape[1:-1]) * inputs.shape[-1] * layer.units
    return 0
