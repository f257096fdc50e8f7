"""Our AVX2 grouped convolution against TensorFlow's kernel, and which one the
package picks on this CPU.

1. Per shape: every grouped 3x3 of ResNeXt-50 32x4d (4, 8, 16 and 32 channels
   per group, stride 1 and 2) and ResNeXt-101 64x4d's first, as each runs in the
   model at inference: ours with batch norm and ReLU fused into the op, against
   what TensorFlow runs in its place here (oneDNN on: grappler fuses pad, conv,
   batch norm and ReLU into one oneDNN op; off: its grouped Conv2D, then the
   batch norm and ReLU). The same pair of calls that the automatic choice
   (keras_resnext/kernels/avx2/choice.py) times, here over interleaved rounds,
   medians; then the choice's decision (kept, or timed now if none is) and what
   a fresh timing of it costs.
2. Whole ResNeXt-50 32x4d, inference and a training step (SGD), the same model
   traced twice: with the op where `KERAS_RESNEXT_NATIVE_KERNELS` lets it run
   (by default where it was timed faster; `always` for every shape) and without.
   The two alternate batch by batch and the speed-up is the median of the
   paired ratios, which cancels this machine's slow drifts in speed.

`--results_dir` keeps the figures in DIR/grouped_conv_<cpu>.json (see
machine.keep_per_cpu), one entry per oneDNN setting, replaced by a rerun.

    python benchmarks/grouped_conv.py [--batch_size 8] [--pairs 40] \
        [--results_dir benchmarks/results] [--skip_model]
"""

import argparse
import os
import time

import numpy as np

import keras_resnext as kr  # (switches oneDNN on before TensorFlow loads)
import keras
import tensorflow as tf

from keras_resnext.kernels import avx2, tf_ops
from keras_resnext.kernels.avx2 import choice
from machine import keep_per_cpu, print_cpu

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
    parser.add_argument("--skip_model", action="store_true",
                        help="only the per-shape comparison")
    parser.add_argument("--results_dir", help="keep the figures in DIR/grouped_conv_<cpu>.json")
    args = parser.parse_args()
    print_cpu()
    if tf_ops.avx2_op() is None:
        raise SystemExit("The AVX2 op is unavailable here (see the warning above).")
    onednn = tf_ops._onednn_enabled()
    saved = {"onednn": onednn, "batch_size": args.batch_size,
             "native_kernels": os.environ.get(avx2.SWITCH, "1"),
             "shapes": per_shape(onednn, args)}
    if not args.skip_model:
        saved["model"] = whole_model(args)
    if args.results_dir:
        path = keep_per_cpu(args.results_dir, "grouped_conv",
                            f"onednn {'on' if onednn else 'off'}", saved)
        print(f"kept in {path}")


def per_shape(onednn, args):
    theirs = ("oneDNN's fused pad + conv + BN + ReLU" if onednn else
              "TensorFlow's grouped Conv2D, then BN and ReLU")
    print(f"batch {args.batch_size}, float32, median of {args.repeats} rounds of "
          f"{args.steps} calls, ms per call; TensorFlow's kernel here (oneDNN "
          f"{'on' if onednn else 'off'}): {theirs}.\nchoice: the automatic decision kept "
          f"for this CPU (timed at batch {choice.BATCH}) and its speed-up (of the fastest "
          "calls); 'timed in': what timing one shape afresh costs (warm-up included, tracing "
          "not)")
    print(f"{'input':>6} {'channels':>8} {'per group':>9} {'stride':>6} {'ours':>8} "
          f"{'TF':>8} {'speed-up':>8} {'choice':>7} {'its':>6} {'timed in':>8}")
    rows = []
    for size, channels, group_width, stride in SHAPES:
        ours, tensorflows = tf_ops._timed_grouped_convs(args.batch_size, size, size, channels,
                                                        group_width, stride)
        np.testing.assert_allclose(ours(), tensorflows(), rtol=1e-3, atol=1e-3)
        times = {"ours": [], "tensorflow": []}
        for round_index in range(args.repeats):
            order = [("ours", ours), ("tensorflow", tensorflows)]
            for name, function in order[round_index % 2:] + order[:round_index % 2]:
                start = time.perf_counter()
                for _ in range(args.steps):
                    function()  # returns once the CPU kernels are done
                times[name].append((time.perf_counter() - start) / args.steps * 1e3)
        ours_ms, theirs_ms = np.median(times["ours"]), np.median(times["tensorflow"])

        def timed_calls(batch):
            return tf_ops._timed_grouped_convs(batch, size, size, channels, group_width, stride)

        use_op = choice.op_wins(group_width, stride, size, size, channels, onednn, timed_calls)
        decision = choice.read_decisions(choice.decisions_path(onednn)).get(
            choice.shape_key(group_width, stride, size, size, channels), {})
        calls = timed_calls(choice.BATCH)
        start = time.perf_counter()
        choice.measure(*calls)
        cost_s = time.perf_counter() - start
        rows.append(dict(size=size, channels=channels, group_width=group_width, stride=stride,
                         ours_ms=ours_ms, tensorflow_ms=theirs_ms, speed_up=theirs_ms / ours_ms,
                         use_op=use_op, decision=decision, timing_cost_s=cost_s))
        print(f"{size:>6} {channels:>8} {group_width:>9} {stride:>6} {ours_ms:>8.2f} "
              f"{theirs_ms:>8.2f} {theirs_ms / ours_ms:>7.2f}x {'ours' if use_op else 'TF':>7} "
              f"{decision.get('speed_up', float('nan')):>5.2f}x {cost_s:>7.2f}s")
    return rows


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

    print(f"\nResNeXt-50 32x4d, batch {args.batch_size}, float32, {avx2.SWITCH}="
          f"{os.environ.get(avx2.SWITCH, '1')}; ms per batch (medians) and the median of "
          "paired ratios")
    rows = {}
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
        rows[mode] = dict(with_op_ms=np.median(times["with"]),
                          without_ms=np.median(times["without"]),
                          speed_up=np.median(ratios), quartiles=np.quantile(ratios, [0.25, 0.75]))
        print(f"{mode:<10} with the op {np.median(times['with']):7.1f}  TensorFlow's "
              f"{np.median(times['without']):7.1f}  speed-up {np.median(ratios):.3f}x "
              f"(quartiles {np.quantile(ratios, 0.25):.3f}-{np.quantile(ratios, 0.75):.3f})")
    return {mode: {key: np.asarray(value).tolist() for key, value in row.items()}
            for mode, row in rows.items()}


if __name__ == "__main__":
    main()
