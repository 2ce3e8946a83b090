"""`--mode=eval`: the quality of the run's model on held-out text.

- GPT: every held-out token leaves at the first exit whose confidence passes, for each
  `--criteria` and `--thresholds`: perplexity and counted savings → results.json and
  exit_curve.png.
- Llama: the quality table: perplexity against the base per `--llama_capacities` (and
  with exits at `--exit_depth`), with measured decode speed → llama_results.json.
- seq2seq: BLEU, chrF, exit layers and measured decoder speedup per setting on held-out
  sentences → results.json (`toex_tf/cli/seq2seq.py`).
"""

import os

from toex_tf.cli.common import (
    append_to_config_log,
    load_run_model,
    model_record,
    prepared_data,
    write_json,
)
from toex_tf.cli.flags import FLAGS, eval_config, flag_values


def run() -> dict:
    results = evaluate()
    append_to_config_log(results=results)
    return results


def evaluate(trained_here: bool = False) -> dict:
    """The family's evaluation of the run's model; `trained_here`: the model this run has
    just trained into OUTPUT_DIR (`--mode=train_and_eval`), not `--init_from`'s."""
    if FLAGS.model == "seq2seq":
        from toex_tf.cli import seq2seq  # noqa: PLC0415

        return seq2seq.evaluate(trained_here)
    lm = load_run_model(trained_here=trained_here)
    prepared = prepared_data(lm.tokenizer)
    if FLAGS.model == "llama":
        return _llama_table(lm.model, prepared)
    return _exit_sweep(lm.model, prepared)


def _exit_sweep(model, prepared) -> dict:
    from toex_tf.analysis.cost import CostModel  # noqa: PLC0415
    from toex_tf.analysis.exit_eval import (  # noqa: PLC0415
        collect_exit_statistics,
        format_table,
        sweep,
    )
    from toex_tf.analysis.plots import plot_exit_curve  # noqa: PLC0415

    evaluation = eval_config()
    inputs = prepared.val_inputs[: evaluation.windows]
    targets = prepared.val_targets[: evaluation.windows]
    from toex_tf.progress import Progress  # noqa: PLC0415

    stats = collect_exit_statistics(
        model,
        inputs,
        targets,
        batch_size=FLAGS.batch_size,
        criteria=evaluation.criteria,
        confidence_source=evaluation.confidence_source,
        progress=Progress(len(inputs), "exit sweep"),
    )
    # Average attention context of a token in a window of length T: (T + 1) / 2.
    cost_model = CostModel.for_model(
        model,
        context_length=(inputs.shape[1] + 1) / 2,
        confidence_source=evaluation.confidence_source,
    )
    swept = sweep(stats, model.exit_layers, cost_model, evaluation.thresholds, evaluation.criteria)
    results = {
        "config": {
            "flags": flag_values(),
            "model": model_record(model),
            "exit_layers": list(model.exit_layers),
            "eval_tokens": int(inputs.size),
            "confidence_source": evaluation.confidence_source,
            "head_cost": model.token_embedding.cost_report(),
            "cost_model_macs": {
                "layer": cost_model.layer_macs,
                "full_head": cost_model.full_head_macs,
                "exit_check": cost_model.check_macs,
            },
        },
        **swept,
    }
    path = os.path.join(FLAGS.output_dir, "results.json")
    write_json(path, results)
    from toex_tf.analysis.tf_summaries import log_exit_sweep  # noqa: PLC0415 - TensorFlow

    log_exit_sweep(os.path.join(FLAGS.output_dir, "tensorboard"), results, int(inputs.size))
    plot = plot_exit_curve(results, os.path.join(FLAGS.output_dir, "exit_curve.png"))
    print(format_table(results))
    print(f"Wrote {path} and {plot}.")
    return results


def _llama_table(model, prepared) -> dict:
    from toex_tf.analysis.llama_quality import format_table, quality_table  # noqa: PLC0415

    result = quality_table(
        model,
        prepared,
        capacities=[float(c) for c in FLAGS.llama_capacities],
        exit_depth=FLAGS.exit_depth or None,
        eval_windows=FLAGS.eval_windows,
    )
    path = os.path.join(FLAGS.output_dir, "llama_results.json")
    write_json(path, result)
    print(format_table(result))
    print(f"Wrote {path}.")
    return result
