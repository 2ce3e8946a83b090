"""Bad input at every public entry point fails early, with an error that names it.

`CASES` feeds each entry point (`toex_tf.load`, `AdaptiveLM`, `generate`, `score`, the
translator, the loaders, the command line's flags and the SavedModel signatures) wrong
types, wrong ranks and dtypes, empty and huge values, NaN thresholds, text that is not
UTF-8, ids outside the vocabulary, unknown names, and missing, corrupt or wrongly
configured files. Each must raise the expected error type with a message that names the
argument (the flag, the file) and what was expected, and never a TensorFlow trace from
inside a graph.

Text that is not UTF-8: text is a `str`. Bytes are refused (`TypeError`: decode them
first), and so is a `str` holding lone surrogates (`ValueError`), which is what Python
makes of bytes that are not UTF-8 in argv or in a file read with
`errors="surrogateescape"`. The export's text signatures refuse invalid UTF-8 strings.

The table is meant to grow: a new argument, entry point or check gets its rows here. A
row is `(id, entry point, bad input, error type, message regex)`:

- entry point: a key of `ENTRY_POINTS`, which says how the input is fed and which module
  fixtures it needs (each is built once, on first use, so `-k cli` builds no export).
- bad input: `Args(*args, **kwargs)` for a Python call, where `File("name")` stands for
  a file of the `files` fixture (garbage, truncated, corrupt, misconfigured), `RUN` for
  the run directory and `MODEL` for its model; an argv list for `cli` (`{run}` and
  `{out}` are filled in); for a signature, the inputs that replace its valid ones
  (`GOOD_INPUTS`), `MISSING` to leave one out.
- the regex is matched with `re.search` against `str(error)`.

The command line is exercised in the process: absl parses the argv (what `app.run` does;
it prints a parse error as "FATAL Flags parsing error: <message>") and `toex_tf.run.main`
runs, turning errors into `SystemExit("toex_tf.run: error: ...")`; the flags are restored
afterwards.

A signature fed a wrong dtype fails in TensorFlow's runtime before its graph runs; the
message names the input by its position among the signature's input names, sorted
(`wrong_dtype`). Every other bad input to a signature fails at one of its
`tf.debugging` asserts, which the test checks ("Detected at node ...Assert").
"""

import json
import os
import re
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from cli_runner import call_cli

import toex_tf
from toex_tf.data import ByteTokenizer
from toex_tf.export import export_saved_model, generate_with_export, score_with_export
from toex_tf.loaders import CheckpointError, export_llama, load_llama, read_safetensors
from toex_tf.loaders.gguf_file import load_gguf_llama
from toex_tf.models import build_gpt, build_llama, build_transformer
from toex_tf.translation import AdaptiveTranslator

MAX_LENGTH = 32  # the GPT's (and its export's) max_length
VOCAB = 257  # the byte tokenizer's


class Args:
    """Positional and keyword arguments of one Python call."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __repr__(self) -> str:
        return f"Args{self.args}{self.kwargs}"


class File:
    """The path of the file `name` that the `files` fixture writes."""

    def __init__(self, name: str):
        self.name = name


RUN = object()  # the run directory (model.keras and tokenizer/)
MODEL = object()  # its model
MISSING = object()  # a signature input left out

# Valid inputs of each signature; a row's bad input replaces some of them.
GOOD_INPUTS = {
    "generate": dict(
        token_ids=[[5, 6, 7]], lengths=[3], max_new_tokens=2, threshold=0.5, mode="frozen"
    ),
    "score": dict(token_ids=[[5, 6, 7]], lengths=[3], threshold=0.5, mode="frozen"),
    "logits": dict(token_ids=[[5, 6, 7]]),
    "generate_text": dict(prompt=["Return the"], max_new_tokens=2, threshold=0.5, mode="frozen"),
}
INPUT_DTYPES = {"threshold": tf.float32, "prompt": tf.string, "mode": tf.string}


def wrong_dtype(signature: str, name: str, expected: str, given: str) -> str:
    """The regex of TensorFlow's dtype error for input `name` of `signature`: the runtime
    names an input by its position among the signature's input names, sorted."""
    position = sorted(GOOD_INPUTS[signature]).index(name)
    return (
        rf"input #{position}\(zero-based\) was expected to be a {expected} tensor but is "
        rf"a {given} tensor"
    )


THRESHOLD = r"threshold must be in \[0, 1\]"
PROMPTS = r"prompts must be a string or a non-empty list of strings"
TOO_LONG = rf"exceeds the model's max_length={MAX_LENGTH}"
WIDE = rf"token_ids is wider than max_length={MAX_LENGTH}"
SIGNATURE_TOO_LONG = rf"prompt width \+ max_new_tokens exceeds max_length={MAX_LENGTH}"
NO_RUN = r"does not exist \(expected a run directory"
NOT_UTF8 = r"is not valid UTF-8: it holds '\\udcff' at position \d+, a lone surrogate"
bad_float = np.array([[5.0, 6.0, 7.0]], "float32")
IAE = tf.errors.InvalidArgumentError

