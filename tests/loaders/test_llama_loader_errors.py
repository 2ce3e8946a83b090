"""`load_llama` on broken, unusual and remote-handle checkpoints: errors name the culprit.

One tiny checkpoint per module, written by `export_llama` (no torch), copied and tampered
with per test. Nothing here touches the network: hub handles resolve from a fake cache or
from fake `kagglehub` / `tensorflow_hub` modules.
"""

import hashlib
import json
import os
import random
import re
import shutil
import sys
import types

import numpy as np
import pytest

from toex_tf.loaders import CheckpointError, export_llama, load_llama, read_safetensors
from toex_tf.loaders import resolve_handle as resolve_handle_fn
from toex_tf.models import build_llama

safetensors_numpy = pytest.importorskip("safetensors.numpy")

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
VOCAB = 512  # above the 300-piece SentencePiece models of the tokenizer tests


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 2-layer checkpoint (vocab 512, width 32, 4 heads, 2 kv heads, FFN 64)."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    model = build_llama(
        "llama-tiny",
        exit_layers=(),
        capacity=1.0,
        vocab_size=VOCAB,
        hidden_dim=32,
        intermediate_dim=64,
        shortlist_size=32,
    )
    export_llama(model, str(directory))
    # Norm scales away from 1, so a norm that is not loaded (or not copied) shows.
    tensors = safetensors_numpy.load_file(str(directory / WEIGHTS))
    rng = np.random.default_rng(0)
    for key in tensors:
        if key.endswith("norm.weight"):
            tensors[key] = rng.uniform(0.5, 1.5, tensors[key].shape).astype("float32")
    safetensors_numpy.save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    return directory


@pytest.fixture
def ckpt(source, tmp_path):
    """A private copy of the module checkpoint, free to tamper with."""
    return shutil.copytree(source, tmp_path / "ckpt")


def _ids(seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (2, 7)).astype("int32")


def _tensors(directory):
    return safetensors_numpy.load_file(str(directory / WEIGHTS))


def _tensors_of(path):
    return safetensors_numpy.load_file(str(path))


def _save_tensors(directory, tensors, name=WEIGHTS):
    safetensors_numpy.save_file(tensors, str(directory / name), metadata={"format": "pt"})


def _config(directory):
    return json.loads((directory / CONFIG).read_text())


def _save_config(directory, config):
    (directory / CONFIG).write_text(json.dumps(config))


def _fingerprint(directory):
    """{relative path: sha256} of every file under `directory`."""
    result = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                result[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return result


def _shard(directory):
    """Splits model.safetensors into two shards plus an index; returns the shard names."""
    tensors = _tensors(directory)
    keys = sorted(tensors)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for name, half in zip(names, halves):
        _save_tensors(directory, {key: tensors[key] for key in half}, name)
        weight_map.update({key: name for key in half})
    (directory / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / WEIGHTS).unlink()
    return names


# --- Weights --------------------------------------------------------------------------


def test_untampered_copy_loads(ckpt, source):
    """The baseline every error test departs from: the copy loads, weights in place."""
    model = load_llama(str(ckpt))
    tensors = _tensors(source)
    config = model.config
    query_width, kv_width = (
        heads * config.head_dim for heads in (config.num_heads, config.num_kv_heads)
    )
    fused = np.asarray(model.blocks[1].block.self_attention.qkv_dense.kernel)
    np.testing.assert_array_equal(  # Linear: (out, in) as in HF; q, k, v row blocks
        fused[query_width : query_width + kv_width],
        tensors["model.layers.1.self_attn.k_proj.weight"],
    )
    np.testing.assert_array_equal(
        fused[query_width + kv_width :], tensors["model.layers.1.self_attn.v_proj.weight"]
    )
    np.testing.assert_array_equal(
        np.asarray(model.blocks[-1].exit_norm.scale), tensors["model.norm.weight"]
    )
    assert np.asarray(model(_ids())["logits"]).shape == (2, 7, VOCAB)
    assert model.tokenizer is None


def test_missing_weight_is_named(ckpt):
    tensors = _tensors(ckpt)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    _save_tensors(ckpt, tensors)
    with pytest.raises(CheckpointError, match=r"1 missing weight.*model\.layers\.1\.mlp\.up_proj"):
        load_llama(str(ckpt))


def test_untied_checkpoint_without_lm_head_is_missing_lm_head(ckpt):
    tensors = _tensors(ckpt)
    del tensors["lm_head.weight"]
    _save_tensors(ckpt, tensors)
    with pytest.raises(CheckpointError, match=r"missing weight.*lm_head\.weight"):
        load_llama(str(ckpt))


def test_unexpected_weight_is_named(ckpt):
    tensors = _tensors(ckpt)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, "float32")
    _save_tensors(ckpt, tensors)
    with pytest.raises(
        CheckpointError, match=r"1 unexpected weight.*model\.layers\.0\.self_attn\.q_proj\.bias"
    ):
        load_llama(str(ckpt))


