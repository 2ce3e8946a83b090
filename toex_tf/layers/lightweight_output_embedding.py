"""`LightweightOutputEmbedding`: a tied token embedding whose output side has a cheap head."""

import keras
import numpy as np
from keras import ops

from toex_tf.layers.layer_utils import get_initializer
from toex_tf.layers.linear import matmul_out_in

MODES = ("shortlist", "low_rank")
CALL_MODES = ("embed", "logits", "cheap_logits")


@keras.saving.register_keras_serializable(package="toex_tf")
class LightweightOutputEmbedding(keras.layers.Layer):
    """Token embedding, LM head (tied or not), and a cheap head for exit confidence.

    A confidence check with the full head costs `vocab * hidden` MACs per token: on
    TinyLlama that is 1.5 decoder layers, so checking at five exits would cost more than
    exiting saves (DESIGN.md §4). This layer owns one `(vocab, hidden)` matrix (two when
    `tied=False`) and uses it three ways:

    - `mode="embed"`: token ids → vectors (the input embedding).
    - `mode="logits"`: hidden → full logits, `hidden @ E.T`. Run it once per token,
      at the exit actually taken.
    - `mode="cheap_logits"`: hidden → cheap logits for the confidence signal only.
        - `shortlist`: logits over the `shortlist_size` most frequent tokens, read live
          from the head matrix (`hidden @ E[shortlist].T`). Set the ids from corpus
          counts with `set_shortlist`; until then they are ids `0..K-1`.
        - `low_rank`: `(hidden @ V_r) @ (U_r S_r).T`, a rank-`rank` SVD of `E`. The
          factors are non-trainable and must be refreshed with `refresh_low_rank()`
          after `E` changes (training does it before saving).

    Args:
        vocab_size: int, number of tokens.
        hidden_dim: int, model width.
        mode: str, `"shortlist"` or `"low_rank"`. Defaults to `"shortlist"`.
        shortlist_size: int, tokens in the shortlist. Defaults to `256`.
        rank: int, rank of the low-rank head. Defaults to `64`.
        embeddings_initializer: initializer for `E`. Defaults to normal(stddev=0.02).
        tied: bool. `True` (GPT-2): one matrix is both the input embedding and the LM
            head. `False` (Llama, `tie_word_embeddings=false`): a second `(vocab,
            hidden)` matrix `output_embeddings` is the LM head, and the cheap head
            reads from it. Defaults to `True`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: int token ids `(...)` for `"embed"`, else hidden states `(..., hidden)`.
        mode: str, one of `"embed"`, `"logits"`, `"cheap_logits"`. Defaults to
            `"logits"`.

    Example:
    >>> head = LightweightOutputEmbedding(vocab_size=1000, hidden_dim=16, shortlist_size=64)
    >>> vectors = head(np.array([[1, 2, 3]]), mode="embed")
    >>> cheap = head(vectors, mode="cheap_logits")  # (1, 3, 64)

    References:
        Kim et al., "ToEx: Accelerating Generation Stage of Transformer-based Language
        Models via Token-adaptive Early Exit", 2024 (lightweight output embedding).
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_dim: int,
        mode: str = "shortlist",
        shortlist_size: int = 256,
        rank: int = 64,
        embeddings_initializer="normal",
        tied: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
        for name, value in (("vocab_size", vocab_size), ("hidden_dim", hidden_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}.")
        if mode == "shortlist" and not 2 <= shortlist_size <= vocab_size:
            raise ValueError(
                f"shortlist_size must be in [2, vocab_size={vocab_size}]; got {shortlist_size}."
            )
        if mode == "low_rank" and not 1 <= rank <= min(vocab_size, hidden_dim):
            raise ValueError(
                f"rank must be in [1, min(vocab_size, hidden_dim)="
                f"{min(vocab_size, hidden_dim)}]; got {rank}."
            )
        self.vocab_size = vocab_size
        self.hidden_dim = hidden_dim
        self.mode = mode
        self.shortlist_size = shortlist_size
        self.rank = rank
        self.embeddings_initializer = get_initializer(embeddings_initializer)
        self.tied = bool(tied)

    def build(self, input_shape=None):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.vocab_size, self.hidden_dim),
            initializer=self.embeddings_initializer,
        )
        self.output_embeddings = self.embeddings
        if not self.tied:
            self.output_embeddings = self.add_weight(
                name="output_embeddings",
                shape=(self.vocab_size, self.hidden_dim),
                initializer=self.embeddings_initializer,
            )
        if self.mode == "shortlist":
            self.shortlist_ids = self.add_weight(
                name="shortlist_ids",
                shape=(self.shortlist_size,),
                dtype="int32",
                initializer=lambda shape, dtype: ops.arange(shape[0], dtype=dtype),
                trainable=False,
            )
        else:
            self.low_rank_in = self.add_weight(
                name="low_rank_in", shape=(self.hidden_dim, self.rank), trainable=False
            )
            self.low_rank_out = self.add_weight(
                name="low_rank_out", shape=(self.rank, self.vocab_size), trainable=False
            )
            self.refresh_low_rank()

    def call(self, inputs, mode="logits"):
        if mode == "embed":
            return ops.take(self.embeddings, ops.cast(inputs, "int32"), axis=0)
        if mode == "logits":
            head = ops.cast(self.output_embeddings, inputs.dtype)
            return matmul_out_in(inputs, head)
        if mode == "cheap_logits":
            return self.apply_cheap_head(inputs, self.cheap_head(inputs.dtype))
        raise ValueError(f"mode must be one of {CALL_MODES}; got {mode!r}.")

    def cheap_head(self, dtype=None) -> list:
        """The cheap head as matrices to apply in order: `[(hidden, K)]` for a shortlist
        (its rows of the head matrix, transposed), `[(hidden, r), (r, vocab)]` low-rank.

        A decode step builds them once and reuses them at every exit it checks: the
        gather and transpose then stay off the path that decides whether to go deeper.
        """
        dtype = dtype or self.compute_dtype
        if self.mode == "shortlist":
            rows = ops.take(self.output_embeddings, self.shortlist_ids, axis=0)
            return [ops.transpose(ops.cast(rows, dtype))]
        return [ops.cast(self.low_rank_in, dtype), ops.cast(self.low_rank_out, dtype)]

    @staticmethod
    def apply_cheap_head(inputs, head):
        """Cheap logits of `inputs` from the matrices of `cheap_head`."""
        for matrix in head:
            inputs = ops.matmul(inputs, matrix)
        return inputs

    def compute_output_spec(self, inputs, mode="logits"):
        if mode == "embed":
            return keras.KerasTensor(tuple(inputs.shape) + (self.hidden_dim,), self.compute_dtype)
        width = self.vocab_size
        if mode == "cheap_logits" and self.mode == "shortlist":
            width = self.shortlist_size
        return keras.KerasTensor(tuple(inputs.shape[:-1]) + (width,), inputs.dtype)

    def set_shortlist(self, token_ids) -> None:
        """Sets the shortlist, for example to the most frequent tokens of the corpus.

        Args:
            token_ids: `shortlist_size` distinct ids in `[0, vocab_size)`.
        """
        if self.mode != "shortlist":
            raise ValueError(f"set_shortlist needs mode='shortlist'; this layer is {self.mode!r}.")
        token_ids = np.asarray(token_ids)
        if token_ids.shape != (self.shortlist_size,):
            raise ValueError(
                f"token_ids must have shape ({self.shortlist_size},); got {token_ids.shape}."
            )
        if token_ids.min() < 0 or token_ids.max() >= self.vocab_size:
            raise ValueError(f"token_ids must be in [0, {self.vocab_size}).")
        if len(np.unique(token_ids)) != len(token_ids):
            raise ValueError("token_ids must be distinct.")
        self.shortlist_ids.assign(token_ids.astype("int32"))

    def set_shortlist_from_counts(self, counts) -> None:
        """Sets the shortlist to the `shortlist_size` ids with the largest `counts`."""
        counts = np.asarray(counts)
        if counts.shape != (self.vocab_size,):
            raise ValueError(f"counts must have shape ({self.vocab_size},); got {counts.shape}.")
        # A stable sort so that ties resolve to the smaller id, deterministically.
        order = np.argsort(-counts, kind="stable")
        self.set_shortlist(np.sort(order[: self.shortlist_size]))

    def refresh_low_rank(self) -> None:
        """Recomputes the low-rank head from the current output matrix (rank-r SVD)."""
        if self.mode != "low_rank":
            return
        matrix = np.asarray(ops.convert_to_numpy(self.output_embeddings), dtype="float64")
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        self.low_rank_in.assign(vt[: self.rank].T.astype("float32"))
        self.low_rank_out.assign((u[:, : self.rank] * s[: self.rank]).T.astype("float32"))

    def cost_report(self) -> dict:
        """MACs per token of the cheap head against the full head."""
        full = self.vocab_size * self.hidden_dim
        if self.mode == "shortlist":
            cheap = self.shortlist_size * self.hidden_dim
        else:
            cheap = self.hidden_dim * self.rank + self.rank * self.vocab_size
        return {
            "mode": self.mode,
            "full_head_macs": full,
            "cheap_head_macs": cheap,
            "cheap_over_full": cheap / full,
        }

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "hidden_dim": self.hidden_dim,
            "mode": self.mode,
            "shortlist_size": self.shortlist_size,
            "rank": self.rank,
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
            "tied": self.tied,
        }
