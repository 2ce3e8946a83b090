"""The Python API: `toex_tf.load(...)` and `AdaptiveLM.generate / score / export`."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import toex_tf
from toex_tf.data import ByteTokenizer
from toex_tf.inference import DecoderAdapter, ExitPolicy, generate, pad_prompts
from toex_tf.loaders import export_llama
from toex_tf.models import build_gpt, build_llama


def _peaky_free_gpt():
    """A tiny GPT with random weights whose exits disagree (so exits change tokens)."""
    keras.utils.set_random_seed(3)
    model = build_gpt("tiny", vocab_size=260, max_length=48, shortlist_size=32)
    rng = np.random.default_rng(0)
    for weight in model.weights:
        if "embeddings" in weight.path:
            weight.assign(rng.normal(0, 1.0, weight.shape).astype("float32"))
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as `toex_tf.run` writes it: model.keras and tokenizer/."""
    directory = tmp_path_factory.mktemp("run")
    _peaky_free_gpt().save(str(directory / "model.keras"))
    ByteTokenizer().save(str(directory / "tokenizer"))
    return directory


def test_generate_text_in_text_out_with_exit_layers(run_dir):
    lm = toex_tf.load(str(run_dir))
    results = lm.generate(["Return the", "The"], max_new_tokens=6, mode="lazy", threshold=0.02)
    assert len(results) == 2
    for result, prompt in zip(results, ["Return the", "The"]):
        assert result.prompt == prompt and isinstance(result.text, str)
        assert len(result.exit_layers) == len(result.token_ids) == len(result.tokens) <= 6
        assert set(result.exit_layers) <= {1, 2}
        assert "".join(result.tokens) == result.text
    layers = [layer for r in results for layer in r.exit_layers]
    assert 1 in layers and 2 in layers, layers  # the threshold gives mixed exits
    # A batch is left-padded: each row is what it is alone, and equals the engine's
    # token ids for the same policy.
    alone = lm.generate("The", max_new_tokens=6, mode="lazy", threshold=0.02)
    assert alone.token_ids == results[1].token_ids
    assert alone.exit_layers == results[1].exit_layers
    policy = ExitPolicy("lazy", lm.policy.criterion, 0.02)
    tokens, exits = generate(DecoderAdapter(lm.model), [list(b"The")], 6, policy)
    assert np.asarray(tokens)[0].tolist() == alone.token_ids
    assert np.asarray(exits)[0].tolist() == alone.exit_layers


def test_a_threshold_sweep_reuses_one_compiled_loop(run_dir):
    lm = toex_tf.load(str(run_dir))
    layers = []
    for threshold in (0.0, 0.02, 1.0):
        result = lm.generate("abc", max_new_tokens=6, mode="frozen", threshold=threshold)
        layers.append(result.exit_layers)
    assert len(lm._compiled) == 1  # threshold (and seed) are inputs of the compiled loop
    assert set(layers[0][1:]) == {1} and set(layers[2]) == {2} and layers[1] != layers[2]


def test_modes_and_sampling(run_dir):
    lm = toex_tf.load(str(run_dir))
    full = lm.generate("abc", max_new_tokens=8, mode="full")
    assert set(full.exit_layers) == {2}
    never = lm.generate("abc", max_new_tokens=8, mode="lazy", threshold=1.0)
    assert never.token_ids == full.token_ids and set(never.exit_layers) == {2}
    speculative = lm.generate("abc", max_new_tokens=8, mode="speculative", draft_layer=1)
    assert speculative.token_ids == full.token_ids  # lossless: greedy output identical
    first = lm.generate("abc", max_new_tokens=8, do_sample=True, seed=7, top_k=20)
    again = lm.generate("abc", max_new_tokens=8, do_sample=True, seed=7, top_k=20)
    other = lm.generate("abc", max_new_tokens=8, do_sample=True, seed=8, top_k=20)
    assert first.token_ids == again.token_ids and first.token_ids != other.token_ids


def test_stop_strings_cut_the_text_and_its_tokens(run_dir):
    lm = toex_tf.load(str(run_dir))
    whole = lm.generate("abc", max_new_tokens=10, mode="full")
    assert len(whole.text) >= 4
    stop = whole.text[2:4]
    cut = lm.generate("abc", max_new_tokens=10, mode="full", stop=stop)
    assert cut.text == whole.text[: whole.text.index(stop)]
    assert "".join(cut.tokens) == cut.text
    assert cut.token_ids == whole.token_ids[: len(cut.tokens)]