@pytest.mark.parametrize("keep_lm_head", [True, False])
def test_tied_checkpoint_with_or_without_lm_head_copy(ckpt, keep_lm_head):
    """Tied checkpoints may store lm_head.weight (ignored) or leave it out."""
    _save_config(ckpt, {**_config(ckpt), "tie_word_embeddings": True})
    tensors = _tensors(ckpt)
    embedding = tensors["model.embed_tokens.weight"]
    if keep_lm_head:
        tensors["lm_head.weight"] = np.zeros_like(embedding)  # a stale copy, not used
    else:
        del tensors["lm_head.weight"]
    _save_tensors(ckpt, tensors)
    model = load_llama(str(ckpt))
    assert model.config.tie_embeddings
    np.testing.assert_array_equal(np.asarray(model.token_embedding.embeddings), embedding)


def test_rotary_inv_freq_buffers_are_ignored(ckpt):
    tensors = _tensors(ckpt)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, "float32")
    _save_tensors(ckpt, tensors)
    assert np.asarray(load_llama(str(ckpt))(_ids())["logits"]).shape == (2, 7, VOCAB)


@pytest.mark.parametrize(
    "key, change, found, wanted",
    [
        ("model.layers.0.self_attn.k_proj.weight", lambda w: w.T.copy(), (32, 16), (16, 32)),
        ("model.layers.1.mlp.up_proj.weight", lambda w: w[:, :16].copy(), (64, 16), (64, 32)),
        ("model.embed_tokens.weight", lambda w: w[:100].copy(), (100, 32), (VOCAB, 32)),
        ("model.norm.weight", lambda w: w[:31].copy(), (31,), (32,)),
    ],
)
def test_shape_mismatch_names_key_and_both_shapes(ckpt, key, change, found, wanted):
    tensors = _tensors(ckpt)
    tensors[key] = change(tensors[key])
    _save_tensors(ckpt, tensors)
    with pytest.raises(CheckpointError) as info:
        load_llama(str(ckpt))
    message = str(info.value)
    assert repr(key) in message
    assert str(found) in message and str(wanted) in message
    assert message.index(str(found)) < message.index(str(wanted))  # "has ...; expects ..."


def test_truncated_safetensors_names_the_file(ckpt):
    path = ckpt / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as info:
        load_llama(str(ckpt))
    assert "truncated or corrupt" in str(info.value)


@pytest.mark.parametrize(
    "garbage", [b"this is not a safetensors file\n" * 64, b"\x00" * 3, b""], ids=len
)
def test_garbage_safetensors_names_the_file(ckpt, garbage):
    path = ckpt / WEIGHTS
    path.write_bytes(garbage)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        read_safetensors(str(ckpt))


