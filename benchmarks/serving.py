"""Served throughput: `serving_preprocessed` of an exported SavedModel in a bare
TensorFlow, oneDNN on and off, each against Keras' `predict_on_batch` in a
TensorFlow with the same oneDNN setting (the anchors).

Each configuration is a process of its own (TensorFlow reads the oneDNN switch
once, when it loads); the served ones never import keras_resnext, as TF
Serving doesn't. Another worker serves the same model exported with its
grouped convolutions open to grappler's conv + BN + ReLU fusion, which only a
oneDNN TensorFlow can run: the price of the export that runs everywhere.

`--precision bfloat16` builds the model under `mixed_bfloat16` and exports its
bfloat16 serving graph. `--results_dir benchmarks/results` keeps the run in
`serving_<cpu>.json`, one entry per configuration.

    python benchmarks/serving.py --model resnext50_32x4d --batch_size 8
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

from machine import keep_per_cpu, print_cpu
from timed_workers import (Worker, add_round_arguments, answer_runs, measure_in_rounds,
                           repo_environment)


def keras_worker(args):
    """Builds the model, first writes both SavedModels if `--export` is given,
    then times predict_on_batch."""
    import numpy as np

    import keras_resnext as kr  # first: it arranges oneDNN before TF loads
    import keras
    from keras_resnext.kernels import tf_ops

    keras.utils.set_random_seed(0)
    if args.precision != "float32":
        keras.config.set_dtype_policy(f"mixed_{args.precision}")
    model = kr.build(args.model, input_shape=(args.image_size, args.image_size, 3))
    if args.export:
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
               "--image_size", str(args.image_size), "--precision", args.precision,
               "--warmup", str(args.warmup), "--workdir", args.workdir]
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
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--results_dir",
                        help="also keep the results in DIR/serving_<cpu>.json, by configuration")
    parser.add_argument("--worker", choices=["keras", "served"])
    parser.add_argument("--export")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.worker:
        return serve(args)

    print_cpu()
    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = workdir
        # The first Keras worker writes both SavedModels before it says it's ready.
        workers = {
            "on": start_worker("predict_on_batch, oneDNN on", args, "keras", "write", "1"),
            "off": start_worker("predict_on_batch, oneDNN off", args, "keras", None, "0"),
        }
        workers.update({
            "served on": start_worker("served, oneDNN on", args, "served", "portable", "1"),
            "served off": start_worker("served, oneDNN off", args, "served", "portable", "0"),
            "fusable": start_worker("served, oneDNN on, fusable export", args, "served",
                                    "onednn_only", "1"),
        })
        measure_in_rounds(list(workers.values()), args)
        for worker in workers.values():
            worker.close()

    def paired(numerator, denominator):
        return statistics.median(a / b for a, b in zip(workers[numerator].rates,
                                                       workers[denominator].rates))

    anchors = {"on": "on", "off": "off", "served on": "on", "served off": "off", "fusable": "on"}
    print(f"{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}, "
          f"{args.precision}, median of {args.repeats} rounds of {args.steps} batches")
    print(f"{'':<36}{'img/s':>8}  {'/ predict_on_batch, same oneDNN (paired)':>42}   rounds")
    results = {}
    for name, worker in workers.items():
        median = statistics.median(worker.rates)
        over_anchor = paired(name, anchors[name])
        rounds = " ".join(f"{rate:.2f}" for rate in worker.rates)
        print(f"{worker.key:<36}{median:>8.2f}  {over_anchor:>41.2f}x   {rounds}")
        results[worker.key] = dict(median=median, paired_over_anchor=over_anchor,
                                   rates=worker.rates, version=worker.version)
    for worker in workers.values():
        print(f"{worker.key}: {worker.version}")
    cost = paired("fusable", "served on")
    print(f"price of the portable export under oneDNN (fusable / portable, paired): {cost:.3f}x")
    saved = {"results": results, "portable_price": cost,
             "args": {k: v for k, v in vars(args).items() if k != "workdir"}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(saved, f, indent=1)
    if args.results_dir:
        configuration = (f"{args.model} {args.precision} batch{args.batch_size} "
                         f"{args.image_size}px")
        print(f"kept in {keep_per_cpu(args.results_dir, 'serving', configuration, saved)}")


if __name__ == "__main__":
    main()
