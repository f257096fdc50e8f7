"""The bfloat16 inference graph under Keras' `mixed_bfloat16` policy: batch
norm folds into the convolution before it (kernel times scale, then a
BiasAdd), because grappler fuses bfloat16 Conv2D + BiasAdd (+ ReLU) into one
oneDNN op but not Conv2D + FusedBatchNorm; the numbers stay those of float32
within bfloat16's precision."""

import collections
import glob

import numpy as np
import pytest

import keras_resnext as kr
from conftest import dtype_policy, pretrained_like_batch_norms

tf = pytest.importorskip("tensorflow")
from keras_resnext.kernels import tf_ops  # noqa: E402  (needs TensorFlow)


def _model(policy="float32"):
    with dtype_policy(policy):
        model = kr.ResNeXt29(depth=11, cardinality=4, width=4, classes=3,
                             input_shape=(16, 16, 3))
    return pretrained_like_batch_norms(model)


def _images(count=4):
    return np.random.default_rng(1).normal(0, 1, (count, 16, 16, 3)).astype("float32")


def _traced_graph(model, native, batch=None):
    @tf.function
    def infer(x):
        with tf_ops.native_kernels(enabled=native):
            return model(x, training=False)

    return infer.get_concrete_function(tf.TensorSpec([batch, 16, 16, 3])).graph


def _traced_op_types(model, native, batch=None):
    """Op types in the traced inference graph (dead ones included), and
    "BiasAdd of T" for each BiasAdd of an op of type T but the dense head's.
    The batch is unknown unless given, as in exports."""
    graph = _traced_graph(model, native, batch)
    types = collections.Counter(op.type for op in graph.get_operations())
    for op in graph.get_operations():
        if op.type == "BiasAdd" and op.inputs[0].op.type != "MatMul":
            types[f"BiasAdd of {op.inputs[0].op.type}"] += 1
    return types


def _batch_norms(model):
    return sum(isinstance(layer, kr.layers.BatchNormalization) for layer in model.layers)


def test_bfloat16_inference_folds_every_batch_norm_into_its_convolution():
    model = _model("mixed_bfloat16")
    ops = _traced_op_types(model, native=True)
    assert ops["FusedBatchNormV3"] == 0, ops
    folded = sum(count for key, count in ops.items() if key.startswith("BiasAdd of"))
    assert folded == _batch_norms(model), ops


def test_exported_graphs_fold_too_and_keep_grouped_convs_behind_their_boundary():
    # Outside native graphs (exports) a grouped conv sits behind a function
    # boundary that keeps grappler from fusing it (see tf_ops): the fold
    # scales its kernel going in and adds the offset coming out.
    model = _model("mixed_bfloat16")
    ops = _traced_op_types(model, native=False)
    grouped = sum(isinstance(layer, kr.layers.GroupConv2D) for layer in model.layers)
    assert ops["FusedBatchNormV3"] == 0, ops
    assert ops["BiasAdd of PartitionedCall"] == grouped, ops
    assert ops["BiasAdd of Conv2D"] == _batch_norms(model) - grouped, ops


def test_with_a_small_batch_known_large_kernels_keep_their_batch_norm():
    # Batch 1: conv4_block1_0's kernel (512 x 1024) is 32 times its output
    # (4 x 4 x 1024); rescaling it every call would cost more than the pass
    # over the output that batch norm makes.
    ops = [op for op in _traced_graph(_model("mixed_bfloat16"), native=True, batch=1)
           .get_operations() if op.type == "FusedBatchNormV3"]
    names = " ".join(op.name for op in ops)
    assert "conv4_block1_0_bn" in names and "conv2_block1_1_bn" not in names, names


def test_float32_inference_keeps_the_fused_batch_norm():
    # grappler fuses float32 Conv2D + FusedBatchNorm itself; nothing to fold.
    ops = _traced_op_types(_model(), native=True)
    assert not [key for key in ops if key.startswith("BiasAdd of")], ops


def test_predict_runs_no_batch_norm_op_in_bfloat16(tmp_path):
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    model = _model("mixed_bfloat16")
    images = _images(16)  # enough that every kernel folds (see the test above)
    model.predict_on_batch(images)
    tf.profiler.experimental.start(str(tmp_path))
    model.predict_on_batch(images)
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(glob.glob(f"{tmp_path}/**/*.xplane.pb", recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    ran = {plane.event_metadata[event.metadata_id].name.rsplit(":", 1)[-1]
           for plane in space.planes for line in plane.lines
           if line.name.startswith("tf_Compute") for event in line.events}
    assert any("Conv2D" in op for op in ran), ran
    assert not [op for op in ran if "BatchNorm" in op], ran


@pytest.mark.parametrize("policy, call", [("mixed_bfloat16", "predict_on_batch"),
                                          ("mixed_bfloat16", "tf.function"),
                                          ("mixed_float16", "predict_on_batch")])
def test_half_precision_outputs_within_1e2_of_float32(policy, call):
    float32_model = _model()
    mixed_model = _model(policy)
    mixed_model.set_weights(float32_model.get_weights())
    images = _images()
    expected = float32_model.predict_on_batch(images)
    if call == "predict_on_batch":
        got = mixed_model.predict_on_batch(images)
    else:
        got = tf.function(lambda x: mixed_model(x, training=False))(images).numpy()
    difference = np.max(np.abs(got.astype("float32") - expected))
    assert 0 < difference < 1e-2, difference


def test_the_folded_graph_differentiates_as_well_as_the_unfolded_one():
    # Saliency maps and frozen-BN fine-tuning differentiate an inference graph.
    float32_model = _model()
    mixed_model = _model("mixed_bfloat16")
    mixed_model.set_weights(float32_model.get_weights())
    images = tf.constant(_images(2))

    def gradients(model, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(model(x, training=False), tf.float32)[:, 0])
        return tape.gradient(loss, [x, model.get_layer("conv2_block1_2_conv").kernel,
                                    model.get_layer("conv2_block1_2_bn").gamma])

    @tf.function
    def folded(x):
        with tf_ops.native_kernels():
            return gradients(mixed_model, x)

    expected = gradients(float32_model, images)
    unfolded = gradients(mixed_model, images)  # eagerly: batch norm stays apart
    for name, got, plain, want in zip(["images", "kernel", "gamma"], folded(images),
                                      unfolded, expected):
        error, plain_error = (float(tf.reduce_max(tf.abs(g - want))) for g in (got, plain))
        # bfloat16 gradients are 2-15% of their largest element off float32,
        # with or without the fold; a wrong gradient is off by ~100%.
        scale = float(tf.reduce_max(tf.abs(want)))
        assert error <= max(2 * plain_error, 0.25 * scale), (name, error, plain_error, scale)
