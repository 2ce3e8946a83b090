"""The translation family's commands (`--model=seq2seq`): train, eval, benchmark, calibrate.

- train: an `EarlyExitTransformer` of `--seq2seq_preset` on the `--dataset` pairs
  (`builtin`: the gettext catalogs on the machine), with the joint exit loss on the
  decoder exits, checkpoints (exact resume) and TensorBoard.
- eval: every `--benchmark_modes` × `--criteria` × `--thresholds` setting, plus each
  `--benchmark_speculative` draft, translates `--eval_sentences` held-out sentences at
  batch 1: sacreBLEU BLEU and chrF, average decoder exit layer, ideal and measured decoder
  speedup (side by side with full depth) → results.json, results.png, a printed table.
- benchmark: the same sweep with `--benchmark_thresholds` → benchmark.json.
- calibrate: the lowest `--calibration_thresholds` value of `--decode_mode` whose
  outputs keep BLEU within `--max_bleu_drop` of full depth on validation sentences.

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
    from toex_tf.training.translation_training import train_translation  # noqa: PLC0415

    if FLAGS.init_from:
        raise ValueError(
            "--model=seq2seq --mode=train trains from scratch (or resumes the checkpoint in "
            "OUTPUT_DIR); drop --init_from."
        )
    config = model_config()  # checked before the (slower) data preparation
    pairs = corpus()
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    vocab_size = FLAGS.vocab_size if FLAGS.tokenizer == "sentencepiece" else None
    tokenizer = translation_tokenizer(pairs, FLAGS.tokenizer, vocab_size, FLAGS.output_dir)
    config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size)
    examples = encode_pairs(pairs.train, tokenizer, config.max_source_length, config.max_length)
    print(
        f"Data: {pairs.summary['pairs']} pairs ({FLAGS.source_lang}→{FLAGS.target_lang}); "
        f"{len(examples)} training pairs fit {config.max_source_length}/{config.max_length} "
        f"tokens ({examples.dropped} longer ones left out); vocabulary {tokenizer.vocab_size}."
    )
    write_json(os.path.join(FLAGS.output_dir, "data.json"), pairs.summary)
    model = train_translation(config, train_config(), examples, FLAGS.output_dir)
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

    def progress(done, total, label):
        print(f"  [{done}/{total}] {label}", flush=True)

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
