"""Strategies, workers and what crosses replicas: `tf.distribute` for the loop.

One loop serves every strategy (default, one device, mirrored,
multi-worker, TPU); the chief is the worker that writes the run's files.
"""

import json
import os

import keras
import tensorflow as tf

from keras_resnext.training.errors import UserError

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")


def create_strategy(name, tpu_address=None):
    """The `tf.distribute.Strategy` called `name` (one of `STRATEGIES`).

    Create it before any other TensorFlow work: multi-worker and TPU
    strategies configure the runtime.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        device = "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"
        return tf.distribute.OneDeviceStrategy(device)
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        _check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise UserError(f"Unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}.")


def _check_tf_config():
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise UserError(
            "--strategy multi_worker reads the cluster from the TF_CONFIG environment "
            "variable, which is not set (see the README's multi-host section)."
        )
    try:
        tf_config = json.loads(raw)
        tf_config["cluster"], tf_config["task"]["type"], tf_config["task"]["index"]
    except (ValueError, KeyError, TypeError):
        raise UserError(
            "TF_CONFIG must be JSON with 'cluster' and 'task': {'type', 'index'}; "
            f"got {raw!r}."
        ) from None


def worker_info(strategy):
    """(is_chief, task_id, num_workers) of this process in `strategy`'s cluster.

    The chief is task 'chief', or worker 0 of a cluster without one.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True, 0, 1
    cluster = resolver.cluster_spec().as_dict()
    num_workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None:  # no TF_CONFIG: a one-worker cluster
        return True, 0, 1
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0
                                        and "chief" not in cluster)
    return is_chief, task_id or 0, max(num_workers, 1)


def is_chief(strategy):
    return worker_info(strategy)[0]


def make_average_local_state(strategy, variables):
    """A function that sets `variables` on every replica to their mean
    across replicas.

    BN moving statistics (and their EMA) are updated by each replica from
    its own batch, so replicas drift apart; averaging them at each epoch end
    (as timm's distribute_bn) makes checkpoints, evaluation and the export
    agree on every worker.
    """
    if strategy.num_replicas_in_sync == 1 or not variables:
        return lambda: None

    def replica_fn():
        context = tf.distribute.get_replica_context()
        values = [tf.identity(_tf_variable(v)) for v in variables]
        means = context.all_reduce(tf.distribute.ReduceOp.MEAN, values)
        for variable, mean in zip(variables, means):
            _tf_variable(variable).assign(mean)

    @tf.function
    def average():
        strategy.run(replica_fn)

    return average


def _tf_variable(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


def copy_per_device(strategy, targets, sources):
    """`target.assign(source)` on every device's copy, in cross-replica context."""
    def assign(target, source):
        return target.assign(tf.cast(source, target.dtype))

    for target, source in zip(targets, sources):
        strategy.extended.update(_tf_variable(target), assign, args=(_tf_variable(source),))


def distribute_split(strategy, split, batch_size, repeat):
    """`split` (an `InputSplit`) as a distributed dataset of global batches
    of `batch_size`, each worker reading its own shard; endless if `repeat`."""
    num_replicas = strategy.num_replicas_in_sync
    if batch_size % num_replicas:
        raise UserError(
            f"The global batch size {batch_size} does not split evenly over "
            f"{num_replicas} replicas; choose a multiple of {num_replicas}."
        )

    def dataset_fn(input_context):
        per_replica = input_context.get_per_replica_batch_size(batch_size)
        dataset = split.dataset_fn(per_replica, input_context)
        return dataset.repeat() if repeat else dataset

    return strategy.distribute_datasets_from_function(dataset_fn)


def sum_over_replicas(strategy, values):
    """The float64 sum of `values` over all replicas (every worker must call)."""
    @tf.function
    def all_reduce():
        def replica_fn():
            context = tf.distribute.get_replica_context()
            return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.constant(values, tf.float64))
        return strategy.run(replica_fn)

    return strategy.experimental_local_results(all_reduce())[0].numpy()


def check_workers_agree(strategy, value, what):
    """Raise unless every worker holds the same number `value`."""
    if strategy.num_replicas_in_sync == 1:
        return
    # ReduceOp has no MIN/MAX: values agree iff n * sum(v^2) == sum(v)^2.
    total, total_squares, count = sum_over_replicas(
        strategy, [float(value), float(value) ** 2, 1.0])
    if count * total_squares != total * total:
        raise UserError(
            f"Workers disagree on {what} (this worker: {value}, mean {total / count:g}): "
            "--model_dir must be storage that every worker reads and the chief writes."
        )


def wait_for_all_workers(strategy):
    """Return once every worker has called this; a no-op with one worker.

    Workers that leave while the chief still writes (an export, say) make
    the chief's runtime wait on them and report them as crashed.
    """
    if worker_info(strategy)[2] > 1:
        sum_over_replicas(strategy, [0.0])
