"""Translation quality and speed per exit setting: sacreBLEU, exit layers, measured speedup.

Every setting translates the same held-out sentences one at a time (batch 1, the case
exits are for), through one compiled program per setting (`translate`). Quality is
sacreBLEU's BLEU and chrF against the references. Speed is measured side by side: for
each sentence the full-depth program and the setting's program run back to back, so a
slow spell of the machine hits both. The decoder's share is the total minus the
encoder's time on that sentence (timed once per sentence; it is the same in every
setting), which gives the *measured decoder speedup*, next to the ideal one the exit
layers promise.
"""

import copy
import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from toex_tf.inference.adapter import DecoderAdapter
from toex_tf.inference.compiled import compile_function
from toex_tf.inference.policy import ExitPolicy
from toex_tf.inference.translate import pad_sources, translate


@dataclasses.dataclass(frozen=True)
class TranslationSetting:
    """One row of the sweep: an exit mode with its criterion and threshold, or a
    speculative draft layer (`mode="speculative"`)."""

    mode: str = "full"
    criterion: str = "max_prob"
    threshold: float = 1.0
    draft_layer: int | None = None
    draft_length: int = 4
    max_pending: int = 4
    decision_layers: tuple | None = None  # None: decide at every exit

    def label(self) -> str:
        if self.mode == "speculative":
            return f"speculative draft {self.draft_layer}x{self.draft_length}"
        if self.mode == "full":
            return "full"
        where = ""
        if self.decision_layers is not None:
            where = " @" + ",".join(str(layer) for layer in self.decision_layers)
        return f"{self.mode} {self.criterion} {self.threshold:g}{where}"


def sweep_settings(
    modes: Sequence[str],
    criteria: Sequence[str],
    thresholds: Sequence[float],
    draft_layers: Sequence[int] = (),
    draft_length: int = 4,
) -> list[TranslationSetting]:
    """Every mode × criterion × threshold, then one speculative row per draft layer."""
    settings = [
        TranslationSetting(mode, criterion, float(threshold))
        for mode in modes
        if mode not in ("full", "speculative")
        for criterion in criteria
        for threshold in thresholds
    ]
    settings += [
        TranslationSetting("speculative", draft_layer=layer, draft_length=draft_length)
        for layer in draft_layers
    ]
    return settings


