"""The translation sweep: sacreBLEU on real outputs, exit layers, speedups, the table and plot."""

import keras
import numpy as np
import sacrebleu

from toex_tf.analysis.translation_eval import (
    SentenceTranslator,
    TranslationSetting,
    evaluate_translation,
    format_translation_table,
    plot_translation_sweep,
    sweep_settings,
)
from toex_tf.data.tokenizers import ByteTokenizer
from toex_tf.models import build_transformer

TOKENIZER = ByteTokenizer()
SOURCES = ["cat", "dog sun", "map", "red box", "cup"]


def _model():
    keras.utils.set_random_seed(3)
    return build_transformer("tiny", vocab_size=257, num_layers=3, max_length=12)


def test_sweep_rows_and_bleu_against_the_model_own_outputs(tmp_path):
    model = _model()
    full = SentenceTranslator(model, TOKENIZER, TranslationSetting("full"), jit_compile=False)
    # References equal to full depth's own outputs: full depth must score chrF 100 (and
    # sacreBLEU's self-BLEU of those strings; a random model's short outputs have no
    # 4-grams), which checks that outputs are cut at eos and decoded as generated.
    references = []
    for source in SOURCES:
        ids = full(full.source_arrays(TOKENIZER.encode(source)))["ids"]
        references.append(TOKENIZER.decode([t for t in ids if t != TOKENIZER.eos_id]))
    assert all(references)
    settings = sweep_settings(["frozen", "lazy"], ["max_prob"], [0.0, 1.0], draft_layers=[1])
    # Deciding only at layer 2: a token that always passes leaves there, not at layer 1.
    settings.append(TranslationSetting("frozen", "max_prob", 0.0, decision_layers=(2,)))
    results = evaluate_translation(
        model, TOKENIZER, list(zip(SOURCES, references)), settings, jit_compile=False
    )
    base = results["baseline"]
    self_bleu = round(sacrebleu.corpus_bleu(references, [references]).score, 2)
    assert base["chrf"] == 100.0 and base["bleu"] == self_bleu
    assert base["num_layers"] == 3 and base["sentences"] == 5
    rows = {(r["mode"], r["threshold"]): r for r in results["sweeps"][:5]}
    assert len(results["sweeps"]) == 6
    decided = results["sweeps"][5]
    assert decided["decision_layers"] == [2] and 2.0 < decided["avg_exit_layer"] < 2.5
    # Never exiting is full depth; always exiting leaves at layer 1.
    for mode in ("frozen", "lazy"):
        assert rows[(mode, 1.0)]["chrf"] == 100.0 and rows[(mode, 1.0)]["avg_exit_layer"] == 3
        assert rows[(mode, 1.0)]["agreement_with_full"] == 1.0
        # Every token but the first (the prefill's, at full depth) leaves at layer 1.
        low = rows[(mode, 0.0)]
        assert 1.0 < low["avg_exit_layer"] < 1.5
        assert low["ideal_speedup"] == round(3 / low["avg_exit_layer"], 3)
    assert rows[("speculative", None)]["chrf"] == 100.0  # lossless
    for row in results["sweeps"]:
        assert row["measured_speedup"] > 0 and 0 <= row["agreement_with_full"] <= 1
    example = results["examples"][0]
    assert example["source"] == "cat" and example["output"] == references[0]
    assert all(1 <= t["exit_layer"] <= 3 for t in example["tokens"])
    table = format_translation_table(results)
    assert "chrF 100.00" in table and "speculative draft 1x4" in table
    assert "frozen max_prob 0 @2" in table
    assert (tmp_path / "r.png").exists() is False
    plot_translation_sweep(results, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_long_sources_are_left_out_and_counted():
    model = _model()
    pairs = [("x" * 40, "y"), ("cat", "pisică")]
    results = evaluate_translation(model, TOKENIZER, pairs, [], jit_compile=False)
    assert results["baseline"]["sentences"] == 1
    assert results["baseline"]["skipped_long_sources"] == 1
    assert np.isfinite(results["baseline"]["bleu"])
