"""Packaging for toex_tf: adaptive-depth (early-exit, skip-routed) transformer LMs in Keras 3."""

from setuptools import find_packages, setup

setup(
    name="toex-tf",
    version="0.1.0",
    description="Adaptive-depth inference for transformer LMs in TensorFlow / Keras 3: "
    "early exit and FFN skip routing.",
    packages=find_packages(include=["toex_tf", "toex_tf.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3",
        "tensorflow-datasets",
        "tensorboard",
        "numpy",
        "absl-py",
        "sentencepiece",
        "matplotlib",
        # The Llama loader: safetensors checkpoints (bf16 through ml_dtypes), hf:// handles.
        "safetensors",
        "ml_dtypes",
        "huggingface_hub",
    ],
    extras_require={
        # The export's in-graph SentencePiece tokenizer (generate_text). tensorflow-text
        # releases track TensorFlow's minor version, so this may pin TensorFlow.
        "text": ["tensorflow-text"],
        # jax: the no-TensorFlow import test runs the layers on the JAX backend.
        # torch + transformers: the Llama loader's parity test (install the CPU build of
        # torch first on a machine without a GPU; .ci/run does).
        # tensorflow-hub: the export's hub.load test (it imports pkg_resources, which
        # setuptools dropped in 81). nbclient + ipykernel: the Kaggle notebook runs headless.
        # tensorflow-text: the export's generate_text signature with SentencePiece.
        "test": [
            "pytest",
            "pytest-xdist",  # the README's test command runs two workers
            "ruff",
            "jax",
            "torch",
            "transformers",
            "tensorflow-hub",
            "setuptools<81",
            "nbclient",
            "nbformat",
            "ipykernel",
            "tensorflow-text",
        ],
    },
)
