"""Choosing an exit threshold from data: the cheapest one whose output agrees with full depth.

A threshold is only useful with a statement of what it costs in quality. Here quality is
*consistency* with the full-depth model (CALM, Schuster et al. 2022): the share of the
generated tokens that equal the tokens full-depth greedy decoding produces on the same
prompt. For each candidate threshold the calibrator generates on a set of prompts,
measures that agreement and the average layers per decode step, then picks:

- `empirical`: the cheapest threshold whose mean agreement reaches the target.
- `ltt`: Learn-then-Test (Angelopoulos et al. 2021), as CALM uses it: a threshold is
  accepted only when a Hoeffding-Bentkus test rejects "its expected disagreement exceeds
  `1 - target`" at level `delta`, testing thresholds in a fixed sequence from the most
  conservative down. With probability at least `1 - delta` over the calibration prompts,
  the chosen threshold's expected disagreement on new prompts from the same distribution
  is at most `1 - target`.

NumPy and `keras.ops` only (through `generate`); the CLI passes a compiled `run_fn`.

References:
    Schuster et al., "Confident Adaptive Language Modeling", NeurIPS 2022.
    Angelopoulos et al., "Learn then Test: Calibrating Predictive Algorithms to Achieve
    Risk Control", 2021.
    Bates et al., "Distribution-Free, Risk-Controlling Prediction Sets", 2021 (the
    Hoeffding-Bentkus bound).
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from toex_tf.inference import DecoderAdapter, ExitPolicy, generate

METHODS = ("empirical", "ltt")
# From most conservative (1.0: never exit) to least (0.0: exit at the first exit).
DEFAULT_THRESHOLDS = tuple(round(1.0 - 0.05 * i, 2) for i in range(21))


@dataclass
class Calibration:
    """The chosen threshold and the measurements behind it.

    Attributes:
        threshold: the chosen exit threshold (1.0 when nothing qualified).
        method: `"empirical"` or `"ltt"`.
        target_agreement: the agreement with full depth that was asked for.
        agreement: the chosen threshold's mean agreement on the calibration prompts.
        avg_layers: its average layers per decode step.
        guaranteed: `ltt` only: whether some threshold was certified (with probability
            `>= 1 - delta`, risk `<= 1 - target`); False means the fallback 1.0 was
            chosen. None for `empirical`, which gives no guarantee.
        rows: one dict per candidate threshold, most conservative first: `threshold`,
            `agreement`, `risk` (`1 - agreement`), `p_value` (`ltt`; None otherwise) and
            `avg_layers`.
        delta: `ltt` only: the allowed probability that the guarantee fails.
        num_prompts: how many prompts the figures come from.
        note: a sentence on how the choice was made.
    """

    threshold: float
    method: str
    target_agreement: float
    agreement: float
    avg_layers: float
    guaranteed: bool | None
    rows: list = field(default_factory=list)
    delta: float | None = None
    num_prompts: int = 0
    note: str = ""

    def to_dict(self) -> dict:
        """A JSON-ready dict (plain Python floats, ints and lists)."""
        return dataclasses.asdict(self)


def hoeffding_p_value(risk: float, num_samples: int, alpha: float) -> float:
    """Hoeffding p-value of "expected loss > alpha" given a mean loss `risk` in [0, 1].

    `exp(-2 n (alpha - risk)_+^2)`: small when the observed risk sits well below alpha.
    """
    gap = max(alpha - risk, 0.0)
    return math.exp(-2.0 * num_samples * gap * gap)


def binomial_cdf(k: int, num_samples: int, probability: float) -> float:
    """`P(Binomial(num_samples, probability) <= k)`, summed in log space (no scipy)."""
    if k < 0:
        return 0.0
    if k >= num_samples or probability <= 0.0:
        return 1.0
    if probability >= 1.0:
        return 0.0
    log_p, log_q = math.log(probability), math.log1p(-probability)
    log_n = math.lgamma(num_samples + 1)
    terms = [
        log_n
        - math.lgamma(i + 1)
        - math.lgamma(num_samples - i + 1)
        + i * log_p
        + (num_samples - i) * log_q
        for i in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def bentkus_p_value(risk: float, num_samples: int, alpha: float) -> float:
    """Bentkus p-value of "expected loss > alpha": `e * P(Binom(n, alpha) <= ceil(n risk))`."""
    # A small slack so that e.g. 10 * 0.1 = 1.0000000000000002 counts as 1 loss, not 2.
    losses = math.ceil(num_samples * risk - 1e-9)
    return min(1.0, math.e * binomial_cdf(losses, num_samples, alpha))


def hoeffding_bentkus_p_value(risk: float, num_samples: int, alpha: float) -> float:
    """The Hoeffding-Bentkus p-value (Bates et al. 2021): the smaller of the two."""
    return min(
        hoeffding_p_value(risk, num_samples, alpha), bentkus_p_value(risk, num_samples, alpha)
    )


def _check_fraction(name: str, value, low_open: bool, high_open: bool) -> float:
    low, high = "(" if low_open else "[", ")" if high_open else "]"
    expected = f"a float in {low}0, 1{high}"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"{name} must be {expected}; got {value!r}.")
    value = float(value)
    below = value <= 0.0 if low_open else value < 0.0
    above = value >= 1.0 if high_open else value > 1.0
    if math.isnan(value) or below or above:
        raise ValueError(f"{name} must be {expected}; got {value}.")
    return value


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")


def select_threshold(
    rows: Sequence[dict],
    num_prompts: int,
    target_agreement: float = 0.95,
    method: str = "empirical",
    delta: float = 0.1,
) -> Calibration:
    """Picks a threshold from measured rows (the decision half of `calibrate_threshold`).

    Args:
        rows: dicts with `threshold`, `agreement` (mean over prompts, in [0, 1]) and
            `avg_layers`, one per candidate; any order.
        num_prompts: int > 0, the prompts each agreement is a mean over (LTT's `n`).
        target_agreement: float in (0, 1], defaults to 0.95.
        method: `"empirical"` (default) or `"ltt"`.
        delta: float in (0, 1), defaults to 0.1: `ltt`'s allowed failure probability.

    Returns:
        A `Calibration`; its rows are sorted most conservative first and carry `risk`
        and `p_value`.
    """
    target_agreement = _check_fraction("target_agreement", target_agreement, True, False)
    delta = _check_fraction("delta", delta, True, True)
    _check_method(method)
    if not rows:
        raise ValueError("rows must hold at least one measured threshold; got none.")
    if num_prompts <= 0:
        raise ValueError(f"num_prompts must be > 0; got {num_prompts}.")
    alpha = 1.0 - target_agreement
    table = []
    for row in sorted(rows, key=lambda r: -r["threshold"]):
        agreement = float(row["agreement"])
        risk = 1.0 - agreement
        p_value = None
        if method == "ltt":
            p_value = hoeffding_bentkus_p_value(risk, num_prompts, alpha)
        table.append(
            {
                "threshold": float(row["threshold"]),
                "agreement": agreement,
                "risk": risk,
                "p_value": p_value,
                "avg_layers": float(row["avg_layers"]),
            }
        )
    if method == "empirical":
        # Tiny slack: a mean of per-prompt fractions that should be exactly the target.
        accepted = [r for r in table if r["agreement"] >= target_agreement - 1e-12]
        guaranteed = None
        how = f"cheapest threshold with mean agreement >= {target_agreement}"
    else:
        # Fixed-sequence testing: the family-wise error stays <= delta without any
        # multiple-testing correction because testing stops at the first non-rejection.
        accepted = []
        for row in table:
            if row["p_value"] > delta:
                break
            accepted.append(row)
        guaranteed = bool(accepted)
        how = (
            f"cheapest threshold certified by Learn-then-Test: with probability >= "
            f"{1 - delta:g}, expected disagreement <= {alpha:g}"
        )
    if accepted:
        # Ties in cost go to the higher (more conservative) threshold: `accepted` is
        # sorted most conservative first and `min` keeps the first minimum.
        chosen = min(accepted, key=lambda r: r["avg_layers"])
        note = how + "."
    else:
        chosen = next((r for r in table if r["threshold"] == 1.0), None) or {
            "threshold": 1.0,
            "agreement": 1.0,
            "avg_layers": float("nan"),
        }
        note = f"no threshold qualified ({how}); falling back to 1.0 (never exit)."
    return Calibration(
        threshold=chosen["threshold"],
        method=method,
        target_agreement=target_agreement,
        agreement=chosen["agreement"],
        avg_layers=chosen["avg_layers"],
        guaranteed=guaranteed,
        rows=table,
        delta=delta if method == "ltt" else None,
        num_prompts=int(num_prompts),
        note=note,
    )


def agreement_with_reference(tokens, reference, stop_token_ids: Sequence[int] = ()) -> np.ndarray:
    """Per-row share of generated tokens equal to the reference's, `(batch,)` float.

    Only columns up to and including the reference's first stop token count: after it
    the reference holds filler, and whether the candidate stops at the same place is
    itself part of agreeing.
    """
    tokens, reference = np.asarray(tokens), np.asarray(reference)
    if tokens.shape != reference.shape:
        raise ValueError(
            f"tokens and reference must have the same shape; got {tokens.shape} and "
            f"{reference.shape}."
        )
    columns = np.arange(reference.shape[1])[None, :]
    length = np.full((reference.shape[0], 1), reference.shape[1])
    if len(stop_token_ids):
        stops = np.isin(reference, list(stop_token_ids))
        first = np.where(stops.any(axis=1), stops.argmax(axis=1) + 1, reference.shape[1])
        length = first[:, None]
    counted = columns < length
    return ((tokens == reference) & counted).sum(axis=1) / counted.sum(axis=1)


def _check_thresholds(thresholds) -> tuple:
    values = []
    for value in thresholds:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
            raise TypeError(f"thresholds must be floats in [0, 1]; got {value!r}.")
        if math.isnan(value) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"thresholds must be floats in [0, 1]; got {value}.")
        values.append(float(value))
    if not values:
        raise ValueError("thresholds must hold at least one value in [0, 1]; got none.")
    # 1.0 (never exit) is always measured: it is where LTT's fixed sequence starts and
    # the fallback when no threshold qualifies.
    return tuple(sorted(set(values) | {1.0}, reverse=True))


def calibrate_threshold(
    adapter: DecoderAdapter,
    prompts,
    max_new_tokens: int,
    policy: ExitPolicy,
    target_agreement: float = 0.95,
    thresholds: Sequence[float] | None = None,
    method: str = "empirical",
    delta: float = 0.1,
    run_fn: Callable | None = None,
    stop_token_ids: Sequence[int] = (),
    batch_size: int | None = None,
    progress: Callable | None = None,
) -> Calibration:
    """The cheapest exit threshold whose greedy output agrees with full depth.

    For each candidate threshold, `dataclasses.replace(policy, threshold=t)` generates
    greedily from `prompts`; agreement is the per-prompt share of tokens equal to
    full-depth greedy output (`ExitPolicy("full")`), cost the average layers per decode
    step. See the module docstring for the two selection methods.

    Args:
        adapter: the model (`DecoderAdapter(model)`).
        prompts: int `(num_prompts, prompt_length)` token ids; at least one row. With a
            custom `run_fn`, any int array whose first axis is the prompts: `run_fn`'s
            function gets slices of it (e.g. `(num_prompts, 2, length)` source ids and
            padding masks for a translation model).
        max_new_tokens: int > 0, tokens generated per prompt.
        policy: the exit policy to calibrate (any mode but `"full"`); only its
            threshold is changed.
        target_agreement: float in (0, 1], defaults to 0.95.
        thresholds: candidates in [0, 1]; defaults to `DEFAULT_THRESHOLDS` (1.0, 0.95,
            ..., 0.0). 1.0 is always added.
        method: `"empirical"` (default) or `"ltt"`.
        delta: float in (0, 1), defaults to 0.1: `ltt`'s allowed failure probability.
        run_fn: `run_fn(policy) -> fn(prompts) -> (tokens, exit_layers, state)` with
            `state["layers_run"]` and `state["steps"]`, e.g. a compiled `generate`
            (`return_state=True`). Defaults to eager `generate`.
        stop_token_ids: stop ids passed to the default `run_fn`; agreement counts
            columns up to the reference's first stop.
        batch_size: prompts per generate call; None (default): all at once. In
            `frozen` and `lazy` modes a layer is skipped only when every row of the
            batch has exited, so cost (and `frozen`'s tokens) depend on it: use the
            serving batch size.
        progress: None, or `progress(done, total, note)` after full depth and after each
            candidate threshold (`toex_tf.progress.Progress`).

    Returns:
        A `Calibration`.

    Example:
        >>> adapter = DecoderAdapter(build_gpt("tiny"))
        >>> prompts = np.zeros((4, 3), "int32")
        >>> calibration = calibrate_threshold(
        ...     adapter, prompts, 4, ExitPolicy("lazy", "max_prob"), thresholds=[0.0, 0.5]
        ... )
        >>> calibration.threshold in (0.0, 0.5, 1.0)
        True
    """
    target_agreement = _check_fraction("target_agreement", target_agreement, True, False)
    delta = _check_fraction("delta", delta, True, True)
    _check_method(method)
    if not isinstance(policy, ExitPolicy):
        raise TypeError(f"policy must be an ExitPolicy; got {type(policy).__name__}.")
    if policy.mode == "full":
        raise ValueError(
            'policy.mode must be an exiting mode, not "full": full depth has no threshold '
            "to calibrate."
        )
    candidates = _check_thresholds(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
    prompts = np.asarray(prompts)
    # A custom run_fn may take more than ids per row (a translation's ids and mask).
    rank_ok = prompts.ndim == 2 or (run_fn is not None and prompts.ndim > 2)
    if not rank_ok or prompts.shape[0] == 0:
        raise ValueError(
            f"prompts must be (num_prompts >= 1, prompt_length) token ids; got shape "
            f"{prompts.shape}."
        )
    prompts = prompts.astype("int32")
    num_prompts = prompts.shape[0]
    batch_size = num_prompts if batch_size is None else int(batch_size)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0 or None; got {batch_size}.")
    if run_fn is None:

        def run_fn(run_policy):
            return lambda batch: generate(
                adapter,
                batch,
                max_new_tokens,
                run_policy,
                stop_token_ids=stop_token_ids,
                return_state=True,
            )

    def run_all(run_policy):
        """Tokens `(num_prompts, max_new_tokens)` and average layers per decode step."""
        run = run_fn(run_policy)
        tokens, layers_run, steps = [], 0.0, 0.0
        for start in range(0, num_prompts, batch_size):
            out_tokens, _, state = run(prompts[start : start + batch_size])
            tokens.append(np.asarray(out_tokens))
            layers_run += float(np.asarray(state["layers_run"]))
            steps += float(np.asarray(state["steps"]))
        # One new token needs no decode step: the prefill (full depth) produced it.
        avg_layers = layers_run / steps if steps else float(adapter.num_layers)
        return np.concatenate(tokens), avg_layers

    reference, _ = run_all(ExitPolicy("full"))
    if progress is not None:
        progress(1, len(candidates) + 1, "full depth")
    rows = []
    for done, threshold in enumerate(candidates, 2):
        tokens, avg_layers = run_all(dataclasses.replace(policy, threshold=threshold))
        if progress is not None:
            progress(done, len(candidates) + 1, f"threshold {threshold:g}")
        agreement = agreement_with_reference(tokens, reference, stop_token_ids)
        rows.append(
            {"threshold": threshold, "agreement": float(agreement.mean()), "avg_layers": avg_layers}
        )
    return select_threshold(rows, num_prompts, target_agreement, method, delta)
