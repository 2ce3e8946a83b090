"""`ExitPolicy`: how a decode step decides to exit (mode, criterion, threshold, ...).

Modes (DESIGN.md §3):
    full      every layer; the prediction comes from the final layer.
    unfrozen  every layer (exact caches); the prediction comes from the first exit that
              passes. The quality reference for the cheaper modes.
    frozen    when every row of the batch has exited, the remaining segments are skipped;
              their K/V at this position are projected from the exit hidden state (CALM
              state propagation). Not exact.
    lazy      skipped layers are deferred: the next token that goes deep first computes
              them for every pending position in one windowed pass (FREE, EE-LLM), so the
              caches stay exact and the tokens are exactly `unfrozen`'s.
`speculative` (LayerSkip) is its own loop: `toex_tf.inference.speculative`.

The criteria are described in `toex_tf.inference.criteria`.
"""

from dataclasses import dataclass

import numpy as np
from keras import ops

from toex_tf.inference.criteria import DECODE_CRITERIA, validate_threshold

DECODE_MODES = ("full", "unfrozen", "frozen", "lazy")


@dataclass(frozen=True)
class ExitPolicy:
    """How a decode step decides to exit.

    Attributes:
        mode: one of `DECODE_MODES`.
        criterion: one of `DECODE_CRITERIA` (see the module docstring).
        threshold: float in [0, 1]; a row exits when its confidence is above it
            (1.0 never exits). A scalar float32 tensor is accepted too (a serving
            graph's input, `toex_tf.export`); it is not range-checked here.
        max_pending: lazy mode: the catch-up window. At most `max_pending - 1` tokens
            wait for a layer; then the next token goes deep and computes them all.
        decision_layers: exits (1-based layers) where the step may decide; None: every
            exit of the model. Each decision is one data-dependent branch, which costs
            about a small layer on a GPU (DESIGN.md §4), so decide at a few exits there.
        patience: `patience` criterion: agreeing exits needed (int >= 1).
        threshold_decay: None (a constant threshold) or a float >= 0, the CALM decay
            temperature of a threshold that falls with position.
    """

    mode: str = "full"
    criterion: str = "max_prob"
    threshold: float = 1.0
    max_pending: int = 8
    decision_layers: tuple | None = None
    patience: int = 2
    threshold_decay: float | None = None

    def __post_init__(self):
        if self.mode not in DECODE_MODES:
            raise ValueError(f"mode must be one of {DECODE_MODES}; got {self.mode!r}.")
        if self.criterion not in DECODE_CRITERIA:
            raise ValueError(f"criterion must be one of {DECODE_CRITERIA}; got {self.criterion!r}.")
        if not is_scalar_tensor(self.threshold):
            validate_threshold(self.threshold)
        if isinstance(self.patience, bool) or not isinstance(self.patience, int):
            raise ValueError(f"patience must be an int >= 1; got {self.patience!r}.")
        if self.patience < 1:
            raise ValueError(f"patience must be an int >= 1; got {self.patience!r}.")
        decay = self.threshold_decay
        if decay is not None and (
            isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay >= 0
        ):
            raise ValueError(f"threshold_decay must be None or a float >= 0; got {decay!r}.")
        if (
            isinstance(self.max_pending, bool)
            or not isinstance(self.max_pending, int)
            or (self.max_pending < 2)
        ):
            raise ValueError(f"max_pending must be an int >= 2; got {self.max_pending!r}.")

    def threshold_at(self, positions, max_length: int):
        """The threshold at `positions` (any int shape): constant, or decaying (CALM)."""
        if self.threshold_decay is None:
            return self.threshold
        dynamic = is_scalar_tensor(self.threshold)
        if not dynamic and self.threshold >= 1.0:
            return self.threshold
        fraction = ops.cast(positions, "float32") / float(max_length)
        decayed = 0.9 * self.threshold + 0.1 * ops.exp(-float(self.threshold_decay) * fraction)
        decayed = ops.clip(decayed, 0.0, 1.0)
        if dynamic:  # 1.0 still never exits
            return ops.where(self.threshold >= 1.0, self.threshold, decayed)
        return decayed


def is_scalar_tensor(value) -> bool:
    """A scalar tensor (not a Python or numpy number): a runtime threshold."""
    if isinstance(value, (bool, int, float, np.number)):
        return False
    shape = getattr(value, "shape", None)
    return shape is not None and tuple(shape) == () and "float" in str(value.dtype)