CASES = [
    # --- toex_tf.load -------------------------------------------------------------------
    ("load-none", "load", Args(None), ValueError, r"source must be a path or a handle .*None"),
    ("load-int", "load", Args(5), ValueError, r"source must be a path or a handle .*got 5"),
    ("load-bytes", "load", Args(b"runs/x"), ValueError, r"source must be .*got b'runs/x'"),
    ("load-empty", "load", Args(""), ValueError, r"source must be a path or a handle string"),
    ("load-missing", "load", Args(File("missing")), ValueError, r"missing' " + NO_RUN),
    ("load-garbage-keras", "load", Args(File("garbage.keras")), ValueError,
     r"model file '.*garbage.keras' is corrupt or not a toex_tf model"),
    ("load-dir-without-model", "load", Args(File("empty_dir")), ValueError,
     r"nothing to load at '.*empty_dir': expected a run directory with model.keras"),
    ("load-garbage-file", "load", Args(File("garbage.bin")), ValueError,
     r"nothing to load at '.*garbage.bin'"),
    ("load-corrupt-gguf", "load", Args(File("corrupt.gguf")), CheckpointError,
     r"cannot read .*corrupt.gguf: truncated or corrupt GGUF file"),
    ("load-unknown-scheme", "load", Args("s3://bucket/model"), CheckpointError,
     r"unknown handle scheme 's3://' in 's3://bucket/model'; expected .*hf://org/name"),
    ("load-hf-handle-offline", "load", Args("hf://nobody/nothing"), CheckpointError,
     r"cannot resolve hf://nobody/nothing from the local Hugging Face cache"),
    ("load-policy-str", "load", Args(RUN, policy="lazy"), TypeError,
     r"policy must be an ExitPolicy or None; got 'lazy'"),
    ("load-max_length-negative", "load", Args(RUN, max_length=-1), ValueError,
     r"max_length must be a positive int; got -1"),
    ("load-max_length-huge", "load", Args(RUN, max_length=10**6), ValueError,
     rf"max_length=1000000 exceeds the model's max_length={MAX_LENGTH}"),
    ("load-llama-option-for-a-gpt", "load", Args(RUN, capacity=0.5), TypeError,
     r"\['capacity'\] apply to Llama checkpoints"),
    # --- AdaptiveLM ----------------------------------------------------------------------
    ("AdaptiveLM-model-str", "AdaptiveLM", Args("model"), TypeError,
     r"model must be a keras.Model offering .*AdaptiveModel .*got str"),
    ("AdaptiveLM-policy-dict", "AdaptiveLM", Args(MODEL, policy={"mode": "lazy"}), TypeError,
     r"policy must be an ExitPolicy or None; got \{'mode': 'lazy'\}"),
    # --- AdaptiveLM.generate: prompts (max_new_tokens=2 unless the row sets it) ----------
    ("generate-prompts-none", "generate", Args(None), ValueError, PROMPTS + ".*got None"),
    ("generate-prompts-float", "generate", Args(3.5), ValueError, PROMPTS + ".*got 3.5"),
    ("generate-prompts-bytes", "generate", Args(b"\xff\xfe"), TypeError,
     r"prompts is bytes \(b'\\xff\\xfe'\); give text as a str: decode the bytes first"),
    ("generate-prompt-bytes", "generate", Args([b"ok"]), TypeError, r"prompts\[0\] is bytes"),
    ("generate-prompt-none", "generate", Args(["ok", None]), TypeError,
     r"prompts\[1\] must be a string or a list of int token ids; got None"),
    ("generate-ids-rank-1", "generate", Args([5, 6]), TypeError,
     r"prompts\[0\] must be .* got 5 \(a flat list of ids is one prompt: wrap it"),
    ("generate-ids-rank-3", "generate", Args([[[5, 6]]]), TypeError,
     r"prompts\[0\]\[0\] must be an int token id; got \[5, 6\]"),
    ("generate-ids-float", "generate", Args([[5, 6.0]]), TypeError,
     r"prompts\[0\]\[1\] must be an int token id; got 6.0"),
    ("generate-ids-float-array", "generate", Args(bad_float), TypeError,
     r"prompts\[0\]\[0\] must be an int token id; got 5.0"),
    ("generate-ids-str", "generate", Args([["a"]]), TypeError,
     r"prompts\[0\]\[0\] must be an int token id; got 'a'"),
    ("generate-ids-bool", "generate", Args([[True]]), TypeError,
     r"prompts\[0\]\[0\] must be an int token id; got True"),
    ("generate-empty-string", "generate", Args(""), ValueError,
     r"prompts\[0\] is empty: '' encodes to no token"),
    ("generate-empty-batch", "generate", Args([]), ValueError, PROMPTS + ".*got \\[\\]"),
    ("generate-empty-ids", "generate", Args([[5], []]), ValueError, r"prompts\[1\] is empty"),
    ("generate-not-utf8", "generate", Args(["ok", "ab\udcff"]), ValueError,
     r"prompts\[1\] " + NOT_UTF8),
    ("generate-ids-out-of-vocabulary", "generate", Args([[5, 300]]), ValueError,
     rf"prompts\[0\] holds token ids from 5 to 300; the model's vocabulary is \[0, {VOCAB}\)"),
    ("generate-ids-negative", "generate", Args([[-1, 5]]), ValueError,
     rf"prompts\[0\] holds token ids from -1 to 5; .*\[0, {VOCAB}\)"),
    ("generate-prompt-too-long", "generate", Args("a" * 40), ValueError,
     r"prompt length 40 \+ max_new_tokens 2 " + TOO_LONG),
    ("generate-no-tokenizer-for-text", "generate-no-tokenizer", Args("text"), ValueError,
     r"this model has no tokenizer: give token-id lists"),
    # --- AdaptiveLM.generate: settings ---------------------------------------------------
    ("generate-max_new_tokens-0", "generate", Args("ab", max_new_tokens=0), ValueError,
     r"max_new_tokens must be > 0; got 0"),
    ("generate-max_new_tokens-negative", "generate", Args("ab", max_new_tokens=-3), ValueError,
     r"max_new_tokens must be > 0; got -3"),
    ("generate-max_new_tokens-over", "generate", Args("ab", max_new_tokens=31), ValueError,
     r"prompt length 2 \+ max_new_tokens 31 " + TOO_LONG),
    ("generate-max_new_tokens-huge", "generate", Args("ab", max_new_tokens=10**12), ValueError,
     r"max_new_tokens 1000000000000 " + TOO_LONG),
    ("generate-max_new_tokens-str", "generate", Args("ab", max_new_tokens="5"), TypeError,
     r"max_new_tokens must be an int; got '5'"),
    ("generate-max_new_tokens-float", "generate", Args("ab", max_new_tokens=2.5), TypeError,
     r"max_new_tokens must be an int; got 2.5"),
    ("generate-max_new_tokens-none", "generate", Args("ab", max_new_tokens=None), TypeError,
     r"max_new_tokens must be an int; got None"),
    ("generate-mode-unknown", "generate", Args("ab", mode="warp"), ValueError,
     r"mode must be one of \('full', .*'speculative'\); got 'warp'"),
    ("generate-mode-int", "generate", Args("ab", mode=1), ValueError, r"mode must be .*got 1"),
    ("generate-criterion-unknown", "generate", Args("ab", criterion="nope"), ValueError,
     r"criterion must be one of \('max_prob', .*\); got 'nope'"),
    ("generate-threshold-nan", "generate", Args("ab", threshold=float("nan")), ValueError,
     THRESHOLD + "; got nan"),
    ("generate-threshold-inf", "generate", Args("ab", threshold=float("inf")), ValueError,
     THRESHOLD + "; got inf"),
    ("generate-threshold-negative", "generate", Args("ab", threshold=-0.1), ValueError,
     THRESHOLD + "; got -0.1"),
    ("generate-threshold-over-1", "generate", Args("ab", threshold=1.5), ValueError,
     THRESHOLD + "; got 1.5"),
    ("generate-threshold-str", "generate", Args("ab", threshold="0.5"), TypeError,
     r"threshold must be a float in \[0, 1\]; got '0.5'"),
    ("generate-decision_layers-no-exit", "generate", Args("ab", decision_layers=[99]),
     ValueError, r"decision_layers \[99\] carry no exit head; the model's exits are \[1, 2\]"),
    ("generate-decision_layers-int", "generate", Args("ab", decision_layers=1), TypeError,
     r"decision_layers must be a list of 1-based exit layers; got 1"),
    ("generate-max_pending-1", "generate", Args("ab", max_pending=1), ValueError,
     r"max_pending must be an int >= 2; got 1"),
    ("generate-patience-0", "generate", Args("ab", criterion="patience", patience=0),
     ValueError, r"patience must be an int >= 1; got 0"),
    ("generate-unknown-argument", "generate", Args("ab", beam=3), TypeError,
     r"unknown policy arguments \['beam'\]; expected \('criterion'"),
    ("generate-temperature-0", "generate", Args("ab", do_sample=True, temperature=0.0),
     ValueError, r"temperature must be a finite number > 0; got 0.0"),
    ("generate-temperature-nan", "generate", Args("ab", temperature=float("nan")), ValueError,
     r"temperature must be a finite number > 0; got nan"),
    ("generate-temperature-str", "generate", Args("ab", temperature="1"), TypeError,
     r"temperature must be a number > 0; got '1'"),
    ("generate-top_k-negative", "generate", Args("ab", top_k=-1), ValueError,
     r"top_k must be an int >= 0 \(0: every token\); got -1"),
    ("generate-top_k-float", "generate", Args("ab", top_k=2.5), TypeError,
     r"top_k must be an int >= 0 .*got 2.5"),
    ("generate-top_p-0", "generate", Args("ab", top_p=0.0), ValueError,
     r"top_p must be a number in \(0, 1\]; got 0.0"),
    ("generate-top_p-nan", "generate", Args("ab", top_p=float("nan")), ValueError,
     r"top_p must be a number in \(0, 1\]; got nan"),
    ("generate-seed-str", "generate", Args("ab", seed="x"), TypeError,
     r"seed must be an int; got 'x'"),
    ("generate-seed-huge", "generate", Args("ab", seed=2**40), ValueError,
     r"seed must be an int32, in \[-2\*\*31, 2\*\*31\); got 1099511627776"),
    ("generate-stop-int", "generate", Args("ab", stop=5), TypeError,
     r"stop must be None, a string or a list of strings; got 5"),
    ("generate-stop-empty", "generate", Args("ab", stop=[""]), ValueError,
     r"stop must be a non-empty string or a list of them; got \[''\]"),
    ("generate-do_sample-str", "generate", Args("ab", do_sample="yes"), TypeError,
     r"do_sample must be a bool; got 'yes'"),
    ("generate-jit_compile-str", "generate", Args("ab", jit_compile="yes"), TypeError,
     r"jit_compile must be a bool; got 'yes'"),
    ("generate-trace-int", "generate", Args("ab", trace=1), TypeError,
     r"trace must be a bool; got 1"),
    ("generate-speculative-draft_layer", "generate",
     Args("ab", mode="speculative", draft_layer=99), ValueError,
     r"draft_layer must be an exit below the final layer, one of \[1\]; got 99"),
    ("generate-speculative-draft_length", "generate",
     Args("ab", mode="speculative", draft_length=0), ValueError,
     r"draft_length must be an int >= 1; got 0"),
    ("generate-speculative-sampling", "generate", Args("ab", mode="speculative", do_sample=True),
     ValueError, r"speculative decoding is greedy: do_sample must be False"),
    # --- AdaptiveLM.score ----------------------------------------------------------------
    ("score-texts-none", "score", Args(None), ValueError,
     r"texts must be a string or a non-empty list of strings .*got None"),
    ("score-texts-bytes", "score", Args([b"abc"]), TypeError, r"texts\[0\] is bytes"),
    ("score-texts-empty-string", "score", Args(["ab", ""]), ValueError, r"texts\[1\] is empty"),
    ("score-texts-one-token", "score", Args("a"), ValueError,
     r"texts\[0\] has 1 token; scoring needs two"),
    ("score-texts-too-long", "score", Args("a" * 40), ValueError,
     rf"texts\[0\] has 40 tokens; the model takes at most {MAX_LENGTH}"),
    ("score-texts-not-utf8", "score", Args("ab\udcff"), ValueError, r"texts\[0\] " + NOT_UTF8),
    ("score-mode-unknown", "score", Args("ab", mode="warp"), ValueError,
     r"mode must be one of \('full', 'unfrozen', 'frozen', 'lazy'\); got 'warp'"),
    ("score-mode-speculative", "score", Args("ab", mode="speculative"), ValueError,
     r"score: speculative decoding scores as full depth; use 'full'"),
    ("score-threshold-nan", "score", Args("ab", threshold=float("nan")), ValueError,
     THRESHOLD + "; got nan"),
    # --- AdaptiveTranslator.generate (max_new_tokens=2 unless the row sets it) -----------
    ("translate-sources-none", "translate", Args(None), ValueError,
     r"sources must be a string or a non-empty list; got None"),
    ("translate-source-ids", "translate", Args([[5, 6]]), TypeError,
     r"sources\[0\] must be a string; got \[5, 6\]"),
    ("translate-source-bytes", "translate", Args([b"\xff"]), TypeError,
     r"sources\[0\] must be a string; got b'\\xff'"),
    ("translate-source-empty", "translate", Args(""), ValueError,
     r"sources\[0\] is empty: give a sentence to translate"),
    ("translate-source-too-long", "translate", Args("x" * 17), ValueError,
     r"sources\[0\] has 17 tokens, more than the model's max_source_length=16"),
    ("translate-source-not-utf8", "translate", Args("ab\udcff"), ValueError,
     r"sources\[0\] " + NOT_UTF8),
    ("translate-max_new_tokens-0", "translate", Args("ab", max_new_tokens=0), ValueError,
     r"max_new_tokens must be in \[1, 11\] \(the decoder's max_length=12, less the start"),
    ("translate-max_new_tokens-huge", "translate", Args("ab", max_new_tokens=10**9),
     ValueError, r"max_new_tokens must be in \[1, 11\] .*got 1000000000"),
    ("translate-max_new_tokens-str", "translate", Args("ab", max_new_tokens="3"), TypeError,
     r"max_new_tokens must be an int or None; got '3'"),
    ("translate-mode-unknown", "translate", Args("ab", mode="warp"), ValueError,
     r"mode must be one of .*got 'warp'"),
    ("translate-threshold-nan", "translate", Args("ab", threshold=float("nan")), ValueError,
     THRESHOLD + "; got nan"),
    ("translate-unknown-argument", "translate", Args("ab", beam=2), TypeError,
     r"unknown policy arguments \['beam'\]"),
    ("translate-temperature-nan", "translate", Args("ab", temperature=float("nan")),
     ValueError, r"temperature must be a finite number > 0; got nan"),
    ("translate-seed-str", "translate", Args("ab", seed="x"), TypeError,
     r"seed must be an int; got 'x'"),
    ("translate-policy-str", "AdaptiveTranslator", Args(policy="lazy"), TypeError,
     r"policy must be an ExitPolicy or None; got 'lazy'"),
    # --- load_llama: handles and checkpoint directories ----------------------------------
    ("llama-handle-none", "load_llama", Args(None), CheckpointError,
     r"handle must be a non-empty string; got None"),
    ("llama-handle-int", "load_llama", Args(5), CheckpointError,
     r"handle must be a non-empty string; got 5"),
    ("llama-missing", "load_llama", Args(File("missing")), CheckpointError,
     r"checkpoint directory '.*missing' does not exist \(expected a directory with config.json"),
    ("llama-a-file", "load_llama", Args(File("garbage.bin")), CheckpointError,
     r"garbage.bin' is a file; a checkpoint handle is its directory"),
    ("llama-unknown-scheme", "load_llama", Args("ftp://host/model"), CheckpointError,
     r"unknown handle scheme 'ftp://' in 'ftp://host/model'"),
    ("llama-other-url", "load_llama", Args("https://example.com/model"), CheckpointError,
     r"unknown handle scheme 'https://' .*https://tfhub.dev/"),
    ("llama-empty-dir", "load_llama", Args(File("empty_dir")), CheckpointError,
     r"empty_dir/config.json is missing: a Llama checkpoint needs its config.json"),
    ("llama-config-not-json", "load_llama", Args(File("llama_not_json")), CheckpointError,
     r"llama_not_json/config.json is not valid JSON"),
    ("llama-config-not-utf8", "load_llama", Args(File("llama_not_utf8")), CheckpointError,
     r"llama_not_utf8/config.json is not valid JSON: 'utf-8' codec can't decode byte 0xff"),
    ("llama-config-model_type", "load_llama", Args(File("llama_gpt2")), CheckpointError,
     r"llama_gpt2/config.json: model_type 'gpt2' is not supported; load_llama reads"),
    ("llama-config-missing-field", "load_llama", Args(File("llama_no_eps")), CheckpointError,
     r"llama_no_eps/config.json: missing fields \['rms_norm_eps'\]"),
    ("llama-config-zero-layers", "load_llama", Args(File("llama_zero_layers")),
     CheckpointError, r"llama_zero_layers/config.json: num_layers must be a positive int; got 0"),
    ("llama-config-heads", "load_llama", Args(File("llama_3_heads")), CheckpointError,
     r"llama_3_heads/config.json: num_kv_heads=2 must divide num_heads=3"),
    ("llama-config-eps-nan", "load_llama", Args(File("llama_eps_nan")), CheckpointError,
     r"llama_eps_nan/config.json: norm_epsilon must be > 0; got nan"),
    ("llama-no-weights", "load_llama", Args(File("llama_no_weights")), CheckpointError,
     r"llama_no_weights has neither model.safetensors nor model.safetensors.index.json"),
    ("llama-truncated-weights", "load_llama", Args(File("llama_truncated")), CheckpointError,
     r"cannot read .*llama_truncated/model.safetensors \(truncated or corrupt safetensors"),
    ("llama-exit_layers-out-of-range", "load_llama", Args(File("llama"), exit_layers=(7,)),
     CheckpointError, r"exit layer 7 is out of range: layers are numbered 1..2"),
    ("llama-capacity-nan", "load_llama", Args(File("llama"), capacity=float("nan")),
     CheckpointError, r"capacity must be in \(0, 1\]; got nan"),
    ("llama-max_length-negative", "load_llama", Args(File("llama"), max_length=-5),
     CheckpointError, r"max_length must be a positive int; got -5"),
    ("llama-unknown-option", "load_llama", Args(File("llama"), colour=3), CheckpointError,
     r"unexpected keyword argument 'colour'"),
    # --- the GGUF loader (through load_llama, as toex_tf.load calls it) ------------------
    ("gguf-missing", "load_llama", Args(File("missing.gguf")), CheckpointError,
     r"GGUF file '.*missing.gguf' does not exist \(expected a .gguf path or one of the handles"),
    ("gguf-not-gguf", "load_llama", Args(File("text.gguf")), CheckpointError,
     r"text.gguf is not a GGUF file: it starts with b'just', not b'GGUF'"),
    ("gguf-corrupt", "load_llama", Args(File("corrupt.gguf")), CheckpointError,
     r"cannot read .*corrupt.gguf: truncated or corrupt GGUF file"),
    ("gguf-truncated-header", "load_llama", Args(File("truncated.gguf")), CheckpointError,
     r"cannot read .*truncated.gguf: truncated or corrupt GGUF file"),
    ("gguf-missing-field", "load_llama", Args(File("no_heads.gguf")), CheckpointError,
     r"no_heads.gguf: GGUF metadata field 'llama.attention.head_count' is missing"),
    ("gguf-architecture", "load_llama", Args(File("qwen2.gguf")), CheckpointError,
     r"qwen2.gguf: GGUF architecture 'qwen2' is not supported"),
    ("gguf-zero-heads", "load_llama", Args(File("zero_heads.gguf")), CheckpointError,
     r"zero_heads.gguf: num_heads must be a positive int; got 0"),
    ("gguf-source-none", "load_gguf_llama", Args(None), CheckpointError,
     r"source must be a GGUF path or handle string; got None"),
    ("gguf-source-directory", "load_gguf_llama", Args(File("empty_dir")), CheckpointError,
     r"empty_dir' is a directory; a GGUF source is a .gguf file"),
    # --- read_safetensors ----------------------------------------------------------------
    ("safetensors-none", "read_safetensors", Args(None), CheckpointError,
     r"directory must be a path string; got None"),
    ("safetensors-int", "read_safetensors", Args(5), CheckpointError,
     r"directory must be a path string; got 5"),
    ("safetensors-missing", "read_safetensors", Args(File("missing")), CheckpointError,
     r"checkpoint directory .*missing does not exist"),
    ("safetensors-a-file", "read_safetensors", Args(File("garbage.bin")), CheckpointError,
     r"garbage.bin is a file; give the checkpoint directory that holds model.safetensors"),
    ("safetensors-no-weights", "read_safetensors", Args(File("empty_dir")), CheckpointError,
     r"empty_dir has neither model.safetensors nor"),
    ("safetensors-truncated", "read_safetensors", Args(File("llama_truncated")),
     CheckpointError, r"cannot read .*llama_truncated/model.safetensors \(truncated or"),
    ("safetensors-garbage", "read_safetensors", Args(File("safetensors_garbage")),
     CheckpointError, r"cannot read .*safetensors_garbage/model.safetensors \(truncated or"),
    # --- the command line: flags, then the run (no flag is parsed into other rows) -------
    ("cli-unknown-flag", "cli", ["--colour=3"], flags.UnrecognizedFlagError,
     r"Unknown command line flag 'colour'"),
    ("cli-unknown-decode_mode", "cli", ["--decode_mode=warp"], flags.IllegalFlagValueError,
     r"flag --decode_mode=warp: value should be one of <full\|unfrozen\|frozen\|lazy\|"),
    ("cli-unknown-criterion", "cli", ["--decode_criterion=nope"], flags.IllegalFlagValueError,
     r"flag --decode_criterion=nope: value should be one of <max_prob\|"),
    ("cli-unknown-preset", "cli", ["--preset=nope"], flags.IllegalFlagValueError,
     r"flag --preset=nope: value should be one of <"),
    ("cli-unknown-config", "cli", ["--config=nope"], SystemExit,
     r"toex_tf.run: error: --config=nope: no such config; one of \["),
    ("cli-max_new_tokens-str", "cli", ["--max_new_tokens=abc"], flags.IllegalFlagValueError,
     r"flag --max_new_tokens=abc: invalid literal for int\(\)"),
    ("cli-max_new_tokens-0", "cli", ["--max_new_tokens=0"], flags.IllegalFlagValueError,
     r"flag --max_new_tokens=0: 0 is not a positive integer"),
    ("cli-threshold-over-1", "cli", ["--decode_threshold=1.5"], flags.IllegalFlagValueError,
     r"flag --decode_threshold=1.5: 1.5 is not a number in the range \[0.0, 1.0\]"),
    ("cli-thresholds-nan", "cli", ["--thresholds=0.1,nan"], flags.IllegalFlagValueError,
     r"--thresholds must be numbers in \[0, 1\]"),
    ("cli-top_p-0", "cli", ["--top_p=0"], flags.IllegalFlagValueError,
     r"flag --top_p=0: 0.0 is not a number in the range \[1e-06, 1.0\]"),
    ("cli-generate-no-prompt", "cli", ["--mode=generate", "--output_dir={out}"], SystemExit,
     r"^toex_tf.run: error: --mode=generate needs --prompt.$"),
    ("cli-generate-missing-model", "cli",
     ["--mode=generate", "--output_dir={out}", "--init_from={out}/nowhere", "--prompt=a"],
     SystemExit, r"^toex_tf.run: error: '.*nowhere' " + NO_RUN),
    ("cli-generate-unknown-scheme", "cli",
     ["--mode=generate", "--output_dir={out}", "--init_from=s3://x/y", "--prompt=a"],
     SystemExit, r"^toex_tf.run: error: unknown handle scheme 's3://'"),
    ("cli-generate-empty-prompt", "cli",
     ["--mode=generate", "--output_dir={out}", "--init_from={run}", "--prompt="],
     SystemExit, r"^toex_tf.run: error: prompts\[0\] is empty"),
    ("cli-generate-not-utf8", "cli",
     ["--mode=generate", "--output_dir={out}", "--init_from={run}", "--prompt=ab\udcff"],
     SystemExit, r"^toex_tf.run: error: prompts\[0\] " + NOT_UTF8),
    ("cli-generate-max_new_tokens-over", "cli",
     ["--mode=generate", "--output_dir={out}", "--init_from={run}", "--prompt=ab",
      "--max_new_tokens=1000"],
     SystemExit, r"^toex_tf.run: error: prompt length 2 \+ max_new_tokens 1000 " + TOO_LONG),
    ("cli-generate-threshold-nan", "cli",
     ["--mode=generate", "--output_dir={out}", "--init_from={run}", "--prompt=ab",
      "--max_new_tokens=2", "--decode_threshold=nan"],
     SystemExit, r"^toex_tf.run: error: --decode_threshold is NaN; expected a number"),
    ("cli-generate-temperature-nan", "cli",
     ["--mode=generate", "--output_dir={out}", "--init_from={run}", "--prompt=ab",
      "--max_new_tokens=2", "--sampling=sample", "--temperature=nan"],
     SystemExit, r"^toex_tf.run: error: --temperature is NaN; expected a number"),
    ("cli-generate-decision_layers", "cli",
     ["--mode=generate", "--output_dir={out}", "--init_from={run}", "--prompt=ab",
      "--max_new_tokens=2", "--decision_layers=9"],
     SystemExit, r"^toex_tf.run: error: decision_layers \[9\] carry no exit head"),
    # --- SavedModel signatures (one export of the run's GPT, byte tokenizer) -------------
    ("sig-generate-token_ids-float", "signature:generate", dict(token_ids=bad_float), IAE,
     wrong_dtype("generate", "token_ids", "int32", "float")),
    ("sig-generate-token_ids-int64", "signature:generate",
     dict(token_ids=np.array([[5, 6, 7]], "int64")), IAE,
     wrong_dtype("generate", "token_ids", "int32", "int64")),
    ("sig-generate-max_new_tokens-float", "signature:generate",
     dict(max_new_tokens=np.float32(2)), IAE,
     wrong_dtype("generate", "max_new_tokens", "int32", "float")),
    ("sig-generate-threshold-int", "signature:generate", dict(threshold=np.int32(1)), IAE,
     wrong_dtype("generate", "threshold", "float", "int32")),
    ("sig-generate-mode-int", "signature:generate", dict(mode=np.int32(1)), IAE,
     wrong_dtype("generate", "mode", "string", "int32")),
    ("sig-generate-token_ids-rank-1", "signature:generate", dict(token_ids=[5, 6, 7]), IAE,
     r"token_ids must be a matrix \(rank 2\), got rank 1"),
    ("sig-generate-token_ids-rank-3", "signature:generate", dict(token_ids=[[[5, 6, 7]]]), IAE,
     r"token_ids must be a matrix \(rank 2\), got rank 3"),
    ("sig-generate-max_new_tokens-rank-1", "signature:generate", dict(max_new_tokens=[2]),
     IAE, r"max_new_tokens must be a scalar \(rank 0\), got rank 1"),
    ("sig-generate-token_ids-empty", "signature:generate",
     dict(token_ids=np.zeros((1, 0), "int32"), lengths=[1]), IAE,
     r"token_ids is empty: give at least one prompt token|lengths must not exceed the width"),
    ("sig-generate-empty-batch", "signature:generate",
     dict(token_ids=np.zeros((0, 3), "int32"), lengths=np.zeros((0,), "int32")), IAE,
     r"token_ids has no rows: give at least one prompt"),
    ("sig-generate-token_ids-too-wide", "signature:generate",
     dict(token_ids=np.ones((1, 40), "int32"), lengths=[40]), IAE,
     WIDE + "|" + SIGNATURE_TOO_LONG),
    ("sig-generate-max_new_tokens-0", "signature:generate", dict(max_new_tokens=0), IAE,
     r"max_new_tokens must be > 0"),
    ("sig-generate-max_new_tokens-negative", "signature:generate", dict(max_new_tokens=-1),
     IAE, r"max_new_tokens must be > 0"),
    ("sig-generate-max_new_tokens-over", "signature:generate", dict(max_new_tokens=30), IAE,
     SIGNATURE_TOO_LONG),
    ("sig-generate-max_new_tokens-int32-max", "signature:generate",
     dict(max_new_tokens=2**31 - 1), IAE, SIGNATURE_TOO_LONG),
    ("sig-generate-threshold-nan", "signature:generate", dict(threshold=float("nan")), IAE,
     THRESHOLD),
    ("sig-generate-threshold-inf", "signature:generate", dict(threshold=float("inf")), IAE,
     THRESHOLD),
    ("sig-generate-threshold-negative", "signature:generate", dict(threshold=-0.5), IAE,
     THRESHOLD),
    ("sig-generate-mode-unknown", "signature:generate", dict(mode="warp"), IAE,
     r"unknown mode\] \[warp\] \[; expected one of\] \[full unfrozen frozen"),
    ("sig-generate-mode-empty", "signature:generate", dict(mode=""), IAE, r"unknown mode\] \[\]"),
    ("sig-generate-lengths-per-row", "signature:generate", dict(lengths=[3, 3]), IAE,
     r"lengths needs one entry per prompt row"),
    ("sig-generate-lengths-0", "signature:generate", dict(lengths=[0]), IAE,
     r"every prompt needs at least one token \(lengths >= 1\)"),
    ("sig-generate-lengths-over-width", "signature:generate", dict(lengths=[4]), IAE,
     r"lengths must not exceed the width of token_ids"),
    ("sig-generate-ids-out-of-vocabulary", "signature:generate",
     dict(token_ids=[[5, 6, 999]]), IAE, rf"token ids must be in \[0, {VOCAB}\) \(the voc"),
    ("sig-generate-ids-negative", "signature:generate", dict(token_ids=[[-1, 6, 7]]), IAE,
     rf"token ids must be in \[0, {VOCAB}\)"),
    ("sig-generate-missing-input", "signature:generate", dict(lengths=MISSING), TypeError,
     r"missing a required argument: 'lengths'"),
    ("sig-generate-unknown-input", "signature:generate", dict(beam=3), TypeError,
     r"got an unexpected keyword argument 'beam'"),
    ("sig-score-token_ids-float", "signature:score", dict(token_ids=bad_float), IAE,
     wrong_dtype("score", "token_ids", "int32", "float")),
    ("sig-score-empty-batch", "signature:score",
     dict(token_ids=np.zeros((0, 3), "int32"), lengths=np.zeros((0,), "int32")), IAE,
     r"token_ids has no rows"),
    ("sig-score-token_ids-too-wide", "signature:score",
     dict(token_ids=np.ones((1, 40), "int32"), lengths=[40]), IAE, WIDE),
    ("sig-score-threshold-nan", "signature:score", dict(threshold=float("nan")), IAE, THRESHOLD),
    ("sig-score-mode-unknown", "signature:score", dict(mode="warp"), IAE, r"unknown mode"),
    ("sig-score-ids-out-of-vocabulary", "signature:score", dict(token_ids=[[5, 6, 999]]),
     IAE, rf"token ids must be in \[0, {VOCAB}\)"),
    ("sig-logits-token_ids-float", "signature:logits", dict(token_ids=bad_float), IAE,
     wrong_dtype("logits", "token_ids", "int32", "float")),
    ("sig-logits-token_ids-rank-1", "signature:logits", dict(token_ids=[5, 6]), IAE,
     r"token_ids must be a matrix \(rank 2\), got rank 1"),
    ("sig-logits-token_ids-empty", "signature:logits",
     dict(token_ids=np.zeros((1, 0), "int32")), IAE, r"token_ids is empty"),
    ("sig-logits-token_ids-too-wide", "signature:logits",
     dict(token_ids=np.ones((1, 40), "int32")), IAE, WIDE),
    ("sig-logits-ids-out-of-vocabulary", "signature:logits", dict(token_ids=[[999]]), IAE,
     rf"token ids must be in \[0, {VOCAB}\)"),
    ("sig-text-prompt-not-utf8", "signature:generate_text", dict(prompt=[b"ok", b"\xff\xfe"]),
     IAE, r"every prompt must be valid UTF-8"),
    ("sig-text-prompt-empty-string", "signature:generate_text", dict(prompt=["ok", ""]), IAE,
     r"every prompt must be non-empty text"),
    ("sig-text-prompt-empty-batch", "signature:generate_text",
     dict(prompt=[]), IAE, r"prompt is empty: give at least one prompt"),
    ("sig-text-prompt-too-long", "signature:generate_text", dict(prompt=["x" * 40]), IAE,
     rf"every prompt must encode to at most max_length={MAX_LENGTH} tokens"),
    ("sig-text-prompt-rank-0", "signature:generate_text", dict(prompt="ok"), IAE,
     r"prompt must be a vector \(rank 1\), got rank 0"),
    ("sig-text-prompt-int", "signature:generate_text", dict(prompt=np.array([1], "int32")),
     IAE, wrong_dtype("generate_text", "prompt", "string", "int32")),
    ("sig-text-max_new_tokens-over", "signature:generate_text", dict(max_new_tokens=30), IAE,
     SIGNATURE_TOO_LONG),
    ("sig-text-threshold-nan", "signature:generate_text", dict(threshold=float("nan")), IAE,
     THRESHOLD),
    # --- the export's Python client ------------------------------------------------------
    ("client-token_ids-float", "generate_with_export", dict(token_ids=[[5.5, 6.0]]),
     TypeError, r"token_ids must hold integers; got dtype float64"),
    ("client-max_new_tokens-float", "generate_with_export", dict(max_new_tokens=2.5),
     TypeError, r"max_new_tokens must hold integers; got dtype float64"),
    ("client-score-lengths-float", "score_with_export", dict(lengths=[3.0]), TypeError,
     r"lengths must hold integers; got dtype float64"),
]  # fmt: skip


