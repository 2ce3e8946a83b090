"""`.keras` files saved by earlier versions still load, with the same outputs.

`legacy/*_788ffe0.keras` were saved by commit 788ffe0 (before the one model interface:
`gpt_config`/`llama_config`, a GPT output dict without `"logits"`); the file
`outputs_788ffe0.npz` holds what those models returned then on `ids`.
"""

import os

import keras
import numpy as np
import pytest

import toex_tf.models  # noqa: F401 - registers the classes for loading
from toex_tf.inference import DecoderAdapter, ExitPolicy, generate

LEGACY = os.path.join(os.path.dirname(__file__), "legacy")


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_file_saved_by_an_earlier_version_loads_with_the_same_outputs(family):
    model = keras.saving.load_model(os.path.join(LEGACY, f"{family}_788ffe0.keras"))
    saved = np.load(os.path.join(LEGACY, "outputs_788ffe0.npz"))
    outputs = model(saved["ids"])
    assert set(outputs) >= {"logits", "exit_logits"}
    assert len(outputs["exit_logits"]) == len(model.exit_layers) == 2
    for index, logits in enumerate(outputs["exit_logits"]):
        np.testing.assert_allclose(np.asarray(logits), saved[f"{family}_{index}"], atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(outputs["logits"]), np.asarray(outputs["exit_logits"][-1])
    )
    # The one interface: the engine decodes it without knowing the family.
    assert model.config.num_layers == model.num_layers == 2
    tokens, exits = generate(
        DecoderAdapter(model), saved["ids"], 4, ExitPolicy("lazy", threshold=0.0)
    )
    assert np.asarray(tokens).shape == (2, 4) and set(np.asarray(exits).ravel()) <= {1, 2}
