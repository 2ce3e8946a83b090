"""The exit criteria's names and the threshold check, without Keras.

`toex_tf.config` and the CLI's flags read these, so `python -m toex_tf.run` rejects a bad
flag before TensorFlow is imported (a second, not five). `criteria` re-exports them.
"""

import math

import numpy as np

# Criteria read from logits alone (`logit_confidence`, `TopKConfidenceGate`).
CRITERIA = ("max_prob", "margin", "entropy")
DECODE_CRITERIA = CRITERIA + ("kl", "saturation", "patience", "learned")
# Criteria that read the cheap (shortlist or low-rank) head; the others read hidden states.
CHEAP_HEAD_CRITERIA = CRITERIA + ("kl", "patience")


def validate_threshold(threshold: float, name: str = "threshold") -> float:
    """Returns `threshold` as a float, or raises when it is not a number in [0, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)):
        raise TypeError(f"{name} must be a float in [0, 1]; got {threshold!r}.")
    if math.isnan(threshold) or not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1]; got {threshold}.")
    return float(threshold)
