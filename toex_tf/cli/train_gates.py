"""`--mode=train_gates`: learned exit gates on the frozen run model → OUTPUT_DIR/model.keras.

- GPT: a `LearnedExitGate` on every non-final exit (added when the model has none), fit
  on the consistency of each exit's top-1 with the final layer's (CALM) → gates.json.
- Llama: the `exits` phase: its exit gates and exit norms, base and routers frozen.

Afterwards the model's default criterion is `learned` (`toex_tf.api.default_policy`).
"""

import json
import os

from toex_tf.cli.common import append_to_config_log, load_run_model, prepared_data, write_json
from toex_tf.cli.flags import FLAGS


def run() -> dict:
    lm = load_run_model()
    prepared = prepared_data(lm.tokenizer)
    if FLAGS.model == "llama":
        from toex_tf.training.llama_phases import run_phase  # noqa: PLC0415

        logs = run_phase(
            lm.model,
            "exits",
            prepared,
            FLAGS.output_dir,
            FLAGS.train_steps,
            FLAGS.batch_size,
            FLAGS.learning_rate,
            seed=FLAGS.seed,
            checkpoint_every=FLAGS.checkpoint_every,
            compute_weight=FLAGS.compute_weight,
        )
        report = {"logs": {k: v for k, v in logs.items() if k != "schedule"}}
    else:
        report = _fit_gpt_gates(lm.model, prepared)
    report = json.loads(json.dumps(report, default=float))  # numpy scalars → JSON
    write_json(os.path.join(FLAGS.output_dir, "gates.json"), report)
    append_to_config_log(gates=report)
    return report


def _fit_gpt_gates(model, prepared) -> dict:
    from toex_tf.models import add_learned_gates  # noqa: PLC0415
    from toex_tf.models.saving import save_model_atomically  # noqa: PLC0415
    from toex_tf.training.gate_training import fit_learned_gates  # noqa: PLC0415

    if not model.gates:
        model = add_learned_gates(model, hidden_units=FLAGS.gate_units)
    windows = FLAGS.gate_windows
    report = fit_learned_gates(
        model,
        prepared.train_inputs[:windows],
        epochs=FLAGS.gate_epochs,
        batch_size=FLAGS.batch_size,
        validation_inputs=prepared.val_inputs[: max(windows // 4, 1)],
    )
    save_model_atomically(model, os.path.join(FLAGS.output_dir, "model.keras"))
    for layer, metrics in report.get("validation", {}).items():
        print(
            f"exit {layer}: held-out AUC {metrics['auc']:.3f}, accuracy "
            f"{metrics['accuracy']:.3f}, consistent share {metrics['positive_rate']:.3f}"
        )
    return report
