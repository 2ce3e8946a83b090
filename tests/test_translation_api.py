"""`AdaptiveTranslator`: what `toex_tf.load` returns for an encoder-decoder run."""

import keras
import pytest

import toex_tf
from toex_tf.data.tokenizers import ByteTokenizer
from toex_tf.models import build_transformer


@pytest.fixture(scope="module")
def translator(tmp_path_factory):
    keras.utils.set_random_seed(0)
    run = tmp_path_factory.mktemp("run")
    model = build_transformer("tiny", vocab_size=257, num_layers=3, max_length=12)
    model.save(str(run / "model.keras"))
    ByteTokenizer().save(str(run / "tokenizer"))
    return toex_tf.load(str(run))


def test_load_gives_a_translator_whose_modes_agree(translator):
    assert type(translator).__name__ == "AdaptiveTranslator"
    assert "2+3 layers" in repr(translator)
    full = translator.generate("cat", mode="full")
    assert full.prompt == "cat" and len(full.exit_layers) == len(full.token_ids) <= 11
    assert all(layer == 3 for layer in full.exit_layers)
    # Never exiting, lazy and speculative decoding give full depth's translation.
    assert translator.generate("cat", mode="lazy", threshold=1.0).text == full.text
    assert translator.generate("cat", mode="speculative", draft_layer=1).text == full.text
    batch = translator.generate(["cat", "a longer source"], mode="frozen", threshold=1.0)
    assert batch[0].text == full.text  # a batch row translates as it would alone


@pytest.mark.parametrize(
    "sources, error, kind",
    [
        ("", "sources\\[0\\] is empty", ValueError),
        ("x" * 17, "max_source_length=16", ValueError),
        ([], "non-empty list", ValueError),
        ([3], "sources\\[0\\] must be a string", TypeError),
    ],
)
def test_bad_sources_are_named(translator, sources, error, kind):
    with pytest.raises(kind, match=error):
        translator.generate(sources)


def test_bad_settings_are_named(translator):
    with pytest.raises(ValueError, match="mode must be one of"):
        translator.generate("cat", mode="fast")
    with pytest.raises(ValueError, match="max_length=12"):
        translator.generate("cat", max_new_tokens=12)
    with pytest.raises(ValueError, match="speculative decoding is greedy"):
        translator.generate("cat", mode="speculative", do_sample=True)
