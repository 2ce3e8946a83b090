"""`--mode=train` (and `train_and_eval`): train a model of either family, save it.

- GPT: the early-exit GPT of `--preset`, or the model of `--init_from` trained further,
  with the joint exit loss, distillation, checkpoints (exact resume) and TensorBoard.
- Llama: one `--phase`: `base` pretrains the `--llama_preset` from scratch; `routers`,
  `exits` and `full` train on the frozen base of `--init_from` (default OUTPUT_DIR);
  `exit_heads` trains exit adapters, norms and gates on a frozen pretrained base (a GGUF
  or checkpoint) from its cached states, and writes OUTPUT_DIR/exit_heads.json.
- seq2seq: the encoder-decoder of `--seq2seq_preset` on sentence pairs
  (`toex_tf/cli/seq2seq.py`).

Writes OUTPUT_DIR/model.keras and OUTPUT_DIR/tokenizer (a Llama base also `hf/`).
"""

import contextlib
import dataclasses
import json
import os

from toex_tf.cli import evaluate
from toex_tf.cli.common import append_to_config_log, load_run_model, prepared_data, write_json
from toex_tf.cli.flags import FLAGS, gpt_overrides, train_config
from toex_tf.config import gpt_preset


def run() -> dict:
    from toex_tf.training.checkpoint import check_output_dir  # noqa: PLC0415
    from toex_tf.training.multi_worker import is_chief, write_dir  # noqa: PLC0415

    # A read-only or full output directory fails before the data and the model are made.
    check_output_dir(write_dir(FLAGS.output_dir), 0, "--output_dir")
    if FLAGS.model == "seq2seq":
        from toex_tf.cli import seq2seq  # noqa: PLC0415

        outcome = seq2seq.train()
    else:
        outcome = _train_llama() if FLAGS.model == "llama" else _train_gpt()
    if FLAGS.mode == "train_and_eval" and is_chief():  # the chief evaluates the model it saved
        outcome["results"] = evaluate.evaluate(trained_here=True)
    append_to_config_log(**outcome)
    return outcome


def _train_gpt() -> dict:
    from toex_tf.training.tf_train import train  # noqa: PLC0415 - TensorFlow

    # The model settings are checked before the (slower) data preparation.
    model_config = gpt_preset(
        FLAGS.preset,
        **gpt_overrides(),
        exit_layers=FLAGS.exit_layers,
        output_embedding_mode=FLAGS.output_embedding,
        dropout=FLAGS.dropout,
        layer_dropout=FLAGS.layer_dropout,
        capacity=FLAGS.capacity,
    )
    initial, tokenizer = None, None
    if FLAGS.init_from:
        lm = load_run_model()
        initial, tokenizer = lm.model, lm.tokenizer
        model_config = initial.config
    prepared = prepared_data(tokenizer)
    if initial is None:  # the vocabulary comes from the tokenizer
        model_config = dataclasses.replace(model_config, vocab_size=prepared.tokenizer.vocab_size)
    model = train(
        model_config,
        train_config(),
        prepared.train_inputs,
        prepared.train_targets,
        FLAGS.output_dir,
        token_counts=None if initial is not None else prepared.token_counts,
        initial_model=initial,
        train_dataset=prepared.train_dataset,  # a streamed corpus: all of it, not its head
    )
    _save_on_chief(model)
    return {}


def _save_on_chief(model) -> None:
    """OUTPUT_DIR/model.keras, written by the chief only: in a multi-worker run, every
    worker ends with the same weights and one file is written."""
    from toex_tf.models.saving import save_model_atomically  # noqa: PLC0415
    from toex_tf.training.multi_worker import is_chief  # noqa: PLC0415

    if not is_chief():
        print("Not the chief: the chief saves the model.")
        return
    path = os.path.join(FLAGS.output_dir, "model.keras")
    save_model_atomically(model, path)
    print(f"Saved {path} ({model.count_params():,} parameters).")


