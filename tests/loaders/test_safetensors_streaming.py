"""`load_llama` reads safetensors headers first, then one tensor at a time.

Every read goes through `safetensors.safe_open`; the `reads` fixture wraps it to count
`get_tensor` calls per key and the most tensors alive at once (a weak reference to every
array it hands out). One tiny checkpoint per module, written by `export_llama`.
"""

import json
import re
import shutil
import weakref

import numpy as np
import pytest

from toex_tf.loaders import CheckpointError, export_llama, load_llama
from toex_tf.loaders.safetensors_file import SafetensorsTensors
from toex_tf.models import build_llama

safetensors = pytest.importorskip("safetensors")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_dim=32, intermediate_dim=48, shortlist_size=16)


class Reads:
    """What went through `safe_open(...).get_tensor`: `keys` in call order, and
    `most_alive`, the most arrays it had handed out alive at once."""

    def __init__(self):
        self.keys = []
        self.alive = 0
        self.most_alive = 0

    def handed_out(self, key, array):
        self.keys.append(key)
        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(array, self._dropped)
        return array

    def _dropped(self):
        self.alive -= 1


@pytest.fixture
def reads(monkeypatch):
    """Wraps `safetensors.safe_open` (the loader imports it at call time)."""
    record = Reads()
    real_open = safetensors.safe_open

    class CountingHandle:
        def __init__(self, *args, **kwargs):
            self._handle = real_open(*args, **kwargs)

        def __enter__(self):
            self._open = self._handle.__enter__()
            return self

        def __exit__(self, *exc_info):
            return self._handle.__exit__(*exc_info)

        def get_tensor(self, key):
            return record.handed_out(key, self._open.get_tensor(key))

        def __getattr__(self, name):  # keys, get_slice, metadata: the header only
            return getattr(self._open, name)

    monkeypatch.setattr(safetensors, "safe_open", CountingHandle)
    return record


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 2-layer model (vocab 96, width 32, 4 heads, 2 kv heads, FFN 48) and its export,
    with norm scales away from 1 so that a norm left unloaded shows."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    model = build_llama("llama-tiny", exit_layers=(), capacity=1.0, **TINY)
    rng = np.random.default_rng(0)
    for variable in model.weights:
        if "scale" in variable.path:
            variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))
    export_llama(model, str(directory))
    return model, directory


@pytest.fixture
def ckpt(source, tmp_path):
    """A private copy of the module checkpoint, free to tamper with."""
    return shutil.copytree(source[1], tmp_path / "ckpt")


def _tensors(path):
    return safetensors_numpy.load_file(str(path))


def _save(path, tensors):
    safetensors_numpy.save_file(tensors, str(path), metadata={"format": "pt"})


def _shard(directory):
    """Splits model.safetensors into two shards plus an index; returns the shard paths."""
    tensors = _tensors(directory / WEIGHTS)
    keys = sorted(tensors)
    paths = [directory / f"model-0000{n}-of-00002.safetensors" for n in (1, 2)]
    weight_map = {}
    for path, half in zip(paths, (keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        _save(path, {key: tensors[key] for key in half})
        weight_map.update(dict.fromkeys(half, path.name))
    (directory / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / WEIGHTS).unlink()
    return paths


def _ids():
    return np.random.default_rng(1).integers(0, VOCAB, (2, 7)).astype("int32")


# --- Headers first -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, change, found, wanted",
    [
        ("model.layers.1.mlp.down_proj.weight", lambda w: w.T.copy(), (48, 32), (32, 48)),
        ("model.embed_tokens.weight", lambda w: w[:50].copy(), (50, 32), (VOCAB, 32)),
        ("model.norm.weight", lambda w: np.ones(33, "float32"), (33,), (32,)),
    ],
)
def test_wrong_shape_is_refused_before_any_tensor_is_read(ckpt, reads, key, change, found, wanted):
    tensors = _tensors(ckpt / WEIGHTS)
    tensors[key] = change(tensors[key])
    _save(ckpt / WEIGHTS, tensors)
    with pytest.raises(CheckpointError) as info:
        load_llama(str(ckpt))
    message = str(info.value)
    assert reads.keys == []  # the headers said enough
    assert repr(key) in message and str(ckpt / WEIGHTS) in message
    assert message.index(str(found)) < message.index(str(wanted))  # "has ...; expects ..."


def test_unsupported_dtype_is_refused_before_any_tensor_is_read(ckpt, reads):
    tensors = _tensors(ckpt / WEIGHTS)
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key].astype("int8")
    _save(ckpt / WEIGHTS, tensors)
    with pytest.raises(CheckpointError) as info:
        load_llama(str(ckpt))
    message = str(info.value)
    assert reads.keys == []
    assert repr(key) in message and str(ckpt / WEIGHTS) in message
    assert "dtype I8" in message and "BF16, F16, F32" in message


