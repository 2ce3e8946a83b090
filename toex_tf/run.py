"""The toex_tf command line: `python -m toex_tf.run --flagfile=configs/quickstart.cfg`.

Modes:
    train            tokenize the corpus, train an early-exit GPT, save OUTPUT_DIR/model.keras
    eval             sweep exit criteria and thresholds on held-out data → results.json
    train_and_eval   both
    generate         --prompt text → generated text and each token's exit layer, as JSON
                     (also OUTPUT_DIR/generate.json)
    benchmark        decode speed of each exit mode against full depth → benchmark.json/.png
    calibrate        the cheapest threshold that keeps agreement with full depth → calibration.json
    train_gates      add LearnedExitGates to the trained model and fit them (frozen base)
    export           OUTPUT_DIR/model.keras → a SavedModel whose `generate` signature runs
                     the early-exit decode loop in the graph (--export_dir; toex_tf.export);
                     with the run's tokenizer in the graph, `generate_text` too (--export_text)
    benchmark        decode speed (tokens/s, measured and ideal speedup) of exit modes
                     against full depth on held-out prompts → benchmark.json, benchmark.png
    calibrate        the cheapest --decode_mode threshold whose output agrees with full
                     depth on held-out prompts (empirical or Learn-then-Test)
                     → calibration.json

`--model=llama` (see `toex_tf/llama_jobs.py`): `--phase=base|routers|exits|full` trains
the hierarchical Llama from `--init_from` (a checkpoint handle or `.keras` file),
`--mode=eval` writes the quality table with measured speed, `--target_speedup` searches the
router capacity for a measured decode speedup.

This is the only module that knows about absl flags; it turns them into the dataclasses
of `toex_tf.config` and calls the library.
"""

import dataclasses
import datetime
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from toex_tf.config import (  # noqa: E402
    EXIT_WEIGHT_SCHEDULES,
    LLAMA_PRESETS,
    PRESETS,
    DataConfig,
    EvalConfig,
    TrainConfig,
    gpt_preset,
)
from toex_tf.inference.decoding import DECODE_CRITERIA  # noqa: E402
from toex_tf.layers.top_k_confidence_gate import CRITERIA  # noqa: E402

FLAGS = flags.FLAGS

MODES = [
    "train",
    "eval",
    "train_and_eval",
    "generate",
    "benchmark",
    "calibrate",
    "train_gates",
    "export",
]
flags.DEFINE_enum("mode", "train_and_eval", MODES, "What to run.")
flags.DEFINE_string("output_dir", None, "Where the model, results and logs go.")
flags.DEFINE_enum("model", "gpt", ["gpt", "llama"], "Model family.")
flags.DEFINE_enum(
    "phase",
    None,
    ["base", "routers", "exits", "full"],
    "--model=llama training phase: base (pretrain), routers, exits or full (frozen base).",
)
flags.DEFINE_string(
    "init_from", None, "--model=llama: a checkpoint handle (dir, hf://, kaggle://) or .keras file."
)
flags.DEFINE_enum("llama_preset", "llama-small", sorted(LLAMA_PRESETS), "--phase=base: size.")
flags.DEFINE_list("llama_exit_layers", [], "--model=llama exits; empty: the preset's.")
flags.DEFINE_float("capacity_start", 0.9, "--phase=routers/full: schedule start.", 0.01, 1.0)
flags.DEFINE_float("compute_weight", 0.5, "--phase=exits/full: exit-depth penalty.", 0.0)
flags.DEFINE_float(
    "exit_depth", 0.0, "--model=llama eval: target average exit layer (0: no exits)."
)
flags.DEFINE_float(
    "target_speedup", 0.0, "--model=llama: search capacity for this measured speedup."
)
flags.DEFINE_list(
    "llama_capacities", ["0.9", "0.7", "0.55", "0.4"], "--model=llama eval capacities."
)
flags.DEFINE_enum("preset", "quickstart", sorted(PRESETS), "Named model size.")
flags.DEFINE_integer("hidden_dim", None, "Override the preset's width.", lower_bound=1)
flags.DEFINE_integer("num_layers", None, "Override the preset's depth.", lower_bound=1)
flags.DEFINE_integer("num_heads", None, "Override the preset's heads.", lower_bound=1)
flags.DEFINE_integer("max_length", None, "Override the preset's max_length.", lower_bound=1)
flags.DEFINE_string("exit_layers", "all", "'all', 'none' or comma-separated 1-based layers.")
flags.DEFINE_enum(
    "output_embedding", "shortlist", ["shortlist", "low_rank"], "Cheap exit head kind."
)
flags.DEFINE_integer("shortlist_size", None, "Tokens in the exit shortlist.", lower_bound=2)
flags.DEFINE_integer("low_rank", None, "Rank of the low-rank exit head.", lower_bound=1)
flags.DEFINE_float("dropout", 0.0, "Dropout.", lower_bound=0.0, upper_bound=0.9)
flags.DEFINE_float("layer_dropout", 0.0, "Layer dropout at the last layer.", 0.0, 0.9)
flags.DEFINE_float("capacity", 1.0, "FFN SkipRouter capacity in (0, 1].", 0.01, 1.0)

