"""Where the case studies put their full attribution results: one Zarr store per result
(:func:`distattr.store.save_outputs`), read back with :func:`distattr.open_store` and ``distattr stats``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..results import AttributionOutput


def save_results(directory: str | Path, outputs: Mapping[str, AttributionOutput]) -> dict[str, Path]:
    """Write each result to the store ``directory/<name>.zarr`` (replacing an earlier run's); returns the paths."""
    from ..store import save_outputs

    directory = Path(directory)
    paths = {}
    for name, out in outputs.items():
        paths[name] = directory / f"{name}.zarr"
        save_outputs(str(paths[name]), out, overwrite=True)
    return paths


def concat_outputs(outputs: Sequence[AttributionOutput]) -> AttributionOutput:
    """One result from several ``attribute`` calls with the same settings (e.g. batches of a dataset).

    Sequences are concatenated; in ``info``, lists with one entry per input are concatenated, ``timing``
    values are summed, and everything else is taken from the first call."""
    if not outputs:
        raise ValueError("No attribution results to concatenate")
    first = outputs[0]
    info = dict(first.info)
    for key, value in first.info.items():
        if isinstance(value, list) and all(isinstance(o.info.get(key), list) and len(o.info[key]) == len(o)
                                           for o in outputs):
            info[key] = [v for o in outputs for v in o.info[key]]
    timings = [o.info.get("timing") for o in outputs]
    if all(isinstance(t, dict) for t in timings):
        info["timing"] = {k: sum(t.get(k, 0) for t in timings) for k in timings[0]
                          if all(isinstance(t.get(k, 0), int | float) for t in timings)}
    info["n_calls"] = len(outputs)
    return AttributionOutput(sequences=tuple(s for o in outputs for s in o.sequences), info=info)