class SentenceTranslator:
    """Batch-1 translation of token ids with one setting, compiled once per mode.

    Sources are padded to the model's `max_source_length`, and the threshold is an input
    of the compiled program, so every sentence and every threshold of a mode reuse one
    trace (XLA compiles a 6-layer decoder in about 10 s on 2 cores).
    """

    def __init__(self, model, tokenizer, setting: TranslationSetting, jit_compile: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.setting = setting
        self.jit_compile = jit_compile
        adapter = DecoderAdapter(model)
        new_tokens = model.max_length - 1
        options = {"stop_token_ids": (tokenizer.eos_id,), "return_state": True}
        if setting.mode == "speculative":
            options.update(draft_layer=setting.draft_layer, draft_length=setting.draft_length)
        policy = None
        if setting.mode != "speculative":
            policy = ExitPolicy(
                setting.mode,
                setting.criterion,
                setting.threshold,
                max_pending=setting.max_pending,
                decision_layers=setting.decision_layers,
            )

        def run(ids, mask, threshold):
            if setting.mode != "speculative":
                options["policy"] = dataclasses.replace(policy, threshold=threshold)
            return translate(adapter, ids, mask, new_tokens, tokenizer.eos_id, **options)

        self._run = compile_function(run, jit_compile, numpy_outputs=True)

    def with_threshold(self, threshold: float) -> "SentenceTranslator":
        """The same compiled program at another threshold."""
        other = copy.copy(self)
        other.setting = dataclasses.replace(self.setting, threshold=float(threshold))
        return other

    def source_arrays(self, source_ids: list) -> tuple:
        return pad_sources([source_ids], length=self.model.max_source_length)

    def __call__(self, arrays) -> dict:
        """Translates one padded source: `{"ids", "exit_layers", "state"}`, cut at eos."""
        threshold = np.asarray(self.setting.threshold, "float32")
        tokens, exits, state = self._run(*arrays, threshold)
        tokens, exits = tokens[0].tolist(), exits[0].tolist()
        eos = self.tokenizer.eos_id
        length = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        return {"ids": tokens[:length], "exit_layers": exits[:length], "state": state}


def _encoder_timer(model, jit_compile: bool):
    def encode(ids, mask):
        return model.decoder_context(ids, mask)

    return compile_function(encode, jit_compile, numpy_outputs=True)


def evaluate_translation(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    settings: Sequence[TranslationSetting],
    jit_compile: bool = True,
    num_examples: int = 5,
    progress=None,
) -> dict:
    """BLEU, chrF, exit layers and measured speedup of every setting on `pairs`.

    Args:
        model: a trained `EarlyExitTransformer`.
        tokenizer: its tokenizer (eos starts and stops the target).
        pairs: held-out `(source, reference)` pairs; sources longer than the model's
            `max_source_length` are left out (counted in `skipped_long_sources`).
        settings: the sweep (`sweep_settings`); full depth is the baseline.
        jit_compile: compile with XLA (TensorFlow).
        num_examples: sentences whose outputs, with each token's exit layer, go in.
        progress: None, or `(done, total, label)` callable after each setting.

    Returns:
        The `results.json` dict: `baseline` (`bleu`, `chrf`, `num_layers`, ...),
        `sweeps` (one row per setting: `mode`, `criterion`, `threshold`, `bleu`, `chrf`,
        `avg_exit_layer`, `ideal_speedup`, `measured_speedup`, ...) and `examples`.
    """
    import sacrebleu  # noqa: PLC0415 - only the evaluation needs it

    encoded = [(tokenizer.encode(source), source, reference) for source, reference in pairs]
    kept = [row for row in encoded if 0 < len(row[0]) <= model.max_source_length]
    if not kept:
        raise ValueError(
            f"none of the {len(pairs)} pairs has a source of 1..{model.max_source_length} "
            "tokens; expected held-out pairs the model can read."
        )
    references = [reference for _, _, reference in kept]
    full = SentenceTranslator(model, tokenizer, TranslationSetting("full"), jit_compile)
    arrays = [full.source_arrays(ids) for ids, _, _ in kept]
    encoder = _encoder_timer(model, jit_compile)
    encoder(*arrays[0])  # compile
    encoder_seconds = []
    for source in arrays:
        start = time.perf_counter()
        encoder(*source)
        encoder_seconds.append(time.perf_counter() - start)
    full(arrays[0])  # compile
    full_by_jit = {jit_compile: full}
    num_layers = model.num_layers

    def run_setting(translator, paired: bool):
        outputs, seconds, full_seconds = [], 0.0, 0.0
        reference = full_by_jit.get(translator.jit_compile)
        if paired and reference is None:
            reference = SentenceTranslator(model, tokenizer, TranslationSetting("full"), False)
            reference(arrays[0])  # compile
            full_by_jit[False] = reference
        for source in arrays:
            if paired:
                start = time.perf_counter()
                reference(source)
                full_seconds += time.perf_counter() - start
            start = time.perf_counter()
            outputs.append(translator(source))
            seconds += time.perf_counter() - start
        return outputs, seconds, full_seconds

    full_outputs, full_seconds, _ = run_setting(full, paired=False)
    encoder_total = float(sum(encoder_seconds))

    def quality(outputs) -> dict:
        hypotheses = [tokenizer.decode(_without_eos(o["ids"], tokenizer)) for o in outputs]
        return {
            "bleu": round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2),
            "chrf": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
            "hypotheses": hypotheses,
        }

    base_quality = quality(full_outputs)
    generated = sum(len(o["ids"]) for o in full_outputs)
    baseline = {
        "bleu": base_quality["bleu"],
        "chrf": base_quality["chrf"],
        "num_layers": num_layers,
        "num_encoder_layers": model.config.num_encoder_layers,
        "sentences": len(kept),
        "skipped_long_sources": len(pairs) - len(kept),
        "generated_tokens": generated,
        "seconds": round(full_seconds, 4),
        "encoder_seconds": round(encoder_total, 4),
        "decoder_tokens_per_second": round(generated / max(full_seconds - encoder_total, 1e-9), 1),
    }
    rows, compiled = [], {}
    for index, setting in enumerate(settings):
        # Lazy mode of the encoder-decoder under XLA recompiles the decode loop for every
        # new source (about 5 s each on the quickstart model; frozen and speculative do
        # not; cause not found yet): its rows run, and are timed against full depth, in
        # the plain graph.
        row_jit = jit_compile and setting.mode != "lazy"
        key = (*dataclasses.astuple(dataclasses.replace(setting, threshold=0.0)), row_jit)
        if key not in compiled:
            compiled[key] = SentenceTranslator(model, tokenizer, setting, row_jit)
            compiled[key](arrays[0])  # compile
        translator = compiled[key].with_threshold(setting.threshold)
        outputs, seconds, paired_full = run_setting(translator, paired=True)
        row_quality = quality(outputs)
        exits = [layer for o in outputs for layer in o["exit_layers"] if layer > 0]
        avg_exit = float(np.mean(exits)) if exits else float(num_layers)
        same = [a == b for a, b in zip(row_quality["hypotheses"], base_quality["hypotheses"])]
        full_decoder = max(paired_full - encoder_total, 1e-9)
        decoder = max(seconds - encoder_total, 1e-9)
        rows.append(
            {
                "mode": setting.mode,
                "criterion": None if setting.mode == "speculative" else setting.criterion,
                "threshold": None if setting.mode == "speculative" else setting.threshold,
                "draft_layer": setting.draft_layer,
                "draft_length": setting.draft_length if setting.mode == "speculative" else None,
                "decision_layers": None
                if setting.decision_layers is None
                else list(setting.decision_layers),
                "bleu": row_quality["bleu"],
                "chrf": row_quality["chrf"],
                "bleu_delta": round(row_quality["bleu"] - baseline["bleu"], 2),
                "avg_exit_layer": round(avg_exit, 3),
                "ideal_speedup": round(_ideal_speedup(setting, outputs, avg_exit, num_layers), 3),
                "measured_speedup": round(full_decoder / decoder, 3),
                "measured_end_to_end_speedup": round(paired_full / max(seconds, 1e-9), 3),
                "agreement_with_full": round(float(np.mean(same)), 4),
                "generated_tokens": sum(len(o["ids"]) for o in outputs),
                "jit_compile": row_jit,
            }
        )
        if progress is not None:
            progress(index + 1, len(settings), setting.label())
    examples = [
        {
            "source": source,
            "reference": reference,
            "output": base_quality["hypotheses"][i],
            "tokens": [
                {"piece": tokenizer.decode([token]), "exit_layer": layer}
                for token, layer in zip(full_outputs[i]["ids"], full_outputs[i]["exit_layers"])
            ],
        }
        for i, (_, source, reference) in enumerate(kept[:num_examples])
    ]
    return {"baseline": baseline, "sweeps": rows, "examples": examples}


