"""`LearnedExitGate`: a learned exit confidence from the hidden state, no vocabulary head."""

import keras
from keras import ops

from toex_tf.inference.criteria import passes


@keras.saving.register_keras_serializable(package="toex_tf")
class LearnedExitGate(keras.layers.Layer):
    """A small classifier on an exit's normed hidden state that predicts consistency.

    The gate outputs `sigmoid(logit)`: the predicted probability that this exit's top-1
    token equals the final layer's top-1 (CALM's "learned classifier" criterion, with
    its consistency target). It reads the hidden state only, so a confidence check costs
    `hidden` MACs for the linear probe instead of a vocabulary projection (about 1.5
    TinyLlama layers for the full head, DESIGN.md §4).

    The output kernel starts at zero, so an untrained gate says 0.5 everywhere and
    never passes a threshold above 0.5 by accident. Train the gates with
    `toex_tf.training.gate_training.fit_learned_gates` (binary cross-entropy on
    `logit`, with the rest of the model frozen).

    The gate reads a gradient-stopped input: it observes the hidden state, it must not
    shape it. Its weights and its whole computation are float32 whatever the dtype
    policy (they are tiny: `hidden + 1` weights for the probe): the confidence is
    compared against thresholds near 1, where bf16 rounding of the logit would move
    decisions.

    Args:
        hidden_units: int >= 0. `0` is a linear probe; otherwise one hidden layer of
            that width with GELU. Defaults to `0`.
        kernel_initializer: initializer of the output (logit) kernel. Defaults to
            `"zeros"`.
        hidden_kernel_initializer: initializer of the hidden-layer kernel (only used
            with `hidden_units > 0`). Defaults to `"glorot_uniform"`.
        bias_initializer: initializer of both biases. Defaults to `"zeros"`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        hidden: float tensor `(..., hidden)`, the exit's normed hidden state (the
            `exit_norm` output of `EarlyExitBlock`).

    Returns:
        float32 `(...)` confidence in [0, 1].

    Example:
    >>> gate = LearnedExitGate(hidden_units=32)
    >>> confidence = gate(np.random.rand(2, 8, 16).astype("float32"))  # (2, 8)
    >>> exit_decision = passes(confidence, 0.9)  # toex_tf.inference.criteria

    References:
        Schuster et al., "Confident Adaptive Language Modeling" (CALM), 2022.
    """

    def __init__(
        self,
        hidden_units: int = 0,
        kernel_initializer="zeros",
        hidden_kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(hidden_units, bool) or not isinstance(hidden_units, int) or hidden_units < 0:
            raise ValueError(f"hidden_units must be an int >= 0; got {hidden_units!r}.")
        self.hidden_units = hidden_units
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.hidden_kernel_initializer = keras.initializers.get(hidden_kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        if hidden_dim is None:
            raise ValueError("LearnedExitGate needs a known last (hidden) dimension.")
        self.hidden_kernel = self.hidden_bias = None
        if self.hidden_units:
            self.hidden_kernel = self._float32_weight(
                (hidden_dim, self.hidden_units), self.hidden_kernel_initializer, "hidden_kernel"
            )
            self.hidden_bias = self._float32_weight(
                (self.hidden_units,), self.bias_initializer, "hidden_bias"
            )
            hidden_dim = self.hidden_units
        self.kernel = self._float32_weight((hidden_dim, 1), self.kernel_initializer, "kernel")
        self.bias = self._float32_weight((1,), self.bias_initializer, "bias")

    def _float32_weight(self, shape, initializer, name):
        # Not autocast: under a mixed policy the gate still reads its float32 weights.
        return self.add_weight(
            shape, initializer=initializer, dtype="float32", autocast=False, name=name
        )

    @property
    def input_dtype(self):
        """Float32: inputs are cast up, never down to the compute dtype."""
        return "float32"

    def logit(self, hidden):
        """Float32 logit `(...)` of the confidence; the input of the BCE training loss."""
        features = ops.cast(ops.stop_gradient(hidden), "float32")
        if self.hidden_units:
            features = ops.gelu(ops.matmul(features, self.hidden_kernel) + self.hidden_bias)
        return ops.squeeze(ops.matmul(features, self.kernel) + self.bias, axis=-1)

    def call(self, hidden):
        return ops.sigmoid(self.logit(hidden))

    def compute_output_spec(self, hidden):
        return keras.KerasTensor(hidden.shape[:-1], dtype="float32")

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_units": self.hidden_units,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "hidden_kernel_initializer": keras.initializers.serialize(
                self.hidden_kernel_initializer
            ),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }


