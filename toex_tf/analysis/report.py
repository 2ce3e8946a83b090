"""The exit report: which tokens leave early, at which layer, and why.

`collect_report` runs a model on a few prompts under a grid of settings (exit modes ×
criteria and thresholds; by default seed 003's KL-strength sweep 0.5, 1, 2, 4 across
`unfrozen`, `frozen` and `lazy`), each traced (every token's confidence at each decision
exit and its top alternatives, `generate(..., trace=True)`) and timed against full depth.
`render_report` (`toex_tf.analysis.report_html`) turns the results into one
self-contained HTML page; `save_results_json` / `load_results_json` keep them, so a page
can be rebuilt without the model.

KL strength. The `kl` criterion's confidence is `exp(-KL(p_k || p_prev))`; seed 003
scales the divergence by a strength `s` (higher: more conservative). Exiting when
`exp(-s * KL) > base` is exiting when `exp(-KL) > base ** (1 / s)`, so strength `s` runs
the `kl` criterion at threshold `base ** (1 / s)`: no second code path.
"""

import dataclasses
import datetime
import json
import os
import platform
import statistics
import time

REPORT_FORMAT = "toex_tf.report"
REPORT_VERSION = 1
KL_STRENGTHS = (0.5, 1.0, 2.0, 4.0)
REPORT_MODES = ("unfrozen", "frozen", "lazy")


@dataclasses.dataclass(frozen=True)
class ReportSetting:
    """One column of the comparison: an exit mode with its criterion and threshold.

    Attributes:
        mode: `full`, `unfrozen`, `frozen`, `lazy` or `speculative` (untraced).
        criterion: the exit criterion (`toex_tf.inference.criteria`); None for `full`.
        threshold: float in [0, 1]; None for `full`.
        kl_strength: the seed's KL strength this threshold came from, or None.
    """

    mode: str
    criterion: str | None = None
    threshold: float | None = None
    kl_strength: float | None = None

    @property
    def label(self) -> str:
        if self.mode == "full":
            return "full depth"
        if self.mode == "speculative":
            return "speculative"
        strength = "" if self.kl_strength is None else f" (strength {self.kl_strength:g})"
        return f"{self.mode} · {self.criterion} > {self.threshold:.3g}{strength}"


def kl_strength_settings(
    modes=REPORT_MODES, strengths=KL_STRENGTHS, base_threshold: float = 0.99
) -> list:
    """Seed 003's sweep: the `kl` criterion at `base_threshold ** (1 / strength)`.

    The default base, 0.99, spreads the sweep on the quickstart model (strengths 0.5-4:
    average exit layer 2.3 to 4.7 of 6, agreement with full depth 0.75 to 0.98); at 0.5
    every strength exits at the first layer that can (consecutive exits there differ by
    a KL under 0.2), so the four settings would look alike.
    """
    if not 0.0 < base_threshold < 1.0:
        raise ValueError(f"base_threshold must be in (0, 1); got {base_threshold!r}.")
    bad = [s for s in strengths if not isinstance(s, (int, float)) or s <= 0]
    if bad or not strengths:
        raise ValueError(f"KL strengths must be positive numbers; got {list(strengths)!r}.")
    return [
        ReportSetting(mode, "kl", round(base_threshold ** (1.0 / s), 6), float(s))
        for mode in modes
        for s in strengths
    ]


def threshold_settings(modes, criteria, thresholds) -> list:
    """Every mode × criterion × threshold."""
    return [
        ReportSetting(mode, criterion, float(threshold))
        for mode in modes
        for criterion in criteria
        for threshold in thresholds
    ]


def _generate(lm, prompt, max_new_tokens, setting, trace, policy_options):
    options = {"trace": trace}
    if setting.mode not in ("full", "speculative"):
        options.update(policy_options, criterion=setting.criterion, threshold=setting.threshold)
    # A list: one prompt of token ids would otherwise read as a batch of ids.
    return lm.generate([prompt], max_new_tokens, mode=setting.mode, **options)[0]