def _without_eos(ids: list, tokenizer) -> list:
    return [token for token in ids if token != tokenizer.eos_id]


def _ideal_speedup(setting, outputs, avg_exit: float, num_layers: int) -> float:
    """Full depth's layer passes over the setting's, counted (no head or check cost).

    Frozen and lazy: `L / avg_exit_layer` per token (lazy's catch-up is counted as
    free, as in FREE's accounting; its cost shows in the measured figure). Unfrozen runs
    every layer: 1. Speculative: tokens × L over the rounds' draft and verify passes.
    """
    if setting.mode == "unfrozen" or setting.mode == "full":
        return 1.0
    if setting.mode == "speculative":
        tokens = sum(len(o["ids"]) for o in outputs)
        rounds = sum(int(o["state"]["rounds"]) for o in outputs)
        per_round = setting.draft_length * setting.draft_layer + (num_layers - setting.draft_layer)
        return tokens * num_layers / max(rounds * per_round, 1)
    return num_layers / avg_exit


def format_translation_table(results: dict) -> str:
    """A printed table: one line per setting, BLEU next to ideal and measured speedups."""
    base = results["baseline"]
    lines = [
        f"full depth ({base['num_layers']} decoder layers): BLEU {base['bleu']:.2f}, chrF "
        f"{base['chrf']:.2f} on {base['sentences']} sentences, "
        f"{base['decoder_tokens_per_second']} decoder tok/s",
        f"{'setting':<34}{'BLEU':>7}{'ΔBLEU':>7}{'chrF':>7}{'avg exit':>9}{'ideal':>7}"
        f"{'measured':>9}",
    ]
    for row in results["sweeps"]:
        setting = TranslationSetting(
            row["mode"],
            row["criterion"] or "max_prob",
            row["threshold"] if row["threshold"] is not None else 1.0,
            row["draft_layer"],
            row["draft_length"] or 4,
            decision_layers=tuple(row.get("decision_layers") or ()) or None,
        )
        lines.append(
            f"{setting.label():<34}{row['bleu']:>7.2f}{row['bleu_delta']:>7.2f}"
            f"{row['chrf']:>7.2f}{row['avg_exit_layer']:>9.2f}{row['ideal_speedup']:>6.2f}x"
            f"{row['measured_speedup']:>8.2f}x"
        )
    return "\n".join(lines)


def plot_translation_sweep(results: dict, path: str) -> str:
    """BLEU against measured decoder speedup (filled) and ideal speedup (hollow); PNG."""
    from matplotlib.figure import Figure  # noqa: PLC0415 - plotting only

    base = results["baseline"]
    figure = Figure(figsize=(6.4, 4.2), dpi=120, layout="tight")
    axis = figure.subplots()
    for mode in dict.fromkeys(row["mode"] for row in results["sweeps"]):
        rows = [row for row in results["sweeps"] if row["mode"] == mode]
        points = axis.plot(
            [row["measured_speedup"] for row in rows],
            [row["bleu"] for row in rows],
            marker="o",
            linestyle="",
            label=f"{mode} (measured)",
        )
        axis.plot(
            [row["ideal_speedup"] for row in rows],
            [row["bleu"] for row in rows],
            marker="o",
            linestyle="",
            markerfacecolor="none",
            color=points[0].get_color(),
            label=f"{mode} (ideal)",
        )
    axis.axhline(base["bleu"], color="grey", linewidth=1, label="full depth")
    axis.axhline(base["bleu"] - 1, color="grey", linestyle=":", linewidth=1, label="-1 BLEU")
    axis.axvline(1.4, color="grey", linestyle="--", linewidth=0.5)
    axis.set_xlabel("decoder speedup over full depth (batch 1)")
    axis.set_ylabel("BLEU (sacreBLEU)")
    axis.set_title(f"Decoder exits, {base['num_layers']} layers, {base['sentences']} sentences")
    axis.legend(fontsize=7)
    figure.savefig(path)
    return path
