"""The Inseq paper's case studies, reproduced.

* :mod:`distattr.casestudies.cat`: Contrastive Attribution Tracing, locating factual knowledge
  (``distattr case-study cat``).
* :mod:`distattr.casestudies.gender_bias`: pronoun probabilities and attributions vs labor statistics
  (``distattr case-study gender-bias``).
* :mod:`distattr.casestudies.agreement`: rank agreement of CAT, causal tracing and attribution patching maps
  (Spearman per fact and of the averaged maps, bootstrap intervals, per relation).
* :mod:`distattr.casestudies.storage`: where their full attribution results are written.
* :mod:`distattr.casestudies.tokens`: character spans -> token positions.

Packaged data (``distattr/casestudies/data``, provenance in its ``SOURCES.md``): ROME's known facts and the
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