def test_score_matches_across_exact_modes(run_dir):
    lm = toex_tf.load(str(run_dir))
    texts = ["Return the number of items.", "The value of x"]
    full = lm.score(texts, mode="full")
    assert full["tokens"] == sum(len(t.encode()) - 1 for t in texts)
    assert full["avg_exit_layer"] == 2.0 and full["perplexity"] > 1
    never = lm.score(texts, mode="lazy", threshold=1.0)
    assert never["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5)
    exiting = lm.score(texts, mode="frozen", threshold=0.02)
    assert exiting["avg_exit_layer"] < 2.0
    assert exiting["perplexity"] != pytest.approx(full["perplexity"], rel=1e-6)


def test_default_policy_is_the_models_saved_gate(run_dir):
    lm = toex_tf.load(str(run_dir))
    gate = lm.model.blocks[0].gate
    assert (lm.policy.mode, lm.policy.criterion, lm.policy.threshold) == (
        "lazy",
        gate.criterion,
        gate.threshold,
    )
    custom = toex_tf.load(str(run_dir), policy=ExitPolicy("frozen", "entropy", 0.3))
    assert custom.policy == ExitPolicy("frozen", "entropy", 0.3)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda lm: lm.generate(""), ValueError, "prompts[0] is empty"),
        (lambda lm: lm.generate([]), ValueError, "non-empty list"),
        (lambda lm: lm.generate("a", mode="warp"), ValueError, "mode must be one of"),
        (lambda lm: lm.generate("a", threshold=1.5), ValueError, "threshold must be in [0, 1]"),
        (lambda lm: lm.generate("a", stop=[""]), ValueError, "stop must be"),
        (lambda lm: lm.generate("a", beam=3), TypeError, "unknown policy arguments ['beam']"),
        (lambda lm: lm.generate("a" * 60), ValueError, "max_length=48"),
        (lambda lm: lm.generate("a", max_new_tokens=0), ValueError, "max_new_tokens must be > 0"),
        (lambda lm: lm.generate("a", mode="speculative", do_sample=True), ValueError, "greedy"),
        (lambda lm: lm.score("a"), ValueError, "scoring needs two"),
        (lambda lm: lm.score(["ab"], mode="speculative"), ValueError, "use 'full'"),
        (lambda lm: lm.generate([[1, 99999]]), ValueError, "prompts[0] holds token ids"),
        (lambda lm: lm.generate("a", trace=1), TypeError, "trace must be a bool"),
        (lambda lm: lm.generate("a", mode="speculative", trace=True), ValueError, "makes none"),
    ],
)
def test_bad_input_names_the_argument(run_dir, call, error, message):
    lm = toex_tf.load(str(run_dir))
    with pytest.raises(error) as raised:
        call(lm)
    assert message in str(raised.value)


def test_load_errors_name_the_source(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        toex_tf.load(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="nothing to load"):
        toex_tf.load(str(tmp_path))
    with pytest.raises(ValueError, match="source must be"):
        toex_tf.load("")


def test_cli_generate_equals_the_python_api(run_dir, tmp_path):
    """`--mode=generate` runs the same code path: same text, tokens and exit layers."""
    lm = toex_tf.load(str(run_dir))
    expected = lm.generate(["Return the", "The"], max_new_tokens=6, mode="lazy", threshold=0.02)
    completed = subprocess.run(
        [
            sys.executable, "-m", "toex_tf.run", f"--output_dir={tmp_path}",
            f"--init_from={run_dir}", "--mode=generate", "--prompt=Return the",
            "--prompt=The", "--max_new_tokens=6", "--decode_mode=lazy",
            "--decode_threshold=0.02",
        ],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    record = json.loads((tmp_path / "generate.json").read_text())
    assert record["results"] == [g.to_dict() for g in expected]
    assert record["settings"]["criterion"] == lm.policy.criterion


def test_load_a_hugging_face_checkpoint_directory(run_dir, tmp_path):
    model = build_llama("llama-tiny", num_layers=2, exit_layers=(), capacity=1.0, max_length=64)
    export_llama(model, str(tmp_path))
    lm = toex_tf.load(str(tmp_path), exit_layers=(1,))
    assert lm.tokenizer is None and lm.model.exit_layers == (1, 2)
    prompt = [[5, 6, 7], [8, 9]]
    results = lm.generate(prompt, max_new_tokens=4, mode="full")
    padded, mask = pad_prompts(prompt)
    tokens, _ = generate(DecoderAdapter(lm.model), padded, 4, padding_mask=mask)
    assert [r.token_ids for r in results] == np.asarray(tokens).tolist()
    with pytest.raises(TypeError, match="apply to Llama checkpoints"):
        toex_tf.load(str(run_dir), capacity=0.5)


def test_the_cache_is_sized_to_the_call_not_the_models_context():
    keras.utils.set_random_seed(3)
    model = build_llama("llama-tiny", max_length=1024, exit_layers=(1,), capacity=1.0)
    sized = toex_tf.AdaptiveLM(model)
    fixed = toex_tf.AdaptiveLM(model, max_length=1024)
    prompts = [[5, 6, 7, 8], [9, 10]]
    for mode in ("full", "lazy", "speculative"):
        options = {"draft_layer": 1, "draft_length": 2} if mode == "speculative" else {}
        options.update({} if mode == "speculative" else {"criterion": "max_prob"})
        options.update({} if mode == "speculative" else {"threshold": 0.05})
        ours = sized.generate(prompts, max_new_tokens=12, mode=mode, **options)
        reference = fixed.generate(prompts, max_new_tokens=12, mode=mode, **options)
        for a, b in zip(ours, reference):
            assert a.token_ids == b.token_ids and a.exit_layers == b.exit_layers
    assert sized.adapter_for(4 + 12).max_length == 64  # a 64-slot cache, not 1024
    assert sized.adapter_for(100).max_length == 128
    assert sized.adapter_for(2000) is sized.adapter and fixed.adapter_for(16) is fixed.adapter
    with pytest.raises(ValueError, match="max_length"):
        sized.generate([[1] * 1020], max_new_tokens=8)