flags.DEFINE_string("dataset", "builtin", "'builtin', 'text:GLOB' or 'tfds:NAME[/CONFIG]'.")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_string("tfds_text_key", "text", "Text feature of a TFDS dataset.")
flags.DEFINE_enum("tokenizer", "sentencepiece", ["byte", "sentencepiece"], "Tokenizer.")
flags.DEFINE_integer("vocab_size", 2048, "SentencePiece vocabulary size.", lower_bound=2)
flags.DEFINE_float("validation_fraction", 0.1, "Held-out share of documents.", 0.001, 0.9)

flags.DEFINE_integer("seq_len", 128, "Training window length.", lower_bound=2)
flags.DEFINE_integer("batch_size", 16, "Global batch size.", lower_bound=1)
flags.DEFINE_integer("train_steps", 1000, "Optimizer steps.", lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.", lower_bound=0.0)
flags.DEFINE_integer("warmup_steps", 100, "Linear warm-up steps.", lower_bound=0)
flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay.", lower_bound=0.0)
flags.DEFINE_string(
    "exit_loss_weights", "linear", f"One of {EXIT_WEIGHT_SCHEDULES} or comma-separated weights."
)
flags.DEFINE_float("distill_weight", 0.0, "Weight of distillation from the final exit.", 0.0)
flags.DEFINE_float("distill_temperature", 1.0, "Distillation temperature.", lower_bound=0.01)
flags.DEFINE_integer("checkpoint_every", 100, "Save a checkpoint every N steps.", lower_bound=1)
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"], "tf.distribute.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_bool("jit_compile", True, "Compile the training step with XLA.")
flags.DEFINE_bool(
    "core_parallel",
    False,
    "TensorFlow on CPU: one thread per op, independent ops side by side and large products "
    "split in row blocks (toex_tf.inference.tf_threads): faster batch-1 decoding; an export "
    "keeps the splits.",
)

flags.DEFINE_list("criteria", list(CRITERIA), f"Exit criteria to sweep: {CRITERIA}.")
flags.DEFINE_list(
    "thresholds",
    ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "0.95", "1.0"],
    "Thresholds in [0, 1] to sweep.",
)
flags.DEFINE_integer("eval_windows", 256, "Held-out windows to evaluate.", lower_bound=1)
flags.DEFINE_enum(
    "confidence_source",
    "cheap",
    ["cheap", "full"],
    "Confidence from the cheap LightweightOutputEmbedding head or the full head.",
)


