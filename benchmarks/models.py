"""Inference and training images/s of our ResNeXt-50 32x4d and ResNet-50, against
torchvision's when it is importable.

Each (implementation, model, mode) lives in its own worker process, built once;
the script then interleaves timed rounds across the workers (two shared cores
are noisy) and reports medians and the ratios of issue 6, each the median of
the ratios within rounds:

    ours ResNeXt-50 / torchvision ResNeXt-50   (inference, training)
    ours ResNeXt-50 time / ours ResNet-50 time (cost of cardinality)

`--precision bfloat16` runs ours under Keras' `mixed_bfloat16` policy and
torchvision under `torch.autocast(device, dtype=torch.bfloat16)`.

`--batch_size 1` is the latency mode: each call is timed on its own (at
least `--latency_calls` per worker, spread over the rounds) and p50 and p99
are reported beside the rates; at inference it adds ours served (the
SavedModel of `kr.export_saved_model` in the precision asked, called through
`serving_preprocessed`) and torchvision `torch.compile`d, where it compiles.

`--results_dir benchmarks/results` keeps one JSON file per CPU model
(`models_<cpu>.json`, see machine.cpu_file_name), holding one entry per
configuration (backend, device, precision, batch size, image size); a run
replaces its configuration's earlier entry.

`--threads N` caps both sides' intra-op threads (TensorFlow's and torch's).
On a shared machine with fewer free cores than threads, torch's OpenMP
threads wait for each other at every barrier and its figures collapse
(here, 2 shared cores: 1.8 s a ResNeXt-50 image with 2 threads, 0.12 s with 1).

CPU (this repo's venv for ours, another interpreter for torchvision):
    python benchmarks/models.py --torch_python /path/to/torchvenv/bin/python
GPU with Keras-JAX, mixed precision, training only:
    python benchmarks/models.py --backend jax --device gpu --batch_size 256 \
        --modes training --precision bfloat16
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

from timed_workers import (Worker, add_round_arguments, answer_runs, measure_in_rounds,
                           repo_environment)
from machine import keep_per_cpu, print_cpu

MODELS = ("resnext50_32x4d", "resnet50")
TORCHVISION_NAMES = {"resnext50_32x4d": "resnext50_32x4d", "resnet50": "resnet50"}
# Variants measured in latency mode only, beside "ours" and "torchvision".
SERVED, COMPILED = "ours_served", "torchvision_compiled"


def ours_worker(model_name, mode, batch_size, image_size, precision, device, served=False,
                threads=None):
    import numpy as np

    import keras_resnext as kr  # first: it arranges oneDNN before TF loads
    import keras

    if threads and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)

    if precision != "float32":
        keras.config.set_dtype_policy(f"mixed_{precision}")
    model = kr.build(model_name, input_shape=(image_size, image_size, 3))
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, (batch_size, image_size, image_size, 3)).astype("float32")
    y = rng.integers(0, 1000, batch_size)
    if device == "gpu":
        # Keep the batch on the device, as torchvision's side does.
        x, y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
    if mode == "training":
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(),
        )

        def step():
            model.train_on_batch(x, y)
    elif served:
        return served_step(model, x, precision), (
            f"keras {keras.__version__}, served SavedModel ({precision})")
    else:
        def step():
            model.predict_on_batch(x)
    return step, f"keras {keras.__version__} ({keras.backend.backend()})"


def served_step(model, x, precision):
    """A step through `serving_preprocessed` of the model's SavedModel."""
    import tensorflow as tf

    import keras_resnext as kr

    export_dir = kr.export_saved_model(model, tempfile.mkdtemp(prefix="models-bench-"),
                                       dtype=precision)
    signature = tf.saved_model.load(export_dir).signatures["serving_preprocessed"]
    images = tf.constant(x)

    def step():
        signature(images=images)["probabilities"].numpy()
    return step


def torchvision_worker(model_name, mode, batch_size, image_size, precision, device,
                       compiled=False, threads=None):
    import torch
    import torchvision

    if threads:
        torch.set_num_threads(threads)

    model = getattr(torchvision.models, TORCHVISION_NAMES[model_name])()
    model = model.to(device=device, memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]

    def autocast():
        return torch.autocast(device_type=device, dtype=autocast_dtype,
                              enabled=autocast_dtype is not None)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    if mode == "training":
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler(enabled=precision == "float16")
        loss_fn = torch.nn.CrossEntropyLoss()

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            sync()
    else:
        model.eval()
        if compiled:
            model = torch.compile(model)

        def step():
            with torch.inference_mode(), autocast():
                model(x)
            sync()
    compiled_note = ", torch.compile" if compiled else ""
    return step, f"torch {torch.__version__}, torchvision {torchvision.__version__}{compiled_note}"


