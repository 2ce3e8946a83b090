"""`--mode=calibrate`: the cheapest `--decode_mode` threshold whose greedy output keeps
`--target_agreement` with full depth on held-out prompts (empirical, or Learn-then-Test
with `--calibration_method=ltt`) → calibration.json. Either family."""

import os

from toex_tf.cli.common import (
    append_to_config_log,
    check_fits,
    held_out,
    load_run_model,
    model_record,
    write_json,
)
from toex_tf.cli.flags import FLAGS, data_config, policy_options


def run() -> dict:
    from toex_tf.calibration.thresholds import (  # noqa: PLC0415
        DEFAULT_THRESHOLDS,
        calibrate_threshold,
    )
    from toex_tf.inference import ExitPolicy, compiled_generate  # noqa: PLC0415
    from toex_tf.progress import Progress  # noqa: PLC0415

    if FLAGS.model == "seq2seq":
        from toex_tf.cli import seq2seq  # noqa: PLC0415

        return seq2seq.calibrate()
    lm = load_run_model()
    model, mode = lm.model, FLAGS.decode_mode
    criterion = FLAGS.decode_criterion or lm.policy.criterion
    check_fits(model, FLAGS.prompt_length, FLAGS.max_new_tokens, "max_new_tokens")
    prompts = held_out(lm.tokenizer, FLAGS.calibration_prompts, FLAGS.prompt_length)
    # Generation is compiled (one program per threshold) and stops at the tokenizer's
    # end-of-text id, as --mode=generate does.
    eos = getattr(lm.tokenizer, "eos_id", None)
    stop = [] if eos is None else [int(eos)]

    def run_fn(policy):
        return compiled_generate(
            lm.adapter, FLAGS.max_new_tokens, policy, stop_token_ids=stop, return_state=True
        )

    thresholds = None
    if FLAGS.calibration_thresholds:
        thresholds = tuple(float(t) for t in FLAGS.calibration_thresholds)
    calibration = calibrate_threshold(
        lm.adapter,
        prompts,
        FLAGS.max_new_tokens,
        ExitPolicy(mode, criterion, **policy_options()),
        target_agreement=FLAGS.target_agreement,
        thresholds=thresholds,
        method=FLAGS.calibration_method,
        delta=FLAGS.calibration_delta,
        run_fn=run_fn,
        stop_token_ids=stop,
        batch_size=FLAGS.calibration_batch_size,
        progress=Progress(len(thresholds or DEFAULT_THRESHOLDS) + 1, "calibration"),
    )
    record = {
        "model": model_record(model),
        "settings": {
            "mode": mode,
            "criterion": criterion,
            "num_prompts": int(prompts.shape[0]),
            "prompt_length": FLAGS.prompt_length,
            "max_new_tokens": FLAGS.max_new_tokens,
            "batch_size": FLAGS.calibration_batch_size,
            "dataset": data_config().dataset,
        },
        "calibration": calibration.to_dict(),
    }
    p_value = ("p_value", lambda row: "" if row["p_value"] is None else f"{row['p_value']:.3g}")
    path = write_calibration(record, calibration, f"{mode}_{criterion}", [p_value])
    guarantee = {True: ", certified", False: ", NOT certified", None: ""}[calibration.guaranteed]
    print(
        f"Chosen threshold: {calibration.threshold:g} ({mode}/{criterion}, "
        f"{FLAGS.calibration_method}{guarantee}): agreement {calibration.agreement:.3f} with "
        f"full depth at {calibration.avg_layers:.2f} of {model.num_layers} layers per step. "
        f"{calibration.note}"
    )
    print(f"Wrote {path}.")
    append_to_config_log(calibration=record["calibration"])
    return record


def write_calibration(record: dict, calibration, run_name: str, columns=()) -> str:
    """Writes OUTPUT_DIR/calibration.json and the curve to TensorBoard
    (`calibration/<run_name>`), and prints the curve: threshold, agreement, layers, then
    `columns`, `(header, row -> text)` pairs. Returns the JSON's path."""
    from toex_tf.analysis.tf_summaries import log_calibration  # noqa: PLC0415 - TensorFlow

    path = os.path.join(FLAGS.output_dir, "calibration.json")
    write_json(path, record)
    log_calibration(os.path.join(FLAGS.output_dir, "tensorboard"), run_name, calibration.rows)
    headers = "".join(f" {header:>9}" for header, _ in columns)
    print(f"{'threshold':>9} {'agreement':>9} {'layers':>7}{headers}")
    for row in calibration.rows:
        cells = "".join(f" {text(row):>9}" for _, text in columns)
        print(f"{row['threshold']:>9g} {row['agreement']:>9.3f} {row['avg_layers']:>7.2f}{cells}")
    return path
