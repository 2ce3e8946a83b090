"""Turning generated ids back into text, as a continuation of the prompt."""


def decode_continuation(tokenizer, prompt_ids: list, token_ids: list) -> tuple[str, list]:
    """The text of `token_ids` as a continuation of `prompt_ids`, and each token's piece.

    Decoding generated ids on their own is wrong for SentencePiece: it drops the leading
    space of the first piece ("▁sat" decodes to "sat"). So the continuation is decoded
    after the prompt and the decoded prompt is cut off. A token whose bytes do not yet
    form whole characters (byte tokenizer, multi-byte UTF-8) gets an empty piece, and
    its text is carried by the token that completes it; the pieces join to the text.
    """
    prefix = tokenizer.decode(prompt_ids)
    emitted = prefix
    pieces = []
    for end in range(1, len(token_ids) + 1):
        decoded = tokenizer.decode(prompt_ids + token_ids[:end])
        if decoded.startswith(emitted) and not decoded.endswith("\ufffd"):
            pieces.append(decoded[len(emitted) :])
            emitted = decoded
        else:
            pieces.append("")
    whole = tokenizer.decode(prompt_ids + token_ids)
    if not whole.startswith(prefix):  # the prompt decodes differently in context
        return tokenizer.decode(token_ids), [tokenizer.decode([t]) for t in token_ids]
    text = whole[len(prefix) :]
    if pieces and whole.startswith(emitted):
        pieces[-1] += whole[len(emitted) :]  # an incomplete character at the very end
    if "".join(pieces) != text:  # decoding is not prefix-stable here: per-token pieces
        pieces = [tokenizer.decode([t]) for t in token_ids]
    return text, pieces
