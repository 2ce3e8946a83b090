"""SavedModel export with the early-exit decode loop inside the graph (TensorFlow only).

    from toex_tf.export import export_saved_model
    export_saved_model(model, "exported/")  # an EarlyExitGPT or a HierarchicalLlama

Signatures (the decode loops run in the graph, so TF Serving, `tf.saved_model.load` or
`saved_model_cli` use adaptive depth without toex_tf installed):

- `generate` (also `serving_default`): right-padded `token_ids` int32 `(batch, width)`,
  `lengths` int32 `(batch,)` (real tokens per row), `max_new_tokens` int32, `threshold`
  float32 in [0, 1] and `mode`, one of `EXPORT_MODES` (each a traced branch of one
  `switch_case`) -> `token_ids` and `exit_layers`, int32 `(batch, max_new_tokens)`, the
  exit layers 1-based (0 after a stop token). Greedy; the criterion and decision layers
  are fixed at export.
- `score`: `token_ids`, `lengths`, `threshold`, `mode` -> `logits` float32 `(batch,
  width, vocab)`, each position's next-token logits from the exit it took when the mode's
  decode loop reads the row (teacher-forced, `toex_tf.analysis.quality.exit_logits`),
  and `exit_layers` int32 `(batch, width)`; zeros past each row's length.
- `logits`: `token_ids` `(batch, width)` -> the final layer's logits, one forward pass.
- `generate_text` (only with `tokenizer=`): `prompt` string `(batch,)`, `max_new_tokens`,
  `threshold`, `mode` -> `text` string `(batch,)` (each row's continuation up to its
  first stop token, as it reads after the prompt), `token_ids` and `exit_layers` (as
  `generate`). Tokenization runs in the graph (`toex_tf.export.graph_text`): the byte tokenizer
  with core ops; SentencePiece with tensorflow-text's custom op, so every process that
  loads such an export needs `import tensorflow_text` first (`saved_model_cli run` and
  a plain TF process cannot load it at all).

The root object also meets TF-Hub's reusable SavedModel API: `__call__(inputs,
training=False)` (the final logits, as `logits`), `variables`, `trainable_variables` and
`regularization_losses` (empty: the models have no weight penalties). A Llama with skip
routers has only the `training=False` trace: routers train with top-k routing, which
needs a static sequence length. Bad input fails with an `InvalidArgumentError` naming
the problem (`tf.debugging` asserts that run before any layer); each input's rank is checked
first ("lengths must be a vector (rank 1), got rank 0"). Cache writes are scatters, so the
graph holds no `Xla*` op.
"""

import os
import shutil

import keras
import tensorflow as tf

from toex_tf.data.tokenizers import Tokenizer, load_tokenizer
from toex_tf.export.graph_text import GraphTokenizer, valid_utf8
from toex_tf.inference import DecoderAdapter, ExitPolicy, generate
from toex_tf.inference.teacher_forced import exit_logits

EXPORT_MODES = ("full", "unfrozen", "frozen", "lazy")
# What `export_saved_model` writes; the first is also `serving_default`.
SIGNATURES = ("generate", "score", "logits", "serving_default")
# Added by `export_saved_model(..., tokenizer=...)`.
TEXT_SIGNATURE = "generate_text"
# Where the export keeps a copy of its tokenizer (`load_tokenizer` reads it back).
TOKENIZER_SUBDIR = "assets.extra/tokenizer"


def checked(tensor, checks):
    """`tensor`, released only after every op in `checks` (asserts) has run."""
    with tf.control_dependencies(checks):
        return tf.identity(tensor)


_RANK_NAMES = ("a scalar", "a vector", "a matrix")


def _run_time_rank(tensor):
    """The rank of `tensor` as fed, which the signature's `tf.TensorSpec` need not match.

    `tf.rank` (or `tf.size(tf.shape(...))`) will not do: grappler's constant folding
    replaces it with the spec's rank. A serialize/parse round trip hides the static shape
    from the optimizer; what it copies is small (ids, lengths, scalars, prompt strings).
    """
    return tf.rank(tf.io.parse_tensor(tf.io.serialize_tensor(tensor), tensor.dtype))