@keras.saving.register_keras_serializable(package="toex_tf")
class GumbelExitGate(LearnedExitGate):
    """A `LearnedExitGate` trained end to end with a straight-through Gumbel sample.

    At inference it is a `LearnedExitGate`: `call` returns `sigmoid(logit)`, which the
    decode engine's `learned` criterion compares with the threshold. In training,
    `sample` draws a hard exit decision per token from the binary Gumbel-softmax
    (logistic noise) and lets gradients through a softer relaxation:

        forward:  `sigmoid((logit + g) / forward_temperature)`, rounded to 0/1 when
                  `hard` (the default)
        backward: the gradient of `sigmoid((logit + g) / backward_temperature)`

    Decoupling the two temperatures (a sharp or hard forward pass, a smooth backward
    pass) keeps training decisions like the discrete ones used at inference while the
    gradient stays informative (straight-through Gumbel-softmax).

    Args:
        forward_temperature: float > 0, temperature of the forward value when
            `sample(..., hard=False)`; a hard sample is its rounding, which does not
            depend on it. Defaults to `0.5`.
        backward_temperature: float > 0, temperature of the relaxation whose gradient
            the hard sample carries. Defaults to `1.0`.
        **kwargs: `LearnedExitGate` arguments.

    Example:
    >>> gate = GumbelExitGate(backward_temperature=2.0)
    >>> hard = gate.sample(np.random.rand(2, 8, 16).astype("float32"), seed=0)

    References:
        Jang et al., "Categorical Reparameterization with Gumbel-Softmax", 2017.
    """

    def __init__(
        self, forward_temperature: float = 0.5, backward_temperature: float = 1.0, **kwargs
    ):
        super().__init__(**kwargs)
        for name, value in (
            ("forward_temperature", forward_temperature),
            ("backward_temperature", backward_temperature),
        ):
            if isinstance(value, bool) or not float(value) > 0:
                raise ValueError(f"{name} must be > 0; got {value!r}.")
        self.forward_temperature = float(forward_temperature)
        self.backward_temperature = float(backward_temperature)

    def sample(self, hidden, seed=None, noise=True, hard=True):
        """Straight-through exit decisions, float32 `(...)`: exactly 0 or 1 when `hard`.

        Args:
            hidden: the exit's normed hidden state `(..., hidden)`.
            seed: a `keras.random.SeedGenerator`, int or None: the logistic noise.
            noise: bool; False uses the plain logit (deterministic).
            hard: bool; False returns the forward-temperature relaxation as the value.
        """
        logit = self.logit(hidden)
        if noise:
            uniform = keras.random.uniform(ops.shape(logit), 1e-6, 1.0 - 1e-6, seed=seed)
            logit = logit + ops.log(uniform) - ops.log(1.0 - uniform)
        soft_backward = ops.sigmoid(logit / self.backward_temperature)
        if hard:
            # The exit decision at 0.5 (sigmoid(logit) > 0.5 is logit > 0).
            forward = ops.cast(passes(ops.sigmoid(logit), 0.5), "float32")
        else:
            forward = ops.sigmoid(logit / self.forward_temperature)
        # `soft - stop_gradient(soft)` is exactly zero in value, so hard samples stay 0/1.
        return ops.stop_gradient(forward) + (soft_backward - ops.stop_gradient(soft_backward))

    def get_config(self):
        return {
            **super().get_config(),
            "forward_temperature": self.forward_temperature,
            "backward_temperature": self.backward_temperature,
        }
