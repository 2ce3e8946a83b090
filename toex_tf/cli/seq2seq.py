"""The translation family's commands (`--model=seq2seq`): train, eval, benchmark, calibrate.

- train: an `EarlyExitTransformer` of `--seq2seq_preset` on the `--dataset` pairs
  (`builtin`: the gettext catalogs on the machine), with the joint exit loss on the
  decoder exits, checkpoints (exact resume) and TensorBoard.
- eval: every `--benchmark_modes` × `--criteria` × `--thresholds` setting, plus each
  `--benchmark_speculative` draft, translates `--eval_sentences` held-out sentences at
  batch 1: sacreBLEU BLEU and chrF, average decoder exit layer, ideal and measured decoder
  speedup (side by side with full depth) → results.json, results.png, a printed table.
- benchmark: the same sweep with `--benchmark_thresholds` → benchmark.json.
- calibrate: the cheapest `--calibration_thresholds` value of `--decode_mode` whose greedy
  translations of `--calibration_prompts` validation sources keep `--target_agreement`
  with full depth (empirical, or Learn-then-Test) → calibration.json, with each
  threshold's BLEU and chrF against the references next to its agreement.

`generate` and `export` go through the Python API (`AdaptiveTranslator`) and the export
module like the other families.
"""

import dataclasses
import os

from toex_tf.cli.common import load_run_model, write_json
from toex_tf.cli.flags import FLAGS, seq2seq_overrides, train_config


def corpus():
    """The run's sentence pairs (`--dataset`; `builtin` is the gettext catalogs)."""
    from toex_tf.data.parallel import load_parallel  # noqa: PLC0415

    dataset = "gettext" if FLAGS.dataset == "builtin" else FLAGS.dataset
    return load_parallel(
        dataset,
        FLAGS.source_lang,
        FLAGS.target_lang,
        data_dir=FLAGS.data_dir,
        validation_fraction=FLAGS.validation_fraction,
        test_fraction=FLAGS.test_fraction,
        seed=FLAGS.seed,
    )


def model_config():
    from toex_tf.config import transformer_preset  # noqa: PLC0415

    return transformer_preset(
        FLAGS.seq2seq_preset,
        **seq2seq_overrides(),
        exit_layers=FLAGS.exit_layers,
        output_embedding_mode=FLAGS.output_embedding,
        dropout=FLAGS.dropout,
        layer_dropout=FLAGS.layer_dropout,
        tie_embeddings=FLAGS.tie_embeddings,
    )


def train() -> dict:
    from toex_tf.data.translation_examples import (  # noqa: PLC0415
        encode_pairs,
        translation_tokenizer,
    )
    from toex_tf.models.saving import save_model_atomically  # noqa: PLC0415
    from toex_tf.training.multi_worker import is_chief, write_dir  # noqa: PLC0415
    from toex_tf.training.translation_training import train_translation  # noqa: PLC0415

    if FLAGS.init_from:
        raise ValueError(
            "--model=seq2seq --mode=train trains from scratch (or resumes the checkpoint in "
            "OUTPUT_DIR); drop --init_from."
        )
    config = model_config()  # checked before the (slower) data preparation
    pairs = corpus()
    # A multi-worker run's non-chief workers write into directories of their own.
    writes = write_dir(FLAGS.output_dir)
    os.makedirs(writes, exist_ok=True)
    vocab_size = FLAGS.vocab_size if FLAGS.tokenizer == "sentencepiece" else None
    tokenizer = translation_tokenizer(pairs, FLAGS.tokenizer, vocab_size, writes)
    config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size)
    examples = encode_pairs(pairs.train, tokenizer, config.max_source_length, config.max_length)
    print(
        f"Data: {pairs.summary['pairs']} pairs ({FLAGS.source_lang}→{FLAGS.target_lang}); "
        f"{len(examples)} training pairs fit {config.max_source_length}/{config.max_length} "
        f"tokens ({examples.dropped} longer ones left out); vocabulary {tokenizer.vocab_size}."
    )
    write_json(os.path.join(writes, "data.json"), pairs.summary)
    model = train_translation(config, train_config(), examples, FLAGS.output_dir)
    if is_chief():
        path = os.path.join(FLAGS.output_dir, "model.keras")
        save_model_atomically(model, path)
        print(f"Saved {path} ({model.count_params():,} parameters).")
    return {"data": pairs.summary}


