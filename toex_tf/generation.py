"""`Generation`: one prompt's (or source sentence's) continuation, with its exits.

With `generate(..., trace=True)` it also says why each token left where it did: the
criterion's confidence at every decision exit and the top alternatives at the exit taken
(what the HTML report shows, `toex_tf.analysis.report`).

It also holds the checks of the arguments that `AdaptiveLM.generate` and
`AdaptiveTranslator.generate` share: each raises a `TypeError` or `ValueError` that
names the argument, the value given and what was expected.
"""

import dataclasses
import math

import numpy as np

from toex_tf.inference.policy import ExitPolicy


@dataclasses.dataclass(frozen=True)
class Generation:
    """One prompt's continuation.

    Attributes:
        prompt: the prompt text (for a translator, the source sentence).
        text: the continuation (without the prompt and the stop token).
        tokens: each generated token's text piece; they join to `text` (before a
            stop string cut it).
        token_ids: the generated ids.
        exit_layers: the 1-based layer each token left at.
        decision_layers: traced only: the layers where an exit was decided (the
            policy's non-final decision exits).
        confidences: traced only: per token, the criterion's value at each decision
            layer, None where it was not computed (a skipped segment, or the first
            token, which the prompt's full-depth pass predicts).
        alternatives: traced only: per token, `[(piece, probability), ...]`, the most
            likely tokens at the exit it took (the chosen one first under greedy).
    """

    prompt: str
    text: str
    tokens: list
    token_ids: list
    exit_layers: list
    decision_layers: tuple = ()
    confidences: list | None = None
    alternatives: list | None = None

    def annotated(self) -> str:
        """The continuation with each token's exit layer after it: `" a⟨16⟩ list⟨30⟩"`."""
        return "".join(
            f"{piece}\u27e8{layer}\u27e9" for piece, layer in zip(self.tokens, self.exit_layers)
        )

    def to_dict(self) -> dict:
        """`{"prompt", "text", "tokens": [{"token", "id", "exit_layer"}]}` (the CLI's JSON);
        traced, each token also has `confidences` and `alternatives`, and the dict
        `decision_layers`."""
        tokens = [
            {"token": piece, "id": token, "exit_layer": layer}
            for piece, token, layer in zip(self.tokens, self.token_ids, self.exit_layers)
        ]
        result = {"prompt": self.prompt, "text": self.text, "tokens": tokens}
        if self.confidences is not None:
            result["decision_layers"] = list(self.decision_layers)
            for entry, confidence, alternatives in zip(tokens, self.confidences, self.alternatives):
                entry["confidences"] = confidence
                entry["alternatives"] = [[piece, prob] for piece, prob in alternatives]
        return result


def token_piece(tokenizer, token_id: int) -> str:
    """How one id reads on its own: the SentencePiece piece (`"▁the"`), else its text."""
    if tokenizer is None:
        return str(token_id)
    to_piece = getattr(tokenizer, "id_to_piece", None)
    return to_piece(int(token_id)) if to_piece else tokenizer.decode([int(token_id)])


def traced_decision_layers(adapter, policy) -> tuple:
    """The layers a traced generation under `policy` decided at: the non-final decision
    exits, none at full depth."""
    return () if policy.mode == "full" else tuple(adapter.decision_layers(policy)[:-1])


def with_trace(generation: Generation, trace: dict, row: int, tokenizer, decision_layers):
    """`generation` plus row `row` of a decode trace (`generate(..., trace=k)`), cut to
    the generation's tokens."""
    count = len(generation.token_ids)
    confidences = [
        [None if math.isnan(value) else round(float(value), 6) for value in column]
        for column in trace["confidences"][row][:count].tolist()
    ]
    alternatives = [
        [(token_piece(tokenizer, token), round(float(prob), 6)) for token, prob in zip(ids, probs)]
        for ids, probs in zip(
            trace["top_ids"][row][:count].tolist(), trace["top_probs"][row][:count].tolist()
        )
    ]
    return dataclasses.replace(
        generation,
        decision_layers=tuple(int(layer) for layer in decision_layers),
        confidences=confidences,
        alternatives=alternatives,
    )


