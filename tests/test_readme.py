"""Every Python snippet in README.md runs as written, in order, on tiny models.

The snippets name `runs/quickstart` (the quickstart's run directory),
`runs/translate_quickstart` (the translation quickstart's) and `runs/llama_base/hf` (a
Llama base checkpoint); the test makes tiny ones at those paths
in a scratch directory and runs each snippet there, in a fresh namespace, in one process.
"""

import os
import re
import subprocess
import sys
import textwrap

import keras

from toex_tf.data import ByteTokenizer
from toex_tf.loaders import export_llama
from toex_tf.models import build_gpt, build_llama, build_transformer

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def python_snippets() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.DOTALL)


RUNNER = textwrap.dedent(
    """
    import json, sys, traceback
    snippets = json.load(open(sys.argv[1]))
    for index, snippet in enumerate(snippets):
        try:
            exec(compile(snippet, f"README snippet {index}", "exec"), {"__name__": "__main__"})
        except Exception:
            print(f"README snippet {index} failed:\\n{snippet}", file=sys.stderr)
            traceback.print_exc()
            sys.exit(1)
    print(f"ran {len(snippets)} snippets")
    """
)


def test_readme_has_the_setup_lines_and_a_short_python_example():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.DOTALL).group(1).splitlines()
    assert first_block == [
        "pip install -e . && python -m toex_tf.run --flagfile=configs/quickstart.cfg",
        'pip install -e ".[test]" && python -m pytest -q -rs -n 2 --dist loadfile',
    ]
    with open(os.path.join(os.path.dirname(README), ".ci", "run"), encoding="utf-8") as f:
        assert "python -m pytest -q -rs -n 2 --dist loadfile" in f.read()  # the same command
    assert len([line for line in python_snippets()[0].splitlines() if line.strip()]) <= 5


def test_every_python_snippet_runs(tmp_path):
    import json  # noqa: PLC0415

    keras.utils.set_random_seed(0)
    tokenizer = ByteTokenizer()
    run = tmp_path / "runs" / "quickstart"
    gpt = build_gpt("tiny", vocab_size=tokenizer.vocab_size, num_layers=3, max_length=64)
    os.makedirs(run)
    gpt.save(str(run / "model.keras"))
    tokenizer.save(str(run / "tokenizer"))
    translation = tmp_path / "runs" / "translate_quickstart"
    seq2seq = build_transformer(
        "tiny", vocab_size=tokenizer.vocab_size, max_source_length=32, max_length=24
    )
    os.makedirs(translation)
    seq2seq.save(str(translation / "model.keras"))
    tokenizer.save(str(translation / "tokenizer"))
    llama = build_llama("llama-tiny", vocab_size=tokenizer.vocab_size, exit_layers=())
    export_llama(llama, str(tmp_path / "runs" / "llama_base" / "hf"))
    snippets = python_snippets()
    assert len(snippets) >= 6
    (tmp_path / "snippets.json").write_text(json.dumps(snippets))
    (tmp_path / "runner.py").write_text(RUNNER)
    completed = subprocess.run(
        [sys.executable, "runner.py", "snippets.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert f"ran {len(snippets)} snippets" in completed.stdout