# --- entry points --------------------------------------------------------------------


def _signature(name):
    def call(env, inputs):
        tensors = {}
        for key, value in {**GOOD_INPUTS[name], **inputs}.items():
            if value is MISSING:
                continue
            if isinstance(value, (np.ndarray, np.generic)):  # a row's own dtype
                tensors[key] = tf.constant(value)
            else:
                tensors[key] = tf.constant(value, INPUT_DTYPES.get(key, tf.int32))
        return env["exported"].signatures[name](**tensors)

    return call


def _client(function, signature):
    def call(env, inputs):
        return function(env["exported"], **{**GOOD_INPUTS[signature], **inputs})

    return call


def _generate(env, a):
    return env["lm"].generate(*a.args, **{"max_new_tokens": 2, **a.kwargs})


def _cli(env, argv):
    call_cli(*[arg.format(run=env["run_dir"], out=env["tmp"]) for arg in argv])


# Entry point -> (the module fixtures it needs, how a row's bad input is fed).
ENTRY_POINTS = {
    "load": ((), lambda env, a: toex_tf.load(*a.args, **a.kwargs)),
    "AdaptiveLM": ((), lambda env, a: toex_tf.AdaptiveLM(*a.args, **a.kwargs)),
    "generate": (("lm",), _generate),
    "generate-no-tokenizer": (
        ("lm",),
        lambda env, a: toex_tf.AdaptiveLM(env["lm"].model).generate(*a.args, **a.kwargs),
    ),
    "score": (("lm",), lambda env, a: env["lm"].score(*a.args, **a.kwargs)),
    "translate": (
        ("translator",),
        lambda env, a: env["translator"].generate(*a.args, **{"max_new_tokens": 2, **a.kwargs}),
    ),
    "AdaptiveTranslator": (
        ("translator",),
        lambda env, a: AdaptiveTranslator(env["translator"].model, ByteTokenizer(), **a.kwargs),
    ),
    "load_llama": ((), lambda env, a: load_llama(*a.args, **a.kwargs)),
    "load_gguf_llama": ((), lambda env, a: load_gguf_llama(*a.args, **a.kwargs)),
    "read_safetensors": ((), lambda env, a: read_safetensors(*a.args, **a.kwargs)),
    "cli": (("run_dir", "tmp"), _cli),
    **{f"signature:{name}": (("exported",), _signature(name)) for name in GOOD_INPUTS},
    "generate_with_export": (("exported",), _client(generate_with_export, "generate")),
    "score_with_export": (("exported",), _client(score_with_export, "score")),
}


