"""What every command shares: the model a run reads (`--init_from`), its data, its logs."""

import datetime
import json
import os

from toex_tf.cli.flags import FLAGS, flag_values, llama_exit_layers


def write_json(path: str, record: dict) -> None:
    """Writes `record` to `path` through a temporary file (never half a file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
    os.replace(path + ".tmp", path)


def append_to_config_log(**outcome) -> None:
    """One JSON line per run in OUTPUT_DIR/config_log.jsonl: time, every flag, the outcome.

    Only the chief of a multi-worker run writes it."""
    from toex_tf.training.multi_worker import is_chief  # noqa: PLC0415

    if not is_chief():
        return
    entry = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "flags": flag_values(),
        **outcome,
    }
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    with open(os.path.join(FLAGS.output_dir, "config_log.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, default=str) + "\n")


def model_source() -> str:
    """`--init_from`, or the run's own directory (OUTPUT_DIR/model.keras)."""
    return FLAGS.init_from or FLAGS.output_dir


def load_run_model(policy=None, trained_here: bool = False):
    """The model this run reads, with its tokenizer, as an `AdaptiveLM` (either family).

    `--init_from` (a run directory, a `.keras` file, a checkpoint or a handle) or
    OUTPUT_DIR. A Llama checkpoint gets the exits of `--llama_exit_layers` and the
    routers of `--capacity`; a `.keras` model keeps its own. `trained_here`: the model
    this run has just trained into OUTPUT_DIR, whatever `--init_from` says.
    """
    from toex_tf.api import load, source_kind  # noqa: PLC0415 - TensorFlow after the flags

    source = FLAGS.output_dir if trained_here else model_source()
    if source == FLAGS.output_dir and not os.path.isfile(os.path.join(source, "model.keras")):
        raise ValueError(
            f"no model at {os.path.join(source, 'model.keras')!r}: --mode={FLAGS.mode} needs "
            "--init_from (a run directory, .keras file, checkpoint or handle) or a model "
            "trained into OUTPUT_DIR (--mode=train)."
        )
    found = source_kind(source)
    if found is None:
        raise ValueError(
            f"no model at --init_from={source!r}: expected a run directory with model.keras, "
            "a .keras file, a checkpoint directory with config.json, or a GGUF file or "
            "handle (smollm2)."
        )
    kind = found[0]
    options = {}
    if kind in ("checkpoint", "gguf"):
        options = {
            "exit_layers": llama_exit_layers(),
            "capacity": FLAGS.capacity,
            "exit_adapter": FLAGS.exit_adapter,
            "exit_adapter_units": FLAGS.exit_adapter_units,
        }
    return load(source, policy=policy, **options)


def prepared_data(tokenizer=None):
    """The run's corpus, split and cut into windows (`toex_tf.data.prepared`).

    The tokenizer is the model's when it has one (so ids match it), else the one in
    OUTPUT_DIR/tokenizer, else a new one trained on the training split.
    """
    from toex_tf.cli.flags import data_config  # noqa: PLC0415
    from toex_tf.data.prepared import prepare_data  # noqa: PLC0415
    from toex_tf.data.tokenizers import MANIFEST_FILE, load_tokenizer  # noqa: PLC0415
    from toex_tf.training.multi_worker import write_dir  # noqa: PLC0415

    writes = write_dir(FLAGS.output_dir)
    chief_tokenizer = os.path.join(FLAGS.output_dir, "tokenizer")
    if tokenizer is None and writes != FLAGS.output_dir:
        # A non-chief worker writes its tokenizer and data cache into its own directory,
        # but uses the chief's tokenizer when there is one (a resumed run).
        if os.path.exists(os.path.join(chief_tokenizer, MANIFEST_FILE)):
            tokenizer = load_tokenizer(chief_tokenizer)
    os.makedirs(writes, exist_ok=True)
    return prepare_data(data_config(), FLAGS.seq_len, writes, seed=FLAGS.seed, tokenizer=tokenizer)


def held_out(tokenizer, count: int, length: int):
    """`count` held-out prompts of `length` tokens (`toex_tf.data.prepared`)."""
    from toex_tf.cli.flags import data_config  # noqa: PLC0415
    from toex_tf.data.prepared import held_out_prompts  # noqa: PLC0415

    # A streamed corpus's shards, when this run wrote them, are reused.
    cache_dir = os.path.join(FLAGS.output_dir, "data")
    return held_out_prompts(
        data_config(),
        tokenizer,
        count,
        length,
        seed=FLAGS.seed,
        cache_dir=cache_dir if os.path.isdir(cache_dir) else None,
    )


def model_record(model) -> dict:
    """The model's config and size, for a result file."""
    return {**model.config.to_dict(), "parameters": model.count_params()}


def check_fits(model, prompt_length: int, new_tokens: int, new_tokens_flag: str) -> None:
    """Raises when `--prompt_length` plus the new tokens exceed the model's length."""
    if prompt_length + new_tokens > model.max_length:
        raise ValueError(
            f"--prompt_length={prompt_length} + --{new_tokens_flag}={new_tokens} exceeds the "
            f"model's max_length={model.max_length}."
        )
