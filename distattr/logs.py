"""distattr's logging: the ``distattr`` logger, its command-line setup, and quiet model loading.

Every module logs with ``logging.getLogger(__name__)``; those loggers (``distattr.models.loading``,
``distattr.jobs.actor``...) are children of :data:`logger`, so one level and one handler on it govern them all.
distattr never touches the root logger: a program that imports distattr keeps its own logging setup, and sees
distattr's records through propagation like any library's. The command line's ``-v/--log-level`` calls
:func:`configure` with one of :data:`LOG_LEVELS`.

:func:`quiet_transformers` turns transformers' warnings and the hub's progress bars down while distattr loads a
model, and puts back what was there before when the load ends, also when it fails.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger("distattr")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
"""Level names :func:`configure` takes (any case), from most to least verbose: the command line's choices."""

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"


class _StderrHandler(logging.Handler):
    """Writes each record to ``sys.stderr`` as it is when the record is emitted (as logging's last resort does),
    so a later redirection of stderr (pytest, a notebook) still sees the records."""

    @property
    def stream(self):
        return sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except Exception:  # logging's contract: a failing handler reports through handleError, never raises
            self.handleError(record)


def parse_level(level: str | int) -> int:
    """The ``logging`` level of ``level``: a name of :data:`LOG_LEVELS` in any case, or a number (as an int or
    a string of digits). Anything else raises one line of ``ValueError`` listing the valid names."""
    if isinstance(level, int) and not isinstance(level, bool) and level >= 0:
        return level
    if isinstance(level, str) and level.strip().isdigit():
        return int(level)
    if isinstance(level, str) and level.strip().lower() in LOG_LEVELS:
        return logging.getLevelName(level.strip().upper())
    raise ValueError(f"Unknown log level {level!r}; use one of {', '.join(LOG_LEVELS)} or a number")


def configure(level: str | int) -> int:
    """Send distattr's records at ``level`` and above to stderr, one short line each
    (``12:03:04 INFO distattr.models.loading: ...``); returns the level as an int.

    Only the ``distattr`` logger changes: its level, and one stderr handler of its own (calling again replaces
    it rather than adding a second). The root logger and other libraries' loggers stay as they are.
    """
    value = parse_level(level)
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(value)
    return value


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Within the block, transformers logs errors only and no progress bars show (transformers' own and the
    Hugging Face hub's downloads); on exit, also on error, the verbosity and progress-bar settings are as they
    were before. Loading prints warnings that mean nothing to a distattr user (unused weights of a checkpoint,
    generation defaults) and a bar per file; a program that uses distattr keeps its own settings afterwards.
    The settings are process-wide: blocks may nest, but loads in several threads at once may restore out of order."""
    from transformers.utils import logging as hf_logging

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module, which `utils.tqdm` (a class) hides
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hub_bars = dict(hub_tqdm.progress_bar_states)  # the hub's per-group switches, which its enable/disable reset
    try:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        hub_tqdm.progress_bar_states.clear()
        hub_tqdm.progress_bar_states.update(hub_bars)
