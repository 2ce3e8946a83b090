"""SavedModel export with the early-exit decode loop inside the graph (TensorFlow only).

    from toex_tf.export import export_saved_model
    export_saved_model(model, "exported/")  # an EarlyExitGPT or a HierarchicalLlama

The export holds one `generate` signature (also `serving_default`): the prefill, the
`while_loop` over new tokens and the exit decisions run in the graph, so TF Serving,
`tf.saved_model.load` or `saved_model_cli` generate with adaptive depth without
toex_tf installed. Inputs (right-padded prompts):

- `token_ids` int32 `(batch, width)`, `lengths` int32 `(batch,)` (real tokens per row);
- `max_new_tokens` int32 scalar, `threshold` float32 scalar in [0, 1];
- `mode` string scalar: one of `EXPORT_MODES` (each mode is a traced branch of one
  `switch_case`).

Outputs: `token_ids` and `exit_layers`, int32 `(batch, max_new_tokens)`, the exit layers
1-based (0 after a stop token). Decoding is greedy, the criterion and decision layers are
fixed at export. Bad input fails with an `InvalidArgumentError` naming the problem
(`tf.debugging` asserts that run before the loop). Cache writes are scatters, so the
graph holds no `Xla*` op.
"""

import keras
import numpy as np
import tensorflow as tf

from toex_tf.inference.decoding import DecoderAdapter, ExitPolicy, generate

EXPORT_MODES = ("full", "unfrozen", "frozen", "lazy")


def _generate_function(
    adapter: DecoderAdapter,
    criterion: str,
    decision_layers,
    max_pending: int,
    stop_token_ids,
    policy_options: dict,
):
    max_length, vocab_size = adapter.max_length, adapter.vocab_size
    modes = tf.constant(EXPORT_MODES)
    # Buffers are sized once; `max_new_tokens` (an input) stops the loop earlier.
    capacity = max_length - 1

    def generate_signature(token_ids, lengths, max_new_tokens, threshold, mode):
        batch, width = tf.shape(token_ids)[0], tf.shape(token_ids)[1]
        real = tf.range(width)[None, :] < lengths[:, None]
        in_vocabulary = tf.logical_and(token_ids >= 0, token_ids < vocab_size)
        checks = [
            tf.debugging.assert_greater(
                width, 0, message="token_ids is empty: give at least one prompt token"
            ),
            tf.debugging.assert_equal(
                tf.shape(lengths)[0], batch, message="lengths needs one entry per prompt row"
            ),
            tf.debugging.assert_greater_equal(
                lengths, 1, message="every prompt needs at least one token (lengths >= 1)"
            ),
            tf.debugging.assert_less_equal(
                lengths, width, message="lengths must not exceed the width of token_ids"
            ),
            tf.debugging.Assert(
                tf.reduce_all(tf.logical_or(in_vocabulary, tf.logical_not(real))),
                [f"token ids must be in [0, {vocab_size}) (the vocabulary); got", token_ids],
            ),
            tf.debugging.assert_greater(max_new_tokens, 0, message="max_new_tokens must be > 0"),
            tf.debugging.assert_less_equal(
                width + max_new_tokens,
                max_length,
                message=f"prompt width + max_new_tokens exceeds max_length={max_length}",
            ),
            tf.debugging.assert_greater_equal(
                threshold, 0.0, message="threshold must be in [0, 1]"
            ),
            tf.debugging.assert_less_equal(threshold, 1.0, message="threshold must be in [0, 1]"),
            tf.debugging.Assert(
                tf.reduce_any(tf.equal(mode, modes)),
                ["unknown mode", mode, "; expected one of", modes],
            ),
        ]
        with tf.control_dependencies(checks):
            token_ids = tf.identity(token_ids)
        # Right padding + lengths -> the engine's left padding + mask.
        source = tf.range(width)[None, :] - (width - lengths)[:, None]
        padding_mask = source >= 0
        prompt = tf.where(
            padding_mask, tf.gather(token_ids, tf.maximum(source, 0), batch_dims=1), 0
        )

        def branch(name):
            def run():
                policy = ExitPolicy(
                    name,
                    criterion,
                    threshold,
                    max_pending=max_pending,
                    decision_layers=decision_layers,
                    **policy_options,
                )
                return generate(
                    adapter,
                    prompt,
                    capacity,
                    policy,
                    stop_token_ids=stop_token_ids,
                    padding_mask=tf.cast(padding_mask, "int32"),
                    new_token_limit=max_new_tokens,
                )

            return run

        index = tf.argmax(tf.cast(tf.equal(mode, modes), tf.int32), output_type=tf.int32)
        tokens, exits = tf.switch_case(index, [branch(name) for name in EXPORT_MODES])
        return {
            "token_ids": tokens[:, :max_new_tokens],
            "exit_layers": exits[:, :max_new_tokens],
        }

    return generate_signature


