"""`Linear` (kernels stored `(out, in)`) and the `kernel_layout` option of the blocks."""

import keras
import numpy as np
import pytest
from roundtrip import assert_roundtrip

from toex_tf.config import LlamaConfig
from toex_tf.layers import CausalSelfAttention, FeedForward, Linear, TransformerBlock
from toex_tf.models import HierarchicalLlama, build_llama

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("shape", [(2, 5, 8), (1, 1, 8), (1, 8), (3, 8)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_linear_equals_dense_with_the_transposed_kernel(shape, use_bias):
    # (1, 1, 8) and (1, 8) take the single-row (decode) path, the others the GEMM path.
    inputs = RNG.normal(size=shape).astype("float32")
    linear = Linear(6, use_bias=use_bias, bias_initializer="random_normal")
    out = np.asarray(linear(inputs))
    assert tuple(linear.kernel.shape) == (6, 8) and out.shape == shape[:-1] + (6,)
    dense = keras.layers.Dense(6, use_bias=use_bias)
    dense.build(shape)
    weights = [np.asarray(linear.kernel).T] + ([np.asarray(linear.bias)] if use_bias else [])
    dense.set_weights(weights)
    np.testing.assert_allclose(out, np.asarray(dense(inputs)), atol=1e-5)


def test_linear_initializer_sees_the_in_out_fans():
    # he_uniform's limit is sqrt(6 / fan_in) with fan_in = input width (64), not units (4).
    linear = Linear(4, kernel_initializer="he_uniform")
    linear.build((None, 64))
    kernel = np.abs(np.asarray(linear.kernel))
    limit = np.sqrt(6 / 64)
    assert kernel.max() <= limit and kernel.max() > 0.8 * limit


def test_linear_roundtrip(tmp_path):
    assert_roundtrip(Linear(5), RNG.normal(size=(2, 3, 4)).astype("float32"), tmp_path)


def test_out_in_block_equals_in_out_block_with_transposed_kernels(tmp_path):
    x = RNG.normal(size=(2, 6, 16)).astype("float32")
    kwargs = dict(
        num_heads=4,
        head_dim=4,
        intermediate_dim=32,
        num_kv_heads=2,
        norm_type="rms_norm",
        activation="swiglu",
        use_bias=False,
        rope_theta=10000.0,
    )
    dense_block = TransformerBlock(**kwargs)
    dense_block(x)
    linear_block = TransformerBlock(**kwargs, kernel_layout="out_in")
    linear_block(x)
    for source, target in zip(dense_block.weights, linear_block.weights, strict=True):
        value = np.asarray(source)
        target.assign(value.T if target.path.endswith("kernel") and value.ndim == 2 else value)
    assert isinstance(linear_block.ffn.down_dense, Linear)
    np.testing.assert_allclose(np.asarray(linear_block(x)), np.asarray(dense_block(x)), atol=1e-5)
    assert_roundtrip(linear_block, x, tmp_path, atol=1e-6)


def test_bad_kernel_layout_is_named():
    for make in (
        lambda: CausalSelfAttention(num_heads=2, head_dim=4, kernel_layout="io"),
        lambda: FeedForward(intermediate_dim=8, kernel_layout="io"),
        lambda: TransformerBlock(num_heads=2, head_dim=4, intermediate_dim=8, kernel_layout="io"),
        lambda: LlamaConfig(kernel_layout="io"),
    ):
        with pytest.raises(ValueError, match="kernel_layout.*'io'"):
            make()


def test_llama_saved_before_kernel_layout_loads_with_dense_kernels():
    model = build_llama("llama-tiny")
    assert model.config.kernel_layout == "out_in"
    config = model.get_config()
    del config["kernel_layout"], config["fused_qkv"]  # a config written by an earlier version
    old = HierarchicalLlama.from_config(config)
    assert old.config.kernel_layout == "in_out"
    assert not old.config.fused_qkv
    assert isinstance(old.blocks[0].block.self_attention.query_dense, keras.layers.Dense)


def test_llama_saved_before_fused_qkv_loads_with_three_projections(tmp_path):
    model = build_llama("llama-tiny")
    assert model.config.fused_qkv
    config = model.get_config()
    del config["fused_qkv"]  # written after kernel_layout, before fused_qkv
    old = HierarchicalLlama.from_config(config)
    attention = old.blocks[0].block.self_attention
    assert not old.config.fused_qkv and attention.qkv_dense is None
    assert isinstance(attention.query_dense, Linear)
    path = str(tmp_path / "old.keras")
    old.save(path)
    again = keras.saving.load_model(path)
    tokens = RNG.integers(0, 256, size=(2, 5)).astype("int32")
    np.testing.assert_array_equal(
        np.asarray(again(tokens)["logits"]), np.asarray(old(tokens)["logits"])
    )


@pytest.mark.parametrize("kernel_layout", ["in_out", "out_in"])
@pytest.mark.parametrize("fused_qkv", [True, False])
def test_hf_weights_load_into_either_kernel_layout(tmp_path, kernel_layout, fused_qkv):
    """Export from one layout / projection form and load into another: same logits, and
    exporting the loaded model gives the same tensors back."""
    from toex_tf.loaders.llama import assign_hf_weights, export_llama, read_safetensors

    tokens = RNG.integers(0, 256, size=(2, 7)).astype("int32")
    source = build_llama("llama-tiny", exit_layers=(), capacity=1.0)
    export_llama(source, str(tmp_path / "source"))
    tensors = read_safetensors(str(tmp_path / "source"))
    target = build_llama(
        "llama-tiny",
        exit_layers=(),
        capacity=1.0,
        kernel_layout=kernel_layout,
        fused_qkv=fused_qkv,
    )
    assign_hf_weights(target, tensors)
    np.testing.assert_allclose(
        np.asarray(target(tokens)["logits"]),
        np.asarray(source(tokens)["logits"]),
        atol=1e-5,
        rtol=1e-5,
    )
    logits = np.asarray(target(tokens)["logits"])
    assert not np.allclose(logits, np.asarray(target(tokens[:, ::-1])["logits"]))
    export_llama(target, str(tmp_path / "again"))
    again = read_safetensors(str(tmp_path / "again"))
    assert sorted(again) == sorted(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


@pytest.fixture
def linear_module(monkeypatch):
    """`toex_tf.layers.linear` with tiny kernels splittable; row splits reset after."""
    import toex_tf.layers.linear as module

    monkeypatch.setattr(module, "MIN_ROWS_PER_PART", 2)
    yield module
    module.set_row_splits(1)


def _products(layer, shape):
    """The matrix-product ops in the traced graph of `layer` on `shape`."""
    import tensorflow as tf

    graph = tf.function(layer).get_concrete_function(tf.TensorSpec(shape, "float32")).graph
    return [op for op in graph.get_operations() if op.type in ("MatMul", "BatchMatMulV2", "Einsum")]


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 5, 8)])
def test_row_splits_run_blocks_that_give_the_same_products(linear_module, parts, shape):
    inputs = RNG.normal(size=shape).astype("float32")
    layer = Linear(7, bias_initializer="random_normal")
    whole = np.asarray(layer(inputs))
    assert len(_products(layer, shape)) == 1
    linear_module.set_row_splits(parts)
    assert linear_module.get_row_splits() == parts
    np.testing.assert_allclose(np.asarray(layer(inputs)), whole, rtol=1e-6, atol=1e-6)
    assert len(_products(layer, shape)) == parts
    # Kept whole: a layer built with row_split=False, and kernels below the row minimum.
    kept = Linear(7, row_split=False)
    assert len(_products(kept, shape)) == 1
    assert Linear.from_config(kept.get_config()).row_split is False
    linear_module.MIN_ROWS_PER_PART = 4
    assert len(_products(Linear(7), shape)) == 1


