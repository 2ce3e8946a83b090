"""`Generation`: one prompt's (or source sentence's) continuation, with its exits.

With `generate(..., trace=True)` it also says why each token left where it did: the
criterion's confidence at every decision exit and the top alternatives at the exit taken
(what the HTML report shows, `toex_tf.analysis.report`).
"""

import dataclasses
import math


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
