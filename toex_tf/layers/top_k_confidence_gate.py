"""`TopKConfidenceGate`: a per-token exit decision from a confidence signal on logits."""

import keras

from toex_tf.inference.criteria import CRITERIA, logit_confidence, passes, validate_threshold


@keras.saving.register_keras_serializable(package="toex_tf")
class TopKConfidenceGate(keras.layers.Layer):
    """Per-token confidence from logits, and the exit decision it implies.

    Every criterion is mapped to [0, 1] so one threshold scale serves all of them:

    - `max_prob`: the top-1 softmax probability.
    - `margin`: top-1 minus top-2 probability (the ToEx default). It separates
      "confident" from "torn between two tokens", which max-prob alone does not.
    - `entropy`: `1 - H(p) / log(V)`, so a uniform distribution scores 0 and a
      one-hot distribution scores 1.

    A token exits when `confidence > threshold + confidence_margin`; the inequality is
    strict so that `threshold=1.0` means "never exit" even for a saturated softmax.
    The margin is a safety buffer kept apart from the threshold, so a threshold found by
    sweeping or calibration can be made more conservative without being re-learned.

    The signal is computed in float32 whatever the layer's dtype policy: a bf16
    softmax loses the small top-1/top-2 gaps this gate thresholds on.

    Args:
        criterion: str, one of `"max_prob"`, `"margin"`, `"entropy"`. Defaults to
            `"margin"`.
        threshold: float in [0, 1]. Defaults to `0.9`.
        confidence_margin: float in [0, 1], added to the threshold at decision time.
            Defaults to `0.0`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        logits: float tensor `(..., vocab)`; may be shortlist or low-rank logits from
            `LightweightOutputEmbedding`.
        threshold: optional float or scalar tensor overriding the layer's threshold,
            so threshold sweeps reuse one layer.

    Returns:
        `(confidence, exit_decision)`: float32 `(...)` and bool `(...)`.

    Example:
    >>> gate = TopKConfidenceGate(criterion="margin", threshold=0.5)
    >>> confidence, exit_decision = gate(np.array([[4.0, 0.0, 0.0]]))

    References:
        Schuster et al., "Confident Adaptive Language Modeling" (CALM), 2022.
    """

    def __init__(
        self,
        criterion: str = "margin",
        threshold: float = 0.9,
        confidence_margin: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}; got {criterion!r}.")
        self.criterion = criterion
        self.threshold = validate_threshold(threshold)
        self.confidence_margin = validate_threshold(confidence_margin, "confidence_margin")

    def build(self, input_shape):
        vocab = input_shape[-1]
        if vocab is not None and vocab < 2:
            raise ValueError(f"TopKConfidenceGate needs at least 2 logits; got {vocab}.")

    def confidence(self, logits):
        """Float32 confidence in [0, 1] for each position of `logits`."""
        return logit_confidence(logits, self.criterion)

    def call(self, logits, threshold=None):
        if threshold is None:
            threshold = self.threshold
        elif isinstance(threshold, (int, float)):
            threshold = validate_threshold(threshold)
        confidence = self.confidence(logits)
        exit_decision = passes(confidence, threshold + self.confidence_margin)
        return confidence, exit_decision

    def compute_output_spec(self, logits, threshold=None):
        shape = logits.shape[:-1]
        return (
            keras.KerasTensor(shape, dtype="float32"),
            keras.KerasTensor(shape, dtype="bool"),
        )

    def get_config(self):
        return {
            **super().get_config(),
            "criterion": self.criterion,
            "threshold": self.threshold,
            "confidence_margin": self.confidence_margin,
        }