def run_stats(exit_layers, token_ids, reference_ids, num_layers: int) -> dict:
    """Exit statistics of one generation against full depth's tokens.

    Agreement is the share of full depth's positions where this run emitted the same
    token (a run that stops early disagrees on the positions it did not reach).
    """
    count = len(exit_layers)
    histogram = [0] * num_layers
    for layer in exit_layers:
        histogram[layer - 1] += 1
    same = sum(a == b for a, b in zip(token_ids, reference_ids))
    return {
        "tokens": count,
        "exit_rate": sum(layer < num_layers for layer in exit_layers) / count if count else 0.0,
        "avg_exit_layer": sum(exit_layers) / count if count else 0.0,
        "histogram": histogram,
        "agreement": same / len(reference_ids) if reference_ids else float(count == 0),
    }


def _ideal_speedup(setting, avg_exit_layer, num_layers):
    """Counted layers only (no check or K/V cost): unfrozen and full run every layer."""
    if setting.mode in ("frozen", "lazy") and avg_exit_layer > 0:
        return num_layers / avg_exit_layer
    return 1.0


def collect_report(
    lm,
    prompts,
    settings,
    max_new_tokens: int = 32,
    timing_rounds: int = 3,
    references=None,
    progress=None,
    policy_options=None,
) -> dict:
    """Runs every prompt under every setting (plus full depth), traced and timed.

    Args:
        lm: an `AdaptiveLM` or `AdaptiveTranslator` (`toex_tf.load`).
        prompts: strings (or token-id lists); for a translator, source sentences.
        settings: `ReportSetting`s (`kl_strength_settings`, `threshold_settings`).
        max_new_tokens: int > 0. Defaults to `32`.
        timing_rounds: int >= 1, untraced timed calls per prompt and setting, the
            settings alternated round by round (the median is kept). Defaults to `3`.
        references: translations of `prompts` (shown beside the output), or None.
        progress: None, or a callable `(done, total, label)`.
        policy_options: other `ExitPolicy` fields for every exit setting
            (`decision_layers`, `max_pending`, `patience`, `threshold_decay`).

    Returns:
        The results dict (`save_results_json` writes it; `render_report` draws it).
    """
    if not prompts:
        raise ValueError("prompts is empty: the report needs at least one prompt.")
    if not settings:
        raise ValueError("settings is empty: give at least one ReportSetting.")
    if not isinstance(timing_rounds, int) or timing_rounds < 1:
        raise ValueError(f"timing_rounds must be an int >= 1; got {timing_rounds!r}.")
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"references has {len(references)} entries; prompts has {len(prompts)}.")
    policy_options = dict(policy_options or {})
    num_layers = lm.model.num_layers
    all_settings = [ReportSetting("full")] + [s for s in settings if s.mode != "full"]
    runs, total = [], len(prompts) * len(all_settings)
    for p_index, prompt in enumerate(prompts):
        traced = [
            _generate(lm, prompt, max_new_tokens, s, s.mode != "speculative", policy_options)
            for s in all_settings
        ]
        seconds = [[] for _ in all_settings]
        for setting in all_settings:  # compile the untraced loops before timing
            _generate(lm, prompt, max_new_tokens, setting, False, policy_options)
        for _ in range(timing_rounds):
            for s_index, setting in enumerate(all_settings):
                start = time.perf_counter()
                _generate(lm, prompt, max_new_tokens, setting, False, policy_options)
                seconds[s_index].append(time.perf_counter() - start)
        full_ids, full_time = traced[0].token_ids, statistics.median(seconds[0])
        for s_index, (setting, generation) in enumerate(zip(all_settings, traced)):
            stats = run_stats(generation.exit_layers, generation.token_ids, full_ids, num_layers)
            elapsed = statistics.median(seconds[s_index])
            stats.update(
                seconds=elapsed,
                tokens_per_second=stats["tokens"] / elapsed if elapsed > 0 else 0.0,
                measured_speedup=full_time / elapsed if elapsed > 0 else 0.0,
                ideal_speedup=_ideal_speedup(setting, stats["avg_exit_layer"], num_layers),
            )
            record = generation.to_dict()
            runs.append(
                {
                    "prompt": p_index,
                    "setting": s_index,
                    "text": record["text"],
                    "decision_layers": record.get("decision_layers", []),
                    "tokens": record["tokens"],
                    "stats": stats,
                }
            )
            if progress is not None:
                progress(p_index * len(all_settings) + s_index + 1, total, setting.label)
    prompt_texts = [
        prompt if isinstance(prompt, str) else _prompt_text(lm, prompt) for prompt in prompts
    ]
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "kind": "translation" if lm.model.is_encoder_decoder else "lm",
        "model": {
            "name": type(lm.model).__name__,
            "num_layers": num_layers,
            "exit_layers": [int(layer) for layer in lm.model.exit_layers],
        },
        "max_new_tokens": max_new_tokens,
        "timing": f"Python API, batch 1, median of {timing_rounds} untraced calls per "
        "setting, alternated with full depth",
        "prompts": [
            {"text": text, **({} if references is None else {"reference": references[i]})}
            for i, text in enumerate(prompt_texts)
        ],
        "settings": [dataclasses.asdict(s) | {"label": s.label} for s in all_settings],
        "runs": runs,
        "summary": summarize(runs, [s.mode for s in all_settings], num_layers),
    }


