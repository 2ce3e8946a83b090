"""Per-token compute counts (multiply-accumulates) for savings and ideal speedup.

Counts are analytic, per generated token, and include what an early exit costs as well
as what it saves: the cheap head and gate at every exit checked, and the full head once
at the exit taken.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CostModel:
    """MACs per token of each part of an early-exit decoder.

    Attributes:
        layer_macs: one transformer layer (projections, attention over the average
            context, FFN at its capacity).
        full_head_macs: norm + full vocabulary projection, paid once per token.
        check_macs: norm + cheap head + gate, paid at each exit checked.
        num_layers: model depth.
    """

    layer_macs: float
    full_head_macs: float
    check_macs: float
    num_layers: int

    @classmethod
    def for_gpt(cls, model, context_length: float, confidence_source: str = "cheap") -> "CostModel":
        """The cost model of an `EarlyExitGPT` at an average attention context length.

        With `confidence_source="full"` every check pays the full vocabulary projection
        (the cost `LightweightOutputEmbedding` exists to avoid).
        """
        config = model.gpt_config
        d = config.hidden_dim
        ffn = config.intermediate_dim or 4 * d
        attention = 4 * d * d + 2 * context_length * d
        layer = attention + 2 * d * ffn * config.capacity + 2 * d  # + norms
        head = model.token_embedding.cost_report()
        check_head = head["cheap_head_macs"]
        checked_logits = config.vocab_size
        if confidence_source == "full":
            check_head = head["full_head_macs"]
        elif config.output_embedding_mode == "shortlist":
            checked_logits = config.shortlist_size
        gate = 3 * checked_logits  # softmax (exp, sum, divide) and top-2 over the logits
        return cls(
            layer_macs=float(layer),
            full_head_macs=float(head["full_head_macs"] + d),
            check_macs=float(check_head + d + gate),
            num_layers=config.num_layers,
        )

    @property
    def full_depth_macs(self) -> float:
        """A token that runs every layer and never checks an exit (the baseline)."""
        return self.num_layers * self.layer_macs + self.full_head_macs

    def exit_costs(self, exit_layers) -> np.ndarray:
        """MACs of a token leaving at each exit (exits checked up to and including it).

        The final layer needs no check: every token that reaches it leaves there.
        """
        costs = []
        for index, layer in enumerate(exit_layers):
            checks = index + 1 if layer < self.num_layers else index
            costs.append(layer * self.layer_macs + checks * self.check_macs + self.full_head_macs)
        return np.asarray(costs, dtype="float64")