flags.DEFINE_string("prompt", None, "--mode=generate: the prompt text.")
flags.DEFINE_integer(
    "max_new_tokens", 64, "--mode=generate/calibrate: tokens to generate.", lower_bound=1
)
flags.DEFINE_enum(
    "decode_mode", "lazy", ["full", "unfrozen", "frozen", "lazy", "speculative"], "Exit mode."
)
flags.DEFINE_enum(
    "decode_criterion", "max_prob", list(DECODE_CRITERIA), "Exit criterion at decode time."
)
flags.DEFINE_list(
    "decision_layers", [], "Exits where a decode step may stop (e.g. 3); empty: every exit."
)
flags.DEFINE_integer("max_pending", 8, "Lazy mode: the catch-up window.", lower_bound=2)
flags.DEFINE_string(
    "export_dir", None, "--mode=export: where the SavedModel goes (default OUTPUT_DIR/saved_model)."
)
flags.DEFINE_enum(
    "export_text",
    "auto",
    ["auto", "yes", "no"],
    "--mode=export: add the text-in, text-out `generate_text` signature (in-graph tokenizer). "
    "auto: only when core TF ops suffice (the byte tokenizer); yes: SentencePiece too, "
    "through tensorflow-text's custom op, which every process that loads the export then needs.",
)
flags.DEFINE_integer("patience", 2, "patience criterion: agreeing exits needed.", 1)
flags.DEFINE_float(
    "threshold_decay", None, "CALM decay temperature of the threshold with position.", 0.0
)
flags.DEFINE_bool(
    "decode_jit_compile", False, "Compile decoding with XLA too (generate, benchmark)."
)
flags.DEFINE_integer("gate_epochs", 5, "--mode=train_gates: epochs over the windows.", 1)
flags.DEFINE_integer("gate_windows", 512, "--mode=train_gates: training windows.", 1)
flags.DEFINE_integer("gate_units", 0, "--mode=train_gates: gate hidden width (0: linear).", 0)
flags.DEFINE_float("decode_threshold", 0.2, "Exit threshold in [0, 1].", 0.0, 1.0)
flags.DEFINE_enum("sampling", "greedy", ["greedy", "sample"], "Decoding strategy.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.", lower_bound=1e-3)
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).", 0)
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.", 1e-6, 1.0)
flags.DEFINE_integer("draft_layer", 1, "Speculative mode: the drafting exit layer.", 1)
flags.DEFINE_integer("draft_length", 4, "Speculative mode: drafts per round.", 1)

flags.DEFINE_integer(
    "prompt_length", 32, "--mode=benchmark/calibrate: tokens per held-out prompt.", 1
)
flags.DEFINE_list("benchmark_modes", ["frozen", "lazy"], "Exit modes to time against full.")
flags.DEFINE_list("benchmark_thresholds", ["0.1", "0.2", "0.3"], "Thresholds to time.")
flags.DEFINE_list("benchmark_batches", ["1", "8"], "Batch sizes to time.")
flags.DEFINE_integer("benchmark_new_tokens", 64, "Tokens generated per timed run.", 1)
flags.DEFINE_integer("benchmark_repeats", 3, "Timed runs per setting (median kept).", 1)
flags.DEFINE_list(
    "benchmark_speculative", [], "Speculative settings to time: draft_layer:draft_length pairs."
)
flags.DEFINE_integer("calibration_prompts", 64, "Held-out prompts to calibrate on.", 1)
flags.DEFINE_integer("calibration_batch_size", 8, "Prompts per generate call (serving).", 1)
flags.DEFINE_float("target_agreement", 0.95, "Share of tokens equal to full depth, (0, 1].")
flags.DEFINE_enum(
    "calibration_method",
    "empirical",
    ["empirical", "ltt"],
    "empirical: cheapest threshold meeting the target; ltt: Learn-then-Test guarantee.",
)
flags.DEFINE_float("calibration_delta", 0.1, "ltt: allowed failure probability, (0, 1).")
flags.DEFINE_list(
    "calibration_thresholds", [], "Candidate thresholds in [0, 1]; empty: 1.0, 0.95, ..., 0.0."
)

BENCHMARK_MODES = ("unfrozen", "frozen", "lazy")


@flags.validator("decision_layers", message="--decision_layers must be positive integers.")
def _check_decision_layers(values):
    return all(value.isdigit() and int(value) > 0 for value in values)