def _sweep(thresholds, pairs, output_name: str, trained_here: bool = False) -> dict:
    from toex_tf.analysis.translation_eval import (  # noqa: PLC0415
        evaluate_translation,
        format_translation_table,
        plot_translation_sweep,
        sweep_settings,
    )

    translator = load_run_model(trained_here=trained_here)
    settings = sweep_settings(
        FLAGS.benchmark_modes,
        FLAGS.criteria,
        thresholds,
        draft_layers=[int(v.split(":")[0]) for v in FLAGS.benchmark_speculative],
        draft_length=int(FLAGS.benchmark_speculative[0].split(":")[1])
        if FLAGS.benchmark_speculative
        else 4,
    )
    decision_layers = tuple(int(v) for v in FLAGS.decision_layers) or None
    settings = [
        dataclasses.replace(setting, max_pending=FLAGS.max_pending, decision_layers=decision_layers)
        for setting in settings
    ]

    from toex_tf.progress import Progress  # noqa: PLC0415

    progress = Progress(len(settings) + 1, "translation sweep")
    results = evaluate_translation(
        translator.model,
        translator.tokenizer,
        pairs[: FLAGS.eval_sentences],
        settings,
        jit_compile=FLAGS.decode_jit_compile,
        progress=progress,
    )
    results["settings"] = {
        "sentences": FLAGS.eval_sentences,
        "jit_compile": FLAGS.decode_jit_compile,
        "batch_size": 1,
        "source_lang": FLAGS.source_lang,
        "target_lang": FLAGS.target_lang,
        "dataset": FLAGS.dataset,
    }
    from toex_tf.analysis.speed import device_name  # noqa: PLC0415

    results["device"] = device_name()
    write_json(os.path.join(FLAGS.output_dir, f"{output_name}.json"), results)
    plot_translation_sweep(results, os.path.join(FLAGS.output_dir, f"{output_name}.png"))
    print(format_translation_table(results))
    for example in results["examples"]:
        layers = " ".join(f"{t['piece']}⟨{t['exit_layer']}⟩" for t in example["tokens"])
        print(f"\n  {example['source']}\n  ref: {example['reference']}\n  out: {layers}")
    return results


def evaluate(trained_here: bool = False) -> dict:
    return _sweep([float(t) for t in FLAGS.thresholds], corpus().test, "results", trained_here)


def benchmark() -> dict:
    return _sweep([float(t) for t in FLAGS.benchmark_thresholds], corpus().test, "benchmark")


