"""Served throughput: `serving_preprocessed` of an exported SavedModel in a bare
TensorFlow, oneDNN on and off, against Keras' `predict_on_batch` (the anchor).

Each configuration is a process of its own (TensorFlow reads the oneDNN switch
once, when it loads); the served ones never import keras_resnext, as TF
Serving doesn't. A fourth worker serves the same model exported with its
grouped convolutions open to grappler's conv + BN + ReLU fusion, which only a
oneDNN TensorFlow can run: the price of the export that runs everywhere.

    python benchmarks/serving.py --model resnext50_32x4d --batch_size 8
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

from machine import cpu_description
from timed_workers import (Worker, add_round_arguments, answer_runs, measure_in_rounds,
                           repo_environment)


def keras_worker(args):
    """Builds the model, exports both SavedModels, then times predict_on_batch."""
    import numpy as np

    import keras_resnext as kr  # first: it arranges oneDNN before TF loads
    import keras
    from keras_resnext.kernels import tf_ops

    keras.utils.set_random_seed(0)
    model = kr.build(args.model, input_shape=(args.image_size, args.image_size, 3))
    kr.export_saved_model(model, os.path.join(args.workdir, "portable"), version=1)
    fusable = tf_ops._grappler_fuses_grouped_convs_here
    tf_ops._grappler_fuses_grouped_convs_here = lambda: True
    try:
        kr.export_saved_model(model, os.path.join(args.workdir, "onednn_only"), version=1)
    finally:
        tf_ops._grappler_fuses_grouped_convs_here = fusable
    x = np.random.default_rng(0).normal(
        0, 1, (args.batch_size, args.image_size, args.image_size, 3)).astype("float32")
    return lambda: model.predict_on_batch(x), f"keras {keras.__version__}"


def served_worker(args):
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    loaded = tf.saved_model.load(os.path.join(args.workdir, args.export, "1"))
    signature = loaded.signatures["serving_preprocessed"]
    images = tf.constant(np.random.default_rng(0).normal(
        0, 1, (args.batch_size, args.image_size, args.image_size, 3)).astype("float32"))

    def step():
        signature(images=images)["probabilities"].numpy()

    onednn = "on" if _pywrap_util_port.IsMklEnabled() else "off"
    return step, f"tensorflow {tf.__version__}, oneDNN {onednn}"


def serve(args):
    """Worker loop: load once, then answer 'run N' with seconds (the step
    keeps the loaded SavedModel alive)."""
    step, version = keras_worker(args) if args.worker == "keras" else served_worker(args)
    answer_runs(step, version, args.warmup)


def start_worker(label, args, worker, export=None, onednn=None):
    command = [sys.executable, os.path.abspath(__file__), "--worker", worker,
               "--model", args.model, "--batch_size", str(args.batch_size),
               "--image_size", str(args.image_size), "--warmup", str(args.warmup),
               "--workdir", args.workdir]
    if export:
        command += ["--export", export]
    env = repo_environment(KERAS_BACKEND="tensorflow")
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    return Worker(label, command, env)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnext50_32x4d")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    add_round_arguments(parser, settle=1.0)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", choices=["keras", "served"])
    parser.add_argument("--export")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.worker:
        return serve(args)

    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = workdir
        # The Keras worker writes both SavedModels before it says it's ready.
        workers = [start_worker("predict_on_batch (anchor)", args, "keras")]
        workers += [
            start_worker("served, oneDNN on", args, "served", "portable", "1"),
            start_worker("served, oneDNN off", args, "served", "portable", "0"),
            start_worker("served, oneDNN on, fusable export", args, "served", "onednn_only", "1"),
        ]
        measure_in_rounds(workers, args)
        for worker in workers:
            worker.close()

    print(f"\nCPU: {cpu_description()}, {os.cpu_count()} cores")
    print(f"{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, float32, "
          f"median of {args.repeats} rounds of {args.steps} batches")
    anchor = workers[0]
    print(f"{'':<36}{'img/s':>8}  {'/ anchor (paired)':>18}   rounds")
    results = {}
    for worker in workers:
        median = statistics.median(worker.rates)
        paired = statistics.median(a / b for a, b in zip(worker.rates, anchor.rates))
        rounds = " ".join(f"{rate:.2f}" for rate in worker.rates)
        print(f"{worker.key:<36}{median:>8.2f}  {paired:>17.2f}x   {rounds}")
        results[worker.key] = dict(median=median, paired_over_anchor=paired,
                                     rates=worker.rates, version=worker.version)
    for worker in workers:
        print(f"{worker.key}: {worker.version}")
    fusable, portable = workers[3], workers[1]
    cost = statistics.median(a / b for a, b in zip(fusable.rates, portable.rates))
    print(f"price of the portable export under oneDNN (fusable / portable, paired): {cost:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_description(), "results": results, "portable_price": cost,
                       "args": {k: v for k, v in vars(args).items() if k != "workdir"}},
                      f, indent=1)


if __name__ == "__main__":
    main()