def _prompt_text(lm, ids) -> str:
    return lm.tokenizer.decode(list(ids)) if lm.tokenizer is not None else str(list(ids))


def summarize(runs: list, modes: list, num_layers: int) -> list:
    """Per setting over all prompts: token-weighted exit statistics and total time.

    Args:
        runs: the `runs` of a report.
        modes: each setting's mode, in setting order (setting 0 is full depth).
        num_layers: model depth.
    """
    full = {run["prompt"]: run["stats"] for run in runs if run["setting"] == 0}
    full_seconds = sum(stats["seconds"] for stats in full.values())
    full_tokens = sum(stats["tokens"] for stats in full.values())
    summary = []
    for index, mode in enumerate(modes):
        rows = [run for run in runs if run["setting"] == index]
        tokens = sum(run["stats"]["tokens"] for run in rows)
        seconds = sum(run["stats"]["seconds"] for run in rows)
        histogram = [sum(run["stats"]["histogram"][i] for run in rows) for i in range(num_layers)]
        layers = sum((i + 1) * count for i, count in enumerate(histogram))
        # Agreement is over full depth's positions, so weight each prompt by its length.
        agreed = sum(run["stats"]["agreement"] * full[run["prompt"]]["tokens"] for run in rows)
        summary.append(
            {
                "setting": index,
                "tokens": tokens,
                "exit_rate": sum(histogram[:-1]) / tokens if tokens else 0.0,
                "avg_exit_layer": layers / tokens if tokens else 0.0,
                "histogram": histogram,
                "agreement": agreed / full_tokens if full_tokens else 0.0,
                "seconds": seconds,
                "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
                "measured_speedup": full_seconds / seconds if seconds > 0 else 0.0,
                "ideal_speedup": (
                    num_layers * tokens / layers if layers and mode in ("frozen", "lazy") else 1.0
                ),
            }
        )
    return summary


def save_results_json(results: dict, path: str) -> str:
    """Writes `results` (from `collect_report`) as JSON, atomically; returns `path`."""
    _check_results(results, "results")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1, ensure_ascii=False)
    os.replace(temporary, path)
    return path


def load_results_json(path: str) -> dict:
    """Reads results that `save_results_json` wrote, checking their format and version."""
    if not os.path.isfile(path):
        raise ValueError(f"report results {path!r} do not exist (expected a report.json).")
    try:
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"report results {path!r} are not valid JSON: {error}") from None
    _check_results(results, path)
    return results


def _check_results(results, name) -> None:
    if not isinstance(results, dict) or results.get("format") != REPORT_FORMAT:
        raise ValueError(
            f"{name!r} is not toex_tf report results (expected format {REPORT_FORMAT!r})."
        )
    if results.get("version") != REPORT_VERSION:
        raise ValueError(
            f"{name!r} has report version {results.get('version')!r}; this toex_tf reads "
            f"version {REPORT_VERSION}."
        )
    keys = ("model", "prompts", "settings", "runs", "summary")
    missing = [key for key in keys if key not in results]
    if missing:
        raise ValueError(f"{name!r} lacks {missing}: not complete report results.")