def calibrate() -> dict:
    """`--mode=calibrate` for translation: the threshold, on validation sources (the
    test catalogs stay unseen), at `--calibration_batch_size` sentences per call."""
    import numpy as np  # noqa: PLC0415
    import sacrebleu  # noqa: PLC0415

    from toex_tf.analysis.speed import device_name  # noqa: PLC0415
    from toex_tf.calibration.thresholds import calibrate_threshold  # noqa: PLC0415
    from toex_tf.cli.common import append_to_config_log, model_record  # noqa: PLC0415
    from toex_tf.cli.flags import policy_options  # noqa: PLC0415
    from toex_tf.inference import DecoderAdapter, ExitPolicy  # noqa: PLC0415
    from toex_tf.inference.compiled import compile_function  # noqa: PLC0415
    from toex_tf.inference.translate import pad_sources, translate  # noqa: PLC0415
    from toex_tf.progress import Progress  # noqa: PLC0415

    translator = load_run_model()
    model, tokenizer = translator.model, translator.tokenizer
    mode = FLAGS.decode_mode
    criterion = FLAGS.decode_criterion or translator.policy.criterion
    new_tokens = min(FLAGS.max_new_tokens, model.max_length - 1)
    pairs = [
        (ids, reference)
        for ids, reference in ((tokenizer.encode(s), r) for s, r in corpus().validation)
        if 0 < len(ids) <= model.max_source_length
    ][: FLAGS.calibration_prompts]
    if not pairs:
        raise ValueError(
            f"--mode=calibrate found no validation source of 1..{model.max_source_length} "
            "tokens; raise --validation_fraction or use another --dataset."
        )
    ids, mask = pad_sources([ids for ids, _ in pairs], length=model.max_source_length)
    prompts = np.stack([ids, mask], axis=1)  # (sentences, 2, source_length)
    eos = tokenizer.eos_id
    adapter = DecoderAdapter(model)
    outputs = {}  # threshold (None: full depth) -> generated ids, to score BLEU after

    def run(source_ids, source_mask, threshold, run_policy):
        policy = dataclasses.replace(run_policy, threshold=threshold)
        return translate(
            adapter, source_ids, source_mask, new_tokens, eos, policy=policy,
            stop_token_ids=(eos,), return_state=True,
        )  # fmt: skip

    compiled = {}

    def run_fn(policy):
        # One trace per mode: the threshold is an input of the compiled program.
        if policy.mode not in compiled:
            compiled[policy.mode] = compile_function(
                lambda i, m, t, p=policy: run(i, m, t, p), FLAGS.decode_jit_compile, True
            )
        key = None if policy.mode == "full" else policy.threshold
        threshold = np.asarray(policy.threshold, "float32")

        def fn(batch):
            tokens, exits, state = compiled[policy.mode](batch[:, 0], batch[:, 1], threshold)
            outputs.setdefault(key, []).append(tokens)
            return tokens, exits, state

        return fn

    thresholds = None
    if FLAGS.calibration_thresholds:
        thresholds = tuple(float(t) for t in FLAGS.calibration_thresholds)
    calibration = calibrate_threshold(
        adapter,
        prompts,
        new_tokens,
        ExitPolicy(mode, criterion, **policy_options()),
        target_agreement=FLAGS.target_agreement,
        thresholds=thresholds,
        method=FLAGS.calibration_method,
        delta=FLAGS.calibration_delta,
        run_fn=run_fn,
        stop_token_ids=(eos,),
        batch_size=FLAGS.calibration_batch_size,
        progress=Progress(len(FLAGS.calibration_thresholds) or 22, "calibration"),
    )
    references = [reference for _, reference in pairs]

    def scores(key):
        texts = []
        for row in np.concatenate(outputs[key]).tolist():
            texts.append(tokenizer.decode(row[: row.index(eos)] if eos in row else row))
        return (
            sacrebleu.corpus_bleu(texts, [references]).score,
            sacrebleu.corpus_chrf(texts, [references]).score,
        )

    full_bleu, full_chrf = scores(None)
    for row in calibration.rows:
        row["bleu"], row["chrf"] = scores(row["threshold"])
    record = {
        "model": model_record(model),
        "settings": {
            "mode": mode,
            "criterion": criterion,
            "num_sentences": len(pairs),
            "max_new_tokens": new_tokens,
            "batch_size": FLAGS.calibration_batch_size,
            "dataset": FLAGS.dataset,
            "split": "validation",
            "jit_compile": FLAGS.decode_jit_compile,
            "device": device_name(),
        },
        "full_depth": {"bleu": full_bleu, "chrf": full_chrf},
        "calibration": calibration.to_dict(),
    }
    from toex_tf.cli.calibrate import write_calibration  # noqa: PLC0415

    columns = [
        ("BLEU", lambda row: f"{row['bleu']:.2f}"),
        ("chrF", lambda row: f"{row['chrf']:.2f}"),
    ]
    path = write_calibration(record, calibration, f"{mode}_{criterion}", columns)
    chosen = next(r for r in calibration.rows if r["threshold"] == calibration.threshold)
    print(
        f"Chosen threshold: {calibration.threshold:g} ({mode}/{criterion}, "
        f"{FLAGS.calibration_method}): agreement {calibration.agreement:.3f} with full depth "
        f"at {calibration.avg_layers:.2f} of {model.num_layers} decoder layers per step; "
        f"BLEU {chosen['bleu']:.2f} against {full_bleu:.2f} at full depth on {len(pairs)} "
        f"validation sentences. {calibration.note}"
    )
    print(f"Wrote {path}.")
    append_to_config_log(calibration=record["calibration"])
    return record
