"""Threshold calibration: agreement with full depth, empirical choice and Learn-then-Test."""

import dataclasses
import json
import math

import keras
import numpy as np
import pytest

from toex_tf.calibration.thresholds import (
    Calibration,
    agreement_with_reference,
    bentkus_p_value,
    binomial_cdf,
    calibrate_threshold,
    hoeffding_bentkus_p_value,
    hoeffding_p_value,
    select_threshold,
)
from toex_tf.inference import DecoderAdapter, ExitPolicy, generate
from toex_tf.models import build_gpt

NEW_TOKENS = 8
THRESHOLDS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8)
POLICY = ExitPolicy("lazy", "max_prob")


def _disagreeing_adapter():
    """A random 4-layer model whose early exits often disagree with the last layer.

    Sharper exit norms spread the confidences out; a louder last FFN makes the final
    layer change the prediction, so exiting early costs agreement.
    """
    keras.utils.set_random_seed(0)
    model = build_gpt("tiny", num_layers=4, exit_layers="all")
    kernel = model.blocks[-1].block.ffn.down_dense.kernel
    kernel.assign(np.asarray(kernel) * 3.0)
    for block in model.blocks:
        block.exit_norm.gamma.assign(np.asarray(block.exit_norm.gamma) * 20.0)
    return DecoderAdapter(model)


@pytest.fixture(scope="module")
def setup():
    """The model, prompts and a memoising `run_fn`: each policy generates once."""
    adapter = _disagreeing_adapter()
    prompts = np.random.default_rng(0).integers(0, 64, (6, 3)).astype("int32")
    memo = {}

    def run_fn(policy):
        def run(batch):
            key = (policy, batch.tobytes())
            if key not in memo:
                memo[key] = generate(adapter, batch, NEW_TOKENS, policy, return_state=True)
            return memo[key]

        return run

    def calibrate(**kwargs):
        kwargs = {"thresholds": THRESHOLDS, "batch_size": 2, "run_fn": run_fn, **kwargs}
        return calibrate_threshold(adapter, prompts, NEW_TOKENS, POLICY, **kwargs)

    return adapter, prompts, calibrate


def _agreement(adapter, prompts, threshold):
    """Mean per-prompt agreement with full depth, recomputed independently (batches of 2)."""
    shares = []
    for start in range(0, len(prompts), 2):
        batch = prompts[start : start + 2]
        full = np.asarray(generate(adapter, batch, NEW_TOKENS, ExitPolicy("full"))[0])
        policy = dataclasses.replace(POLICY, threshold=threshold)
        tokens = np.asarray(generate(adapter, batch, NEW_TOKENS, policy)[0])
        shares.extend((tokens == full).mean(axis=1))
    return float(np.mean(shares))


def test_chosen_threshold_really_reaches_the_target_and_saves_layers(setup):
    adapter, prompts, calibrate = setup
    calibration = calibrate(target_agreement=0.7)
    rows = {r["threshold"]: r for r in calibration.rows}
    assert list(rows) == sorted(rows, reverse=True) and 1.0 in rows
    assert calibration.agreement >= 0.7 and calibration.avg_layers < 4.0
    # The choice is not trivial: something cheaper misses the target.
    cheaper = [r for r in calibration.rows if r["avg_layers"] < calibration.avg_layers]
    assert cheaper and all(r["agreement"] < 0.7 for r in cheaper)
    assert _agreement(adapter, prompts, calibration.threshold) == pytest.approx(
        calibration.agreement
    )
    assert calibration.guaranteed is None and calibration.method == "empirical"


def test_a_stricter_target_never_picks_a_cheaper_threshold(setup):
    _, _, calibrate = setup
    chosen = [calibrate(target_agreement=t) for t in (0.3, 0.6, 0.65, 0.7, 0.8, 0.95, 1.0)]
    layers = [c.avg_layers for c in chosen]
    assert layers == sorted(layers)
    assert len(set(layers)) >= 3, "the fixture should offer a real trade-off"
    assert all(c.agreement >= c.target_agreement for c in chosen)


def test_target_one_picks_a_threshold_that_reproduces_full_depth_exactly(setup):
    adapter, prompts, calibrate = setup
    calibration = calibrate(target_agreement=1.0)
    assert calibration.agreement == 1.0 and calibration.threshold < 1.0
    policy = dataclasses.replace(POLICY, threshold=calibration.threshold)
    full = generate(adapter, prompts, NEW_TOKENS, ExitPolicy("full"))[0]
    np.testing.assert_array_equal(
        np.asarray(generate(adapter, prompts[:2], NEW_TOKENS, policy)[0]), np.asarray(full)[:2]
    )


def test_ltt_certifies_a_prefix_and_is_never_cheaper_than_empirical(setup):
    _, _, calibrate = setup
    empirical = calibrate(target_agreement=0.6)
    ltt = calibrate(target_agreement=0.6, method="ltt", delta=0.2)
    assert ltt.guaranteed is True and ltt.delta == 0.2
    assert ltt.avg_layers >= empirical.avg_layers
    p_values = [r["p_value"] for r in ltt.rows]
    rejected = next(i for i, p in enumerate(p_values) if p > 0.2)
    chosen = [r["threshold"] for r in ltt.rows].index(ltt.threshold)
    assert chosen < rejected and all(p <= 0.2 for p in p_values[:rejected])
    # Six prompts cannot certify a 5% risk: the fallback is never exiting.
    strict = calibrate(target_agreement=0.95, method="ltt", delta=0.1)
    assert strict.guaranteed is False and strict.threshold == 1.0
    assert "falling back" in strict.note