def test_failed_loads_leave_the_checkpoint_untouched(ckpt):
    tensors = _tensors(ckpt)
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors[
        "model.layers.0.self_attn.k_proj.weight"
    ].T.copy()
    _save_tensors(ckpt, tensors)
    before = _fingerprint(ckpt)
    with pytest.raises(CheckpointError, match="k_proj"):
        load_llama(str(ckpt), exit_layers=(1,), capacity=0.5)
    assert _fingerprint(ckpt) == before

    path = ckpt / WEIGHTS
    path.write_bytes(path.read_bytes()[:1000])
    before = _fingerprint(ckpt)
    with pytest.raises(CheckpointError, match="truncated"):
        load_llama(str(ckpt))
    assert _fingerprint(ckpt) == before
    assert sorted(os.listdir(ckpt)) == [CONFIG, WEIGHTS]  # no lock, temp or cache files


def test_successful_load_leaves_the_checkpoint_untouched(ckpt):
    before = _fingerprint(ckpt)
    load_llama(str(ckpt), exit_layers=(1,), capacity=0.5)
    assert _fingerprint(ckpt) == before


# --- Sharded checkpoints and missing files -------------------------------------------


def test_sharded_checkpoint_loads_like_the_single_file(ckpt, source):
    _shard(ckpt)
    ids = _ids(1)
    np.testing.assert_array_equal(
        np.asarray(load_llama(str(ckpt))(ids)["logits"]),
        np.asarray(load_llama(str(source))(ids)["logits"]),
    )


def test_missing_shard_is_named(ckpt):
    names = _shard(ckpt)
    (ckpt / names[1]).unlink()
    shard = re.escape(str(ckpt / names[1]))
    with pytest.raises(
        CheckpointError, match=rf"weight file {shard} \(listed in {INDEX}\) is missing"
    ):
        load_llama(str(ckpt))


def test_key_in_two_shards_is_named(ckpt):
    names = _shard(ckpt)
    first = _tensors_of(ckpt / names[0])
    second = _tensors_of(ckpt / names[1])
    key = sorted(second)[0]
    first[key] = second[key]
    _save_tensors(ckpt, first, names[0])
    with pytest.raises(CheckpointError, match=re.escape(repr(key)) + ".*two shards"):
        load_llama(str(ckpt))


def test_invalid_index_is_named(ckpt):
    _shard(ckpt)
    (ckpt / INDEX).write_text('{"metadata": {}}')  # no weight_map
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / INDEX)) + ".*index"):
        load_llama(str(ckpt))
    (ckpt / INDEX).write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / INDEX))):
        load_llama(str(ckpt))


def test_no_weights_names_the_directory(ckpt):
    (ckpt / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt)) + ".*neither") as info:
        load_llama(str(ckpt))
    assert WEIGHTS in str(info.value) and INDEX in str(info.value)


def test_nonexistent_directory_is_named(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(CheckpointError, match=re.escape(repr(str(missing))) + " does not exist"):
        load_llama(str(missing))


def test_a_file_handle_is_refused_with_a_hint(ckpt):
    with pytest.raises(CheckpointError, match="is a file; a checkpoint handle is its directory"):
        load_llama(str(ckpt / CONFIG))


@pytest.mark.parametrize("handle", ["", None, 3])
def test_empty_or_non_string_handle(handle):
    with pytest.raises(CheckpointError, match="non-empty string"):
        load_llama(handle)


def test_user_directory_is_expanded(ckpt, monkeypatch):
    monkeypatch.setenv("HOME", str(ckpt.parent))
    assert resolve_handle_fn("~/ckpt") == str(ckpt)


# --- config.json ------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["gpt2", "mistral", None])
def test_unknown_model_type_names_type_and_config(ckpt, model_type):
    config = _config(ckpt)
    if model_type is None:
        del config["model_type"]
    else:
        config["model_type"] = model_type
    _save_config(ckpt, config)
    with pytest.raises(CheckpointError) as info:
        load_llama(str(ckpt))
    message = str(info.value)
    assert f"model_type {model_type!r}" in message
    assert str(ckpt / CONFIG) in message


def test_missing_config_is_named(ckpt):
    (ckpt / CONFIG).unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / CONFIG)) + " is missing"):
        load_llama(str(ckpt))


