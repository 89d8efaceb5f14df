"""One progress display for long work: ``model.attribute`` (steps, tokens per second), dataset jobs (examples,
tokens per second, the actors' state) and ``distattr stats`` (examples), built on ``tqdm.auto``.

Where it shows:

* on a terminal (the stream is a TTY): a tqdm bar, redrawn at most ``BAR_INTERVAL_S`` apart;
* in a Jupyter notebook: tqdm's widget (``tqdm.auto``; its text bar when ipywidgets is not installed);
* anywhere else (a log file, ``ray job logs``, a pipe, a test's captured stderr): plain lines, no carriage
  returns, at most one every ``interval`` seconds (``LOG_INTERVAL_S``, 30 s)::

      distattr: attributing: 120/400 (30%) [01:00<02:20, 2.00ex/s, 185 tok/s; actors: 2 live, 0 loading, ...]

  Work shorter than ``interval`` writes nothing; work that wrote a line writes a last one when it ends.

``Progress(title, total)`` is called as ``progress(n, tokens)`` (``n`` more done, ``tokens`` more tokens) and
closed with ``close()`` (more than once is fine); ``enabled=False`` shows nothing at all.
"""

from __future__ import annotations

import sys
import time

LOG_INTERVAL_S = 30.0  # seconds between two plain lines when the stream is not a terminal
BAR_INTERVAL_S = 0.1  # seconds between two redraws of a bar
_LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (the test ``tqdm.autonotebook`` makes)."""
    return "ipykernel.zmqshell" in sys.modules or "IPython.utils._process_emscripten" in sys.modules


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Progress of ``total`` units of work (``None``: unknown) titled ``title``, shown as the module says.

    Args:
        title: what is being done ("Attributing with saliency").
        total: how many units there are (``unit``: "step", "ex").
        file: the stream (default: ``sys.stderr`` when made).
        interval: seconds between two plain lines off a terminal.
        leave: keep the finished bar on a terminal (default: it disappears).
        enabled: False shows nothing (``show_progress=False``, ``--quiet``).

    ``mode`` says which display was picked: "bar", "lines" or "off".
    """

    def __init__(self, title: str, total: int | None, unit: str = "step", *, file=None,
                 interval: float = LOG_INTERVAL_S, leave: bool = False, enabled: bool = True):
        self.title, self.total, self.unit, self.interval = title, total, unit, interval
        self.file = file if file is not None else sys.stderr
        self.n = self.tokens = 0
        self.status = ""
        self.closed = not enabled
        self._started = self._last = time.monotonic()
        self._lines = 0
        self._bar = None
        if enabled and (in_notebook() or _is_terminal(self.file)):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=title, unit=unit, file=self.file, leave=leave, dynamic_ncols=True,
                             mininterval=BAR_INTERVAL_S)
        self.mode = "off" if not enabled else "bar" if self._bar is not None else "lines"

    def __call__(self, n: int, tokens: int = 0) -> None:
        """``n`` more units done, with ``tokens`` more tokens (shown as tokens per second)."""
        if self.closed:
            return
        self.n += n
        self.tokens += tokens
        if self._bar is not None:
            if self.tokens:
                self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(n)
        elif time.monotonic() - self._last >= self.interval:
            self._line()

    def set_status(self, status: str) -> None:
        """A short text shown after the counts (the actors' state), until the next one."""
        if self.closed or status == self.status:
            return
        self.status = status
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix())
        elif time.monotonic() - self._last >= self.interval:
            self._line()

    def write(self, message: str) -> None:
        """A message on a line of its own, above a bar (nothing when disabled)."""
        if self.mode == "off":
            return
        if self._bar is not None:
            self._bar.write(message, file=self.file)
        else:
            print(message, file=self.file, flush=True)

    def close(self) -> None:
        """End the display (a last plain line when some were written); later calls do nothing."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._lines:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self) -> str:
        """The plain line of the current state: ``title: n/total (pct) [elapsed<remaining, rates; status]``."""
        from tqdm.std import tqdm

        elapsed = time.monotonic() - self._started
        known = self.total is not None and self.total > 0
        return tqdm.format_meter(min(self.n, self.total) if known else self.n, self.total if known else None, elapsed,
                                 prefix=self.title, unit=self.unit, postfix=self._postfix() or None,
                                 bar_format=_LINE_FORMAT if known else _LINE_FORMAT_NO_TOTAL)

    def _postfix(self) -> str:
        rate = f"{self.tokens / max(time.monotonic() - self._started, 1e-9):,.0f} tok/s" if self.tokens else ""
        return "; ".join(x for x in (rate, self.status) if x)

    def _line(self) -> None:
        self._last = time.monotonic()
        self._lines += 1
        print(f"distattr: {self.line()}", file=self.file, flush=True)


class DoneOfTotal:
    """A ``(done, total)`` callback (the statistics' ``on_progress``: counts so far, not increments) shown by a
    :class:`Progress` made at the first call; ``close()`` ends it. Arguments as :class:`Progress`."""

    def __init__(self, title: str, unit: str = "ex", **options):
        self.title, self.unit, self.options = title, unit, options
        self.progress: Progress | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.progress is None:
            self.progress = Progress(self.title, total, self.unit, **self.options)
        self.progress(done - self.progress.n)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


def progress_factory(title: str, **options):
    """``factory(total_steps)`` -> a :class:`Progress` of steps titled ``title`` (the ``progress`` argument of
    ``engine.attribute``): called with ``(steps, tokens)``, closed with ``close()``. ``options`` as
    :class:`Progress` (``file``, ``interval``, ...)."""

    def make(total: int) -> Progress:
        return Progress(title, total, "step", **options)

    return make