# --- module fixtures: tiny models and bad files, each built once ----------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as `toex_tf.run` writes it: a 2-layer GPT and the byte tokenizer."""
    keras.utils.set_random_seed(0)
    directory = tmp_path_factory.mktemp("run")
    model = build_gpt("tiny", num_layers=2, vocab_size=VOCAB, max_length=MAX_LENGTH)
    model.save(str(directory / "model.keras"))
    ByteTokenizer().save(str(directory / "tokenizer"))
    return str(directory)


@pytest.fixture(scope="module")
def lm(run_dir):
    return toex_tf.load(run_dir)


@pytest.fixture(scope="module")
def translator():
    keras.utils.set_random_seed(0)
    model = build_transformer("tiny", vocab_size=VOCAB, num_layers=2, max_length=12)
    return AdaptiveTranslator(model, ByteTokenizer())


@pytest.fixture(scope="module")
def exported(lm, tmp_path_factory):
    """The run's GPT as a SavedModel (with `generate_text`), loaded back."""
    directory = str(tmp_path_factory.mktemp("export"))
    export_saved_model(lm.model, directory, tokenizer=ByteTokenizer())
    return tf.saved_model.load(directory)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("out"))


def _write_gguf(path, architecture, **fields):
    import gguf  # noqa: PLC0415 - only the GGUF rows need it

    writer = gguf.GGUFWriter(str(path), architecture)
    for name, value in fields.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A directory of bad files, by name (`File(name)` in a row)."""
    root = tmp_path_factory.mktemp("bad_files")
    (root / "empty_dir").mkdir()
    (root / "garbage.keras").write_bytes(b"not a zip archive" * 4)
    (root / "garbage.bin").write_bytes(b"\x00\x01 garbage")
    (root / "text.gguf").write_text("just text")
    (root / "corrupt.gguf").write_bytes(b"GGUF\x03\x00\x00\x00 garbage")
    _write_gguf(root / "no_heads.gguf", "llama", block_count=2)
    _write_gguf(root / "qwen2.gguf", "qwen2")
    _write_gguf(
        root / "zero_heads.gguf",
        "llama",
        block_count=2,
        head_count=0,
        embedding_length=64,
        feed_forward_length=128,
        layer_norm_rms_eps=1e-5,
        vocab_size=100,
    )
    (root / "truncated.gguf").write_bytes((root / "no_heads.gguf").read_bytes()[:20])
    # A tiny Llama checkpoint, then copies with one thing wrong.
    keras.utils.set_random_seed(0)
    llama = root / "llama"
    model = build_llama("llama-tiny", num_layers=2, exit_layers=(), capacity=1.0, max_length=64)
    export_llama(model, str(llama))
    config = json.loads((llama / "config.json").read_text())
    changes = {
        "llama_gpt2": {"model_type": "gpt2"},
        "llama_no_eps": {"rms_norm_eps": None},
        "llama_zero_layers": {"num_hidden_layers": 0},
        "llama_3_heads": {"num_attention_heads": 3},
        "llama_eps_nan": {"rms_norm_eps": float("nan")},
    }
    for name, change in changes.items():
        (root / name).mkdir()
        changed = {k: v for k, v in {**config, **change}.items() if v is not None}
        (root / name / "config.json").write_text(json.dumps(changed))
    for name in ("llama_not_json", "llama_not_utf8", "llama_no_weights"):
        (root / name).mkdir()
    (root / "llama_not_json" / "config.json").write_text("{model_type: llama")
    (root / "llama_not_utf8" / "config.json").write_bytes(b'{"model_type": "\xff"}')
    shutil.copy(llama / "config.json", root / "llama_no_weights" / "config.json")
    shutil.copytree(llama, root / "llama_truncated")
    with open(root / "llama_truncated" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    (root / "safetensors_garbage").mkdir()
    (root / "safetensors_garbage" / "model.safetensors").write_bytes(b"\xff" * 64)
    return root


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # An hf:// handle must resolve from the local cache only: no row may download.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _resolve(value, request):
    """`value` with its placeholders (`File`, `RUN`, `MODEL`) replaced."""
    if isinstance(value, File):
        return str(request.getfixturevalue("files") / value.name)
    if value is RUN:
        return request.getfixturevalue("run_dir")
    if value is MODEL:
        return request.getfixturevalue("lm").model
    if isinstance(value, Args):
        args = [_resolve(arg, request) for arg in value.args]
        return Args(*args, **{k: _resolve(v, request) for k, v in value.kwargs.items()})
    return value


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_fails_early_and_names_the_argument(case, request):
    _, entry, bad_input, error, message = case
    fixtures, call = ENTRY_POINTS[entry]
    env = {name: request.getfixturevalue(name) for name in fixtures}
    with pytest.raises(error) as raised:
        call(env, _resolve(bad_input, request))
    text = str(raised.value)
    assert re.search(message, text), f"{message!r} not in:\n{text}"
    assert "in user code" not in text, text  # no error raised while a graph was traced
    if "Graph execution error" in text:  # a signature: one of its asserts, nothing deeper
        assert re.search(r"Detected at node \S*Assert", text), text


def test_the_table_covers_every_entry_point_and_its_ids_are_unique():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert {case[1] for case in CASES} == set(ENTRY_POINTS)
    for case in CASES:
        assert len(case) == 5 and issubclass(case[3], BaseException), case


def test_the_cli_rows_leave_the_flags_as_they_were(request):
    from toex_tf.cli.flags import FLAGS  # noqa: PLC0415

    before = (FLAGS.is_parsed(), FLAGS["decode_mode"].value, FLAGS["prompt"].value)
    env = {"run_dir": request.getfixturevalue("run_dir"), "tmp": request.getfixturevalue("tmp")}
    with pytest.raises(SystemExit):
        _cli(env, ["--mode=generate", "--output_dir={out}", "--decode_mode=frozen"])
    assert (FLAGS.is_parsed(), FLAGS["decode_mode"].value, FLAGS["prompt"].value) == before
    assert not os.path.exists(os.path.join(env["tmp"], "generate.json"))
