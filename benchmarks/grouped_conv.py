"""Our AVX2 grouped convolution against TensorFlow's (oneDNN).

1. Per shape: every grouped 3x3 of ResNeXt-50 32x4d (4, 8, 16 and 32 channels
   per group, stride 1 and 2) and ResNeXt-101 64x4d's first, as each runs in the
   model at inference: ours with batch norm and ReLU fused into the op, TensorFlow's
   as pad -> conv -> FusedBatchNormV3 -> ReLU, which grappler fuses into one
   oneDNN op. Interleaved rounds, medians.
2. Whole ResNeXt-50 32x4d, inference and a training step (SGD), the same model
   traced twice: with the op (as Keras' steps and the training loop run it) and
   without. The two alternate batch by batch and the speed-up is the median of
   the paired ratios, which cancels this machine's slow drifts in speed.

    python benchmarks/grouped_conv.py [--batch_size 8] [--pairs 40]
"""

import argparse
import time

import numpy as np

import keras_resnext as kr  # (switches oneDNN on before TensorFlow loads)
import keras
import tensorflow as tf

from keras_resnext.kernels import avx2, tf_ops
from machine import print_cpu

# (input size, channels, channels per group, stride) of ResNeXt-50 32x4d's grouped
# convolutions, then of ResNeXt-101 64x4d's first stage.
SHAPES = [(56, 128, 4, 1), (56, 256, 8, 2), (28, 256, 8, 1), (28, 512, 16, 2), (14, 512, 16, 1),
          (14, 1024, 32, 2), (7, 1024, 32, 1), (56, 256, 4, 1)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=40,
                        help="paired inference batches; training gets a third as many")
    args = parser.parse_args()
    print_cpu()
    op = avx2.grouped_conv_op()
    if op is None:
        raise SystemExit("The AVX2 op is unavailable here (see the warning above).")
    per_shape(op, args)
    whole_model(args)


def per_shape(op, args):
    print(f"batch {args.batch_size}, float32, median of {args.repeats} rounds of "
          f"{args.steps} calls, ms per call")
    print(f"{'input':>6} {'channels':>8} {'per group':>9} {'stride':>6} {'ours':>8} "
          f"{'oneDNN':>8} {'speed-up':>8}")
    for size, channels, group_width, stride in SHAPES:
        rng = np.random.default_rng(0)
        x = tf.constant(rng.normal(size=[args.batch_size, size, size, channels]), tf.float32)
        kernel = tf.Variable(rng.normal(size=[3, 3, group_width, channels]), dtype=tf.float32)
        scale, offset, mean = (tf.Variable(rng.normal(size=[channels]), dtype=tf.float32)
                               for _ in range(3))
        variance = tf.Variable(rng.uniform(0.5, 1.5, size=[channels]), dtype=tf.float32)

        @tf.function
        def ours(x):
            folded_scale = scale * tf.math.rsqrt(variance + 1e-5)
            return op(x, kernel, folded_scale, offset - mean * folded_scale, stride=stride,
                      explicit_paddings=[1, 1, 1, 1], relu=True)

        @tf.function
        def tensorflows(x):
            y = tf.nn.conv2d(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), kernel, stride,
                             "VALID")
            y = tf.raw_ops.FusedBatchNormV3(x=y, scale=scale, offset=offset, mean=mean,
                                            variance=variance, epsilon=1e-5,
                                            is_training=False)[0]
            return tf.nn.relu(y)

        np.testing.assert_allclose(ours(x), tensorflows(x), rtol=1e-3, atol=1e-3)
        times = {"ours": [], "oneDNN": []}
        for round_index in range(args.repeats):
            order = [("ours", ours), ("oneDNN", tensorflows)]
            for name, function in order[round_index % 2:] + order[:round_index % 2]:
                start = time.perf_counter()
                for _ in range(args.steps):
                    function(x)  # returns once the CPU kernels are done
                times[name].append((time.perf_counter() - start) / args.steps * 1e3)
        ours_ms, theirs_ms = np.median(times["ours"]), np.median(times["oneDNN"])
        print(f"{size:>6} {channels:>8} {group_width:>9} {stride:>6} {ours_ms:>8.2f} "
              f"{theirs_ms:>8.2f} {theirs_ms / ours_ms:>7.2f}x")


def whole_model(args):
    model = kr.ResNeXt50(classifier_activation=None)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=[args.batch_size, 224, 224, 3]), tf.float32)
    labels = tf.constant(rng.integers(0, 1000, size=[args.batch_size]))
    optimizer = keras.optimizers.SGD(1e-4, momentum=0.9)

    def forward(with_op, training):
        if with_op:
            with tf_ops.native_kernels():
                return model(images, training=training)
        return model(images, training=training)

    def training_step(with_op):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                labels, forward(with_op, True), from_logits=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables),
                        model.trainable_variables)
        return loss

    print(f"\nResNeXt-50 32x4d, batch {args.batch_size}, float32; ms per batch (medians) "
          "and the median of paired ratios")
    for mode, pairs in (("inference", args.pairs), ("training", max(args.pairs // 3, 3))):
        if mode == "inference":
            with_op = tf.function(lambda: forward(True, False))
            without = tf.function(lambda: forward(False, False))
        else:
            with_op = tf.function(lambda: training_step(True))
            without = tf.function(lambda: training_step(False))
        for function in (with_op, without, with_op, without):
            function().numpy()
        times = {"with": [], "without": []}
        for pair in range(pairs):
            order = [("with", with_op), ("without", without)]
            for name, function in order[pair % 2:] + order[:pair % 2]:
                time.sleep(0.3)
                start = time.perf_counter()
                function().numpy()
                times[name].append((time.perf_counter() - start) * 1e3)
        ratios = np.array(times["without"]) / np.array(times["with"])
        print(f"{mode:<10} with the op {np.median(times['with']):7.1f}  TensorFlow's "
              f"{np.median(times['without']):7.1f}  speed-up {np.median(ratios):.3f}x "
              f"(quartiles {np.quantile(ratios, 0.25):.3f}-{np.quantile(ratios, 0.75):.3f})")


if __name__ == "__main__":
    main()
