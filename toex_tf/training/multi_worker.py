"""Multi-worker training: who the chief is, where each worker writes, and Keras `fit`
under `tf.distribute.MultiWorkerMirroredStrategy`.

Every worker runs the same command with its own `TF_CONFIG` (TensorFlow's multi-worker
guide). The chief (the `chief` task, or worker 0 when the cluster has none) writes the
run's files into the output directory: checkpoints, TensorBoard logs, the model, results.
Every other worker writes into a temporary directory of its own, deleted when the process
ends, so two processes never write one file; all workers read checkpoints (to resume) and
the tokenizer from the chief's output directory, which must be shared storage.

Keras 3's `fit` fails under a multi-worker strategy (keras-team/keras#20585): it reduces a
distributed input batch eagerly only to learn its shapes, and reduces scalar metrics along
an axis they lack. `MultiWorkerFit` is the trainer mixin that avoids both. The module is
backend-neutral: TensorFlow is imported only when a TensorFlow strategy is in use.
"""

import atexit
import json
import os
import shutil
import tempfile

TASK_TYPES = ("chief", "worker")
_write_dirs: dict = {}


def cluster_task() -> tuple[str, int, int, bool] | None:
    """`(task_type, task_index, num_workers, has_chief)` from `TF_CONFIG`, or None
    without one.

    `num_workers` counts the chief and the workers: every process that trains.

    Raises:
        ValueError: `TF_CONFIG` is not JSON, lacks `cluster` or `task`, or names a task
            this training does not run (only `chief` and `worker` train).
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        task_type, index = task["type"], int(task["index"])
        sizes = {name: len(cluster.get(name, ())) for name in TASK_TYPES}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"TF_CONFIG {raw[:200]!r} is not a multi-worker cluster ({error!r}); expected JSON "
            'such as {"cluster": {"worker": ["host1:port", "host2:port"]}, "task": '
            '{"type": "worker", "index": 0}}.'
        ) from error
    if task_type not in TASK_TYPES:
        raise ValueError(
            f"TF_CONFIG task type {task_type!r} does not train here; expected one of "
            f"{TASK_TYPES} (parameter servers and evaluators are not supported)."
        )
    if not 0 <= index < sizes[task_type]:
        raise ValueError(
            f"TF_CONFIG task index {index} is out of range for the {sizes[task_type]} "
            f"{task_type!r} addresses of its cluster."
        )
    return task_type, index, sizes["chief"] + sizes["worker"], sizes["chief"] > 0


def is_chief() -> bool:
    """Whether this process writes the run's files: the chief, worker 0 of a cluster
    without a chief, or any process without a `TF_CONFIG` cluster."""
    task = cluster_task()
    if task is None:
        return True
    task_type, index, _, has_chief = task
    return task_type == "chief" or (not has_chief and index == 0)


def write_dir(output_dir: str) -> str:
    """Where this process writes what belongs in `output_dir`.

    The chief (and a process outside a cluster): `output_dir` itself. Another worker: a
    temporary directory of its own (one per `output_dir` and process), removed when the
    process exits.
    """
    if is_chief():
        return output_dir
    key = os.path.abspath(output_dir)
    if key not in _write_dirs:
        index = cluster_task()[1]
        path = tempfile.mkdtemp(prefix=f"toex-worker{index}-")
        _write_dirs[key] = path
        atexit.register(shutil.rmtree, path, True)
        print(f"Worker {index} writes to its temporary directory {path} (removed at exit).")
    return _write_dirs[key]


def spans_workers(strategy) -> bool:
    """Whether `strategy` spans several processes (more replicas than local devices)."""
    if strategy is None or strategy.num_replicas_in_sync == 1:
        return False
    return strategy.num_replicas_in_sync > len(strategy.extended.worker_devices)


def scale_loss_for_replicas(loss):
    """`loss / replicas` under a TensorFlow strategy with several replicas, else `loss`.

    Each replica's gradient is summed across replicas, so a replica's mean loss over its
    share of the batch must be divided by their number to train as one replica would on
    the whole batch. Keras's own `compute_loss` does this; a trainer that overrides it
    must too.
    """
    import keras  # noqa: PLC0415

    if keras.backend.backend() != "tensorflow":
        return loss
    import tensorflow as tf  # noqa: PLC0415

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss if replicas == 1 else loss / replicas


def unscale_loss_for_replicas(loss):
    """The inverse of `scale_loss_for_replicas` (for logging a replica's loss)."""
    import keras  # noqa: PLC0415

    if keras.backend.backend() != "tensorflow":
        return loss
    import tensorflow as tf  # noqa: PLC0415

    return loss * tf.distribute.get_strategy().num_replicas_in_sync


class MultiWorkerFit:
    """Mixin for a `keras.Model` trainer: `fit` under `MultiWorkerMirroredStrategy`.

    Two Keras 3 steps fail with more than one worker (keras-team/keras#20585):
    - before training, `fit` reduces a distributed input batch with an eager cross-worker
      MEAN only to learn its shapes; a local replica's batch has the same shapes;
    - after each step, it reduces every metric with `reduce("MEAN", axis=0)`, which needs
      an axis: each metric goes out as a 1-element vector, and comes back a scalar (the
      mean over replicas).
    Without a multi-worker strategy both are Keras's own behaviour.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = getattr(self, "_distribute_strategy", None)
        if iterator is None or data_batch is not None or not spans_workers(strategy):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        import tensorflow as tf  # noqa: PLC0415

        for _, _, batches in iterator:
            data_batch = tf.nest.map_structure(
                lambda value: (
                    strategy.experimental_local_results(value)[0]
                    if isinstance(value, tf.distribute.DistributedValues)
                    else value
                ),
                next(batches),
            )
            break
        return super()._maybe_symbolic_build(data_batch=data_batch)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        results = super().compute_metrics(x, y, y_pred, sample_weight)
        if not spans_workers(getattr(self, "_distribute_strategy", None)):
            return results
        from keras import ops  # noqa: PLC0415

        return {name: ops.reshape(value, (1,)) for name, value in results.items()}


def weights_digest(model) -> str:
    """SHA-256 of the model's weights (names, shapes and bytes), to compare two
    processes' models without moving them: workers that trained in step end equal."""
    import hashlib  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    digest = hashlib.sha256()
    for variable in model.weights:
        value = np.ascontiguousarray(np.asarray(variable))
        digest.update(f"{variable.path}:{value.shape}:{value.dtype}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def check_same_run(strategy, run_config: dict) -> None:
    """Refuses to train when the workers of `strategy` prepared different runs.

    Every worker prepares its data and settings itself (its own tokenizer, its own copy
    of the corpus); if one differs, the all-reduced gradients would mix two runs without
    an error. Each worker contributes a 40-bit fingerprint of `run_config` (settings and
    a hash of the training windows) to an all-reduce sum, which equals `replicas x
    fingerprint` only when every worker has the same one.

    Raises:
        ValueError: the workers' runs differ (naming this worker's fingerprint).
    """
    if not spans_workers(strategy):
        return
    import hashlib  # noqa: PLC0415

    import tensorflow as tf  # noqa: PLC0415

    text = json.dumps(run_config, sort_keys=True, default=str)
    fingerprint = int(hashlib.sha256(text.encode()).hexdigest()[:10], 16)  # exact in float64

    @tf.function
    def total():
        def replica_sum():
            value = tf.constant(float(fingerprint), tf.float64)
            return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, value)

        return strategy.run(replica_sum)

    summed = float(strategy.experimental_local_results(total())[0])
    if summed != float(fingerprint) * strategy.num_replicas_in_sync:
        raise ValueError(
            f"the workers prepared different runs (this worker's settings and data "
            f"fingerprint is {fingerprint:010x}): give every worker the same flags, the same "
            "corpus files and the same tokenizer."
        )


def share_batches(dataset, strategy):
    """`dataset` with each worker of `strategy` taking its share of every global batch
    (`AutoShardPolicy.DATA`: every worker reads the same seeded order), or unchanged
    without several workers."""
    if not spans_workers(strategy):
        return dataset
    import tensorflow as tf  # noqa: PLC0415

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)