def _train_llama() -> dict:
    from toex_tf.models.llama import build_llama  # noqa: PLC0415
    from toex_tf.training.llama_phases import run_phase  # noqa: PLC0415 - TensorFlow

    phase = FLAGS.phase
    if phase == "exit_heads":
        return _train_exit_heads()
    if phase == "lora_exits":
        return _train_lora_exits()
    strategy = None
    if FLAGS.strategy != "default":
        from toex_tf.training.tf_distribute import make_strategy  # noqa: PLC0415

        strategy = make_strategy(FLAGS.strategy)
    # The model is built (or loaded) in the strategy's scope: its variables are mirrored.
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    if phase == "base":
        if FLAGS.init_from:
            raise ValueError("--phase=base trains from scratch; drop --init_from.")
        prepared = prepared_data()
        import keras  # noqa: PLC0415

        keras.utils.set_random_seed(FLAGS.seed)  # --seed fixes the initial weights
        with scope:
            model = build_llama(
                FLAGS.llama_preset,
                vocab_size=prepared.tokenizer.vocab_size,
                exit_layers=(),
                capacity=1.0,
            )
    else:
        with scope:
            lm = load_run_model()
        model = lm.model
        prepared = prepared_data(lm.tokenizer)
        if model.vocab_size != prepared.tokenizer.vocab_size:
            raise ValueError(
                f"the model's vocabulary ({model.vocab_size}) does not match the tokenizer's "
                f"({prepared.tokenizer.vocab_size}): use the tokenizer the base was trained with."
            )
    logs = run_phase(
        model,
        phase,
        prepared,
        FLAGS.output_dir,
        FLAGS.train_steps,
        FLAGS.batch_size,
        FLAGS.learning_rate,
        capacity_start=FLAGS.capacity_start,
        seed=FLAGS.seed,
        checkpoint_every=FLAGS.checkpoint_every,
        compute_weight=FLAGS.compute_weight,
        strategy=strategy,
    )
    print(f"phase {phase}: {json.dumps({k: v for k, v in logs.items() if k != 'schedule'})}")
    return {"logs": logs}


