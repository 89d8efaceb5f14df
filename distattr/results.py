"""Result types, Inseq-style display aggregation, and JSON save/load.

A :class:`SequenceAttribution` holds token-level matrices ``[n_tokens, n_steps(, *dims)]``: column ``c``
explains target token ``attr_pos_start + c``. For decoder-only models ``source_tokens`` are the prompt,
``target_tokens`` the whole sequence (prompt + generation) and ``source_attributions`` is None, as in
Inseq. Future target tokens are NaN.

The JSON file (format ``distattr.attribution``, version 1) is a public contract documented in
``docs/reference/json.md``. It is
strict JSON (RFC 8259), which has no NaN or infinity, so in the ``data`` lists of arrays (attributions, step
scores, deltas) NaN is written ``null`` and the infinities as the strings ``"Infinity"`` and ``"-Infinity"``
(the spelling of JavaScript's ``Number()`` and Python's ``float()``); :func:`load` reads them back exactly, and
also accepts ``"NaN"``. In ``info``, which is metadata, a non-finite number is written ``null``.

:meth:`AttributionOutput.save` refuses to replace an existing file unless ``overwrite=True``, and writes
atomically: a temporary file with a unique name in the same folder, flushed to disk, then renamed over the
target, so a reader (or a crash) never sees a half-written file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "distattr.attribution"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SequenceAttribution:
    """Attributions of one example. Arrays are float32; see the module docstring for the layout."""

    source_tokens: tuple[str, ...]
    target_tokens: tuple[str, ...]
    source_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    source_attributions: np.ndarray | None
    target_attributions: np.ndarray | None
    step_scores: dict[str, np.ndarray]
    attr_pos_start: int
    attr_pos_end: int
    deltas: np.ndarray | None = None
    dims: tuple[str, ...] = ()
    dim_labels: tuple[tuple[str, ...], ...] = ()

    @property
    def generated_tokens(self) -> tuple[str, ...]:
        """The explained target tokens, one per column."""
        return self.target_tokens[self.attr_pos_start : self.attr_pos_end]

    def aggregate(self, aggregator: str | bool | None = None, rescale: bool | None = None, *,
                  normalize: bool | None = None, **kwargs) -> SequenceAttribution:
        """Aggregate by name, as Inseq's ``aggregate``; without a name, Inseq's display aggregation.

        ``aggregator`` (see :data:`distattr.aggregate.INSEQ_AGGREGATORS`): None or ``"scores"`` is the display
        aggregation: average each extra dim (last first; ``aggregate_fn=`` picks another function, and a bare
        function name such as ``"sum"`` is short for ``"scores"`` with it), L1-normalising every column over
        source + target tokens after each stage (``normalize``, default True), or dividing by the global max
        |value| (``rescale``). Token-level gradient scores are already L2-reduced over the hidden size.
        ``"subwords"``, ``"spans"``, ``"slices"`` and ``"pair"`` (or their Inseq class names) run the
        distattr stage doing the same, with Inseq's keyword arguments. An unknown name or argument is an
        error listing the valid ones. A bool first argument is ``normalize`` (the older positional form)."""
        if isinstance(aggregator, bool):
            if normalize is not None:
                raise TypeError("aggregate() got normalize twice (positionally and by keyword)")
            aggregator, normalize = None, aggregator
        from .aggregate import named_aggregation

        return named_aggregation(self, aggregator, normalize=normalize, rescale=rescale, **kwargs)

    def display(self, normalize: bool = True, rescale: bool = False, fn=None) -> SequenceAttribution:
        """Inseq's display aggregation (``aggregate()``, ``aggregate("scores")``): reduce each extra dim, last first,
        with ``fn`` (default NaN-ignoring mean), L1-normalising every column over source + target tokens after
        each stage (``normalize``) or dividing by the global max |value| at the end (``rescale``)."""
        if normalize and rescale:
            raise ValueError("normalize and rescale are mutually exclusive")
        from .aggregate import normalize_columns, rescale_global

        reduce = _nanmean_last if fn is None else (lambda x: np.asarray(fn(x, x.ndim - 1), dtype=np.float32))
        src, tgt = self.source_attributions, self.target_attributions
        dims = list(self.dims)
        stages = max(len(dims), 1)
        for _ in range(stages):
            if dims:
                src = None if src is None else reduce(src)
                tgt = None if tgt is None else reduce(tgt)
                dims.pop()
            if normalize:
                src, tgt = normalize_columns(src, tgt)
        if rescale:
            src, tgt = rescale_global(src, tgt)
        return dataclasses.replace(self, source_attributions=src, target_attributions=tgt, dims=(), dim_labels=())

    def apply(self, *stages) -> SequenceAttribution:
        """Run aggregation stages in order (:mod:`distattr.aggregate`), e.g.
        ``seq.apply(Words(tokenizer), Reduce("mean", "head"), Normalize())``."""
        from .aggregate import apply

        return apply(self, *stages)

    def plot(self, path: str | Path | None = None, normalize: bool = True, rescale: bool = False, dpi: float = 150,
             **kwargs):
        """A heatmap figure (matplotlib, ``pip install 'distattr[viz]'``): written to ``path`` (its extension
        picks the format, ``dpi`` the resolution) and the path returned, or returned as a
        ``matplotlib.figure.Figure`` without ``path``. Other keyword arguments:
        :func:`distattr.viz.plot.plot_figure`."""
        from .viz.plot import plot_figure, save_figure

        fig = plot_figure(self, normalize=normalize, rescale=rescale, **kwargs)
        return fig if path is None else save_figure(fig, path, dpi=dpi)

    def _repr_html_(self) -> str:
        """The HTML view of this example, for notebooks."""
        from .viz.html import render_fragment

        return render_fragment(self)


def _nanmean_last(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"), _quiet_nan_warnings():
        return np.nanmean(x, axis=-1).astype(np.float32)


class _quiet_nan_warnings:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


@dataclass(frozen=True)
class AttributionOutput:
    """The result of ``model.attribute``: one :class:`SequenceAttribution` per input, plus ``info``
    (model, revision, method and arguments, attributed function, versions, timing)."""

    sequences: tuple[SequenceAttribution, ...]
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> SequenceAttribution:
        return self.sequences[index]

    def __iter__(self) -> Iterator[SequenceAttribution]:
        return iter(self.sequences)

    def aggregate(self, aggregator: str | bool | None = None, rescale: bool | None = None, *,
                  normalize: bool | None = None, **kwargs) -> AttributionOutput:
        """Aggregate every example (see :meth:`SequenceAttribution.aggregate`); a named aggregation is recorded in
        ``info["aggregation"]``. For ``"pair"``, ``paired_attr`` is an output with as many examples (or one
        example used for all)."""
        if isinstance(aggregator, bool):
            if normalize is not None:
                raise TypeError("aggregate() got normalize twice (positionally and by keyword)")
            aggregator, normalize = None, aggregator
        from .aggregate import named_aggregation

        return named_aggregation(self, aggregator, normalize=normalize, rescale=rescale, **kwargs)

    def apply(self, *stages) -> AttributionOutput:
        """Run aggregation stages in order on every example (:mod:`distattr.aggregate`); the stages are
        recorded in ``info["aggregation"]``."""
        from .aggregate import apply

        return apply(self, *stages)

    def show(self, normalize: bool = True, rescale: bool = False, step_scores: bool = True, console=None) -> None:
        """Print a heatmap per example (rich console)."""
        from .viz.console import show_console

        show_console(self, normalize=normalize, rescale=rescale, step_scores=step_scores, console=console)

    def html(self, normalize: bool = True, rescale: bool = False) -> str:
        """A self-contained HTML page with one heatmap per example."""
        from .viz.html import render_html

        return render_html(self, normalize=normalize, rescale=rescale)

    def _repr_html_(self) -> str:
        """The HTML view as a fragment for notebooks (scoped style and script, no page-wide CSS)."""
        from .viz.html import render_fragment

        return render_fragment(self)

    def plot(self, path: str | Path | None = None, normalize: bool = True, rescale: bool = False,
             index: int | list[int] | None = None, **kwargs):
        """Heatmap figures (matplotlib, ``pip install 'distattr[viz]'``), one per example, sharing one colour
        scale. With ``path``: one example is written to ``path``, several to ``path`` with ``-<i>`` before
        the extension (or ``{index}`` in the name replaced); returns the paths. Without: returns the
        ``matplotlib.figure.Figure`` objects. ``index`` picks examples; other keyword arguments:
        :func:`distattr.viz.plot.plot_figures`, ``dpi`` when saving."""
        from .viz.plot import plot_figures, save_plots

        if path is None:
            return plot_figures(self, normalize=normalize, rescale=rescale, index=index, **kwargs)
        return save_plots(self, path, normalize=normalize, rescale=rescale, index=index, **kwargs)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the JSON file (see the module docstring for NaN and infinities); :func:`load` reads it back
        exactly. An existing file is replaced only with ``overwrite=True`` (:class:`FileExistsError` otherwise).
        The write is atomic: a unique temporary file in the same folder, flushed to disk, renamed into place;
        on any error the temporary file is removed and an existing file is left as it was."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": FORMAT, "version": FORMAT_VERSION, "info": _jsonable(self.info),
               "sequences": [_seq_to_json(s) for s in self.sequences]}
        _write_atomically(path, doc, overwrite)
        return path


def _write_atomically(path: Path, doc: dict, overwrite: bool) -> None:
    """Write ``doc`` as JSON to a unique temporary file next to ``path``, fsync it, and move it into place:
    ``os.replace`` with ``overwrite``, else a hard link that fails if ``path`` appeared meanwhile (a plain check
    then rename where the file system has no hard links)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for a plain open
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
            except OSError:  # no hard links here (FAT, some network file systems)
                if path.exists():
                    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable where the platform allows opening a folder (POSIX)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_NONFINITE_TO_JSON = {math.inf: "Infinity", -math.inf: "-Infinity"}
