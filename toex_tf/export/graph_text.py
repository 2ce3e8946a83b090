"""In-graph tokenizers: text in and text out of an export (TensorFlow only).

`GraphTokenizer(tokenizer)` turns a `ByteTokenizer` or a `SentencePieceTokenizer` into
TF ops, for the `generate_text` signature of `toex_tf.export`:

- **Encoding.** The byte tokenizer splits UTF-8 bytes with core `tf.strings` ops.
  SentencePiece runs tensorflow-text's `SentencepieceTokenizer` on the same model bytes.
  That is a custom op: a process that loads the export must `import tensorflow_text`
  first, and TF Serving needs a build that registers the TF Text ops (CPU kernels only).
- **Decoding.** Core ops only. Each id's bytes come from a constant table built in Python
  by the tokenizer itself (`Tokenizer.id_surfaces`). The bytes are joined, then invalid
  UTF-8 is replaced the way each tokenizer does it in Python: the byte tokenizer
  (`bytes.decode(errors="replace")`) puts one U+FFFD per maximal invalid subpart;
  SentencePiece puts one per invalid byte, and a control piece (eos, bos) between byte
  pieces keeps their bytes apart. tensorflow-text's own `detokenize` is not
  used: it strips leading spaces differently from the `sentencepiece` package.

`decode` gives a continuation's text as it reads after the prompt, without SentencePiece's
dummy-prefix stripping. So for a lossless tokenizer,
`tokenizer.decode(tokenizer.encode(prompt) + new_ids) == prompt + text`.
"""

import tensorflow as tf

from toex_tf.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, Tokenizer

_REPLACEMENT = 0xFFFD


def _tensorflow_text():
    try:
        import tensorflow_text  # noqa: PLC0415  (custom ops; only SentencePiece needs it)
    except ImportError as error:
        raise ImportError(
            "In-graph SentencePiece tokenization needs tensorflow-text "
            "(pip install 'toex-tf[text]', or pip install tensorflow-text matching your "
            "TensorFlow version)."
        ) from error
    return tensorflow_text


class GraphTokenizer(tf.Module):
    """A `ByteTokenizer` or `SentencePieceTokenizer` as TF ops (see the module docstring).

    Args:
        tokenizer: the Python tokenizer, whose `encode` and `decode` this matches.
        vocab_size: the model's vocabulary size, if larger than the tokenizer's: ids in
            between decode to nothing, as in Python.

    Raises:
        TypeError: for another tokenizer type (an `HFJsonTokenizer` has no in-graph
            form; wrap the checkpoint's SentencePiece `tokenizer.model` instead).
        ImportError: for SentencePiece without tensorflow-text installed.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None):
        super().__init__(name="graph_tokenizer")
        if isinstance(tokenizer, ByteTokenizer):
            self.kind = "byte"
        elif isinstance(tokenizer, SentencePieceTokenizer):
            self.kind = "sentencepiece"
            self._sentencepiece = _tensorflow_text().SentencepieceTokenizer(
                model=tokenizer.model_proto, out_type=tf.int32
            )
        else:
            raise TypeError(
                f"In-graph tokenization supports ByteTokenizer and SentencePieceTokenizer; got "
                f"{type(tokenizer).__name__}. For a Llama checkpoint, pass "
                "SentencePieceTokenizer('<checkpoint>/tokenizer.model')."
            )
        surfaces = tokenizer.id_surfaces()
        surfaces += [b""] * max(0, (vocab_size or 0) - len(surfaces))
        self.vocab_size = tokenizer.vocab_size
        self.eos_id = tokenizer.eos_id
        self._surfaces = tf.constant(surfaces, tf.string)
        if self.kind == "sentencepiece":
            breaks = [False] * len(surfaces)
            for i in tokenizer.control_ids():
                breaks[i] = True
            self._breaks = tf.constant(breaks, tf.bool)

    def encode(self, texts):
        """`texts` string `(batch,)` -> int32 ids, a `tf.RaggedTensor` `(batch, None)`."""
        texts = tf.convert_to_tensor(texts, tf.string)
        if self.kind == "sentencepiece":
            return self._sentencepiece.tokenize(texts)
        pieces = tf.strings.bytes_split(texts)
        values = tf.reshape(tf.io.decode_raw(pieces.flat_values, tf.uint8), [-1])
        return pieces.with_flat_values(tf.cast(values, tf.int32))

    def decode(self, ids, keep=None):
        """int32 `ids` `(batch, n)` -> string `(batch,)`: each row's text, where `keep`.

        `keep`: bool `(batch, n)`; False drops an id (e.g. after a stop token). None: all.
        """
        pieces = tf.gather(self._surfaces, ids)
        if keep is not None:
            pieces = tf.where(keep, pieces, "")
        if self.kind == "byte":
            joined = tf.strings.reduce_join(pieces, axis=-1)
            return tf.strings.unicode_transcode(
                joined, "UTF-8", "UTF-8", errors="replace", replacement_char=_REPLACEMENT
            )
        # SentencePiece decodes each run of byte pieces on its own, and a control piece
        # ends a run: join each row's pieces in segments that start at control pieces,
        # replace invalid UTF-8 per segment, then join the segments.
        breaks = tf.gather(self._breaks, ids)
        if keep is not None:
            breaks = tf.logical_and(breaks, keep)
        batch, width = tf.shape(ids)[0], tf.shape(ids)[1]
        segments = tf.cumsum(tf.cast(breaks, tf.int32), axis=1)
        segments += tf.range(batch)[:, None] * (width + 1)
        joined = tf.strings.unsorted_segment_join(
            tf.reshape(pieces, [-1]), tf.reshape(segments, [-1]), batch * (width + 1)
        )
        repaired = tf.map_fn(_replace_per_byte, joined, fn_output_signature=tf.string)
        return tf.strings.reduce_join(tf.reshape(repaired, [batch, width + 1]), axis=1)


def valid_utf8(texts):
    """bool `(batch,)`: whether each string is valid UTF-8."""
    repaired = tf.strings.unicode_transcode(
        texts, "UTF-8", "UTF-8", errors="replace", replacement_char=_REPLACEMENT
    )
    return tf.equal(repaired, texts)


def _replace_per_byte(text):
    """One U+FFFD per invalid byte of `text` (a scalar string), as SentencePiece decodes.

    The decoder replaces each maximal invalid subpart with one U+FFFD; a subpart of `w`
    bytes then becomes `w` of them. A U+FFFD that was in the text (bytes EF BF BD) stays.
    """
    chars, starts = tf.strings.unicode_decode_with_offsets(
        text, "UTF-8", errors="replace", replacement_char=_REPLACEMENT
    )
    length = tf.cast(tf.strings.length(text), tf.int64)
    widths = tf.concat([starts[1:], length[None]], axis=0) - starts
    three = tf.fill(tf.shape(starts), tf.constant(3, tf.int64))
    literal = tf.equal(tf.strings.substr(text, starts, three), b"\xef\xbf\xbd")
    invalid = tf.logical_and(tf.equal(chars, _REPLACEMENT), tf.logical_not(literal))
    chars = tf.repeat(chars, tf.where(invalid, widths, tf.ones_like(widths)))
    return tf.strings.unicode_encode(chars, "UTF-8")
