"""Where one inference batch of a preset spends its time, op by op.

Runs `predict_on_batch` under TensorFlow's profiler with one inter-op thread (so
each op's span is its own time, not shared with a concurrent one) and prints
milliseconds per batch by op type, then for every convolution its time and
GMAC/s.

    python benchmarks/profile_ops.py resnext50_32x4d [--batch_size 8] [--batches 3]
        [--precision bfloat16]

`--precision bfloat16` builds the model under Keras' `mixed_bfloat16` policy,
as `benchmarks/models.py --precision bfloat16` does.
"""

import argparse
import collections
import glob
import re
import tempfile

import numpy as np

import keras_resnext as kr  # (switches oneDNN on before TensorFlow loads)
import keras
import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2
from machine import print_cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset", choices=sorted(kr.PRESETS))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    print_cpu()
    if args.precision != "float32":
        keras.config.set_dtype_policy(f"mixed_{args.precision}")
    tf.config.threading.set_inter_op_parallelism_threads(1)
    size = args.image_size
    model = kr.build(args.preset, input_shape=(size, size, 3))
    images = np.random.default_rng(0).uniform(-2, 2, (args.batch_size, size, size, 3))
    images = images.astype("float32")
    for _ in range(3):
        model.predict_on_batch(images)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(args.batches):
            model.predict_on_batch(images)
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())

    # Op spans are on the executor's threads, named "<node name>:<op type>".
    by_node = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if line.name.startswith("tf_Compute"):
                for event in line.events:
                    name = plane.event_metadata[event.metadata_id].name
                    if ":" in name and "/" in name:
                        by_node[name] += event.duration_ps / 1e9 / args.batches
    by_type = collections.Counter()
    for name, ms in by_node.items():
        by_type[name.rsplit(":", 1)[1]] += ms
    print(f"{args.preset}, {args.precision}, batch {args.batch_size}, {size}x{size}: "
          f"ms per batch by op type "
          f"(sum {sum(by_type.values()):.1f})")
    for op_type, ms in by_type.most_common():
        if ms >= 0.05:
            print(f"{ms:9.2f}  {op_type}")

    # Layer names carry the convolution: conv3_block2_2_conv, fused with its BN/ReLU.
    macs = {}
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is not None and len(kernel.shape) == 4:
            kh, kw, group_width, filters = kernel.shape
            _, height, width, _ = layer.output.shape
            macs[layer.name[:-len("_conv")]] = (
                args.batch_size * height * width * filters * kh * kw * group_width,
                f"{kh}x{kw}, {group_width} in per output, {height}x{width}x{filters} out")
    # In bfloat16 grappler fuses the residual add and ReLU into one of the
    # block's convolutions (its last, or the shortcut's), and the fused op
    # takes their name (conv3_block2_out): it is the one not named otherwise.
    conv_ms = collections.Counter()
    residual_ms = collections.Counter()
    for name, ms in by_node.items():
        if "Conv" not in name.rsplit(":", 1)[1]:
            continue
        residual = re.search(r"/(conv\d_block\d+)_(?:add|out)(?:_\d+)?/", name)
        match = re.search(r"/(conv\d(?:_block\d+_\d)?)_", name)
        if residual:
            residual_ms[residual.group(1)] += ms
        elif match:
            conv_ms[match.group(1)] += ms
    for block, ms in residual_ms.items():
        conv_ms[f"{block}_3" if f"{block}_3" not in conv_ms else f"{block}_0"] += ms
    print("\nconvolution          ms  GMAC/s  shape")
    for name, ms in conv_ms.items():
        if name in macs:
            count, shape = macs[name]
            print(f"{name:<16} {ms:7.2f} {count / ms / 1e6:7.1f}  {shape}")


if __name__ == "__main__":
    main()