_NONFINITE_FROM_JSON = {None: math.nan, "NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _number_to_json(v: float):
    if math.isnan(v):
        return None
    return _NONFINITE_TO_JSON.get(v, v)


def _number_from_json(v):
    if isinstance(v, int | float) and not isinstance(v, bool):
        return v
    try:
        return _NONFINITE_FROM_JSON[v]
    except (KeyError, TypeError):
        raise ValueError(f"{v!r} is not a number (numbers, null, \"NaN\", \"Infinity\" or \"-Infinity\")") from None


def _array_to_json(a: np.ndarray | None):
    if a is None:
        return None
    flat = [_number_to_json(v) for v in np.asarray(a, dtype=np.float32).astype(np.float64).ravel().tolist()]
    return {"shape": list(a.shape), "data": flat}


def _array_from_json(obj) -> np.ndarray | None:
    if obj is None:
        return None
    data = np.array([_number_from_json(v) for v in obj["data"]], dtype=np.float64)
    return data.astype(np.float32).reshape(obj["shape"])


def _seq_to_json(s: SequenceAttribution) -> dict:
    return {
        "source_tokens": list(s.source_tokens), "target_tokens": list(s.target_tokens),
        "source_ids": list(s.source_ids), "target_ids": list(s.target_ids),
        "source_attributions": _array_to_json(s.source_attributions),
        "target_attributions": _array_to_json(s.target_attributions),
        "step_scores": {k: _array_to_json(v) for k, v in s.step_scores.items()},
        "attr_pos_start": s.attr_pos_start, "attr_pos_end": s.attr_pos_end,
        "deltas": _array_to_json(s.deltas), "dims": list(s.dims), "dim_labels": [list(x) for x in s.dim_labels],
    }


def _seq_from_json(d: dict) -> SequenceAttribution:
    return SequenceAttribution(
        source_tokens=tuple(d["source_tokens"]), target_tokens=tuple(d["target_tokens"]),
        source_ids=tuple(d["source_ids"]), target_ids=tuple(d["target_ids"]),
        source_attributions=_array_from_json(d["source_attributions"]),
        target_attributions=_array_from_json(d["target_attributions"]),
        step_scores={k: _array_from_json(v) for k, v in d["step_scores"].items()},
        attr_pos_start=d["attr_pos_start"], attr_pos_end=d["attr_pos_end"], deltas=_array_from_json(d["deltas"]),
        dims=tuple(d["dims"]), dim_labels=tuple(tuple(x) for x in d["dim_labels"]),
    )


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    return repr(obj)


def load(path: str | Path) -> AttributionOutput:
    """Read a file written by :meth:`AttributionOutput.save`."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not a distattr result: not valid JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not a distattr result (no '\"format\": \"{FORMAT}\"' field)")
    version = doc.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} uses result format version {version}; this distattr reads up to {FORMAT_VERSION}. "
            "Upgrade distattr to read it."
        )
    try:
        sequences = tuple(_seq_from_json(s) for s in doc["sequences"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is a damaged distattr result: {err!r}") from None
    except ValueError as err:
        raise ValueError(f"{path} is a damaged distattr result: {err}") from None
    return AttributionOutput(sequences=sequences, info=doc.get("info", {}))
