"""`run_cli`: `python -m toex_tf.run ARGS` in a child process, for the CLI tests
(`tests/` is on `sys.path` through `tests/conftest.py`)."""

import os
import subprocess
import sys


def run_cli(*args, timeout=600, cwd=None):
    """Runs the CLI with `args`; returns the `subprocess.CompletedProcess` (text output)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "toex_tf.run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


# A tiny GPT run on a byte tokenizer: trains in seconds (the GPT CLI tests). Without XLA:
# compiling the step costs more than 6 steps save; one test trains with it (--jit_compile).
TINY = [
    "--preset=tiny",
    "--tokenizer=byte",
    "--seq_len=16",
    "--batch_size=4",
    "--train_steps=6",
    "--warmup_steps=2",
    "--checkpoint_every=3",
    "--eval_windows=8",
    "--thresholds=0.0,0.5,1.0",
    "--nojit_compile",
]


# A tiny Llama phase on a byte tokenizer (the Llama CLI tests).
LLAMA_TINY = [
    "--model=llama",
    "--mode=train",
    "--llama_preset=llama-tiny",
    "--tokenizer=byte",
    "--seq_len=16",
    "--batch_size=4",
    "--eval_windows=4",
]


WORDS = (
    "the cat sat on a mat while the dog ran after a ball in the garden and "
    "a bird sang over the quiet river near the old stone bridge"
).split()


def write_corpus(directory, docs=40):
    """Writes `docs` small English text files; returns their glob (a `text:` dataset)."""
    os.makedirs(directory, exist_ok=True)
    for i in range(docs):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(60)]
        with open(os.path.join(directory, f"doc{i}.txt"), "w") as f:
            f.write(" ".join(words).capitalize() + ".\n")
    return os.path.join(directory, "*.txt")


def run_cli_on_terminal(*args, timeout=600):
    """Runs the CLI with stdout and stderr on a pseudo-terminal (as a user at a terminal
    sees it); returns `(returncode, output bytes)`."""
    import pty  # noqa: PLC0415 - POSIX only
    import select  # noqa: PLC0415
    import time  # noqa: PLC0415

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TOEX_PROGRESS", None)
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "toex_tf.run", *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=env,
        close_fds=True,
    )
    os.close(slave)
    output, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        else:
            process.kill()
            raise TimeoutError(f"toex_tf.run {args} ran past {timeout} s on the terminal")
    finally:
        os.close(master)
    return process.wait(timeout=60), output


def call_cli(*args):
    """Runs `python -m toex_tf.run ARGS` in this process, as far as it goes: absl parses
    the flags (raising `flags.Error` on a bad one) and `toex_tf.run.main` runs (raising
    `SystemExit("toex_tf.run: error: ...")` on bad input). The flags are restored after.

    A bad flag costs milliseconds here against seconds for a child process (which must
    import TensorFlow): for checks that stop before any TensorFlow work.
    """
    from absl.testing import flagsaver  # noqa: PLC0415

    from toex_tf import run  # noqa: PLC0415
    from toex_tf.cli.flags import FLAGS  # noqa: PLC0415

    parsed = FLAGS.is_parsed()
    with flagsaver.flagsaver():
        try:
            FLAGS(["toex_tf.run", *run.expand_config(list(args))])
            run.main(["toex_tf.run"])
        finally:
            if not parsed:
                FLAGS.unparse_flags()


def cli_error(*args) -> str:
    """`call_cli(*args)`'s error message; fails the test when the call succeeds."""
    from absl import flags  # noqa: PLC0415

    try:
        call_cli(*args)
    except flags.Error as error:
        return str(error)
    except SystemExit as error:
        return str(error.code)
    raise AssertionError(f"toex_tf.run {args} succeeded; expected an error")