def _policy_options() -> dict:
    """ExitPolicy settings beyond mode, criterion and threshold, from the flags."""
    return {
        "decision_layers": tuple(int(v) for v in FLAGS.decision_layers) or None,
        "max_pending": FLAGS.max_pending,
        "patience": FLAGS.patience,
        "threshold_decay": FLAGS.threshold_decay,
    }


@flags.validator("criteria", message=f"--criteria must be a subset of {CRITERIA}.")
def _check_criteria(values):
    return bool(values) and all(value in CRITERIA for value in values)


@flags.validator("thresholds", message="--thresholds must be numbers in [0, 1].")
def _check_thresholds(values):
    try:
        return bool(values) and all(0.0 <= float(value) <= 1.0 for value in values)
    except ValueError:
        return False


def _numbers_in_unit_interval(values) -> bool:
    try:
        return all(0.0 <= float(value) <= 1.0 for value in values)
    except ValueError:
        return False


flags.register_validator(
    "benchmark_thresholds",
    lambda values: bool(values) and _numbers_in_unit_interval(values),
    message="--benchmark_thresholds must be numbers in [0, 1].",
)
flags.register_validator(
    "calibration_thresholds",
    _numbers_in_unit_interval,
    message="--calibration_thresholds must be numbers in [0, 1].",
)
flags.register_validator(
    "benchmark_modes",
    lambda values: bool(values) and all(value in BENCHMARK_MODES for value in values),
    message=f"--benchmark_modes must be a subset of {BENCHMARK_MODES}.",
)
flags.register_validator(
    "benchmark_batches",
    lambda values: bool(values) and all(value.isdigit() and int(value) > 0 for value in values),
    message="--benchmark_batches must be positive integers, e.g. 1,8.",
)
flags.register_validator(
    "benchmark_speculative",
    lambda values: all(
        len(value.split(":")) == 2
        and all(part.isdigit() and int(part) > 0 for part in value.split(":"))
        for value in values
    ),
    message="--benchmark_speculative must be draft_layer:draft_length pairs, e.g. 1:4,2:4.",
)
flags.register_validator(
    "target_agreement",
    lambda value: 0.0 < value <= 1.0,
    message="--target_agreement must be in (0, 1].",
)
flags.register_validator(
    "calibration_delta",
    lambda value: 0.0 < value < 1.0,
    message="--calibration_delta must be in (0, 1).",
)


def _configs():
    overrides = {
        name: getattr(FLAGS, name)
        for name in (
            "hidden_dim",
            "num_layers",
            "num_heads",
            "max_length",
            "shortlist_size",
            "low_rank",
        )
        if getattr(FLAGS, name) is not None
    }
    data = DataConfig(
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        tokenizer=FLAGS.tokenizer,
        vocab_size=FLAGS.vocab_size,
        validation_fraction=FLAGS.validation_fraction,
    )
    train = TrainConfig(
        steps=FLAGS.train_steps,
        batch_size=FLAGS.batch_size,
        seq_len=FLAGS.seq_len,
        learning_rate=FLAGS.learning_rate,
        warmup_steps=FLAGS.warmup_steps,
        weight_decay=FLAGS.weight_decay,
        exit_loss_weights=FLAGS.exit_loss_weights,
        distill_weight=FLAGS.distill_weight,
        distill_temperature=FLAGS.distill_temperature,
        checkpoint_every=FLAGS.checkpoint_every,
        strategy=FLAGS.strategy,
        seed=FLAGS.seed,
        jit_compile=FLAGS.jit_compile,
    )
    evaluation = EvalConfig(
        criteria=tuple(FLAGS.criteria),
        thresholds=tuple(float(t) for t in FLAGS.thresholds),
        confidence_source=FLAGS.confidence_source,
    )
    return overrides, data, train, evaluation


def _flag_dict() -> dict:
    """This module's flags and their values (for results.json and the config log)."""
    return {f.name: f.value for f in FLAGS.get_flags_for_module(sys.modules[__name__])}