def test_headers_give_shapes_and_files_without_reading(ckpt, reads):
    paths = _shard(ckpt)
    tensors = SafetensorsTensors(str(ckpt))
    assert len(tensors) == len(_tensors(paths[0])) + len(_tensors(paths[1]))
    key = sorted(_tensors(paths[1]))[0]
    assert tensors.file(key) == str(paths[1])
    assert tensors.shape("model.layers.0.mlp.up_proj.weight") == (48, 32)
    assert reads.keys == []


# --- One tensor at a time ------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("kernel_layout", ["out_in", "in_out"])
def test_load_reads_each_tensor_once_one_at_a_time(ckpt, source, reads, sharded, kernel_layout):
    model, _ = source
    checkpoint = _tensors(ckpt / WEIGHTS)
    if sharded:
        _shard(ckpt)
    loaded = load_llama(str(ckpt), kernel_layout=kernel_layout)
    assert sorted(reads.keys) == sorted(checkpoint)  # every tensor, each exactly once
    assert reads.most_alive == 1  # each dropped before the next was read
    assert reads.alive == 0
    # Parity in the variables' own layout (Keras Dense kernels are (in, out)) ...
    transpose = kernel_layout == "in_out"
    attention = loaded.blocks[1].block.self_attention
    for variable, key in [
        (attention.output_dense.kernel, "model.layers.1.self_attn.o_proj.weight"),
        (loaded.blocks[0].block.ffn.down_dense.kernel, "model.layers.0.mlp.down_proj.weight"),
        (loaded.token_embedding.embeddings, "model.embed_tokens.weight"),
        (loaded.token_embedding.output_embeddings, "lm_head.weight"),
    ]:
        expected = checkpoint[key].T if transpose and "proj" in key else checkpoint[key]
        np.testing.assert_array_equal(np.asarray(variable), expected, err_msg=key)
    width = loaded.config.num_heads * loaded.config.head_dim
    query = np.asarray(attention.qkv_dense.kernel)
    query = query[:, :width].T if transpose else query[:width]
    np.testing.assert_array_equal(query, checkpoint["model.layers.1.self_attn.q_proj.weight"])
    # ... and as a whole: the same logits as the model that was exported.
    ids = _ids()
    np.testing.assert_allclose(
        np.asarray(loaded(ids)["logits"]), np.asarray(model(ids)["logits"]), atol=1e-5
    )


def test_exit_norms_start_from_the_final_norm_read_once(ckpt, reads):
    checkpoint = _tensors(ckpt / WEIGHTS)
    loaded = load_llama(str(ckpt), exit_layers=(1,))
    assert reads.keys.count("model.norm.weight") == 1
    for block in loaded.blocks:
        np.testing.assert_array_equal(
            np.asarray(block.exit_norm.scale), checkpoint["model.norm.weight"]
        )


@pytest.mark.parametrize("model_dtype", ["float32", "bfloat16"])
def test_bfloat16_checkpoint_is_cast_tensor_by_tensor(source, tmp_path, reads, model_dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    directory = export_llama(source[0], str(tmp_path / "bf16"), dtype="bfloat16")
    checkpoint = _tensors(tmp_path / "bf16" / WEIGHTS)
    assert checkpoint["lm_head.weight"].dtype == ml_dtypes.bfloat16
    loaded = load_llama(directory, dtype=model_dtype)
    assert reads.most_alive == 1 and len(reads.keys) == len(checkpoint)
    up = loaded.blocks[0].block.ffn.up_dense.kernel
    assert str(up.dtype) == model_dtype
    np.testing.assert_array_equal(
        np.asarray(up).astype("float32"),
        checkpoint["model.layers.0.mlp.up_proj.weight"].astype("float32"),
    )


# --- Shards ----------------------------------------------------------------------------------


def test_tensor_listed_in_the_index_but_absent_from_its_shard(ckpt, reads):
    paths = _shard(ckpt)
    tensors = _tensors(paths[1])
    key = sorted(tensors)[0]
    del tensors[key]
    _save(paths[1], tensors)
    with pytest.raises(CheckpointError) as info:
        load_llama(str(ckpt))
    message = str(info.value)
    assert repr(key) in message and str(paths[1]) in message and INDEX in message
    assert reads.keys == []


def test_unreadable_tensor_names_key_and_file(ckpt):
    tensors = SafetensorsTensors(str(ckpt))
    (ckpt / WEIGHTS).write_bytes(b"")  # replaced after the headers were read
    with pytest.raises(
        CheckpointError,
        match=re.escape(f"'lm_head.weight' from {ckpt / WEIGHTS}") + ".*truncated or corrupt",
    ):
        tensors["lm_head.weight"]
