"""Settings as plain dataclasses: model, training, data and evaluation.

`run.py` fills them from absl flags; everything else takes them as arguments. Presets
are named configs, not code paths.
"""

import dataclasses
from dataclasses import dataclass, field

from toex_tf.inference.criteria_names import CRITERIA, validate_threshold


def resolve_exit_layers(exit_layers, num_layers: int) -> tuple[int, ...]:
    """Normalises an exit-layer spec to sorted 1-based layer numbers ending at `num_layers`.

    Args:
        exit_layers: `"all"` (every layer), `"none"` or `()` (final layer only: the
            baseline), a comma-separated string such as `"2,4,6"`, or a sequence of ints.
        num_layers: int, model depth.

    Returns:
        Sorted distinct layer numbers in `[1, num_layers]`; the final layer is always
        included, since every token must be able to leave at full depth.
    """
    if isinstance(exit_layers, str):
        spec = exit_layers.strip().lower()
        if spec == "all":
            return tuple(range(1, num_layers + 1))
        if spec in ("none", ""):
            return (num_layers,)
        try:
            exit_layers = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"exit_layers must be 'all', 'none' or comma-separated ints; got {exit_layers!r}."
            ) from None
    layers = set()
    for layer in exit_layers:
        if isinstance(layer, bool) or int(layer) != layer:
            raise ValueError(f"exit layer {layer!r} is not an integer.")
        if not 1 <= int(layer) <= num_layers:
            raise ValueError(
                f"exit layer {layer} is out of range: layers are numbered 1..{num_layers}."
            )
        layers.add(int(layer))
    layers.add(num_layers)
    return tuple(sorted(layers))


@dataclass
class GPTConfig:
    """An early-exit GPT-2-style decoder. See `toex_tf.models.EarlyExitGPT`."""

    vocab_size: int = 4096
    max_length: int = 256
    hidden_dim: int = 384
    num_layers: int = 10
    num_heads: int = 12
    intermediate_dim: int | None = None  # None: 4 * hidden_dim
    dropout: float = 0.0
    exit_layers: str | tuple = "all"
    output_embedding_mode: str = "shortlist"
    shortlist_size: int = 256
    low_rank: int = 64
    layer_dropout: float = 0.0
    capacity: float = 1.0
    gate_criterion: str = "margin"
    gate_threshold: float = 0.9
    norm_epsilon: float = 1e-5
    learned_gates: bool = False  # a LearnedExitGate on every non-final exit
    learned_gate_units: int = 0  # 0: linear probe; else the gate's hidden width

    def __post_init__(self):
        for name in ("vocab_size", "max_length", "hidden_dim", "num_layers", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}.")
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"hidden_dim={self.hidden_dim} must be divisible by num_heads={self.num_heads}."
            )
        if self.gate_criterion not in CRITERIA:
            raise ValueError(
                f"gate_criterion must be one of {CRITERIA}; got {self.gate_criterion!r}."
            )
        validate_threshold(self.gate_threshold, "gate_threshold")
        if not isinstance(self.learned_gates, bool):
            raise ValueError(f"learned_gates must be a bool; got {self.learned_gates!r}.")
        units = self.learned_gate_units
        if isinstance(units, bool) or not isinstance(units, int) or units < 0:
            raise ValueError(f"learned_gate_units must be an int >= 0; got {units!r}.")
        self.exit_layers = resolve_exit_layers(self.exit_layers, self.num_layers)
        if self.output_embedding_mode == "shortlist":
            self.shortlist_size = min(self.shortlist_size, self.vocab_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # Unit tests: 2 layers, width 16.
    "tiny": dict(
        vocab_size=64, max_length=32, hidden_dim=16, num_layers=2, num_heads=2, shortlist_size=16
    ),
    # Quickstart: trains on 2 CPU cores in minutes.
    "quickstart": dict(
        vocab_size=2048,
        max_length=128,
        hidden_dim=128,
        num_layers=6,
        num_heads=4,
        shortlist_size=128,
    ),
    "toex-small": dict(
        vocab_size=4096, max_length=256, hidden_dim=384, num_layers=10, num_heads=12
    ),
    "gpt2-small": dict(
        vocab_size=50257,
        max_length=1024,
        hidden_dim=768,
        num_layers=12,
        num_heads=12,
        shortlist_size=1024,
    ),
}