@pytest.mark.parametrize("text", ['{"model_type": "llama",', "", "\xff\xfe"])
def test_invalid_json_config_is_named(ckpt, text):
    (ckpt / CONFIG).write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / CONFIG)) + " is not valid JSON"):
        load_llama(str(ckpt))


def test_config_that_is_not_an_object(ckpt):
    (ckpt / CONFIG).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt / CONFIG)) + ".*JSON object"):
        load_llama(str(ckpt))


@pytest.mark.parametrize(
    "field",
    [
        "rms_norm_eps",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ],
)
def test_missing_config_field_is_named(ckpt, field):
    config = _config(ckpt)
    del config[field]
    _save_config(ckpt, config)
    with pytest.raises(CheckpointError, match=rf"missing fields \['{field}'\]") as info:
        load_llama(str(ckpt))
    assert str(ckpt / CONFIG) in str(info.value)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"num_key_value_heads": 3}, "num_kv_heads=3 must divide num_heads=4"),
    ],
)
def test_unsupported_architecture_fields_are_named(ckpt, change, match):
    _save_config(ckpt, {**_config(ckpt), **change})
    with pytest.raises(CheckpointError, match=re.escape(match)):
        load_llama(str(ckpt))


@pytest.mark.parametrize(
    "change, rope_type",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),  # old key
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "linear"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        (
            {"rope_parameters": {"rope_theta": 1e4}, "rope_scaling": {"rope_type": "dynamic"}},
            "dynamic",
        ),
        (  # scaling asked for in the old field while the new one says default
            {
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
            },
            "llama3",
        ),
    ],
)
def test_unsupported_rope_scaling_is_named(ckpt, change, rope_type):
    _save_config(ckpt, {**_config(ckpt), **change})
    with pytest.raises(CheckpointError, match=rf"RoPE scaling '{rope_type}' is not supported"):
        load_llama(str(ckpt))


@pytest.mark.parametrize(
    "change",
    [
        {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
        {"rope_theta": 500.0, "rope_scaling": None},
        {"rope_theta": 500.0, "rope_scaling": {"rope_type": "default"}},
    ],
)
def test_plain_rope_variants_load_with_their_theta(ckpt, change):
    _save_config(ckpt, {**_config(ckpt), **change})
    model = load_llama(str(ckpt))
    assert model.config.rope_theta == pytest.approx(500.0)


# --- Hub handles -----------------------------------------------------------------------


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(source, tmp_path, monkeypatch):
    """A Hugging Face hub cache holding `org/name` at COMMIT (refs/main), offline."""
    pytest.importorskip("huggingface_hub")
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hub"
    repo = cache / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(source, snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both at import time: the environment alone is not enough.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_hf_handle_resolves_offline_from_the_cache(hf_cache, source):
    assert os.path.samefile(resolve_handle_fn("hf://org/name"), hf_cache)
    assert os.path.samefile(resolve_handle_fn(f"hf://org/name@{COMMIT}"), hf_cache)
    ids = _ids(2)
    np.testing.assert_array_equal(
        np.asarray(load_llama("hf://org/name")(ids)["logits"]),
        np.asarray(load_llama(str(source))(ids)["logits"]),
    )


@pytest.mark.parametrize("handle", ["hf://org/missing", "hf://org/name@no-such-revision"])
def test_hf_handle_not_in_the_cache(hf_cache, handle):
    with pytest.raises(CheckpointError, match=re.escape(handle) + " from the local Hugging Face"):
        load_llama(handle)


@pytest.mark.parametrize("handle", ["hf://name", "hf://a/b/c"])
def test_malformed_hf_handle(hf_cache, handle):
    with pytest.raises(CheckpointError, match=r"hf://org/name\[@revision\]"):
        load_llama(handle)


@pytest.mark.parametrize("offline", ["1", "0", None])
def test_hf_offline_flag_reaches_snapshot_download(monkeypatch, source, offline):
    """HF_HUB_OFFLINE=1 means local_files_only=True (never a download); the revision,
    the file patterns and the returned directory pass through."""
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if kwargs["revision"] == "bad":
            raise OSError("no such revision")
        return str(source)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    assert resolve_handle_fn("hf://org/name@v1.0") == str(source)
    (repo_id, kwargs), *_ = calls
    assert repo_id == "org/name" and kwargs["revision"] == "v1.0"
    assert kwargs["local_files_only"] is (offline == "1")
    patterns = kwargs["allow_patterns"]
    assert {"*.json", "*.safetensors", "tokenizer.model"} <= set(patterns)
    where = "the local Hugging Face cache" if offline == "1" else "the Hugging Face Hub"
    with pytest.raises(CheckpointError, match=rf"hf://org/name@bad from {where}: OSError"):
        resolve_handle_fn("hf://org/name@bad")


def test_hf_handle_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match="pip install huggingface_hub"):
        load_llama("hf://org/name")


def _fake_module(monkeypatch, name, function, directory):
    calls = []

    def resolve(handle):
        calls.append(handle)
        if directory is None:
            raise RuntimeError("403 Forbidden")
        return str(directory)

    monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**{function: resolve}))
    return calls