def main(argv):
    try:
        _main(argv)
    except (ValueError, TypeError) as error:
        # Bad input (data, flags that only the library can check, checkpoints): one clear
        # line instead of a traceback.
        sys.exit(f"toex_tf.run: error: {error}")


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.output_dir:
        raise app.UsageError("--output_dir is required.")
    if FLAGS.core_parallel:  # before TensorFlow runs its first op
        from toex_tf.inference.tf_threads import use_core_parallel_decoding  # noqa: PLC0415

        try:
            use_core_parallel_decoding()
        except RuntimeError as error:
            raise app.UsageError(f"--core_parallel: {error}") from error
    from toex_tf import tf_jobs as pipeline  # noqa: PLC0415 - TensorFlow after flag checks

    overrides, data, train, evaluation = _configs()
    flag_values = _flag_dict()
    if FLAGS.model == "llama":
        _llama(pipeline, data, train, flag_values)
        return
    if FLAGS.mode == "generate" and FLAGS.prompt is None:
        raise ValueError("--mode=generate needs --prompt.")
    if FLAGS.mode == "calibrate" and FLAGS.decode_mode not in BENCHMARK_MODES:
        raise ValueError(
            f"--mode=calibrate needs an exiting --decode_mode {BENCHMARK_MODES}; got "
            f"{FLAGS.decode_mode!r}."
        )
    model_path = os.path.join(FLAGS.output_dir, "model.keras")
    if FLAGS.mode in (
        "eval",
        "generate",
        "benchmark",
        "calibrate",
        "train_gates",
        "export",
    ) and not os.path.exists(model_path):
        raise ValueError(f"no model at {model_path!r}: train first (--mode=train).")
    if FLAGS.mode == "export":
        _export(pipeline, model_path)
        return
    if FLAGS.mode == "generate":
        _generate(pipeline, flag_values)
        return
    if FLAGS.mode == "benchmark":
        _benchmark(pipeline, data, flag_values)
        return
    if FLAGS.mode == "calibrate":
        _calibrate(pipeline, data, flag_values)
        return
    # The model settings are checked before the (slower) data preparation; the
    # vocabulary size comes from the tokenizer afterwards.
    model_config = gpt_preset(
        FLAGS.preset,
        **overrides,
        exit_layers=FLAGS.exit_layers,
        output_embedding_mode=FLAGS.output_embedding,
        dropout=FLAGS.dropout,
        layer_dropout=FLAGS.layer_dropout,
        capacity=FLAGS.capacity,
    )
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    prepared = pipeline.prepare_data(data, train.seq_len, FLAGS.output_dir, seed=train.seed)
    model_config = dataclasses.replace(model_config, vocab_size=prepared.tokenizer.vocab_size)
    results = None
    if FLAGS.mode == "train_gates":
        gates = pipeline.train_gates_saved(
            FLAGS.output_dir,
            prepared,
            windows=FLAGS.gate_windows,
            epochs=FLAGS.gate_epochs,
            hidden_units=FLAGS.gate_units,
            batch_size=train.batch_size,
        )
        _append_to_config_log(flag_values, gates=gates)
        return
    if FLAGS.mode in ("train", "train_and_eval"):
        pipeline.train_and_save(model_config, train, prepared, FLAGS.output_dir)
    if FLAGS.mode in ("eval", "train_and_eval"):
        results = pipeline.evaluate_saved(
            FLAGS.output_dir,
            prepared,
            evaluation,
            FLAGS.eval_windows,
            train.batch_size,
            config={"flags": flag_values},
        )
    _append_to_config_log(flag_values, results=results)