def _train_exit_heads() -> dict:
    """`--phase=exit_heads`: exits on a frozen pretrained base, from cached states."""
    from toex_tf.models.saving import save_model_atomically  # noqa: PLC0415
    from toex_tf.training import exit_heads  # noqa: PLC0415 - TensorFlow

    lm = load_run_model()
    model = lm.model
    if not exit_heads.non_final_exit_layers(model):
        raise ValueError(
            "--phase=exit_heads needs exits below the last layer: set --llama_exit_layers."
        )
    prepared = prepared_data(lm.tokenizer)
    windows = max(1, -(-FLAGS.cache_tokens // FLAGS.seq_len))
    inputs, targets = prepared.train_inputs[:windows], prepared.train_targets[:windows]
    held_out = min(len(prepared.val_inputs), FLAGS.eval_windows)
    print(f"Caching the frozen base's states: {inputs.size} training tokens ...", flush=True)
    states = exit_heads.cache_exit_states(model, inputs, targets)
    validation = exit_heads.cache_exit_states(
        model, prepared.val_inputs[:held_out], prepared.val_targets[:held_out]
    )
    before = exit_heads.evaluate_exit_heads(model, validation)
    losses = exit_heads.train_exit_heads(
        model,
        states,
        FLAGS.train_steps,
        batch_size=FLAGS.head_batch_size,
        learning_rate=FLAGS.learning_rate,
        seed=FLAGS.seed,
        verbose=2,
    )
    after = exit_heads.evaluate_exit_heads(model, validation)
    gates = exit_heads.fit_gates_on_states(model, states, validation)
    if model.config.output_embedding_mode == "shortlist":
        model.token_embedding.set_shortlist_from_counts(prepared.token_counts)
    path = os.path.join(FLAGS.output_dir, "model.keras")
    save_model_atomically(model, path)
    result = {
        "train_tokens": int(inputs.size),
        "validation_tokens": int(validation.num_tokens),
        "loss": losses,
        "logit_lens": before,
        "trained": after,
        "gates": gates,
    }
    write_json(os.path.join(FLAGS.output_dir, "exit_heads.json"), result)
    for layer in exit_heads.non_final_exit_layers(model):
        print(
            f"exit {layer}: held-out perplexity {before[layer]['perplexity']:.1f} -> "
            f"{after[layer]['perplexity']:.1f} (full depth {after['full']['perplexity']:.2f}), "
            f"top-1 agreement {after[layer]['top1_agreement']:.3f}"
        )
    print(f"Saved {path}.")
    return result


def _train_lora_exits() -> dict:
    """`--phase=lora_exits`: LoRA on the upper layers for the exits (merged after), the
    gates refitted on the tuned model, and the full-depth drift measured."""
    from toex_tf.models.saving import save_model_atomically  # noqa: PLC0415
    from toex_tf.training import exit_heads  # noqa: PLC0415 - TensorFlow
    from toex_tf.training.lora_exits import train_lora_exits  # noqa: PLC0415

    lm = load_run_model()
    model = lm.model
    if not exit_heads.non_final_exit_layers(model):
        raise ValueError(
            "--phase=lora_exits needs exits below the last layer: set --llama_exit_layers."
        )
    prepared = prepared_data(lm.tokenizer)
    windows = max(1, -(-FLAGS.cache_tokens // FLAGS.seq_len))
    inputs, targets = prepared.train_inputs[:windows], prepared.train_targets[:windows]
    held_out = min(len(prepared.val_inputs), FLAGS.eval_windows)
    val_inputs, val_targets = prepared.val_inputs[:held_out], prepared.val_targets[:held_out]
    before = exit_heads.evaluate_exit_heads(
        model, exit_heads.cache_exit_states(model, val_inputs, val_targets)
    )
    logs = train_lora_exits(
        model,
        inputs,
        targets,
        FLAGS.train_steps,
        rank=FLAGS.lora_rank,
        first_layer=FLAGS.lora_first_layer or None,
        layer_dropout=FLAGS.layer_dropout,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        seed=FLAGS.seed,
        verbose=2,
    )
    validation = exit_heads.cache_exit_states(model, val_inputs, val_targets)
    after = exit_heads.evaluate_exit_heads(model, validation)
    # The gates' labels (exit top-1 == final top-1) changed with the layers: refit them.
    states = exit_heads.cache_exit_states(model, inputs, targets)
    gates = exit_heads.fit_gates_on_states(model, states, validation)
    path = os.path.join(FLAGS.output_dir, "model.keras")
    save_model_atomically(model, path)
    drift = after["full"]["perplexity"] / before["full"]["perplexity"] - 1.0
    result = {
        "train_tokens": int(inputs.size),
        "tokens_seen": int(FLAGS.train_steps * FLAGS.batch_size * inputs.shape[1]),
        "validation_tokens": int(validation.num_tokens),
        "lora": logs,
        "before": before,
        "after": after,
        "full_depth_perplexity_drift": drift,
        "gates": gates,
    }
    write_json(os.path.join(FLAGS.output_dir, "lora_exits.json"), result)
    for layer in exit_heads.non_final_exit_layers(model):
        print(
            f"exit {layer}: held-out perplexity {before[layer]['perplexity']:.1f} -> "
            f"{after[layer]['perplexity']:.1f}, top-1 agreement "
            f"{before[layer]['top1_agreement']:.3f} -> {after[layer]['top1_agreement']:.3f}"
        )
    print(
        f"full depth: perplexity {before['full']['perplexity']:.2f} -> "
        f"{after['full']['perplexity']:.2f} ({100 * drift:+.1f}%). Saved {path}."
    )
    return result