def test_kaggle_handle(source, monkeypatch):
    calls = _fake_module(monkeypatch, "kagglehub", "model_download", source)
    model = load_llama("kaggle://owner/model/keras/variant")
    assert calls == ["owner/model/keras/variant"]
    ids = _ids(3)
    np.testing.assert_array_equal(
        np.asarray(model(ids)["logits"]), np.asarray(load_llama(str(source))(ids)["logits"])
    )


def test_kaggle_download_error_is_wrapped(monkeypatch):
    _fake_module(monkeypatch, "kagglehub", "model_download", None)
    with pytest.raises(
        CheckpointError, match=r"cannot resolve kaggle://owner/model/keras/variant: RuntimeError"
    ):
        load_llama("kaggle://owner/model/keras/variant")


def test_kaggle_handle_without_kagglehub(monkeypatch):
    monkeypatch.setitem(sys.modules, "kagglehub", None)
    with pytest.raises(CheckpointError, match="pip install kagglehub"):
        load_llama("kaggle://owner/model/keras/variant")


@pytest.mark.parametrize(
    "handle, resolved",
    [
        ("https://tfhub.dev/owner/model/1", "https://tfhub.dev/owner/model/1"),
        ("tfhub://owner/model/1", "https://tfhub.dev/owner/model/1"),
        (
            "https://www.kaggle.com/models/owner/model/keras/variant/1",
            "https://www.kaggle.com/models/owner/model/keras/variant/1",
        ),
    ],
)
def test_tfhub_handle(source, monkeypatch, handle, resolved):
    calls = _fake_module(monkeypatch, "tensorflow_hub", "resolve", source)
    assert resolve_handle_fn(handle) == str(source)
    assert calls == [resolved]


def test_tfhub_handle_loads(source, monkeypatch):
    calls = _fake_module(monkeypatch, "tensorflow_hub", "resolve", source)
    model = load_llama("https://tfhub.dev/owner/model/1")
    assert calls == ["https://tfhub.dev/owner/model/1"]
    ids = _ids(4)
    np.testing.assert_array_equal(
        np.asarray(model(ids)["logits"]), np.asarray(load_llama(str(source))(ids)["logits"])
    )


def test_tfhub_errors(monkeypatch):
    _fake_module(monkeypatch, "tensorflow_hub", "resolve", None)
    with pytest.raises(
        CheckpointError, match="cannot resolve https://tfhub.dev/o/m/1: RuntimeError"
    ):
        load_llama("https://tfhub.dev/o/m/1")
    monkeypatch.setitem(sys.modules, "tensorflow_hub", None)
    with pytest.raises(CheckpointError, match="pip install tensorflow-hub"):
        load_llama("https://tfhub.dev/o/m/1")