def rank_checked(specs, *tensors):
    """`tensors`, one per `tf.TensorSpec` in `specs`, released once each has its spec's rank.

    A SavedModel signature called with a wrong-rank input skips the spec's shape check (TF
    falls back to its flat call), and would fail deep inside as "slice index 0 of dimension
    0 out of bounds". A signature reads its inputs only from here, so these checks run
    before any other op and fail with the input's name: "lengths must be a vector (rank 1),
    got rank 0".
    """
    checks = []
    for spec, tensor in zip(specs, tensors):
        rank = _run_time_rank(tensor)
        expected = spec.shape.rank
        message = f"{spec.name} must be {_RANK_NAMES[expected]} (rank {expected}), got rank {{}}"
        checks.append(
            tf.debugging.Assert(tf.equal(rank, expected), [tf.strings.format(message, rank)])
        )
    return [checked(tensor, checks) for tensor in tensors]


def ids_checks(token_ids, lengths, vocab_size, max_length):
    """Asserts on right-padded `token_ids` and `lengths`: shapes, lengths, the vocabulary."""
    batch, width = tf.shape(token_ids)[0], tf.shape(token_ids)[1]
    real = tf.range(width)[None, :] < lengths[:, None]
    in_vocabulary = tf.logical_and(token_ids >= 0, token_ids < vocab_size)
    return [
        tf.debugging.assert_greater(
            batch, 0, message="token_ids has no rows: give at least one prompt"
        ),
        tf.debugging.assert_greater(
            width, 0, message="token_ids is empty: give at least one prompt token"
        ),
        tf.debugging.assert_less_equal(
            width, max_length, message=f"token_ids is wider than max_length={max_length}"
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
    ]


def policy_checks(threshold, mode):
    """Asserts that `threshold` is in [0, 1] and `mode` is one of `EXPORT_MODES`."""
    modes = tf.constant(EXPORT_MODES)
    return [
        tf.debugging.assert_greater_equal(threshold, 0.0, message="threshold must be in [0, 1]"),
        tf.debugging.assert_less_equal(threshold, 1.0, message="threshold must be in [0, 1]"),
        tf.debugging.Assert(
            tf.reduce_any(tf.equal(mode, modes)),
            ["unknown mode", mode, "; expected one of", modes],
        ),
    ]


def mode_index(mode):
    """The index of the string `mode` in `EXPORT_MODES` (checked by `policy_checks`)."""
    modes = tf.constant(EXPORT_MODES)
    return tf.argmax(tf.cast(tf.equal(mode, modes), tf.int32), output_type=tf.int32)


def _generate_function(adapter: DecoderAdapter, make_policy, stop_token_ids):
    max_length, vocab_size = adapter.max_length, adapter.vocab_size
    # Buffers are sized once; `max_new_tokens` (an input) stops the loop earlier.
    capacity = max_length - 1

    def generate_signature(token_ids, lengths, max_new_tokens, threshold, mode):
        token_ids, lengths, max_new_tokens, threshold, mode = rank_checked(
            GENERATE_SIGNATURE, token_ids, lengths, max_new_tokens, threshold, mode
        )
        width = tf.shape(token_ids)[1]
        checks = ids_checks(token_ids, lengths, vocab_size, max_length)
        checks += [
            tf.debugging.assert_greater(max_new_tokens, 0, message="max_new_tokens must be > 0"),
            # Not `width + max_new_tokens <= max_length`: that sum overflows int32 for a
            # huge max_new_tokens, passes, and the cache scatter fails deep in the loop.
            tf.debugging.assert_less_equal(
                max_new_tokens,
                max_length - width,
                message=f"prompt width + max_new_tokens exceeds max_length={max_length}",
            ),
        ]
        token_ids = checked(token_ids, checks + policy_checks(threshold, mode))
        # Right padding + lengths -> the engine's left padding + mask.
        source = tf.range(width)[None, :] - (width - lengths)[:, None]
        padding_mask = source >= 0
        prompt = tf.where(
            padding_mask, tf.gather(token_ids, tf.maximum(source, 0), batch_dims=1), 0
        )

        def branch(name):
            def run():
                return generate(
                    adapter,
                    prompt,
                    capacity,
                    make_policy(name, threshold),
                    stop_token_ids=stop_token_ids,
                    padding_mask=tf.cast(padding_mask, "int32"),
                    new_token_limit=max_new_tokens,
                )

            return run

        branches = [branch(name) for name in EXPORT_MODES]
        tokens, exits = tf.switch_case(mode_index(mode), branches)
        return {
            "token_ids": tokens[:, :max_new_tokens],
            "exit_layers": exits[:, :max_new_tokens],
        }

    return generate_signature


def _score_function(adapter: DecoderAdapter, make_policy):
    max_length, vocab_size = adapter.max_length, adapter.vocab_size

    def score_signature(token_ids, lengths, threshold, mode):
        token_ids, lengths, threshold, mode = rank_checked(
            SCORE_SIGNATURE, token_ids, lengths, threshold, mode
        )
        checks = ids_checks(token_ids, lengths, vocab_size, max_length)
        token_ids = checked(token_ids, checks + policy_checks(threshold, mode))
        real = tf.range(tf.shape(token_ids)[1])[None, :] < lengths[:, None]
        # Causal: a row's padding (after its real tokens) never reaches its real positions.
        token_ids = tf.where(real, token_ids, 0)

        def branch(name):
            def run():
                return exit_logits(adapter, make_policy(name, threshold), token_ids)

            return run

        branches = [branch(name) for name in EXPORT_MODES]
        logits, exits = tf.switch_case(mode_index(mode), branches)
        return {
            "logits": tf.where(real[:, :, None], logits, 0.0),
            "exit_layers": tf.where(real, exits, 0),
        }

    return score_signature


def _generate_text_function(generate_endpoint, graph_tokenizer, stop_token_ids, max_length):
    stop_ids = tf.constant(list(stop_token_ids) or [-1], tf.int32)

    def generate_text_signature(prompt, max_new_tokens, threshold, mode):
        prompt, max_new_tokens, threshold, mode = rank_checked(
            GENERATE_TEXT_SIGNATURE, prompt, max_new_tokens, threshold, mode
        )
        prompt = checked(
            prompt,
            [
                tf.debugging.Assert(
                    tf.reduce_all(valid_utf8(prompt)), ["every prompt must be valid UTF-8"]
                ),
                tf.debugging.Assert(
                    tf.reduce_all(tf.strings.length(prompt) > 0),
                    ["every prompt must be non-empty text"],
                ),
            ],
        )
        ids = graph_tokenizer.encode(prompt)
        lengths = tf.cast(ids.row_lengths(), tf.int32)
        lengths = checked(
            lengths,
            [
                tf.debugging.assert_greater(
                    tf.size(prompt), 0, message="prompt is empty: give at least one prompt"
                ),
                tf.debugging.Assert(
                    tf.reduce_all(lengths > 0),
                    ["every prompt must encode to at least one token; token counts:", lengths],
                ),
                tf.debugging.Assert(
                    tf.reduce_all(lengths <= max_length),
                    [
                        f"every prompt must encode to at most max_length={max_length} tokens; "
                        "token counts:",
                        lengths,
                    ],
                ),
            ],
        )
        out = generate_endpoint(
            token_ids=ids.to_tensor(0),
            lengths=lengths,
            max_new_tokens=max_new_tokens,
            threshold=threshold,
            mode=mode,
        )
        tokens = out["token_ids"]
        stopped = tf.reduce_any(tf.equal(tokens[:, :, None], stop_ids), axis=-1)
        # Up to (not including) each row's first stop token.
        keep = tf.equal(tf.cumsum(tf.cast(stopped, tf.int32), axis=1), 0)
        return {
            "text": graph_tokenizer.decode(tokens, keep),
            "token_ids": tokens,
            "exit_layers": out["exit_layers"],
        }

    return generate_text_signature


def final_logits(model, token_ids, training=False):
    """The last layer's logits of a model (the `AdaptiveModel` output contract)."""
    return tf.cast(model(token_ids, training=training)["logits"], tf.float32)


def _logits_function(model, adapter):
    max_length, vocab_size = adapter.max_length, adapter.vocab_size

    def logits_signature(token_ids, training=False):
        (token_ids,) = rank_checked([TOKEN_IDS], token_ids)
        lengths = tf.fill(tf.shape(token_ids)[:1], tf.shape(token_ids)[1])
        token_ids = checked(token_ids, ids_checks(token_ids, lengths, vocab_size, max_length))
        return final_logits(model, token_ids, training=training)

    return logits_signature


TOKEN_IDS = tf.TensorSpec([None, None], tf.int32, name="token_ids")
GENERATE_SIGNATURE = [
    TOKEN_IDS,
    tf.TensorSpec([None], tf.int32, name="lengths"),
    tf.TensorSpec([], tf.int32, name="max_new_tokens"),
    tf.TensorSpec([], tf.float32, name="threshold"),
    tf.TensorSpec([], tf.string, name="mode"),
]
SCORE_SIGNATURE = [GENERATE_SIGNATURE[i] for i in (0, 1, 3, 4)]
GENERATE_TEXT_SIGNATURE = [tf.TensorSpec([None], tf.string, name="prompt")] + GENERATE_SIGNATURE[2:]


def export_saved_model(
    model,
    directory: str,
    criterion: str = "max_prob",
    decision_layers=None,
    max_pending: int = 8,
    stop_token_ids=None,
    max_length: int | None = None,
    patience: int = 2,
    threshold_decay: float | None = None,
    tokenizer: Tokenizer | str | None = None,
) -> str:
    """Writes `model` as a SavedModel that decodes and scores with early exit in-graph.

    Signatures `generate` (= `serving_default`), `score` and `logits` (+ `generate_text`
    with a tokenizer), plus TF-Hub's reusable SavedModel attributes (the module docstring
    has the details).

    Args:
        model: an `EarlyExitGPT` or a `HierarchicalLlama` (its routers decide causally).
        directory: where to write (created; an existing SavedModel there is replaced).
        criterion: the exit criterion (`toex_tf.inference.DECODE_CRITERIA`).
        decision_layers: exits where a step may decide; None: every exit.
        max_pending: lazy mode's catch-up window.
        stop_token_ids: rows stop after emitting one of these. None: the tokenizer's eos
            id with a tokenizer, else none.
        max_length: Llama only: the KV cache length (default: the config's).
        patience, threshold_decay: `ExitPolicy` options of the `patience` criterion and
            of a threshold that decays with position.
        tokenizer: None, or a `ByteTokenizer` / `SentencePieceTokenizer` (or a directory
            `load_tokenizer` reads) matching the model: adds the `generate_text`
            signature and a copy of the tokenizer under `directory/assets.extra/tokenizer`.
            SentencePiece needs tensorflow-text, at export and at load.

    Returns:
        `directory`.

    Raises:
        ValueError: a bad criterion or decision layer, or a tokenizer whose vocabulary
            is larger than the model's.
        TypeError: a tokenizer with no in-graph form (`toex_tf.export.graph_text`).
    """
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"SavedModel export needs KERAS_BACKEND=tensorflow; got {keras.backend.backend()!r}."
        )
    adapter = DecoderAdapter(model, max_length=max_length)
    graph_tokenizer = None
    if tokenizer is not None:
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        if tokenizer.vocab_size > adapter.vocab_size:
            raise ValueError(
                f"The tokenizer's vocab_size ({tokenizer.vocab_size}) exceeds the model's "
                f"({adapter.vocab_size}); export with the tokenizer the model was trained with."
            )
        graph_tokenizer = GraphTokenizer(tokenizer, vocab_size=adapter.vocab_size)
    if stop_token_ids is None:
        stop_token_ids = (tokenizer.eos_id,) if tokenizer is not None else ()

    def make_policy(mode, threshold):
        return ExitPolicy(
            mode,
            criterion,
            threshold,
            max_pending=max_pending,
            decision_layers=decision_layers,
            patience=patience,
            threshold_decay=threshold_decay,
        )

    # Fail here, not at serving time, on a bad criterion or decision layer.
    adapter.decision_layers(make_policy("frozen", 0.5))
    archive = keras.export.ExportArchive()
    archive.track(model)  # also gives the archive `variables` and `trainable_variables`
    generate_fn = _generate_function(adapter, make_policy, stop_token_ids)
    score_fn = _score_function(adapter, make_policy)
    logits_fn = _logits_function(model, adapter)
    # The first endpoint is also `serving_default`. Each is traced once, in `write_out_once`.
    generate_endpoint = archive.add_endpoint(
        "generate", generate_fn, input_signature=GENERATE_SIGNATURE
    )
    archive.add_endpoint("score", score_fn, input_signature=SCORE_SIGNATURE)
    archive.add_endpoint("logits", logits_fn, input_signature=[TOKEN_IDS])
    if graph_tokenizer is not None:
        archive.track(graph_tokenizer)  # the SentencePiece op's model resource
        # Calls the `generate` function: its decode loops are traced once, not twice.
        text_fn = _generate_text_function(
            generate_endpoint, graph_tokenizer, stop_token_ids, adapter.max_length
        )
        archive.add_endpoint(TEXT_SIGNATURE, text_fn, input_signature=GENERATE_TEXT_SIGNATURE)
    _add_reusable_api(archive, model, logits_fn)
    write_out_once(archive, directory)
    tokenizer_dir = os.path.join(directory, TOKENIZER_SUBDIR)
    if tokenizer is not None:
        # Written aside first: the tokenizer may have been loaded from this very copy.
        shutil.rmtree(tokenizer_dir + ".new", ignore_errors=True)
        tokenizer.save(tokenizer_dir + ".new")
    shutil.rmtree(tokenizer_dir, ignore_errors=True)  # an earlier export's, now stale
    if tokenizer is not None:
        os.replace(tokenizer_dir + ".new", tokenizer_dir)
    return directory


