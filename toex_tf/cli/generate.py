"""`--mode=generate`: prompts in; the continuations and each token's exit layer out.

Runs `AdaptiveLM.generate` (the Python API) on the run's model, so the command line and
`toex_tf.load(...).generate(...)` give the same output for the same settings. Prints
the JSON (stdout) and writes it to OUTPUT_DIR/generate.json; each prompt's text with every
token's exit layer goes to stderr.
"""

import dataclasses
import json
import os
import sys

from toex_tf.cli.common import append_to_config_log, load_run_model, write_json
from toex_tf.cli.flags import FLAGS, policy_options


def settings() -> dict:
    """The `generate` keyword arguments the flags ask for."""
    options = {
        "max_new_tokens": FLAGS.max_new_tokens,
        "mode": FLAGS.decode_mode,
        "do_sample": FLAGS.sampling == "sample",
        "temperature": FLAGS.temperature,
        "top_k": FLAGS.top_k,
        "top_p": FLAGS.top_p,
        "seed": FLAGS.seed,
        "jit_compile": FLAGS.decode_jit_compile,
    }
    if FLAGS.decode_mode == "speculative":
        return {**options, "draft_layer": FLAGS.draft_layer, "draft_length": FLAGS.draft_length}
    return {
        **options,
        "criterion": FLAGS.decode_criterion,
        "threshold": FLAGS.decode_threshold,
        **policy_options(),
    }


def run() -> dict:
    lm = load_run_model()
    if lm.tokenizer is None:
        raise ValueError(f"the model at {FLAGS.init_from or FLAGS.output_dir!r} has no tokenizer.")
    options = settings()
    generations = lm.generate(list(FLAGS.prompt), **options)
    policy = {}
    if FLAGS.decode_mode != "speculative":
        policy = dataclasses.asdict(lm.resolved_policy(**options))
    result = {
        "results": [g.to_dict() for g in generations],
        "num_layers": lm.model.num_layers,
        "settings": {**options, **policy},
    }
    write_json(os.path.join(FLAGS.output_dir, "generate.json"), result)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    # Readable, on stderr (stdout stays one JSON document): each token and its exit layer.
    for generation in generations:
        layers = generation.exit_layers
        average = sum(layers) / len(layers) if layers else 0.0
        joined = (
            f"{generation.prompt}\n→ {generation.text}"
            if lm.model.is_encoder_decoder
            else f"{generation.prompt}{generation.text}"
        )
        print(
            f"\n{joined}\n  exit layers (of "
            f"{lm.model.num_layers}; average {average:.1f}): {generation.annotated()}",
            file=sys.stderr,
        )
    append_to_config_log(generate=result)
    return result
