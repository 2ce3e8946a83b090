"""`load_llama` against `transformers.LlamaForCausalLM` on a tiny random checkpoint."""

import numpy as np
import pytest

PARITY_EXTRA = 'needs the parity extra: a CPU build of torch, then pip install -e ".[parity]"'

torch = pytest.importorskip("torch", reason=PARITY_EXTRA)
transformers = pytest.importorskip("transformers", reason=PARITY_EXTRA)

from toex_tf.inference import DecoderAdapter, ExitPolicy, generate  # noqa: E402
from toex_tf.loaders import export_llama, load_llama  # noqa: E402

# Non-default epsilon and theta: a loader that ignored either would fail the parity.
TINY = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-3,
    rope_theta=500.0,
    max_position_embeddings=64,
    initializer_range=0.08,  # larger logits: a RoPE or norm slip shows well above 1e-4
)


def _hf_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norm scales away from 1, so a skipped norm weight shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llama")
    model = _hf_model()
    model.save_pretrained(directory)
    return str(directory), model


def _ids(seed=0, batch=2, seq=12):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (batch, seq)).astype("int32")


def test_full_mode_logits_match_transformers(checkpoint):
    directory, hf = checkpoint
    model = load_llama(directory)
    ids = _ids()
    ours = np.asarray(model(ids)["logits"])
    assert ours.shape == (2, 12, TINY["vocab_size"])
    assert np.max(np.abs(ours - _hf_logits(hf, ids))) <= 1e-4
    # The config came from config.json, not from defaults.
    assert model.config.norm_epsilon == pytest.approx(1e-3)
    assert model.config.rope_theta == pytest.approx(500.0)


def test_bf16_checkpoint_loads_and_matches(tmp_path):
    hf = _hf_model(seed=1).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model = load_llama(str(tmp_path))
    ids = _ids(1)
    # The reference: the same bf16 file read by transformers into fp32 (a bf16 model
    # cast back with `.float()` would keep bf16-rounded RoPE frequencies).
    reread = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    reference = _hf_logits(reread.eval(), ids)
    assert np.max(np.abs(np.asarray(model(ids)["logits"]) - reference)) <= 1e-4


def test_sharded_checkpoint_matches(tmp_path):
    hf = _hf_model(seed=2)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = load_llama(str(tmp_path))
    ids = _ids(2)
    assert np.max(np.abs(np.asarray(model(ids)["logits"]) - _hf_logits(hf, ids))) <= 1e-4


def test_tied_embeddings_match(tmp_path):
    hf = _hf_model(seed=3, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    model = load_llama(str(tmp_path))
    assert model.config.tie_embeddings
    ids = _ids(3)
    assert np.max(np.abs(np.asarray(model(ids)["logits"]) - _hf_logits(hf, ids))) <= 1e-4


def test_cached_greedy_decoding_matches_transformers_generate(checkpoint):
    directory, hf = checkpoint
    model = load_llama(directory)
    adapter = DecoderAdapter(model)
    prompt = _ids(4, batch=2, seq=6)
    tokens, _ = generate(adapter, prompt, 24, ExitPolicy("full"))
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor(prompt, dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            min_new_tokens=24,
            pad_token_id=0,
        )[:, 6:].numpy()
    np.testing.assert_array_equal(np.asarray(tokens), expected)


def test_export_round_trip_reads_back_in_transformers(checkpoint, tmp_path):
    directory, hf = checkpoint
    model = load_llama(directory)
    export_llama(model, str(tmp_path))
    reread = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = _ids(5)
    assert np.max(np.abs(_hf_logits(reread, ids) - _hf_logits(hf, ids))) <= 1e-5