def write_out_once(archive, directory: str) -> None:
    """`archive.write_out(directory)`, with each endpoint traced once instead of twice.

    Keras's `write_out` traces every endpoint to find the variables it uses, then
    `tf.saved_model.save` traces it again: a save context is part of the trace cache key.
    Concrete functions (as signatures and as the root's endpoint attributes) are not
    retraced, which halves export time (the decode loops dominate it). Falls back to
    `write_out` if a Keras release moves the private attributes this needs.
    """
    names = getattr(archive, "_endpoint_names", None)
    track = getattr(archive, "_filter_and_track_resources", None)
    if not names or track is None:
        archive.write_out(directory, verbose=False)
        return
    track()
    root = archive._tf_trackable
    from toex_tf.progress import Progress  # noqa: PLC0415

    progress = Progress(len(names), "export tracing")
    signatures = {}
    for done, name in enumerate(names, 1):
        signatures[name] = getattr(root, name).get_concrete_function()
        progress.update(done, name)
    for name, concrete in signatures.items():
        # The object graph would trace a `tf.function` attribute again; its one trace
        # (a concrete function) is saved as is.
        setattr(root, name, concrete)
    signatures.setdefault("serving_default", signatures[names[0]])
    tf.saved_model.save(root, directory, signatures=signatures)


def _add_reusable_api(archive, model, logits_fn) -> None:
    """TF-Hub's reusable SavedModel API on the archive's root object.

    `ExportArchive` saves only signatures (tensor inputs), so the `__call__` with a
    Python `training` flag and the `regularization_losses` list go on its root trackable
    directly (`_tf_trackable`, a private attribute: the check below names it if a Keras
    release moves it).
    """
    root = getattr(archive, "_tf_trackable", None)
    if root is None:
        raise RuntimeError(
            "keras.export.ExportArchive has no `_tf_trackable` root in this Keras version; "
            "the reusable SavedModel attributes cannot be attached."
        )
    call = tf.function(logits_fn, autograph=False)
    call.get_concrete_function(TOKEN_IDS, training=False)
    if not getattr(model, "routers", None):
        # Skip routers train with top-k routing, which needs a static sequence length:
        # a routed Llama's export has no training=True trace.
        call.get_concrete_function(TOKEN_IDS, training=True)
    root.__call__ = call
    root.regularization_losses = []


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
