"""`benchmarks/hf_reference.py`: the HF timing child process the speed benchmarks rely on."""

import importlib.util
import pathlib

import numpy as np
import pytest

PARITY_EXTRA = 'needs the parity extra: a CPU build of torch, then pip install -e ".[parity]"'

pytest.importorskip("torch", reason=PARITY_EXTRA)
pytest.importorskip("transformers", reason=PARITY_EXTRA)

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "hf_reference.py"


@pytest.fixture(scope="module")
def hf_reference():
    spec = importlib.util.spec_from_file_location("hf_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timing_figures(hf_reference):
    # Batch 2, 5 new tokens in 0.9 s, the first after 0.1 s: 4 steps of 200 ms.
    timed = hf_reference.generate_timing(0.1, 0.9, batch=2, new_tokens=5)
    np.testing.assert_allclose(timed["tokens_per_s"], 10 / 0.9)
    np.testing.assert_allclose(timed["decode_step_ms"], 200.0)


def test_isolated_timing_reports_consistent_figures(hf_reference):
    hf_config = dict(
        model_type="llama",
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=32,
    )
    prompt = np.arange(6, dtype="int32").reshape(2, 3)
    timed = hf_reference.time_transformers_isolated(hf_config, prompt, new_tokens=4, repeats=1)
    assert timed["prefill_plus_1_s"] > 0 and timed["generate_s"] > 0
    # Batch 2, 4 tokens each: tokens/s counts both rows.
    np.testing.assert_allclose(timed["tokens_per_s"], 8 / timed["generate_s"], rtol=1e-9)
    expected_step = 1e3 * (timed["generate_s"] - timed["prefill_plus_1_s"]) / 3
    np.testing.assert_allclose(timed["decode_step_ms"], expected_step, rtol=1e-9)


def test_a_failing_child_is_reported(hf_reference):
    hf_config = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, num_hidden_layers=1)
    out_of_vocabulary = np.full((1, 3), 500, "int32")  # the child's embedding lookup fails
    with pytest.raises(RuntimeError, match="(?s)transformers timing process failed.*IndexError"):
        hf_reference.time_transformers_isolated(hf_config, out_of_vocabulary, 2, 1)
