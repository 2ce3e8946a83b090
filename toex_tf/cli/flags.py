"""Every flag of `python -m toex_tf.run`, defined and validated here and only here.

The other `cli` modules read `FLAGS` and the config builders below; nothing outside
`cli/` and `run.py` knows about absl.
"""

import math
import sys

from absl import flags

from toex_tf.config import (
    EXIT_WEIGHT_SCHEDULES,
    LLAMA_PRESETS,
    PRESETS,
    TRANSFORMER_PRESETS,
    DataConfig,
    EvalConfig,
    TrainConfig,
)
from toex_tf.inference.criteria_names import CRITERIA, DECODE_CRITERIA

FAMILIES = ("gpt", "llama", "seq2seq")

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
    "report",
]
flags.DEFINE_enum("mode", "train_and_eval", MODES, "What to run.")
flags.DEFINE_string("output_dir", None, "Where the model, results and logs go.")
flags.DEFINE_enum("model", "gpt", list(FAMILIES), "Model family; independent of --mode.")
flags.DEFINE_enum(
    "phase",
    None,
    ["base", "routers", "exits", "full", "exit_heads", "lora_exits"],
    "--model=llama --mode=train: base (pretrain), routers, exits or full (frozen base); "
    "exit_heads: exit adapters, norms and gates from cached states of a frozen pretrained "
    "base (a GGUF or checkpoint in --init_from); lora_exits: LoRA on the upper layers with "
    "the exit loss and layer dropout, merged into the weights, then gates refitted.",
)
flags.DEFINE_enum(
    "exit_adapter",
    "none",
    ["none", "linear", "mlp"],
    "--model=llama, loading a checkpoint or GGUF: the ExitAdapter in front of each exit "
    "(a frozen pretrained base needs one: configs/smollm2.cfg uses mlp).",
)
flags.DEFINE_integer("exit_adapter_units", 1024, "Width of an 'mlp' exit adapter.", lower_bound=1)
flags.DEFINE_integer(
    "cache_tokens", 32768, "--phase=exit_heads: training tokens cached.", lower_bound=1
)
flags.DEFINE_integer(
    "head_batch_size", 256, "--phase=exit_heads: tokens per training step.", lower_bound=1
)
flags.DEFINE_integer(
    "lora_rank", 8, "--phase=lora_exits: LoRA rank.", lower_bound=1, upper_bound=64
)
flags.DEFINE_integer(
    "lora_first_layer",
    0,
    "--phase=lora_exits: the lowest tuned layer (1-based); 0: the lowest exit.",
    lower_bound=0,
)
flags.DEFINE_string(
    "init_from",
    None,
    "The model to start from, for every family and mode: a run directory, a .keras file, a "
    "Hugging Face checkpoint directory or an hf://, kaggle:// or TF-Hub handle. Default: "
    "OUTPUT_DIR/model.keras (modes that read a model); train builds a fresh one.",
)
flags.DEFINE_enum("llama_preset", "llama-small", sorted(LLAMA_PRESETS), "--phase=base: size.")
flags.DEFINE_list("llama_exit_layers", [], "--model=llama exits; empty: the preset's.")
flags.DEFINE_float("capacity_start", 0.9, "--phase=routers/full: schedule start.", 0.01, 1.0)
flags.DEFINE_float("compute_weight", 0.5, "--phase=exits/full: exit-depth penalty.", 0.0)
flags.DEFINE_float(
    "exit_depth", 0.0, "--model=llama eval: target average exit layer (0: no exits)."
)
flags.DEFINE_float(
    "target_speedup",
    0.0,
    "--model=llama --mode=benchmark: search the router capacity for this measured speedup.",
)
flags.DEFINE_list(
    "llama_capacities", ["0.9", "0.7", "0.55", "0.4"], "--model=llama eval capacities."
)
flags.DEFINE_enum("preset", "quickstart", sorted(PRESETS), "Named model size.")
flags.DEFINE_enum(
    "seq2seq_preset", "quickstart", sorted(TRANSFORMER_PRESETS), "--model=seq2seq: size."
)
flags.DEFINE_integer(
    "num_encoder_layers", None, "--model=seq2seq: override the encoder depth.", lower_bound=1
)
flags.DEFINE_integer(
    "max_source_length", None, "--model=seq2seq: override the source length.", lower_bound=1
)
flags.DEFINE_bool("tie_embeddings", True, "--model=seq2seq: one matrix for inputs and output.")
flags.DEFINE_string("source_lang", "en", "--model=seq2seq: source language code.")
flags.DEFINE_string("target_lang", "ro", "--model=seq2seq: target language code.")
flags.DEFINE_float(
    "test_fraction", 0.1, "--model=seq2seq: held-out test share of pairs.", 0.001, 0.9
)
flags.DEFINE_integer(
    "eval_sentences", 200, "--model=seq2seq: test sentences translated per setting.", 1
)
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

