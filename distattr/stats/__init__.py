"""Dataset-wide statistics and the Inseq paper's case studies.

* :mod:`distattr.stats.cat`: Contrastive Attribution Tracing, locating factual knowledge (``distattr case-study cat``).
* :mod:`distattr.stats.gender_bias`: pronoun probabilities and attributions vs labor statistics
  (``distattr case-study gender-bias``).
* :mod:`distattr.stats.storage`: where their full attribution results are written.
* :mod:`distattr.stats.tokens`: character spans -> token positions.

Dataset-wide statistics of a Zarr store (``distattr stats STORE``, :mod:`distattr.stats.stats_command`), out of core
with dask (:mod:`distattr.stats.chunks`): per-example summaries (:mod:`.summaries`), means and quantiles by position,
distance, token, step, layer or head (:mod:`.reductions`), rank correlations with labels (:mod:`.correlation`),
ERASER faithfulness (:mod:`.faithfulness`), figures (:mod:`.plots`), the HTML report (:mod:`.report`) and
synthetic stores for benchmarks (:mod:`.synthetic`).

Packaged data (``distattr/stats/data``, provenance in its ``SOURCES.md``): ROME's known facts and the
WinoGender / Inseq-paper occupation statistics.
"""

from importlib.resources import files
from pathlib import Path


def data_file(name: str):
    """Path-like of a packaged data file (``known_facts.json``, ``occupations-stats.tsv``,
    ``inseq_turkish_occupations_bls.tsv``)."""
    return files(__name__) / "data" / name


def as_path(path):
    """A file path, or a packaged resource from :func:`data_file` as it is (both have ``read_text``)."""
    return path if hasattr(path, "read_text") else Path(path)