def test_resolved_directory_is_still_checked(tmp_path, monkeypatch):
    """A hub that hands back an empty directory: the error names that directory."""
    empty = tmp_path / "downloaded"
    empty.mkdir()
    _fake_module(monkeypatch, "kagglehub", "model_download", empty)
    with pytest.raises(CheckpointError, match=re.escape(str(empty / CONFIG)) + " is missing"):
        load_llama("kaggle://owner/model/keras/variant")


# --- Tokenizers ------------------------------------------------------------------------


def _sentences(count=300, seed=0):
    rng = random.Random(seed)
    words = (
        "the a cat dog bird sat ran on under over mat log tree quickly slowly red green "
        "blue big small"
    ).split()
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + f" {rng.randint(0, 999)}."
        for _ in range(count)
    ]


def _hf_tokenizer_json(path):
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "</s>"])
    tokenizer.train_from_iterator(_sentences(), trainer)
    tokenizer.save(str(path))
    return tokenizer


def test_sentencepiece_tokenizer_is_loaded(ckpt, tmp_path):
    pytest.importorskip("sentencepiece")
    from toex_tf.data.tokenizers import SentencePieceTokenizer

    trained = SentencePieceTokenizer.train(_sentences(), 300, str(tmp_path / "sp"))
    shutil.copy(trained.model_file, ckpt / "tokenizer.model")
    model = load_llama(str(ckpt))
    tokenizer = model.tokenizer
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert tokenizer.model_file == str(ckpt / "tokenizer.model")
    text = "the big dog ran under the tree 42."
    ids = tokenizer.encode(text)
    assert ids == trained.encode(text) and len(ids) < len(text)
    assert tokenizer.decode(ids + [tokenizer.eos_id]) == text
    assert load_llama(str(ckpt), load_tokenizer=False).tokenizer is None


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    pytest.importorskip("sentencepiece")
    from toex_tf.data.tokenizers import SentencePieceTokenizer

    small = tmp_path / "small"
    model = build_llama("llama-tiny", exit_layers=(), capacity=1.0, vocab_size=128)
    export_llama(model, str(small))
    trained = SentencePieceTokenizer.train(_sentences(), 300, str(tmp_path / "sp"))
    shutil.copy(trained.model_file, small / "tokenizer.model")
    with pytest.raises(
        CheckpointError, match="tokenizer has 300 tokens but the model's vocabulary is 128"
    ):
        load_llama(str(small))


def test_sentencepiece_model_wins_over_tokenizer_json(ckpt, tmp_path):
    pytest.importorskip("sentencepiece")
    from toex_tf.data.tokenizers import SentencePieceTokenizer

    trained = SentencePieceTokenizer.train(_sentences(), 300, str(tmp_path / "sp"))
    shutil.copy(trained.model_file, ckpt / "tokenizer.model")
    _hf_tokenizer_json(ckpt / "tokenizer.json")
    assert isinstance(load_llama(str(ckpt)).tokenizer, SentencePieceTokenizer)


def test_hf_json_tokenizer_is_loaded(ckpt):
    from toex_tf.data.tokenizers import HFJsonTokenizer

    reference = _hf_tokenizer_json(ckpt / "tokenizer.json")
    model = load_llama(str(ckpt))
    tokenizer = model.tokenizer
    assert isinstance(tokenizer, HFJsonTokenizer)
    assert tokenizer.eos_id == reference.token_to_id("</s>") == 2
    text = "the cat sat on the mat"
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text).ids and len(ids) == 6
    assert tokenizer.eos_id not in ids
    assert tokenizer.decode(ids + [tokenizer.eos_id]) == text


