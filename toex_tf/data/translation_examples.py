"""Sentence pairs made ready for a translation run: a shared tokenizer and padded arrays."""

from dataclasses import dataclass

import numpy as np

from toex_tf.data.parallel import ParallelCorpus
from toex_tf.data.tokenizers import make_tokenizer, run_tokenizer


@dataclass
class TranslationExamples:
    """Padded arrays of one split, the inputs `EarlyExitTransformer` takes.

    `decoder_token_ids` is the target behind the start token (the tokenizer's eos, as in
    fairseq); `labels` is the target followed by eos; `weights` is 1 on real target
    positions and 0 on padding. `pairs` are the `(source, target)` strings kept, in order;
    `dropped` counts the pairs left out because a side exceeded its maximum length.
    """

    encoder_token_ids: np.ndarray
    encoder_padding_mask: np.ndarray
    decoder_token_ids: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    pairs: list
    dropped: int

    @property
    def inputs(self) -> dict:
        return {
            "encoder_token_ids": self.encoder_token_ids,
            "encoder_padding_mask": self.encoder_padding_mask,
            "decoder_token_ids": self.decoder_token_ids,
        }

    def __len__(self) -> int:
        return len(self.pairs)


def encode_pairs(pairs, tokenizer, max_source_length: int, max_length: int) -> TranslationExamples:
    """Tokenizes pairs into padded arrays; pairs that do not fit are left out (counted).

    Args:
        pairs: list of `(source, target)` str pairs.
        tokenizer: the shared tokenizer (its eos starts and ends every target).
        max_source_length: int, the most source tokens (the encoder's positions).
        max_length: int, the decoder's positions: the start token and the target, or the
            target and eos, must fit.
    """
    start = tokenizer.eos_id
    sources = tokenizer.encode_batch([source for source, _ in pairs])
    targets = tokenizer.encode_batch([target for _, target in pairs])
    kept = [
        index
        for index, (source, target) in enumerate(zip(sources, targets))
        if 0 < len(source) <= max_source_length and len(target) + 1 <= max_length
    ]
    count = len(kept)
    encoder_ids = np.zeros((count, max_source_length), "int32")
    encoder_mask = np.zeros((count, max_source_length), "int32")
    decoder_ids = np.zeros((count, max_length), "int32")
    labels = np.zeros((count, max_length), "int32")
    weights = np.zeros((count, max_length), "float32")
    for row, index in enumerate(kept):
        source, target = sources[index], targets[index]
        encoder_ids[row, : len(source)] = source
        encoder_mask[row, : len(source)] = 1
        decoder_ids[row, : len(target) + 1] = [start, *target]
        labels[row, : len(target) + 1] = [*target, tokenizer.eos_id]
        weights[row, : len(target) + 1] = 1.0
    return TranslationExamples(
        encoder_ids,
        encoder_mask,
        decoder_ids,
        labels,
        weights,
        [pairs[index] for index in kept],
        len(pairs) - count,
    )


def translation_tokenizer(
    corpus: ParallelCorpus, kind: str, vocab_size: int | None, output_dir: str, tokenizer=None
):
    """The run's shared source/target tokenizer: the one given, the one saved in
    `output_dir/tokenizer`, or one trained on the training pairs (both sides) and saved
    there, so a later run (resume, eval, generate) reloads it and ids never shift."""
    documents = [text for pair in corpus.train for text in pair]
    size = vocab_size if kind != "byte" else None
    return run_tokenizer(
        output_dir, tokenizer, lambda directory: make_tokenizer(kind, documents, size, directory)
    )