GENERATE_SIGNATURE = [
    tf.TensorSpec([None, None], tf.int32, name="token_ids"),
    tf.TensorSpec([None], tf.int32, name="lengths"),
    tf.TensorSpec([], tf.int32, name="max_new_tokens"),
    tf.TensorSpec([], tf.float32, name="threshold"),
    tf.TensorSpec([], tf.string, name="mode"),
]


def export_saved_model(
    model,
    directory: str,
    criterion: str = "max_prob",
    decision_layers=None,
    max_pending: int = 8,
    stop_token_ids=(),
    max_length: int | None = None,
    patience: int = 2,
    threshold_decay: float | None = None,
) -> str:
    """Writes `model` as a SavedModel whose `generate` signature decodes with early exit.

    Args:
        model: an `EarlyExitGPT` or a `HierarchicalLlama` (its routers decide causally).
        directory: where to write (created; an existing SavedModel there is replaced).
        criterion: the exit criterion (`toex_tf.inference.DECODE_CRITERIA`).
        decision_layers: exits where a step may decide; None: every exit.
        max_pending: lazy mode's catch-up window.
        stop_token_ids: rows stop after emitting one of these.
        max_length: Llama only: the KV cache length (default: the config's).
        patience, threshold_decay: `ExitPolicy` options of the `patience` criterion and
            of a threshold that decays with position.

    Returns:
        `directory`.
    """
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"SavedModel export needs KERAS_BACKEND=tensorflow; got {keras.backend.backend()!r}."
        )
    kwargs = {"max_length": max_length} if hasattr(model, "llama_config") else {}
    adapter = DecoderAdapter.from_model(model, **kwargs)
    # Fail here, not at serving time, on a bad criterion or decision layer.
    options = {"patience": patience, "threshold_decay": threshold_decay}
    adapter.decision_layers(
        ExitPolicy("frozen", criterion, 0.5, max_pending, decision_layers, **options)
    )
    archive = keras.export.ExportArchive()
    archive.track(model)
    endpoint = archive.add_endpoint(
        "generate",
        _generate_function(
            adapter, criterion, decision_layers, max_pending, stop_token_ids, options
        ),
        input_signature=GENERATE_SIGNATURE,
    )
    endpoint.get_concrete_function()  # trace now: errors surface here, not in write_out
    archive.write_out(directory, verbose=False)
    return directory


def xla_ops(directory: str) -> list[str]:
    """Names of `Xla*` ops anywhere in `directory/saved_model.pb`, loop bodies included."""
    from tensorflow.core.protobuf import saved_model_pb2  # noqa: PLC0415

    saved = saved_model_pb2.SavedModel()
    with open(f"{directory}/saved_model.pb", "rb") as f:
        saved.ParseFromString(f.read())
    found = set()
    for graph in saved.meta_graphs:
        nodes = list(graph.graph_def.node)
        for function in graph.graph_def.library.function:
            nodes += list(function.node_def)
        found.update(node.op for node in nodes if node.op.startswith("Xla"))
    return sorted(found)


def generate_with_export(loaded, token_ids, lengths, max_new_tokens, threshold, mode):
    """Calls a loaded export's `generate` signature with numpy inputs; numpy outputs."""
    out = loaded.signatures["generate"](
        token_ids=tf.constant(np.asarray(token_ids, "int32")),
        lengths=tf.constant(np.asarray(lengths, "int32")),
        max_new_tokens=tf.constant(int(max_new_tokens), tf.int32),
        threshold=tf.constant(float(threshold), tf.float32),
        mode=tf.constant(mode),
    )
    return np.asarray(out["token_ids"]), np.asarray(out["exit_layers"])
