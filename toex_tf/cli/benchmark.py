"""`--mode=benchmark`: decode speed of exit settings against full depth, measured.

Held-out prompts; each `--benchmark_modes` × `--benchmark_thresholds` setting (and each
`--benchmark_speculative` pair) is timed alternately with full depth in this process, per
`--benchmark_batches` size → benchmark.json and benchmark.png. Either family.

`--model=llama --target_speedup=X` instead searches the largest router capacity whose
measured decode speedup reaches X (optionally with exits at `--exit_depth`).
"""

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
    if FLAGS.model == "seq2seq":
        from toex_tf.cli import seq2seq  # noqa: PLC0415

        return seq2seq.benchmark()
    lm = load_run_model()
    if FLAGS.target_speedup:
        return _search_capacity(lm)
    from toex_tf.analysis.speed import (  # noqa: PLC0415
        format_speed_table,
        measure_decode_speed,
        plot_decode_speed,
    )
    from toex_tf.inference import ExitPolicy  # noqa: PLC0415

    model = lm.model
    prompt_length, new_tokens = FLAGS.prompt_length, FLAGS.benchmark_new_tokens
    check_fits(model, prompt_length, new_tokens, "benchmark_new_tokens")
    criterion = FLAGS.decode_criterion or lm.policy.criterion
    thresholds = tuple(float(t) for t in FLAGS.benchmark_thresholds)
    modes = tuple(FLAGS.benchmark_modes)
    batches = tuple(int(b) for b in FLAGS.benchmark_batches)
    speculative = tuple(
        tuple(int(x) for x in pair.split(":")) for pair in FLAGS.benchmark_speculative
    )
    options = policy_options()
    policies = [ExitPolicy(mode, criterion, t, **options) for mode in modes for t in thresholds]
    prompts = {batch: held_out(lm.tokenizer, batch, prompt_length) for batch in batches}
    from toex_tf.progress import Progress  # noqa: PLC0415

    total = len(batches) * (len(policies) + len(speculative))
    progress, logged = Progress(total, "benchmark"), []

    def log(line):
        print(line, flush=True)
        logged.append(line)
        progress.update(min(len(logged), total))

    rows = measure_decode_speed(
        model,
        prompts,
        policies,
        new_tokens,
        repeats=FLAGS.benchmark_repeats,
        speculative=speculative,
        log=log,
        jit_compile=FLAGS.decode_jit_compile,
        # A cache of the run's size (drafts need room), not the model's whole context.
        max_length=lm.adapter_for(
            prompt_length + new_tokens + max((n for _, n in speculative), default=0) + 1
        ).max_length,
    )
    record = {
        "model": model_record(model),
        "settings": {
            "modes": list(modes),
            "criterion": criterion,
            "thresholds": list(thresholds),
            "batches": list(batches),
            "prompt_length": prompt_length,
            "new_tokens": new_tokens,
            "repeats": FLAGS.benchmark_repeats,
            "speculative": [list(pair) for pair in speculative],
            "dataset": data_config().dataset,
            "policy_options": {
                k: list(v) if isinstance(v, tuple) else v for k, v in options.items()
            },
            "jit_compile": FLAGS.decode_jit_compile,
        },
        "rows": rows,
    }
    path = os.path.join(FLAGS.output_dir, "benchmark.json")
    write_json(path, record)
    from toex_tf.analysis.tf_summaries import log_benchmark  # noqa: PLC0415 - TensorFlow

    log_benchmark(os.path.join(FLAGS.output_dir, "tensorboard"), rows)
    plot = plot_decode_speed(
        rows, os.path.join(FLAGS.output_dir, "benchmark.png"), title=f"Decode speed ({criterion})"
    )
    print(format_speed_table(rows))
    print(f"Wrote {path} and {plot}.")
    append_to_config_log(benchmark=rows)
    return record


def _search_capacity(lm) -> dict:
    from toex_tf.calibration.capacity import search_capacity  # noqa: PLC0415
    from toex_tf.cli.common import prepared_data  # noqa: PLC0415

    if not lm.model.routers:
        raise ValueError(
            "--target_speedup searches the FFN router capacity; the model has no routers "
            "(load a checkpoint with --capacity below 1.0)."
        )
    prepared = prepared_data(lm.tokenizer)
    search = search_capacity(
        lm.model,
        prepared.val_inputs[-1:, :16],
        prepared.train_inputs[:64],
        FLAGS.target_speedup,
        exit_depth=FLAGS.exit_depth or None,
    )
    write_json(os.path.join(FLAGS.output_dir, "capacity_search.json"), search)
    print(search)
    append_to_config_log(search=search)
    return search
