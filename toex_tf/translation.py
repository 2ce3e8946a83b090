"""`AdaptiveTranslator`: what `toex_tf.load` returns for an encoder-decoder run.

>>> translator = toex_tf.load("runs/translate_quickstart")
>>> result = translator.generate("Cannot open file", mode="lazy", threshold=0.8)
>>> result.text, result.exit_layers

The same calls as `AdaptiveLM` (`generate` with a mode and policy fields per call), with a
source sentence where a language model takes a prompt.
"""

import dataclasses

import numpy as np

from toex_tf.api import MODES, TRACE_ALTERNATIVES, default_policy
from toex_tf.generation import (
    Generation,
    check_bools,
    check_policy,
    check_sampling,
    check_text,
    check_trace,
    is_int,
    traced_decision_layers,
    with_trace,
)
from toex_tf.inference.adapter import DecoderAdapter
from toex_tf.inference.compiled import compile_function
from toex_tf.inference.policy import ExitPolicy
from toex_tf.inference.translate import pad_sources, translate


class AdaptiveTranslator:
    """An encoder-decoder model with decoder exits, its tokenizer and a default policy.

    Args:
        model: an `EarlyExitTransformer`.
        tokenizer: the shared source/target tokenizer (its eos starts and ends targets).
        policy: the default `ExitPolicy`; None: `default_policy(model)`.
    """

    def __init__(self, model, tokenizer, policy: ExitPolicy | None = None):
        if tokenizer is None:
            raise ValueError(
                "an encoder-decoder model needs its tokenizer (a tokenizer/ directory beside "
                "model.keras): its eos id starts every target."
            )
        check_policy(policy)
        self.model = model
        self.tokenizer = tokenizer
        self.policy = policy or default_policy(model)
        self.adapter = DecoderAdapter(model)
        self._compiled = {}

    def __repr__(self) -> str:
        config = self.model.config
        return (
            f"AdaptiveTranslator({config.num_encoder_layers}+{config.num_layers} layers, "
            f"decoder exits {list(self.model.exit_layers)}, vocabulary {config.vocab_size}; "
            f"{self.policy})"
        )

    def resolved_policy(self, mode: str | None = None, **options) -> ExitPolicy:
        """The policy a `generate` call with these arguments runs (non-policy arguments
        are ignored; None keeps the default's)."""
        names = {field.name for field in dataclasses.fields(ExitPolicy)} - {"mode"}
        fields = {k: v for k, v in options.items() if k in names and v is not None}
        mode = self.policy.mode if mode in (None, "speculative") else mode
        return dataclasses.replace(self.policy, mode=mode, **fields)

    def _encode(self, sources) -> tuple[list, list]:
        texts = [sources] if isinstance(sources, str) else sources
        if not isinstance(texts, (list, tuple)) or not texts:
            raise ValueError(f"sources must be a string or a non-empty list; got {sources!r}.")
        ids = []
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"sources[{index}] must be a string; got {text!r}.")
            encoded = self.tokenizer.encode(check_text(f"sources[{index}]", text))
            if not encoded:
                raise ValueError(f"sources[{index}] is empty: give a sentence to translate.")
            if len(encoded) > self.model.max_source_length:
                raise ValueError(
                    f"sources[{index}] has {len(encoded)} tokens, more than the model's "
                    f"max_source_length={self.model.max_source_length}: {text[:60]!r}."
                )
            ids.append(encoded)
        return list(texts), ids

    def generate(
        self,
        sources,
        max_new_tokens: int | None = None,
        mode: str | None = None,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        draft_layer: int = 1,
        draft_length: int = 4,
        jit_compile: bool = False,
        trace: bool = False,
        **policy,
    ):
        """Translates each source sentence, with decoder exits.

        Args:
            sources: a string, or a list of strings (decoded together as one batch).
            max_new_tokens: int or None, the most target tokens; None: as many as the
                model's decoder holds (`max_length - 1`).
            mode: `"full"`, `"unfrozen"`, `"frozen"`, `"lazy"` or `"speculative"`
                (greedy, `draft_layer`, `draft_length`); None: the default policy's.
            do_sample, temperature, top_k, top_p, seed: sampling, as in `AdaptiveLM`.
            jit_compile: bool, TensorFlow: compile with XLA as well.
            trace: bool, also record each token's confidences and top alternatives, as
                in `AdaptiveLM.generate`.
            **policy: `ExitPolicy` fields for this call (`criterion`, `threshold`, ...).

        Returns:
            A `Generation` (`prompt` is the source, `text` the translation) for one
            string, else a list of them.
        """
        if mode not in (None, *MODES):
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
        check_trace(trace, mode)
        check_bools(do_sample=do_sample, jit_compile=jit_compile)
        check_sampling(temperature, top_k, top_p, seed)
        most = self.model.max_length - 1  # the start token takes the first position
        if max_new_tokens is None:
            max_new_tokens = most
        if not is_int(max_new_tokens):
            raise TypeError(f"max_new_tokens must be an int or None; got {max_new_tokens!r}.")
        if not 0 < max_new_tokens <= most:
            raise ValueError(
                f"max_new_tokens must be in [1, {most}] (the decoder's max_length="
                f"{self.model.max_length}, less the start token); got {max_new_tokens}."
            )
        max_new_tokens = int(max_new_tokens)
        texts, ids = self._encode(sources)
        source_ids, mask = pad_sources(ids)
        eos = self.tokenizer.eos_id
        if mode == "speculative":
            if do_sample:
                raise ValueError("speculative decoding is greedy: do_sample must be False.")
            options = {"draft_layer": draft_layer, "draft_length": draft_length}
        else:
            fields = {k: v for k, v in policy.items() if v is not None}
            try:
                exit_policy = dataclasses.replace(
                    self.policy, mode=self.policy.mode if mode is None else mode, **fields
                )
            except TypeError as error:
                raise TypeError(f"unknown policy arguments {sorted(fields)}: {error}") from None
            options = {
                "policy": exit_policy,
                "sampling": "sample" if do_sample else "greedy",
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "seed": seed,
                "trace": TRACE_ALTERNATIVES if trace else 0,
            }
        key = (mode, max_new_tokens, jit_compile, tuple(sorted(options.items(), key=str)))
        if key not in self._compiled:
            if len(self._compiled) > 64:  # many settings: keep memory bounded
                self._compiled.clear()
            self._compiled[key] = self._compile(max_new_tokens, jit_compile, options)
        token_ids, exit_layers, *details = self._compiled[key](source_ids, mask)
        if details:
            decisions = traced_decision_layers(self.adapter, options["policy"])
        results = []
        for index, (text, row, layers) in enumerate(
            zip(texts, np.asarray(token_ids).tolist(), np.asarray(exit_layers).tolist())
        ):
            if eos in row:  # the stop token and after
                cut = row.index(eos)
                row, layers = row[:cut], layers[:cut]
            pieces = [self.tokenizer.decode([token]) for token in row]
            result = Generation(text, self.tokenizer.decode(row), pieces, row, layers)
            if details:
                result = with_trace(result, details[0], index, self.tokenizer, decisions)
            results.append(result)
        return results[0] if isinstance(sources, str) else results

    def _compile(self, max_new_tokens, jit_compile, options):
        adapter, start = self.adapter, self.tokenizer.eos_id

        def run(source_ids, mask):
            return translate(
                adapter,
                source_ids,
                mask,
                max_new_tokens,
                start,
                stop_token_ids=(start,),
                **options,
            )

        return compile_function(run, jit_compile, numpy_outputs=True)

    def export(self, directory: str, **options) -> str:
        """Writes a SavedModel with `translate` (and `translate_text`) signatures that run
        this model's decode loop in the graph (`toex_tf.export.translation_export`).

        Args:
            directory: where to write.
            **options: `export_translation` arguments (`criterion`, `decision_layers`,
                `max_pending`, `text_signature`); the criterion defaults to the policy's.
        """
        from toex_tf.export.translation_export import export_translation  # noqa: PLC0415

        options.setdefault("criterion", self.policy.criterion)
        return export_translation(self.model, directory, self.tokenizer, **options)