def _llama(pipeline, data, train, flag_values):
    """--model=llama: a training phase, the quality table (--mode=eval) or a speed search."""
    from toex_tf import llama_jobs  # noqa: PLC0415

    if FLAGS.phase is None and FLAGS.mode not in ("eval",) and not FLAGS.target_speedup:
        raise ValueError("--model=llama needs --phase, --mode=eval or --target_speedup.")
    exit_layers = tuple(int(v) for v in FLAGS.llama_exit_layers)
    if not exit_layers:
        exit_layers = LLAMA_PRESETS.get(FLAGS.llama_preset, {}).get(
            "exit_layers", (4, 8, 12, 16, 19)
        )
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    llama_jobs.adopt_tokenizer(FLAGS.init_from, FLAGS.output_dir)
    prepared = pipeline.prepare_data(data, train.seq_len, FLAGS.output_dir, seed=train.seed)
    outcome = {}
    if FLAGS.phase is not None:
        outcome["logs"] = llama_jobs.run_phase(
            FLAGS.phase,
            prepared,
            FLAGS.output_dir,
            train.steps,
            train.batch_size,
            train.learning_rate,
            init_from=FLAGS.init_from,
            preset=FLAGS.llama_preset,
            exit_layers=exit_layers,
            capacity=FLAGS.capacity,
            capacity_start=FLAGS.capacity_start,
            seed=train.seed,
            compute_weight=FLAGS.compute_weight,
        )
    model_path = os.path.join(FLAGS.output_dir, "model.keras")
    if FLAGS.mode == "eval" or FLAGS.target_speedup:
        model = llama_jobs.init_llama(FLAGS.init_from or model_path, exit_layers, FLAGS.capacity)
        if FLAGS.target_speedup:
            outcome["search"] = llama_jobs.search_capacity(
                model,
                prepared.val_inputs[-1:, :16],
                prepared.train_inputs[:64],
                FLAGS.target_speedup,
                exit_depth=FLAGS.exit_depth or None,
            )
            print(json.dumps(outcome["search"]))
        if FLAGS.mode == "eval":
            outcome["results"] = llama_jobs.evaluate(
                model,
                prepared,
                FLAGS.output_dir,
                capacities=[float(c) for c in FLAGS.llama_capacities],
                exit_depth=FLAGS.exit_depth or None,
                eval_windows=FLAGS.eval_windows,
            )
    _append_to_config_log(flag_values, **outcome)


def _append_to_config_log(flag_values: dict, **outcome) -> None:
    """One JSON line per run in OUTPUT_DIR/config_log.jsonl: time, every flag, the outcome."""
    entry = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "flags": flag_values,
        **outcome,
    }
    with open(os.path.join(FLAGS.output_dir, "config_log.jsonl"), "a") as f:
        f.write(json.dumps(entry) + "\n")


def _export(pipeline, model_path):
    from toex_tf.export import SIGNATURES, TEXT_SIGNATURE, export_saved_model  # noqa: PLC0415

    directory = FLAGS.export_dir or os.path.join(FLAGS.output_dir, "saved_model")
    options = _policy_options()
    tokenizer_dir = os.path.join(FLAGS.output_dir, "tokenizer")
    tokenizer = None
    if os.path.isdir(tokenizer_dir):
        from toex_tf.data import load_tokenizer  # noqa: PLC0415

        tokenizer = load_tokenizer(tokenizer_dir)
    with_text, note = text_export_choice(tokenizer, FLAGS.export_text, tokenizer_dir)
    if note:
        print(f"No {TEXT_SIGNATURE} signature: {note}", file=sys.stderr)
    # Rows stop at the tokenizer's end-of-text id, as --mode=generate does.
    eos = getattr(tokenizer, "eos_id", None)
    export_saved_model(
        pipeline.load_model(model_path),
        directory,
        criterion=FLAGS.decode_criterion,
        decision_layers=options["decision_layers"],
        max_pending=options["max_pending"],
        patience=options["patience"],
        threshold_decay=options["threshold_decay"],
        stop_token_ids=() if eos is None else (int(eos),),
        tokenizer=tokenizer if with_text else None,
    )
    signatures = list(SIGNATURES) + ([TEXT_SIGNATURE] if with_text else [])
    print(json.dumps({"saved_model": directory, "signatures": signatures}))


