"""Per-token compute counts (multiply-accumulates) for savings and ideal speedup.

Counts are analytic, per generated token, and include what an early exit costs as well
as what it saves: the cheap head and gate at every exit checked, the full head once at
the exit taken, and (frozen mode) the K/V projections of the skipped layers. One cost
model serves every family: it reads the layer shapes from the model's blocks (the
`AdaptiveModel` interface), so GELU and SwiGLU FFNs, MHA and GQA all count right.
"""

from dataclasses import dataclass

import numpy as np


def _layer_parts(model, context_length: float) -> dict:
    """MACs of the parts of one layer of `model`, from its first block's shapes."""
    block = model.blocks[0].block
    hidden = model.token_embedding.hidden_dim
    heads, kv_heads, head_dim = block.num_heads, block.num_kv_heads, block.head_dim
    kv = 2 * hidden * kv_heads * head_dim
    matrices = 3 if block.activation == "swiglu" else 2  # gate, up, down / up, down
    router = 0.0
    if block.capacity < 1.0:
        width = block.router_config.get("predictor_hidden_dim", 64)
        router = hidden * width + width
    return {
        "projections": float(2 * hidden * heads * head_dim + kv),  # Q and O, plus K and V
        "attention": float(2 * context_length * heads * head_dim),  # scores, weighted sum
        "ffn": float(matrices * hidden * block.intermediate_dim),
        "router": float(router),
        "kv": float(kv),
        "norms": float(2 * hidden),
        "capacity": block.capacity,
    }


@dataclass(frozen=True)
class CostModel:
    """MACs per token of each part of an early-exit decoder.

    Attributes:
        layer_macs: one transformer layer (projections, attention over the average
            context, FFN at its capacity, router and norms).
        full_head_macs: norm + full vocabulary projection, paid once per token.
        check_macs: norm + cheap head + gate, paid at each exit checked.
        num_layers: model depth.
        kv_macs: the K and V projections of one layer (frozen mode pays them for each
            skipped layer).
    """

    layer_macs: float
    full_head_macs: float
    check_macs: float
    num_layers: int
    kv_macs: float = 0.0

    @classmethod
    def for_model(
        cls, model, context_length: float, confidence_source: str = "cheap"
    ) -> "CostModel":
        """The cost model of any `AdaptiveModel` at an average attention context length.

        With `confidence_source="full"` every check pays the full vocabulary projection
        (the cost `LightweightOutputEmbedding` exists to avoid).
        """
        parts = _layer_parts(model, context_length)
        layer = (
            parts["projections"]
            + parts["attention"]
            + parts["ffn"] * parts["capacity"]
            + parts["router"]
            + parts["norms"]
        )
        embedding = model.token_embedding
        head = embedding.cost_report()
        hidden = embedding.hidden_dim
        check_head, checked_logits = head["cheap_head_macs"], embedding.vocab_size
        if confidence_source == "full":
            check_head = head["full_head_macs"]
        elif embedding.mode == "shortlist":
            checked_logits = embedding.shortlist_size
        gate = 3 * checked_logits  # softmax (exp, sum, divide) and top-2 over the logits
        # An exit adapter runs at every check (the cheap head reads its output).
        adapter = max(
            (b.exit_adapter.macs_per_token(hidden) for b in model.blocks if b.exit_adapter),
            default=0,
        )
        return cls(
            layer_macs=float(layer),
            full_head_macs=float(head["full_head_macs"] + hidden),
            check_macs=float(check_head + hidden + gate + adapter),
            num_layers=model.num_layers,
            kv_macs=parts["kv"],
        )

    # The name earlier versions used.
    for_gpt = for_model

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


@dataclass(frozen=True)
class RoutedCost:
    """MACs per decoded token of the parts of a layer with FFN skip routing (DESIGN.md §4).

    The routed share of FFNs is measured, not fixed, so the FFN is kept apart.

    Attributes:
        projections: Q, K, V and O projections of one layer.
        attention: scores and weighted sum over the average context.
        ffn: the FFN at full capacity.
        router: the causal predictor of a `SkipRouter` (0 without routers).
        kv: the K and V projections alone (frozen mode pays them for skipped layers).
        head: the full LM head, paid once per token.
        gate: one learned exit gate check (a linear probe on the hidden state, plus the
            exit adapter it reads).
        num_layers: depth.
    """

    projections: float
    attention: float
    ffn: float
    router: float
    kv: float
    head: float
    gate: float
    num_layers: int

    @classmethod
    def for_model(cls, model, context_length: float) -> "RoutedCost":
        parts = _layer_parts(model, context_length)
        hidden = model.token_embedding.hidden_dim
        gates = [b.learned_gate for b in model.blocks if b.learned_gate is not None]
        units = getattr(gates[0], "hidden_units", 0) if gates else 0
        # The gate reads the exit adapter's output: a check pays both.
        adapter = max(
            (b.exit_adapter.macs_per_token(hidden) for b in model.blocks if b.exit_adapter),
            default=0,
        )
        return cls(
            projections=parts["projections"],
            attention=parts["attention"],
            ffn=parts["ffn"],
            router=parts["router"],
            kv=parts["kv"],
            head=float(model.vocab_size * hidden),
            gate=float(hidden * (units or 1) + adapter),
            num_layers=model.num_layers,
        )

    # The name earlier versions used.
    for_llama = for_model

    @property
    def full_depth(self) -> float:
        """Every layer, every FFN, no router, no check: the baseline."""
        return self.num_layers * (self.projections + self.attention + self.ffn) + self.head

    def cost(self, routed: float, avg_layers: float, checks: float, frozen: bool) -> float:
        """MACs per token: `avg_layers` layers whose FFN runs for a `routed` share,
        `checks` gate checks, and (frozen mode) K/V of the skipped layers."""
        layer = self.projections + self.attention + routed * self.ffn + self.router
        skipped = (self.num_layers - avg_layers) * self.kv if frozen else 0.0
        return avg_layers * layer + checks * self.gate + skipped + self.head

    def ffn_share(self) -> float:
        """The FFN's share of one layer (79% on TinyLlama)."""
        return self.ffn / (self.projections + self.attention + self.ffn)