def test_calibration_is_json_ready(setup):
    _, _, calibrate = setup
    record = json.loads(json.dumps(calibrate(method="ltt").to_dict()))
    assert set(record) == {f.name for f in dataclasses.fields(Calibration)}
    assert set(record["rows"][0]) == {"threshold", "agreement", "risk", "p_value", "avg_layers"}


def test_hoeffding_bentkus_against_hand_computed_values():
    # n = 100, alpha = 0.1, no loss observed: Bentkus e * 0.9^100 beats Hoeffding e^-2.
    assert hoeffding_p_value(0.0, 100, 0.1) == pytest.approx(math.exp(-2.0))
    assert bentkus_p_value(0.0, 100, 0.1) == pytest.approx(math.e * 0.9**100)
    assert hoeffding_bentkus_p_value(0.0, 100, 0.1) == pytest.approx(7.2199e-5, rel=1e-4)
    # n = 10, alpha = 0.2, risk 0.05 (ceil(0.5) = 1 loss): e * (0.8^10 + 10 * 0.2 * 0.8^9)
    # = e * 0.37581 > 1, so Hoeffding's exp(-2 * 10 * 0.15^2) = exp(-0.45) wins.
    assert bentkus_p_value(0.05, 10, 0.2) == 1.0
    assert hoeffding_bentkus_p_value(0.05, 10, 0.2) == pytest.approx(math.exp(-0.45))
    # 10 * 0.1 is 1.0000000000000002 in floating point: still one loss, not two.
    assert bentkus_p_value(0.1, 10, 0.3) == pytest.approx(math.e * (0.7**10 + 10 * 0.3 * 0.7**9))
    for k in range(8):
        exact = sum(math.comb(7, i) * 0.35**i * 0.65 ** (7 - i) for i in range(k + 1))
        assert binomial_cdf(k, 7, 0.35) == pytest.approx(exact)
    assert binomial_cdf(100, 100_000, 0.01) < 1e-20
    assert binomial_cdf(1000, 100_000, 0.01) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("num_samples, alpha", [(6, 0.4), (57, 0.05), (400, 0.2)])
def test_p_values_grow_with_the_empirical_risk(num_samples, alpha):
    risks = np.linspace(0.0, 1.0, 101)
    p_values = [hoeffding_bentkus_p_value(float(r), num_samples, alpha) for r in risks]
    assert all(b >= a for a, b in zip(p_values, p_values[1:]))
    assert p_values[-1] == 1.0 and p_values[0] < 1.0


def _rows(*entries):
    return [{"threshold": t, "agreement": a, "avg_layers": c} for t, a, c in entries]


def test_ltt_stops_testing_at_the_first_non_rejection():
    rows = _rows((1.0, 1.0, 4.0), (0.8, 0.995, 3.0), (0.6, 0.8, 2.5), (0.4, 1.0, 1.0))
    ltt = select_threshold(rows, 200, 0.95, "ltt", 0.1)
    assert ltt.threshold == 0.8 and ltt.guaranteed is True
    assert [r["p_value"] <= 0.1 for r in ltt.rows] == [True, True, False, True]
    # Without the test, 0.4 (agreeing and cheapest) would win.
    assert select_threshold(rows, 200, 0.95).threshold == 0.4


def test_empirical_ties_in_cost_go_to_the_higher_threshold():
    rows = _rows((0.2, 0.97, 2.0), (1.0, 1.0, 4.0), (0.5, 0.99, 2.0), (0.1, 0.9, 1.0))
    calibration = select_threshold(rows, 10, 0.95)
    assert calibration.threshold == 0.5 and calibration.avg_layers == 2.0


def test_agreement_counts_columns_up_to_the_reference_stop():
    reference = np.array([[5, 7, 9, 9], [1, 2, 3, 4]])
    tokens = np.array([[5, 7, 3, 3], [1, 0, 3, 0]])
    np.testing.assert_allclose(agreement_with_reference(tokens, reference), [0.5, 0.5])
    np.testing.assert_allclose(agreement_with_reference(tokens, reference, [9]), [2 / 3, 0.5])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_agreement": 0.0}, "target_agreement must be a float in (0, 1]; got 0.0"),
        ({"target_agreement": 1.5}, "target_agreement must be a float in (0, 1]; got 1.5"),
        ({"delta": 0.0}, "delta must be a float in (0, 1); got 0.0"),
        ({"delta": 1.0}, "delta must be a float in (0, 1); got 1.0"),
        ({"method": "bayes"}, "method must be one of ('empirical', 'ltt'); got 'bayes'"),
        ({"prompts": np.zeros((0, 3), "int32")}, "prompts must be (num_prompts >= 1"),
        ({"policy": ExitPolicy("full")}, 'policy.mode must be an exiting mode, not "full"'),
        ({"thresholds": [0.5, 1.2]}, "thresholds must be floats in [0, 1]; got 1.2"),
        ({"thresholds": [-0.1]}, "thresholds must be floats in [0, 1]; got -0.1"),
        ({"thresholds": []}, "thresholds must hold at least one value"),
    ],
)
def test_bad_input_is_rejected_before_any_generation(kwargs, message):
    def run_fn(policy):
        raise AssertionError("nothing should run")

    arguments = {
        "adapter": None,
        "prompts": np.zeros((2, 3), "int32"),
        "max_new_tokens": 4,
        "policy": POLICY,
        "run_fn": run_fn,
        **kwargs,
    }
    with pytest.raises(ValueError) as error:
        calibrate_threshold(**arguments)
    assert message in str(error.value)
