"""Progress of long jobs, readable on a terminal and short in a log.

On a terminal, `Progress` is Keras's `Progbar` (one line, redrawn). Anywhere else (a log
file, CI, a pipe) Keras's bar would write its redraws into one line of hundreds of
kilobytes, so `Progress` prints a plain line at most every `interval` seconds, plus the
first and the last. Quiet (nothing at all) when absl logging is set to errors only
(`--verbosity=-2` on the command line; absl's default is -1, warnings) or when
`TOEX_PROGRESS=0`.

`fit_progress(steps)` gives Keras `fit` the same behaviour: `(verbose, callbacks)`.
"""

import os
import sys
import time

LOG_INTERVAL_SECONDS = 30.0


def progress_enabled() -> bool:
    """False when the user asked for quiet: `TOEX_PROGRESS=0`, or absl logging set to
    errors only (`--verbosity=-2`)."""
    if os.environ.get("TOEX_PROGRESS", "1") == "0":
        return False
    from absl import logging  # noqa: PLC0415 - absl is a dependency; no flag is read

    return logging.get_verbosity() >= logging.WARNING


def _interactive(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    """Progress of `total` units of work labelled `label`.

    Args:
        total: int > 0, the units of work.
        label: str, what is being done ("exit sweep").
        enabled: bool or None; None: `progress_enabled()`.
        stream: where it goes. Defaults to `sys.stdout` (Keras's bar writes there too).
        interval: float, seconds between log lines when `stream` is not a terminal.

    Example:

    >>> progress = Progress(len(rows), "exit sweep")
    >>> for i, row in enumerate(rows):
    ...     progress.update(i + 1, row.label)
    """

    def __init__(self, total: int, label: str, enabled=None, stream=None, interval=None):
        if not isinstance(total, int) or total < 1:
            raise ValueError(f"total must be an int >= 1; got {total!r}.")
        self.total, self.label = total, label
        self.enabled = progress_enabled() if enabled is None else bool(enabled)
        self.stream = stream or sys.stdout
        self.interval = LOG_INTERVAL_SECONDS if interval is None else float(interval)
        self.start = time.monotonic()
        self.last_line = None
        self.bar = None
        if self.enabled and _interactive(self.stream):
            import keras  # noqa: PLC0415

            self.bar = keras.utils.Progbar(total, unit_name=label)
        elif self.enabled:
            self._line(0, "started")

    def update(self, done: int, note: str = "") -> None:
        """Records that `done` of `total` units are finished (`note`: the current item)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done, finalize=done >= self.total)
            return
        now = time.monotonic()
        if done >= self.total or now - self.last_line >= self.interval:
            self._line(done, note)

    def _line(self, done: int, note: str) -> None:
        self.last_line = time.monotonic()
        elapsed = _duration(self.last_line - self.start)
        percent = 100 * done // self.total
        suffix = f": {note}" if note else ""
        print(
            f"[{self.label}] {done}/{self.total} ({percent}%), {elapsed}{suffix}",
            file=self.stream,
            flush=True,
        )

    def __call__(self, done: int, total: int | None = None, note: str = "") -> None:
        """`update`, in the `(done, total, note)` form the analysis functions call (a
        `total` given here replaces the one given at construction)."""
        if total and total != self.total:
            self.total = int(total)
            if self.bar is not None:
                self.bar.target = self.total
        self.update(done, note)


def fit_progress(steps: int, label: str = "training", enabled=None, stream=None):
    """`(verbose, callbacks)` for Keras `fit` over `steps` steps (in one `fit` or over
    several with the same callbacks): the Keras bar on a terminal, `LogProgress` lines
    in a log, nothing when quiet."""
    enabled = progress_enabled() if enabled is None else enabled
    stream = stream or sys.stdout
    if not enabled:
        return 0, []
    if _interactive(stream):
        return 1, []
    return 0, [_log_callback(steps, label, stream)]


def _log_callback(steps, label, stream):
    import keras  # noqa: PLC0415

    class LogProgress(keras.callbacks.Callback):
        """A line every `LOG_INTERVAL_SECONDS` with the step and the logged metrics."""

        def __init__(self):
            super().__init__()
            self.progress = None
            self.done = 0  # counted here: one callback may see several `fit` calls

        def on_train_begin(self, logs=None):
            if self.progress is None:
                self.progress = Progress(steps, label, enabled=True, stream=stream)

        def on_train_batch_end(self, batch, logs=None):
            self.done += 1
            metrics = ", ".join(
                f"{name} {float(value):.4g}"
                for name, value in (logs or {}).items()
                if name.endswith("loss")
            )
            self.progress.update(min(self.done, steps), metrics)

    return LogProgress()
