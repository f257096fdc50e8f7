"""Inference batch norm after a 1x1 convolution: oneDNN's conv + BN against the
batch norm folded into the weights and a bias (which lets grappler fuse the
residual add as well), at each of ResNeXt-50 32x4d's 1x1 shapes. Measured to
decide whether folding is worth doing; it was not (README, Performance).

    python benchmarks/batch_norm_folding.py [--batch_size 8]
"""

import argparse
import statistics
import time

import numpy as np

import keras_resnext  # noqa: F401  (switches oneDNN on before TensorFlow loads)
import tensorflow as tf
from machine import print_cpu

# (input size, in channels, out channels, residual add follows)
SHAPES = [(56, 256, 128, False), (56, 128, 256, True), (28, 512, 256, False),
          (28, 256, 512, True), (14, 1024, 512, False), (14, 512, 1024, True),
          (7, 2048, 1024, False), (7, 1024, 2048, True)]
CALLS = 4  # independent convolutions per traced call


def per_call_ms(function, repeats):
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / CALLS * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print_cpu()
    rng = np.random.default_rng(0)
    totals = {"batch norm": 0.0, "folded": 0.0, "folded in graph": 0.0}
    print(f"batch {args.batch_size}, float32, ms per convolution (best of two medians of "
          f"{args.repeats})")
    for size, cin, cout, add in SHAPES:
        inputs = [tf.constant(rng.normal(size=[args.batch_size, size, size, cin]), tf.float32)
                  for _ in range(CALLS)]
        residual = tf.constant(rng.normal(size=[args.batch_size, size, size, cout]), tf.float32)
        kernel = tf.Variable(rng.normal(size=[1, 1, cin, cout]) * 0.05, dtype=tf.float32)
        gamma, beta, mean = (tf.Variable(rng.normal(size=[cout]), dtype=tf.float32)
                             for _ in range(3))
        variance = tf.Variable(rng.uniform(0.5, 1.5, size=[cout]), dtype=tf.float32)
        scale = gamma * tf.math.rsqrt(variance + 1e-5)
        folded_kernel = tf.Variable(kernel * scale)
        folded_bias = tf.Variable(beta - mean * scale)

        def finish(y):
            return tf.nn.relu(y + residual if add else y)

        @tf.function
        def batch_norm():
            return [finish(tf.raw_ops.FusedBatchNormV3(
                x=tf.nn.conv2d(x, kernel, 1, "VALID"), scale=gamma, offset=beta, mean=mean,
                variance=variance, epsilon=1e-5, is_training=False)[0]) for x in inputs]

        @tf.function
        def folded():
            return [finish(tf.nn.bias_add(tf.nn.conv2d(x, folded_kernel, 1, "VALID"),
                                          folded_bias)) for x in inputs]

        @tf.function
        def folded_in_graph():  # what a model would run: the fold on every call
            s = gamma * tf.math.rsqrt(variance + 1e-5)
            return [finish(tf.nn.bias_add(tf.nn.conv2d(x, kernel * s, 1, "VALID"),
                                          beta - mean * s)) for x in inputs]

        np.testing.assert_allclose(batch_norm()[0], folded()[0], rtol=1e-3, atol=1e-3)
        row = {}
        for label, function in (("batch norm", batch_norm), ("folded", folded),
                                ("folded in graph", folded_in_graph)):
            row[label] = min(per_call_ms(function, args.repeats) for _ in range(2))
            totals[label] += row[label]
        print(f"{size}x{size} {cin}->{cout}{' +add' if add else '     '}  "
              + "  ".join(f"{label} {ms:6.2f}" for label, ms in row.items()))
    print("sum over the shapes: " + "  ".join(f"{label} {ms:.1f}" for label, ms in totals.items()))


if __name__ == "__main__":
    main()