def test_swiglu_gate_and_up_are_never_split(linear_module):
    ffn = FeedForward(intermediate_dim=8, activation="swiglu", kernel_layout="out_in")
    ffn.build((1, 1, 4))
    assert not ffn.gate_dense.row_split and not ffn.up_dense.row_split
    assert ffn.down_dense.row_split
    linear_module.set_row_splits(2)
    assert len(_products(ffn, (1, 1, 4))) == 4  # gate, up, and down in two blocks


@pytest.mark.parametrize("parts", [0, -1, 1.5, True, "2"])
def test_bad_row_splits_are_named(parts):
    from toex_tf.layers.linear import set_row_splits

    with pytest.raises(ValueError, match="row splits must be an int >= 1"):
        set_row_splits(parts)


def test_linear_lora_starts_as_the_kernel_and_trains_only_the_update(tmp_path):
    inputs = RNG.normal(size=(2, 3, 8)).astype("float32")
    linear = Linear(6, use_bias=False, name="projection")
    base = np.asarray(linear(inputs))
    kernel = np.asarray(linear.kernel).copy()
    linear.enable_lora(2)
    np.testing.assert_allclose(np.asarray(linear(inputs)), base, atol=1e-6)  # B starts at 0
    assert [w.path for w in linear.trainable_weights] == [
        "projection/lora_kernel_a",
        "projection/lora_kernel_b",
    ]
    # The same shapes as keras.layers.Dense's LoRA.
    assert tuple(linear.lora_kernel_a.shape) == (8, 2)
    assert tuple(linear.lora_kernel_b.shape) == (2, 6)
    update = RNG.normal(size=(2, 6)).astype("float32")
    linear.lora_kernel_b.assign(update)
    expected = base + inputs @ np.asarray(linear.lora_kernel_a) @ update  # alpha = rank
    np.testing.assert_allclose(np.asarray(linear(inputs)), expected, atol=1e-5)
    assert_roundtrip(linear, inputs, tmp_path, atol=1e-6)
    linear.merge_lora()
    assert [w.path for w in linear.weights] == ["projection/kernel"] and not linear.lora_enabled
    assert not linear.trainable_weights  # the kernel stays frozen
    np.testing.assert_allclose(np.asarray(linear(inputs)), expected, atol=1e-5)
    assert not np.array_equal(np.asarray(linear.kernel), kernel)
    assert linear.get_config()["lora_rank"] is None


def test_linear_lora_rejects_misuse():
    linear = Linear(4)
    with pytest.raises(ValueError, match="isn't yet built"):
        linear.enable_lora(2)
    linear.build((None, 8))
    with pytest.raises(ValueError, match="no LoRA update to merge"):
        linear.merge_lora()
    with pytest.raises(ValueError, match="lora rank must be an int >= 1; got 0"):
        linear.enable_lora(0)
    linear.enable_lora(2)
    with pytest.raises(ValueError, match="already enabled"):
        linear.enable_lora(2)
