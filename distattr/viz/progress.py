"""A progress bar for long attributions (steps done, tokens per second); silent when stderr is not a
terminal."""

from __future__ import annotations

import sys
import time


class _Bar:
    def __init__(self, title: str, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("steps  {task.fields[rate]}"), TimeRemainingColumn(), transient=True,
                                  console=Console(file=sys.stderr))
        self._task = self._progress.add_task(title, total=total, rate="")
        self._tokens = 0
        self._started = time.perf_counter()
        self._progress.start()

    def __call__(self, steps: int, tokens: int) -> None:
        self._tokens += tokens
        rate = self._tokens / max(time.perf_counter() - self._started, 1e-9)
        self._progress.update(self._task, advance=steps, rate=f"{rate:,.0f} tok/s")

    def close(self) -> None:
        self._progress.stop()


def progress_factory(title: str):
    """``factory(total_steps)`` -> callback ``(steps, tokens)`` with ``close()``, or None off a terminal."""

    def make(total: int):
        if not sys.stderr.isatty():
            return None
        return _Bar(title, total)

    return make