flags.DEFINE_string(
    "dataset",
    "builtin",
    "'builtin', 'text:GLOB' or 'tfds:NAME[/CONFIG]'. --model=seq2seq: 'builtin' (= 'gettext', "
    "the translations on this machine), 'gettext:DIR', 'files:SRC,TGT', 'tsv:PATH' or "
    "'tfds:wmt16_translate/ro-en'.",
)
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
STRATEGY_HELP = "tf.distribute: mirrored (local devices) or multi_worker (TF_CONFIG's cluster)."
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"], STRATEGY_HELP)
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


flags.DEFINE_multi_string("prompt", None, "--mode=generate: a prompt; repeat the flag for a batch.")
flags.DEFINE_integer(
    "max_new_tokens", 64, "--mode=generate/calibrate: tokens to generate.", lower_bound=1
)
flags.DEFINE_enum(
    "decode_mode", "lazy", ["full", "unfrozen", "frozen", "lazy", "speculative"], "Exit mode."
)
flags.DEFINE_enum(
    "decode_criterion",
    None,
    list(DECODE_CRITERIA),
    "Exit criterion at decode time. Default: the model's own (its learned gates when it has "
    "them, else the criterion of its saved TopKConfidenceGates).",
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
flags.DEFINE_float(
    "decode_threshold",
    None,
    "Exit threshold in [0, 1]. Default: the model's own (see --decode_criterion).",
    0.0,
    1.0,
)
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

flags.DEFINE_list("report_modes", ["unfrozen", "frozen", "lazy"], "--mode=report: exit modes.")
flags.DEFINE_list(
    "report_criteria",
    ["kl"],
    "--mode=report: criteria; with only 'kl' and no --report_thresholds, the KL strengths.",
)
flags.DEFINE_list(
    "report_kl_strengths",
    ["0.5", "1", "2", "4"],
    "--mode=report: seed 003's KL strengths; strength s runs kl at threshold base ** (1 / s).",
)
flags.DEFINE_float(
    "report_kl_base", 0.99, "--mode=report: the kl threshold at strength 1, in (0, 1).", 0.0, 1.0
)
flags.DEFINE_list("report_thresholds", [], "--mode=report: thresholds (instead of strengths).")
flags.DEFINE_integer("report_prompts", 4, "--mode=report: held-out prompts (without --prompt).", 1)
flags.DEFINE_integer("report_timing_rounds", 3, "--mode=report: timed calls per setting.", 1)
flags.DEFINE_string(
    "report_from", None, "--mode=report: rebuild report.html from this report.json, no model."
)

BENCHMARK_MODES = ("unfrozen", "frozen", "lazy")
REPORT_MODES = ("unfrozen", "frozen", "lazy", "speculative")


@flags.validator("decision_layers", message="--decision_layers must be positive integers.")
def _check_decision_layers(values):
    return all(value.isdigit() and int(value) > 0 for value in values)


@flags.validator("criteria", message=f"--criteria must be a subset of {CRITERIA}.")
def _check_criteria(values):
    return bool(values) and all(value in CRITERIA for value in values)


@flags.validator("thresholds", message="--thresholds must be numbers in [0, 1].")
def _check_thresholds(values):
    try:
        return bool(values) and all(0.0 <= float(value) <= 1.0 for value in values)
    except ValueError:
        return False


def _register_subset(name: str, allowed) -> None:
    """`--name` must be a non-empty list of values from `allowed`."""
    flags.register_validator(
        name,
        lambda values: bool(values) and all(value in allowed for value in values),
        message=f"--{name} must be a subset of {allowed}.",
    )


def _positive_number(value) -> bool:
    try:
        return 0.0 < float(value) < float("inf")
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
_register_subset("benchmark_modes", BENCHMARK_MODES)
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
_register_subset("report_modes", REPORT_MODES)
_register_subset("report_criteria", DECODE_CRITERIA)
flags.register_validator(
    "report_thresholds",
    _numbers_in_unit_interval,
    message="--report_thresholds must be numbers in [0, 1].",
)
flags.register_validator(
    "report_kl_strengths",
    lambda values: bool(values) and all(_positive_number(value) for value in values),
    message="--report_kl_strengths must be positive numbers, e.g. 0.5,1,2,4.",
)
flags.register_validator(
    "report_kl_base",
    lambda value: 0.0 < value < 1.0,
    message="--report_kl_base must be in (0, 1).",
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


def data_config() -> DataConfig:
    return DataConfig(
        dataset=FLAGS.dataset,
        data_dir=FLAGS.data_dir,
        tfds_text_key=FLAGS.tfds_text_key,
        tokenizer=FLAGS.tokenizer,
        vocab_size=FLAGS.vocab_size,
        validation_fraction=FLAGS.validation_fraction,
    )


def train_config() -> TrainConfig:
    return TrainConfig(
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


def eval_config() -> EvalConfig:
    return EvalConfig(
        criteria=tuple(FLAGS.criteria),
        thresholds=tuple(float(t) for t in FLAGS.thresholds),
        windows=FLAGS.eval_windows,
        confidence_source=FLAGS.confidence_source,
    )


def gpt_overrides() -> dict:
    """The size flags given on the command line (they override the preset's)."""
    names = ("hidden_dim", "num_layers", "num_heads", "max_length", "shortlist_size", "low_rank")
    return {name: getattr(FLAGS, name) for name in names if getattr(FLAGS, name) is not None}


def seq2seq_overrides() -> dict:
    """The seq2seq size flags given on the command line (they override the preset's)."""
    names = (
        "hidden_dim",
        "num_layers",
        "num_heads",
        "max_length",
        "max_source_length",
        "num_encoder_layers",
        "shortlist_size",
        "low_rank",
    )
    return {name: getattr(FLAGS, name) for name in names if getattr(FLAGS, name) is not None}


def llama_exit_layers() -> tuple:
    """`--llama_exit_layers`, or the preset's exits."""
    layers = tuple(int(v) for v in FLAGS.llama_exit_layers)
    return layers or LLAMA_PRESETS.get(FLAGS.llama_preset, {}).get(
        "exit_layers", (4, 8, 12, 16, 19)
    )


def policy_options() -> dict:
    """`ExitPolicy` settings beyond mode, criterion and threshold."""
    return {
        "decision_layers": tuple(int(v) for v in FLAGS.decision_layers) or None,
        "max_pending": FLAGS.max_pending,
        "patience": FLAGS.patience,
        "threshold_decay": FLAGS.threshold_decay,
    }


def flag_values() -> dict:
    """Every flag of this module and its value (for results.json and the config log)."""
    return {f.name: f.value for f in FLAGS.get_flags_for_module(sys.modules[__name__])}


def check_combinations() -> None:
    """Checks what one flag alone cannot; raises `ValueError` naming the flags."""
    if not FLAGS.output_dir:
        raise ValueError("--output_dir is required.")
    for name, value in flag_values().items():  # absl's float bounds let NaN through
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"--{name} is NaN; expected a number.")
    if FLAGS.strategy == "multi_worker":
        from toex_tf.training.multi_worker import cluster_task  # noqa: PLC0415

        cluster_task()  # a malformed TF_CONFIG fails here, named
    if FLAGS.phase is not None and FLAGS.model != "llama":
        raise ValueError(f"--phase is for --model=llama; got --model={FLAGS.model}.")
    if FLAGS.target_speedup and (FLAGS.model != "llama" or FLAGS.mode != "benchmark"):
        raise ValueError(
            "--target_speedup searches a Llama's router capacity: it needs --model=llama and "
            f"--mode=benchmark; got --model={FLAGS.model} --mode={FLAGS.mode}."
        )
    if FLAGS.target_speedup and FLAGS.target_speedup <= 1.0:
        raise ValueError(f"--target_speedup must be > 1; got {FLAGS.target_speedup}.")
    if FLAGS.model == "seq2seq" and FLAGS.mode == "train_gates":
        raise ValueError(
            "--model=seq2seq does not support --mode=train_gates yet; it supports train, "
            "eval, train_and_eval, generate, benchmark, calibrate and export."
        )
    if FLAGS.mode == "generate" and not FLAGS.prompt:
        raise ValueError("--mode=generate needs --prompt.")
    if FLAGS.mode == "calibrate" and FLAGS.decode_mode not in BENCHMARK_MODES:
        raise ValueError(
            f"--mode=calibrate needs an exiting --decode_mode {BENCHMARK_MODES}; got "
            f"{FLAGS.decode_mode!r}."
        )
    if FLAGS.model == "llama" and FLAGS.mode in ("train", "train_and_eval") and not FLAGS.phase:
        raise ValueError(
            "--model=llama --mode=train needs --phase (base, routers, exits, full, exit_heads, "
            "lora_exits)."
        )