def gpt_preset(name: str, **overrides) -> GPTConfig:
    """A named `GPTConfig`, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}.")
    return GPTConfig(**{**PRESETS[name], **overrides})


@dataclass
class LlamaConfig:
    """A hierarchical (exits + FFN skip routers) Llama. See `toex_tf.models.HierarchicalLlama`.

    The architecture fields follow the Hugging Face `LlamaConfig` (`load_llama` maps
    them: `hidden_size` → `hidden_dim`, `rms_norm_eps` → `norm_epsilon`, ...). The
    defaults are TinyLlama-1.1B's, with exits at layers 4, 8, 12, 16 and 19 of 22 and a
    `SkipRouter` on every FFN at capacity 0.55.
    """

    vocab_size: int = 32000
    max_length: int = 2048
    hidden_dim: int = 2048
    num_layers: int = 22
    num_heads: int = 32
    num_kv_heads: int = 4
    head_dim: int | None = None  # None: hidden_dim // num_heads
    intermediate_dim: int = 5632
    norm_epsilon: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    exit_layers: str | tuple = (4, 8, 12, 16, 19)
    capacity: float = 0.55  # 1.0: no router
    output_embedding_mode: str = "shortlist"
    shortlist_size: int = 256
    low_rank: int = 64
    gate_units: int = 0  # 0: a linear probe per exit gate
    gate_forward_temperature: float = 0.5
    gate_backward_temperature: float = 1.0
    router_z_loss_weight: float = 1e-3
    router_entropy_weight: float = 1e-3
    router_predictor_weight: float = 1e-2
    router_hidden_dim: int = 64
    # Token-local adapters in front of the non-final exits (`ExitAdapter`): "none",
    # "linear" or "mlp" (`exit_adapter_units` wide). A frozen pretrained base needs one.
    exit_adapter: str = "none"
    exit_adapter_units: int = 1024
    # Projection kernels stored (out, in), as in HF checkpoints: 11% faster batch-1
    # decoding with TensorFlow on CPU (`toex_tf.layers.Linear`). "in_out": keras Dense.
    kernel_layout: str = "out_in"
    # One (q; k; v) projection per layer instead of three (`CausalSelfAttention`); HF's
    # q_proj/k_proj/v_proj load into its row blocks.
    fused_qkv: bool = True

    def __post_init__(self):
        for name in (
            "vocab_size",
            "max_length",
            "hidden_dim",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_dim",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}."
            )
        if self.head_dim is None:
            if self.hidden_dim % self.num_heads:
                raise ValueError(
                    f"hidden_dim={self.hidden_dim} must be divisible by num_heads="
                    f"{self.num_heads} (or give head_dim)."
                )
            self.head_dim = self.hidden_dim // self.num_heads
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim; got {self.head_dim}.")
        if not self.norm_epsilon > 0:
            raise ValueError(f"norm_epsilon must be > 0; got {self.norm_epsilon}.")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0; got {self.rope_theta}.")
        if isinstance(self.capacity, bool) or not 0.0 < float(self.capacity) <= 1.0:
            raise ValueError(f"capacity must be in (0, 1]; got {self.capacity!r}.")
        self.capacity = float(self.capacity)
        self.exit_layers = resolve_exit_layers(self.exit_layers, self.num_layers)
        if self.output_embedding_mode == "shortlist":
            self.shortlist_size = min(self.shortlist_size, self.vocab_size)
        if self.exit_adapter not in ("none", "linear", "mlp"):
            raise ValueError(
                f"exit_adapter must be 'none', 'linear' or 'mlp'; got {self.exit_adapter!r}."
            )
        units = self.exit_adapter_units
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"exit_adapter_units must be a positive int; got {units!r}.")
        if not isinstance(self.fused_qkv, bool):
            raise ValueError(f"fused_qkv must be a bool; got {self.fused_qkv!r}.")
        if self.kernel_layout not in ("in_out", "out_in"):
            raise ValueError(
                f"kernel_layout must be 'in_out' or 'out_in'; got {self.kernel_layout!r}."
            )

    def to_dict(self) -> dict:
        config = dataclasses.asdict(self)
        config["exit_layers"] = list(config["exit_layers"])
        return config


LLAMA_PRESETS = {
    # Unit tests: 2 layers, width 64, GQA 4:2.
    "llama-tiny": dict(
        vocab_size=256,
        max_length=64,
        hidden_dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_dim=128,
        exit_layers=(1,),
        shortlist_size=32,
    ),
    # The quality table: pretrains on the built-in corpus on 2 CPU cores in minutes.
    "llama-small": dict(
        vocab_size=2048,
        max_length=128,
        hidden_dim=192,
        num_layers=8,
        num_heads=6,
        num_kv_heads=2,
        intermediate_dim=512,
        exit_layers=(2, 4, 6),
        shortlist_size=128,
    ),
    # TinyLlama-1.1B (the defaults).
    "tinyllama": dict(),
}


def llama_preset(name: str, **overrides) -> LlamaConfig:
    """A named `LlamaConfig`, with field overrides."""
    if name not in LLAMA_PRESETS:
        raise ValueError(f"unknown llama preset {name!r}; expected one of {sorted(LLAMA_PRESETS)}.")
    return LlamaConfig(**{**LLAMA_PRESETS[name], **overrides})


@dataclass
class TransformerConfig:
    """An encoder-decoder Transformer with decoder exits. See `EarlyExitTransformer`.

    `max_length` and `num_layers` are the decoder's (the `AdaptiveModel` contract: the
    decode engine walks the decoder); the encoder has `max_source_length` and
    `num_encoder_layers`.
    """

    vocab_size: int = 4000  # shared by source and target (one SentencePiece model)
    max_source_length: int = 64
    max_length: int = 64
    hidden_dim: int = 512
    num_encoder_layers: int = 6
    num_layers: int = 6
    num_heads: int = 8
    intermediate_dim: int | None = None  # None: 4 * hidden_dim
    dropout: float = 0.1
    exit_layers: str | tuple = "all"
    output_embedding_mode: str = "shortlist"
    shortlist_size: int = 256
    low_rank: int = 64
    layer_dropout: float = 0.0
    gate_criterion: str = "max_prob"
    gate_threshold: float = 0.9
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = True  # one matrix embeds source, target and scores the output

    def __post_init__(self):
        for name in (
            "vocab_size",
            "max_source_length",
            "max_length",
            "hidden_dim",
            "num_encoder_layers",
            "num_layers",
            "num_heads",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}.")
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"hidden_dim={self.hidden_dim} must be divisible by num_heads={self.num_heads}."
            )
        if self.gate_criterion not in CRITERIA:
            raise ValueError(
                f"gate_criterion must be one of {CRITERIA}; got {self.gate_criterion!r}."
            )
        validate_threshold(self.gate_threshold, "gate_threshold")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be a bool; got {self.tie_embeddings!r}.")
        self.exit_layers = resolve_exit_layers(self.exit_layers, self.num_layers)
        if self.output_embedding_mode == "shortlist":
            self.shortlist_size = min(self.shortlist_size, self.vocab_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TRANSFORMER_PRESETS = {
    # Unit tests: 2+2 layers, width 16.
    "tiny": dict(
        vocab_size=64,
        max_source_length=16,
        max_length=16,
        hidden_dim=16,
        num_encoder_layers=2,
        num_layers=2,
        num_heads=2,
        dropout=0.0,
        shortlist_size=16,
    ),
    # The translation quickstart: trains on 2 CPU cores in minutes. A shallow encoder
    # (it runs once per sentence) and a deeper decoder (it runs once per token, and is
    # where exits save time).
    # 32 tokens hold 95% of the gettext pairs (the median is 9 source and 12 target
    # tokens with 4000 pieces); longer pairs would double every step's cost.
    "quickstart": dict(
        vocab_size=4000,
        max_source_length=32,
        max_length=32,
        hidden_dim=192,
        num_encoder_layers=3,
        num_layers=6,
        num_heads=4,
        dropout=0.0,
        shortlist_size=256,
    ),
    # Transformer-base (Vaswani et al.): 6+6 layers, width 512.
    "base": dict(
        vocab_size=16000,
        max_source_length=128,
        max_length=128,
        hidden_dim=512,
        num_encoder_layers=6,
        num_layers=6,
        num_heads=8,
        shortlist_size=1024,
    ),
}


def transformer_preset(name: str, **overrides) -> TransformerConfig:
    """A named `TransformerConfig`, with field overrides."""
    if name not in TRANSFORMER_PRESETS:
        raise ValueError(
            f"unknown seq2seq preset {name!r}; expected one of {sorted(TRANSFORMER_PRESETS)}."
        )
    return TransformerConfig(**{**TRANSFORMER_PRESETS[name], **overrides})


EXIT_WEIGHT_SCHEDULES = ("linear", "uniform", "quadratic")


@dataclass
class TrainConfig:
    """Joint exit-loss training with Keras `fit`."""

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    exit_loss_weights: str = "linear"  # a schedule name or comma-separated weights
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    checkpoint_every: int = 100
    strategy: str = "default"
    seed: int = 0
    jit_compile: bool = True  # XLA: 15% faster training steps on a 2-core CPU (measured)


@dataclass
class DataConfig:
    """Where text comes from and how it is tokenized."""

    dataset: str = "builtin"
    data_dir: str | None = None
    tfds_text_key: str = "text"  # the text feature of a `tfds:` dataset
    tokenizer: str = "sentencepiece"
    vocab_size: int = 2048
    validation_fraction: float = 0.1


@dataclass
class EvalConfig:
    """Exit sweep settings."""

    criteria: tuple = ("max_prob", "margin", "entropy")
    thresholds: tuple = field(default_factory=lambda: (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0))
    windows: int = 256  # held-out windows evaluated
    confidence_source: str = "cheap"  # "cheap" (LightweightOutputEmbedding) or "full"
