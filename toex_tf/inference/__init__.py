"""Inference: the KV-cached early-exit decode engine, in `keras.ops` (TF and JAX).

One concept per module:
    policy       `ExitPolicy` (mode, criterion, threshold, ...)
    criteria     the confidence signals and `passes`, THE exit decision
    adapter      `DecoderAdapter`, the engine's view of an `AdaptiveModel` model
    modes        what frozen and lazy modes do with skipped layers (lazy bookkeeping)
    step         `prefill` and `decode_step`
    sampling     greedy and seeded sampling
    prompts      left padding and the checks at the boundary
    loop         `generate`, the compiled-friendly loop
    speculative  `generate_speculative` (LayerSkip)
    compiled     the compile helper per backend (`tf.function`, `jax.jit`)
    tf_threads   TensorFlow CPU threading for batch-1 decoding

The names below load on first use, so `import toex_tf.inference.criteria` (which the
layers use) pulls in nothing else.
"""

import importlib

_EXPORTS = {
    "CRITERIA": "criteria",
    "DECODE_CRITERIA": "criteria",
    "passes": "criteria",
    "DECODE_MODES": "policy",
    "ExitPolicy": "policy",
    "DecoderAdapter": "adapter",
    "decode_step": "step",
    "prefill": "step",
    "flush_lazy": "modes",
    "empty_lazy_state": "modes",
    "pad_prompts": "prompts",
    "padding_state": "prompts",
    "sample_next": "sampling",
    "hashed_uniform": "sampling",
    "generate": "loop",
    "generate_speculative": "speculative",
    "compiled_generate": "compiled",
    "compiled_speculative": "compiled",
    "compile_function": "compiled",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
