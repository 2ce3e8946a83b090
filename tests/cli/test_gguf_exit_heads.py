"""A GGUF through the CLI: `--phase=exit_heads` trains exits on its frozen base from
cached states, then `--mode=generate` reads the run (the SmolLM2 flow, on a tiny file)."""

import json

import pytest

PARITY_EXTRA = 'needs the parity extra: a CPU build of torch, then pip install -e ".[parity]"'
torch = pytest.importorskip("torch", reason=PARITY_EXTRA)
transformers = pytest.importorskip("transformers", reason=PARITY_EXTRA)

import gguf_fixtures as fx  # noqa: E402
from cli_runner import run_cli  # noqa: E402


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    tokens, merges, types = fx.gpt2_vocabulary()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # layers that move the residual: the logit lens is far off
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                parameter.normal_(0.0, 2.0 / parameter.shape[1] ** 0.5)
            elif name.endswith("embed_tokens.weight"):  # peaked (tied) output distributions
                parameter.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("gguf_cli") / "tiny.gguf"
    fx.write_llama_gguf(path, model, ("gpt2", tokens, merges, types))
    return str(path)


def test_exit_heads_phase_then_generate(gguf_path, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(fx.TEXT[:8]):
        (corpus / f"doc{i}.txt").write_text(text * 4)
    out = tmp_path / "run"
    common = [
        "--model=llama",
        "--llama_exit_layers=1,2",
        "--exit_adapter=mlp",
        "--exit_adapter_units=32",
        f"--dataset=text:{corpus}/*.txt",
        "--validation_fraction=0.25",
        "--seq_len=16",
        f"--output_dir={out}",
    ]
    trained = _run(
        *common,
        "--mode=train",
        "--phase=exit_heads",
        f"--init_from={gguf_path}",
        "--cache_tokens=256",
        "--head_batch_size=64",
        "--train_steps=30",
        "--learning_rate=0.01",
        "--eval_windows=4",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    report = json.loads((out / "exit_heads.json").read_text())
    for layer in ("1", "2"):
        # The untrained exit (the logit lens) predicts its own input token, far off; the
        # trained one learned the text's next tokens.
        trained, lens = report["trained"][layer], report["logit_lens"][layer]
        assert trained["perplexity"] < 0.01 * lens["perplexity"], (trained, lens)
        assert report["gates"]["validation"][layer]["tokens"] > 0
    assert (out / "model.keras").is_file() and (out / "tokenizer").is_dir()

    generated = _run(
        *common,
        "--mode=generate",
        "--prompt=The quick brown",
        "--max_new_tokens=6",
        "--decode_mode=unfrozen",
        "--decode_criterion=max_prob",
        "--decode_threshold=0.0",
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    record = json.loads((out / "generate.json").read_text())
    layers = [token["exit_layer"] for token in record["results"][0]["tokens"]]
    assert len(layers) == 6 and set(layers[1:]) == {1}  # threshold 0: the first exit
    assert "exit layers (of 3" in generated.stderr

    # Then LoRA for the exits on the trained run, merged into a plain model.
    tuned_dir = tmp_path / "lora"
    tuned = _run(
        *common[:-1],
        f"--output_dir={tuned_dir}",
        "--mode=train",
        "--phase=lora_exits",
        f"--init_from={out}",
        "--cache_tokens=128",
        "--train_steps=6",
        "--batch_size=4",
        "--lora_rank=4",
        "--layer_dropout=0.1",
        "--learning_rate=0.003",
        "--eval_windows=4",
    )
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    report = json.loads((tuned_dir / "lora_exits.json").read_text())
    assert report["lora"]["first_layer"] == 1 and report["lora"]["projections"] == 3 * 5
    assert report["before"]["full"]["perplexity"] > 0 and report["after"]["full"]["perplexity"] > 0
    assert "full_depth_perplexity_drift" in report and set(report["after"]) >= {"1", "2"}
    import toex_tf  # noqa: PLC0415

    merged = toex_tf.load(str(tuned_dir)).model
    base = toex_tf.load(str(out)).model
    assert [w.path for w in merged.weights] == [w.path for w in base.weights]  # no LoRA left


def _run(*args, timeout=600):
    return run_cli(*args, timeout=timeout)