def test_no_tokenizer_gives_none(ckpt):
    assert load_llama(str(ckpt)).tokenizer is None


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json"])
def test_corrupt_tokenizer_file_is_named(ckpt, name):
    pytest.importorskip("sentencepiece" if name.endswith(".model") else "tokenizers")
    (ckpt / name).write_bytes(b"\x00garbage")
    # A ValueError (not a CheckpointError) from the tokenizer class, naming the file.
    with pytest.raises(ValueError, match=re.escape(str(ckpt / name))):
        load_llama(str(ckpt))
    assert load_llama(str(ckpt), load_tokenizer=False).tokenizer is None


def test_export_with_saved_tokenizer_round_trips(ckpt, tmp_path):
    from toex_tf.data.tokenizers import HFJsonTokenizer

    _hf_tokenizer_json(ckpt / "tokenizer.json")
    model = load_llama(str(ckpt))
    assert isinstance(model.tokenizer, HFJsonTokenizer)
    exported = tmp_path / "exported"
    export_llama(model, str(exported))
    model.tokenizer.save(str(exported))
    reloaded = load_llama(str(exported))
    text = "the cat sat on the mat"
    assert reloaded.tokenizer is not None
    assert reloaded.tokenizer.encode(text) == model.tokenizer.encode(text)


def test_byte_tokenizer_saved_next_to_export_loads(ckpt):
    """toex_tf's own manifest ({"type": "byte"}) under the name tokenizer.json."""
    from toex_tf.data.tokenizers import ByteTokenizer

    ByteTokenizer().save(str(ckpt))
    assert json.loads((ckpt / "tokenizer.json").read_text()) == {"type": "byte"}
    tokenizer = load_llama(str(ckpt)).tokenizer
    assert isinstance(tokenizer, ByteTokenizer)
    assert tokenizer.decode(tokenizer.encode("hé")) == "hé"


# --- Exits and routers on a loaded checkpoint -------------------------------------------


def test_exits_and_routers_on_a_loaded_checkpoint(ckpt, source):
    tensors = _tensors(source)
    model = load_llama(str(ckpt), exit_layers=(1,), capacity=0.5)
    assert model.exit_layers == (1, 2)
    assert len(model.routers) == 2 and len(model.gates) == 1
    final_norm = tensors["model.norm.weight"]
    assert not np.allclose(final_norm, 1.0)
    # The non-final exit's norm starts as a copy of the final norm.
    np.testing.assert_array_equal(np.asarray(model.blocks[0].exit_norm.scale), final_norm)
    np.testing.assert_array_equal(np.asarray(model.blocks[-1].exit_norm.scale), final_norm)
    # The routed FFN still holds the checkpoint's weights.
    for index, block in enumerate(model.blocks):
        np.testing.assert_array_equal(
            np.asarray(block.block.ffn.layer.up_dense.kernel),
            tensors[f"model.layers.{index}.mlp.up_proj.weight"],
        )
    # The base is frozen; only routers and gates are fresh.
    assert not model.token_embedding.trainable
    outputs = model(_ids(5))
    assert set(outputs) == {"logits", "exit_logits"} and len(outputs["exit_logits"]) == 2
    assert outputs["logits"].shape == (2, 7, VOCAB)


def test_hf_config_round_trips_the_architecture():
    from toex_tf.config import llama_preset
    from toex_tf.loaders import hf_config_from_llama, llama_config_from_hf

    config = llama_preset(
        "llama-tiny", norm_epsilon=1e-3, rope_theta=500.0, tie_embeddings=True, max_length=40
    )
    hf_config = hf_config_from_llama(config, "bfloat16")
    assert hf_config["model_type"] == "llama" and hf_config["torch_dtype"] == "bfloat16"
    back = llama_config_from_hf(hf_config, exit_layers=config.exit_layers)
    for field in (
        "vocab_size",
        "max_length",
        "hidden_dim",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "intermediate_dim",
        "norm_epsilon",
        "rope_theta",
        "tie_embeddings",
    ):
        assert getattr(back, field) == getattr(config, field), field