def serve(args):
    """Worker loop: build once, then answer 'run N' with seconds."""
    if args.worker in ("ours", SERVED):
        step, version = ours_worker(args.model, args.mode, args.batch_size, args.image_size,
                                    args.precision, args.device, served=args.worker == SERVED,
                                    threads=args.threads)
    else:
        device = "cuda" if args.device == "gpu" else "cpu"
        step, version = torchvision_worker(args.model, args.mode, args.batch_size,
                                           args.image_size, args.precision, device,
                                           compiled=args.worker == COMPILED,
                                           threads=args.threads)
    answer_runs(step, version, args.warmup)


def start_worker(implementation, python, model, mode, args):
    command = [python, os.path.abspath(__file__), "--worker", implementation,
               "--model", model, "--mode", mode, "--batch_size", str(args.batch_size),
               "--image_size", str(args.image_size), "--precision", args.precision,
               "--device", args.device, "--warmup", str(args.warmup)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = repo_environment(KERAS_BACKEND=args.backend)
    # Several workers share one GPU: JAX must not grab 75% of it up front.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return Worker((implementation, model, mode), command, env)


def latency_mode(args):
    return args.batch_size == 1


def measure_latencies(workers, args):
    """Interleaved rounds as `measure_in_rounds`, each call timed on its own:
    `worker.latencies` gets every call's seconds and `worker.rates` each
    round's images/s, so the paired ratios read as at other batch sizes."""
    calls = max(args.steps, math.ceil(args.latency_calls / args.repeats))
    for worker in workers:
        worker.latencies = []
    for round_index in range(args.repeats):
        shift = round_index % len(workers)
        for worker in workers[shift:] + workers[:shift]:
            time.sleep(args.settle)
            seconds = []
            for _ in range(calls):
                worker.measure(1, 1)
                seconds.append(1 / worker.rates.pop())
            worker.latencies += seconds
            worker.rates.append(calls / sum(seconds))


def percentile(values, fraction):
    """The `fraction` quantile of `values`, linear between order statistics."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def configuration(args):
    """The key of a run in its CPU's results file: what changes the figures."""
    key = (f"{args['backend']} {args['device']} {args['precision']} "
           f"batch{args['batch_size']} {args['image_size']}px")
    if args.get("threads"):
        key += f" {args['threads']}threads"
    return key


def torchvision_available(python):
    try:
        probe = subprocess.run([python, "-c", "import torchvision"], capture_output=True)
    except OSError:  # no such interpreter
        return False
    return probe.returncode == 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="tensorflow", choices=["tensorflow", "jax", "torch"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--modes", default="inference,training")
    parser.add_argument("--models", default=",".join(MODELS))
    add_round_arguments(parser, settle=2.0)
    parser.add_argument("--python", default=sys.executable, help="interpreter for ours")
    parser.add_argument("--torch_python", default=sys.executable,
                        help="interpreter with torch + torchvision")
    parser.add_argument("--threads", type=int,
                        help="intra-op threads of each side (default: theirs)")
    parser.add_argument("--latency_calls", type=int, default=50,
                        help="at batch size 1, the fewest calls timed per worker")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--results_dir",
                        help="also keep the results in DIR/models_<cpu>.json, by configuration")
    # Worker mode (internal).
    parser.add_argument("--worker", choices=["ours", "torchvision", SERVED, COMPILED])
    parser.add_argument("--model")
    parser.add_argument("--mode")
    args = parser.parse_args()
    if args.worker:
        return serve(args)
    print_cpu()

    models = args.models.split(",")
    modes = args.modes.split(",")
    implementations = [("ours", args.python)]
    with_torchvision = torchvision_available(args.torch_python)
    if with_torchvision:
        implementations.append(("torchvision", args.torch_python))
    else:
        print(f"torchvision is not importable by {args.torch_python}: measuring ours only")

    results = {}
    for mode in modes:
        variants = list(implementations)
        if latency_mode(args) and mode == "inference":
            if args.precision != "float16":  # SavedModels are float32 or bfloat16
                variants.append((SERVED, args.python))
            if with_torchvision:
                variants.append((COMPILED, args.torch_python))
        # One mode at a time keeps at most four models in memory.
        workers = []
        for impl, python in variants:
            for model in models:
                try:
                    workers.append(start_worker(impl, python, model, mode, args))
                except RuntimeError as error:
                    if impl != COMPILED:
                        raise
                    print(f"{error}: torch.compile failed here, measuring torchvision eager only")
        if latency_mode(args):
            measure_latencies(workers, args)
        else:
            measure_in_rounds(workers, args)
        for worker in workers:
            worker.close()
            results[worker.key] = dict(median=statistics.median(worker.rates),
                                       rates=worker.rates, version=worker.version)
            if latency_mode(args):
                results[worker.key].update(
                    calls=len(worker.latencies),
                    p50_ms=1000 * percentile(worker.latencies, 0.5),
                    p99_ms=1000 * percentile(worker.latencies, 0.99))

    threads = f", {args.threads} threads" if args.threads else ""
    print(f"\nbatch {args.batch_size}, {args.image_size}x{args.image_size}, "
          f"{args.precision}{threads}, backend {args.backend}, device {args.device}, "
          f"median of {args.repeats} rounds of {args.steps} batches")
    print(f"{'implementation':<22}{'model':<18}{'mode':<11}{'img/s':>8}   rounds")
    for (impl, model, mode), r in results.items():
        rounds = " ".join(f"{rate:.2f}" for rate in r["rates"])
        print(f"{impl:<22}{model:<18}{mode:<11}{r['median']:>8.2f}   {rounds}")
    if latency_mode(args):
        print("\nlatency, each call timed alone: p50 and p99 in ms")
        for (impl, model, mode), r in results.items():
            print(f"{impl:<22}{model:<18}{mode:<11}p50 {r['p50_ms']:>8.1f}   "
                  f"p99 {r['p99_ms']:>8.1f}   ({r['calls']} calls)")
    for (impl, model, mode), r in results.items():
        if model == models[0] and mode == modes[0]:
            print(f"{impl}: {r['version']}")
    # Each ratio is the median over rounds of the ratio within the round: the
    # two workers of a round ran seconds apart, so the minutes-long drifts in
    # this machine's speed cancel. The ratio of the medians is printed beside it.
    ratios = {}
    print("\nratio: median of per-round ratios (quartiles) | ratio of medians")
    for mode in modes:
        ours = results.get(("ours", "resnext50_32x4d", mode))
        theirs = results.get(("torchvision", "resnext50_32x4d", mode))
        resnet = results.get(("ours", "resnet50", mode))
        served = results.get((SERVED, "resnext50_32x4d", mode))
        compiled = results.get((COMPILED, "resnext50_32x4d", mode))
        pairs = {}
        if ours and theirs:
            pairs[f"{mode}: ours / torchvision (ResNeXt-50)"] = (ours, theirs)
        if served and ours:
            pairs[f"{mode}: served / predict_on_batch (ResNeXt-50)"] = (served, ours)
        if served and compiled:
            pairs[f"{mode}: served / torchvision compiled (ResNeXt-50)"] = (served, compiled)
        if ours and resnet:
            # Time per batch of ResNeXt over ResNet = inverse ratio of rates.
            pairs[f"{mode}: cost of cardinality (ResNeXt-50 / ResNet-50 time)"] = (resnet, ours)
        for label, (numerator, denominator) in pairs.items():
            per_round = [a / b for a, b in zip(numerator["rates"], denominator["rates"])]
            quartiles = statistics.quantiles(per_round, n=4)
            ratios[label] = dict(paired=statistics.median(per_round), quartiles=quartiles,
                                 of_medians=numerator["median"] / denominator["median"])
            print(f"{label}: {ratios[label]['paired']:.2f}x ({quartiles[0]:.2f}-"
                  f"{quartiles[2]:.2f}) | {ratios[label]['of_medians']:.2f}x")
    saved = {"results": {"|".join(k): v for k, v in results.items()},
             "ratios": ratios, "args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(saved, f, indent=1)
    if args.results_dir:
        path = keep_per_cpu(args.results_dir, "models", configuration(saved["args"]), saved)
        print(f"kept in {path}")


if __name__ == "__main__":
    main()
