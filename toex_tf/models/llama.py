"""`HierarchicalLlama`: a Llama decoder with exit gates and FFN skip routers (Functional)."""

import keras

from toex_tf.config import LlamaConfig, llama_preset
from toex_tf.layers import (
    EarlyExitBlock,
    ExitAdapter,
    GumbelExitGate,
    LightweightOutputEmbedding,
    SkipRouter,
    TransformerBlock,
)
from toex_tf.models.base import AdaptiveModel

# What each training phase trains; the pretrained base is frozen in all but "base".
PHASES = ("base", "routers", "exits", "full", "lora", "frozen")


@keras.saving.register_keras_serializable(package="toex_tf")
class HierarchicalLlama(AdaptiveModel, keras.Model):
    """Llama with two-dimensional adaptive computation.

    - Vertical: exits at a few layers (default 4, 8, 12, 16 and 19 of 22). Each exit has
      an RMSNorm, the shared (untied) LM head of `LightweightOutputEmbedding`, and a
      `GumbelExitGate` trained with straight-through Gumbel samples; with
      `exit_adapter`, an `ExitAdapter` in front of the norm (a frozen pretrained base's
      middle layers need one before the shared head can read them).
    - Horizontal: a `SkipRouter` around every layer's SwiGLU FFN. In training, the top
      `capacity` share of the tokens of a sequence runs the FFN; at decode time the
      router's causal predictor decides, and a token that skips the FFN still writes its
      attention K/V (attention runs before the FFN).

    The blocks are RMSNorm, RoPE, grouped-query attention and SwiGLU (Hugging Face
    Llama numerics: `toex_tf.loaders.load_llama` imports checkpoints, with parity
    against `transformers`). The base weights start frozen (`set_phase`).

    Outputs (the `AdaptiveModel` contract): a dict, `"logits"` (the final layer's) and
    `"exit_logits"`, a list of logits per exit layer in ascending order, the final one
    last (a list of one without exits).

    Args:
        the fields of `toex_tf.config.LlamaConfig`.
        **kwargs: base `keras.Model` arguments (`name`, `dtype`, ...). `dtype` is the
            layers' dtype policy, for example `"bfloat16"`.

    Example:
    >>> model = HierarchicalLlama(**llama_preset("llama-tiny").to_dict())
    >>> outputs = model(np.zeros((1, 8), "int32"))  # {"logits", "exit_logits"}

    References:
        Touvron et al., "LLaMA", 2023; Zhang et al., "TinyLlama", 2024; Raposo et al.,
        "Mixture-of-Depths", 2024; Schuster et al., "CALM", 2022.
    """

    def __init__(
        self,
        vocab_size: int = 32000,
        max_length: int = 2048,
        hidden_dim: int = 2048,
        num_layers: int = 22,
        num_heads: int = 32,
        num_kv_heads: int = 4,
        head_dim: int | None = None,
        intermediate_dim: int = 5632,
        norm_epsilon: float = 1e-5,
        rope_theta: float = 10000.0,
        tie_embeddings: bool = False,
        exit_layers=(4, 8, 12, 16, 19),
        capacity: float = 0.55,
        output_embedding_mode: str = "shortlist",
        shortlist_size: int = 256,
        low_rank: int = 64,
        gate_units: int = 0,
        gate_forward_temperature: float = 0.5,
        gate_backward_temperature: float = 1.0,
        router_z_loss_weight: float = 1e-3,
        router_entropy_weight: float = 1e-3,
        router_predictor_weight: float = 1e-2,
        router_hidden_dim: int = 64,
        exit_adapter: str = "none",
        exit_adapter_units: int = 1024,
        kernel_layout: str = "out_in",
        fused_qkv: bool = True,
        **kwargs,
    ):
        config = LlamaConfig(
            vocab_size=vocab_size,
            max_length=max_length,
            hidden_dim=hidden_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_dim=intermediate_dim,
            norm_epsilon=norm_epsilon,
            rope_theta=rope_theta,
            tie_embeddings=tie_embeddings,
            exit_layers=exit_layers,
            capacity=capacity,
            output_embedding_mode=output_embedding_mode,
            shortlist_size=shortlist_size,
            low_rank=low_rank,
            gate_units=gate_units,
            gate_forward_temperature=gate_forward_temperature,
            gate_backward_temperature=gate_backward_temperature,
            router_z_loss_weight=router_z_loss_weight,
            router_entropy_weight=router_entropy_weight,
            router_predictor_weight=router_predictor_weight,
            router_hidden_dim=router_hidden_dim,
            exit_adapter=exit_adapter,
            exit_adapter_units=exit_adapter_units,
            kernel_layout=kernel_layout,
            fused_qkv=fused_qkv,
        )
        dtype = kwargs.pop("dtype", None)
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        embedding = LightweightOutputEmbedding(
            vocab_size=config.vocab_size,
            hidden_dim=config.hidden_dim,
            mode=config.output_embedding_mode,
            shortlist_size=config.shortlist_size,
            rank=config.low_rank,
            tied=config.tie_embeddings,
            dtype=dtype,
            name="token_embedding",
        )
        x = embedding(token_ids, mode="embed")
        router_config = {
            "z_loss_weight": config.router_z_loss_weight,
            "entropy_weight": config.router_entropy_weight,
            "predictor_weight": config.router_predictor_weight,
            "predictor_hidden_dim": config.router_hidden_dim,
        }
        exit_logits = []
        for layer in range(1, config.num_layers + 1):
            has_exit = layer in config.exit_layers
            gate = adapter = None
            if has_exit and layer < config.num_layers:  # the final exit is always taken
                gate = GumbelExitGate(
                    forward_temperature=config.gate_forward_temperature,
                    backward_temperature=config.gate_backward_temperature,
                    hidden_units=config.gate_units,
                    name="learned_gate",
                )
                if config.exit_adapter != "none":
                    adapter = ExitAdapter(
                        config.exit_adapter,
                        units=config.exit_adapter_units,
                        norm_epsilon=config.norm_epsilon,
                        dtype=dtype,
                        name="exit_adapter",
                    )
            block = EarlyExitBlock(
                TransformerBlock(
                    num_heads=config.num_heads,
                    head_dim=config.head_dim,
                    intermediate_dim=config.intermediate_dim,
                    num_kv_heads=config.num_kv_heads,
                    norm_type="rms_norm",
                    norm_epsilon=config.norm_epsilon,
                    activation="swiglu",
                    use_bias=False,
                    rope_theta=config.rope_theta,
                    capacity=config.capacity,
                    router_config=router_config,
                    kernel_layout=config.kernel_layout,
                    fused_qkv=config.fused_qkv,
                    dtype=dtype,
                    name="transformer",
                ),
                output_embedding=embedding if has_exit else None,
                norm_type="rms_norm",
                norm_epsilon=config.norm_epsilon,
                learned_gate=gate,
                exit_adapter=adapter,
                dtype=dtype,
                name=f"block_{layer}",
            )
            if has_exit:
                x, logits = block(x)
                exit_logits.append(logits)
            else:
                x = block(x)
        outputs = {"logits": exit_logits[-1], "exit_logits": exit_logits}
        super().__init__(inputs=token_ids, outputs=outputs, dtype=dtype, **kwargs)
        self.config = config
        self.set_phase("frozen")

    def embed_tokens(self, token_ids, start_index=0, position_ids=None):
        """Token embeddings (`AdaptiveModel`). RoPE is applied inside attention and is
        relative, so positions (and a left-padded row's shift) need nothing here."""
        return self.token_embedding(token_ids, mode="embed")

    def set_phase(self, phase: str) -> None:
        """Sets what trains (`layer.trainable`) for a training phase.

        - `"base"`: every base weight (pretraining from scratch); routers and gates are
          frozen.
        - `"routers"`: the routers' scores and causal predictors.
        - `"exits"`: the exit gates, adapters and the norms of the non-final exits;
          routers frozen.
        - `"full"`: routers, gates and non-final exit norms together.
        - `"lora"`: the LoRA updates of `enable_lora`, with the exit adapters and the
          norms of the non-final exits; gates frozen (they are fitted afterwards).
        - `"frozen"`: nothing (inference; the state after construction and loading).

        In every phase but `"base"` the pretrained base (embeddings, LM head, attention,
        FFNs, block norms, final norm) stays frozen; `"lora"` trains low-rank updates
        next to its projections, never the projections themselves.
        """
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}; got {phase!r}.")
        tuned = [p for p in self.lora_projections() if p.lora_enabled] if phase == "lora" else []
        if phase == "lora" and not tuned:
            raise ValueError("phase 'lora' needs LoRA updates: call enable_lora first.")
        base = phase == "base"
        self.token_embedding.trainable = base
        for index, block in enumerate(self.blocks, start=1):
            transformer = block.block
            for layer in (
                transformer.attention_norm,
                transformer.self_attention,
                transformer.ffn_norm,
            ):
                layer.trainable = base
            router = transformer.ffn if isinstance(transformer.ffn, SkipRouter) else None
            (router.layer if router else transformer.ffn).trainable = base
            if router is not None:
                for layer in (
                    router.router_dense,
                    router.predictor_hidden,
                    router.predictor_output,
                ):
                    layer.trainable = phase in ("routers", "full")
            exits = phase in ("exits", "full", "lora")
            if block.exit_norm is not None:
                final = index == self.num_layers
                block.exit_norm.trainable = base if final else exits
            if block.learned_gate is not None:
                block.learned_gate.trainable = phase in ("exits", "full")
            if block.exit_adapter is not None:
                block.exit_adapter.trainable = exits
        if phase == "lora":
            for projection in tuned:
                projection.trainable = True  # the LoRA kernels; the kernel stays frozen
                projection.kernel.trainable = False

    def lora_projections(self, layers=None) -> list:
        """The attention and FFN projections of the 1-based `layers` (None: all), in
        order: what `enable_lora` adapts."""
        layers = range(1, self.num_layers + 1) if layers is None else layers
        found = []
        for layer in layers:
            transformer = self.blocks[layer - 1].block
            attention = transformer.self_attention
            ffn = (
                transformer.ffn.layer
                if isinstance(transformer.ffn, SkipRouter)
                else transformer.ffn
            )
            names = (
                ("qkv_dense",)
                if attention.fused_qkv
                else ("query_dense", "key_dense", "value_dense")
            )
            found += [getattr(attention, n) for n in (*names, "output_dense")]
            found += [
                getattr(ffn, n)
                for n in ("gate_dense", "up_dense", "down_dense")
                if getattr(ffn, n, None) is not None
            ]
        return found

    def enable_lora(self, rank: int = 8, layers=None, lora_alpha: float | None = None) -> int:
        """Adds rank-`rank` LoRA updates to every attention and FFN projection of the
        1-based `layers` (None: every layer), leaving the pretrained kernels as they are.

        Returns:
            The number of projections adapted.
        """
        if self.config.kernel_layout != "out_in":
            raise ValueError(
                f"enable_lora needs kernel_layout='out_in' (Linear, which can merge its "
                f"update); this model has {self.config.kernel_layout!r}."
            )
        layers = list(range(1, self.num_layers + 1) if layers is None else layers)
        bad = [n for n in layers if isinstance(n, bool) or not 1 <= int(n) <= self.num_layers]
        if not layers or bad:
            raise ValueError(
                f"layers must be 1-based layers in [1, {self.num_layers}]; got {layers}."
            )
        projections = self.lora_projections([int(n) for n in layers])
        for projection in projections:
            projection.enable_lora(rank, lora_alpha)
        self.set_phase("frozen")
        return len(projections)

    def merge_lora(self) -> int:
        """Folds every LoRA update into its kernel (`Linear.merge_lora`): a plain model
        again, as fast as the base. Returns the number of projections merged."""
        merged = [p for p in self.lora_projections() if p.lora_enabled]
        for projection in merged:
            projection.merge_lora()
        return len(merged)

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, **self.config.to_dict()}

    @classmethod
    def from_config(cls, config):
        # Saved before `kernel_layout` existed: Keras Dense kernels; before `fused_qkv`:
        # separate query, key and value projections.
        return cls(**{"kernel_layout": "in_out", "fused_qkv": False, **config})


def build_llama(config: LlamaConfig | str, dtype=None, **overrides) -> HierarchicalLlama:
    """Builds a `HierarchicalLlama` from a `LlamaConfig` or a preset name plus overrides."""
    if isinstance(config, str):
        config = llama_preset(config, **overrides)
    elif overrides:
        config = LlamaConfig(**{**config.to_dict(), **overrides})
    return HierarchicalLlama(**config.to_dict(), dtype=dtype)