def check_trace(trace, mode) -> None:
    """`trace` must be a bool, and speculative decoding has no exit decisions to trace."""
    if not isinstance(trace, bool):
        raise TypeError(f"trace must be a bool; got {trace!r}.")
    if trace and mode == "speculative":
        raise ValueError(
            "trace=True records exit decisions; speculative decoding makes none (its "
            "tokens are full depth's): use mode 'full', 'unfrozen', 'frozen' or 'lazy'."
        )


def check_policy(policy) -> None:
    """`policy` must be None or an `ExitPolicy` (a mode's name goes to `generate`)."""
    if policy is not None and not isinstance(policy, ExitPolicy):
        hint = (
            f" (for a mode alone: policy=ExitPolicy({policy!r}))" if isinstance(policy, str) else ""
        )
        raise TypeError(f"policy must be an ExitPolicy or None; got {policy!r}{hint}.")


def is_int(value) -> bool:
    """Whether `value` is a Python or NumPy integer (a bool is not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """Whether `value` is a Python or NumPy real number (a bool is not)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def check_bools(**values) -> None:
    """Raises a `TypeError` naming the first of `values` that is not a bool."""
    for name, value in values.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool; got {value!r}.")


def check_sampling(temperature, top_k, top_p, seed) -> None:
    """Raises when a sampling argument has the wrong type or range (NaN included)."""
    if not is_real(temperature):
        raise TypeError(f"temperature must be a number > 0; got {temperature!r}.")
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}.")
    if not is_int(top_k):
        raise TypeError(f"top_k must be an int >= 0 (0: every token); got {top_k!r}.")
    if top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: every token); got {top_k!r}.")
    if not is_real(top_p):
        raise TypeError(f"top_p must be a number in (0, 1]; got {top_p!r}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1]; got {top_p!r}.")
    if not is_int(seed):
        raise TypeError(f"seed must be an int; got {seed!r}.")
    if not -(2**31) <= seed < 2**31:
        raise ValueError(f"seed must be an int32, in [-2**31, 2**31); got {seed!r}.")


def check_text(name: str, text: str) -> str:
    """`text`, or a `ValueError` naming `name` when it cannot be UTF-8 encoded.

    Python decodes bytes that are not UTF-8 (command-line arguments, file names, files
    opened with `errors="surrogateescape"`) to lone surrogates, which no tokenizer can
    encode: they are refused here, by name, instead of as a `UnicodeEncodeError`.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{name} is not valid UTF-8: it holds {text[error.start : error.end]!r} at "
            f"position {error.start}, a lone surrogate (bytes that are not UTF-8, decoded "
            f"with errors='surrogateescape'); decode such bytes with errors='replace'."
        ) from None
    return text


def token_id_list(name: str, ids) -> list[int]:
    """`ids` (a list, tuple or 1-D array of int token ids) as a list of ints, or a
    `TypeError` naming `name` (and the position of a bad id)."""
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()
    if isinstance(ids, (bytes, bytearray)):
        raise TypeError(
            f"{name} is bytes ({bytes(ids[:16])!r}); give text as a str: decode the bytes "
            f"first, e.g. data.decode('utf-8', errors='replace')."
        )
    if not isinstance(ids, (list, tuple)):
        hint = " (a flat list of ids is one prompt: wrap it in a list)" if is_int(ids) else ""
        raise TypeError(f"{name} must be a string or a list of int token ids; got {ids!r}{hint}.")
    for position, token in enumerate(ids):
        if not is_int(token):
            raise TypeError(f"{name}[{position}] must be an int token id; got {token!r}.")
    return [int(token) for token in ids]
