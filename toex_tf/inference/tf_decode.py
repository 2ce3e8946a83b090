"""The compiled TensorFlow entry to the decode loop: one `tf.function` per setting."""

import functools

import tensorflow as tf

from toex_tf.inference.decoding import DecoderAdapter, ExitPolicy, generate


def compiled_generate(
    adapter: DecoderAdapter,
    max_new_tokens: int,
    policy: ExitPolicy | None = None,
    jit_compile: bool = False,
    **sampling,
):
    """A `tf.function` `(prompt) -> (token_ids, exit_layers)` for fixed settings.

    The whole loop (prefill, `while_loop` over tokens, segment `cond`s) is one graph:
    no Python runs per token. Retracing happens per prompt shape.

    Args:
        adapter: the model.
        max_new_tokens: int > 0.
        policy: the exit policy.
        jit_compile: compile with XLA as well.
        **sampling: `sampling`, `temperature`, `top_k`, `top_p`, `stop_token_ids`, `seed`.
    """
    run = functools.partial(
        generate, adapter, max_new_tokens=max_new_tokens, policy=policy, **sampling
    )
    return tf.function(lambda prompt: run(prompt), jit_compile=jit_compile)