def text_export_choice(tokenizer, export_text: str, tokenizer_dir: str = "OUTPUT_DIR/tokenizer"):
    """`--export_text`: whether `generate_text` goes into the export, and why not (or None).

    auto: only when core TF ops suffice (the byte tokenizer). SentencePiece is
    tensorflow-text's custom op: clients without it (`saved_model_cli`, a plain TF
    process) could not load the export at all, so it goes in only on `yes`.

    Raises:
        app.UsageError: `yes` when the tokenizer has no in-graph form here.
    """
    from toex_tf.data.tokenizers import ByteTokenizer, SentencePieceTokenizer  # noqa: PLC0415

    if export_text == "no":
        return False, None
    if isinstance(tokenizer, ByteTokenizer):
        return True, None
    if tokenizer is None:
        problem = f"no tokenizer in {tokenizer_dir}"
    elif not isinstance(tokenizer, SentencePieceTokenizer):
        problem = f"{type(tokenizer).__name__} has no in-graph form"
    elif export_text == "auto":
        return False, (
            "SentencePiece in the graph is tensorflow-text's custom op, which every client "
            "that loads the export then needs; --export_text=yes adds it"
        )
    else:
        try:
            import tensorflow_text  # noqa: F401, PLC0415
        except Exception as error:  # noqa: BLE001  (a build for another TF fails to load ops)
            problem = (
                "SentencePiece in the graph needs tensorflow-text matching this TensorFlow "
                f"(pip install 'toex-tf[text]'); importing it failed: {error}"
            )
        else:
            return True, None
    if export_text == "yes":
        raise app.UsageError(f"--export_text=yes: {problem}")
    return False, problem


def _generate(pipeline, flag_values):
    result = pipeline.generate_text(
        FLAGS.output_dir,
        FLAGS.prompt,
        FLAGS.max_new_tokens,
        mode=FLAGS.decode_mode,
        criterion=FLAGS.decode_criterion,
        threshold=FLAGS.decode_threshold,
        sampling=FLAGS.sampling,
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        seed=FLAGS.seed,
        draft_layer=FLAGS.draft_layer,
        draft_length=FLAGS.draft_length,
        policy_options=_policy_options(),
        jit_compile=FLAGS.decode_jit_compile,
    )
    print(json.dumps(result, indent=2, ensure_ascii=False))
    _append_to_config_log(flag_values, generate=result)


def _benchmark(pipeline, data, flag_values):
    record = pipeline.benchmark_saved(
        FLAGS.output_dir,
        data,
        modes=tuple(FLAGS.benchmark_modes),
        criterion=FLAGS.decode_criterion,
        thresholds=tuple(float(t) for t in FLAGS.benchmark_thresholds),
        batches=tuple(int(b) for b in FLAGS.benchmark_batches),
        prompt_length=FLAGS.prompt_length,
        new_tokens=FLAGS.benchmark_new_tokens,
        repeats=FLAGS.benchmark_repeats,
        speculative=tuple(
            tuple(int(x) for x in pair.split(":")) for pair in FLAGS.benchmark_speculative
        ),
        seed=FLAGS.seed,
        policy_options=_policy_options(),
        jit_compile=FLAGS.decode_jit_compile,
    )
    _append_to_config_log(flag_values, benchmark=record["rows"])


def _calibrate(pipeline, data, flag_values):
    thresholds = None
    if FLAGS.calibration_thresholds:
        thresholds = tuple(float(t) for t in FLAGS.calibration_thresholds)
    record = pipeline.calibrate_saved(
        FLAGS.output_dir,
        data,
        mode=FLAGS.decode_mode,
        criterion=FLAGS.decode_criterion,
        num_prompts=FLAGS.calibration_prompts,
        prompt_length=FLAGS.prompt_length,
        max_new_tokens=FLAGS.max_new_tokens,
        target_agreement=FLAGS.target_agreement,
        method=FLAGS.calibration_method,
        delta=FLAGS.calibration_delta,
        thresholds=thresholds,
        batch_size=FLAGS.calibration_batch_size,
        seed=FLAGS.seed,
        policy_options=_policy_options(),
    )
    _append_to_config_log(flag_values, calibration=record["calibration"])


def run_main():
    flags.mark_flag_as_required("output_dir")
    app.run(main)


if __name__ == "__main__":
    run_main()
