"""`--mode=report`: which tokens leave early, and why, as one HTML page.

Runs the run's model (any family) on `--prompt`s or held-out prompts (for translation,
test sources with their references) under the report grid, traced and timed against
full depth (`toex_tf.analysis.report`), and writes OUTPUT_DIR/report.json and
OUTPUT_DIR/report.html. With `--report_from=report.json` it only redraws the page.
"""

import os

from toex_tf.cli.common import append_to_config_log, load_run_model
from toex_tf.cli.flags import FLAGS, policy_options


def settings() -> list:
    """The grid the flags ask for: KL strengths, or modes × criteria × thresholds."""
    from toex_tf.analysis import report  # noqa: PLC0415

    modes = list(FLAGS.report_modes)
    exit_modes = [mode for mode in modes if mode != "speculative"]
    grid = []
    if FLAGS.report_thresholds:
        thresholds = [float(t) for t in FLAGS.report_thresholds]
        grid = report.threshold_settings(exit_modes, FLAGS.report_criteria, thresholds)
    elif list(FLAGS.report_criteria) == ["kl"]:
        strengths = [float(s) for s in FLAGS.report_kl_strengths]
        grid = report.kl_strength_settings(exit_modes, strengths, FLAGS.report_kl_base)
    else:
        raise ValueError(
            f"--report_criteria={','.join(FLAGS.report_criteria)} needs --report_thresholds "
            "(the KL strengths apply to the kl criterion alone)."
        )
    if "speculative" in modes:
        grid.append(report.ReportSetting("speculative"))
    return grid


def prompts(lm) -> tuple:
    """`(prompts, references or None)`: `--prompt`, else held-out text of the run's data."""
    if FLAGS.prompt:
        return list(FLAGS.prompt), None
    count = FLAGS.report_prompts
    if lm.model.is_encoder_decoder:
        from toex_tf.cli.seq2seq import corpus  # noqa: PLC0415

        limit = lm.model.max_source_length
        pairs = [(s, r) for s, r in corpus().test if 0 < len(lm.tokenizer.encode(s)) <= limit]
        if not pairs:
            raise ValueError("--mode=report found no test source that fits the model.")
        step = max(len(pairs) // count, 1)
        chosen = pairs[::step][:count]
        return [s for s, _ in chosen], [r for _, r in chosen]
    from toex_tf.cli.common import check_fits, held_out  # noqa: PLC0415

    check_fits(lm.model, FLAGS.prompt_length, FLAGS.max_new_tokens, "max_new_tokens")
    ids = held_out(lm.tokenizer, count, FLAGS.prompt_length)
    return [list(row) for row in ids.tolist()], None


def run() -> dict:
    from toex_tf.analysis.report import (  # noqa: PLC0415
        collect_report,
        load_results_json,
        save_results_json,
    )
    from toex_tf.analysis.report_html import write_report  # noqa: PLC0415
    from toex_tf.progress import Progress  # noqa: PLC0415

    os.makedirs(FLAGS.output_dir, exist_ok=True)
    html_path = os.path.join(FLAGS.output_dir, "report.html")
    if FLAGS.report_from:
        results = load_results_json(FLAGS.report_from)
    else:
        lm = load_run_model()
        if lm.tokenizer is None:
            raise ValueError("--mode=report needs a model with a tokenizer.")
        grid = settings()
        texts, references = prompts(lm)
        progress = Progress(len(texts) * (len(grid) + 1), "report")
        new_tokens = FLAGS.max_new_tokens
        if lm.model.is_encoder_decoder:
            new_tokens = min(new_tokens, lm.model.max_length - 1)
        options = {k: v for k, v in policy_options().items() if v is not None}
        results = collect_report(
            lm,
            texts,
            grid,
            max_new_tokens=new_tokens,
            timing_rounds=FLAGS.report_timing_rounds,
            references=references,
            progress=progress,
            policy_options=options,
        )
        save_results_json(results, os.path.join(FLAGS.output_dir, "report.json"))
    write_report(results, html_path)
    print(_summary_table(results))
    print(f"Wrote {html_path}")
    append_to_config_log(report={"html": html_path, "settings": len(results["settings"])})
    return results


def _summary_table(results) -> str:
    lines = [
        f"{'setting':44} {'exit rate':>9} {'avg layer':>9} {'agree':>6} {'tok/s':>8} "
        f"{'measured':>8} {'ideal':>6}"
    ]
    for row in results["summary"]:
        label = results["settings"][row["setting"]]["label"]
        lines.append(
            f"{label[:44]:44} {row['exit_rate']:9.2f} {row['avg_exit_layer']:9.2f} "
            f"{row['agreement']:6.2f} {row['tokens_per_second']:8.1f} "
            f"{row['measured_speedup']:7.2f}x {row['ideal_speedup']:5.2f}x"
        )
    return "\n".join(lines)
