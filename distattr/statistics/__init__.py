"""Dataset-wide statistics of a Zarr store (``distattr stats STORE``), out of core with dask.

* :mod:`.chunks`: which examples a statistic reads (done markers, ``--where``/``--select``) and the block waves.
* :mod:`.summaries`: per-example summaries (entropy, top-k mass, distance...).
* :mod:`.reductions`: means and quantiles by position, distance, token, step, layer or head.
* :mod:`.correlation`: rank correlations of summaries with labels.
* :mod:`.faithfulness`: ERASER comprehensiveness and sufficiency (reruns the model).
* :mod:`.plots` and :mod:`.report`: figures and the self-contained HTML report.
* :mod:`.synthetic`: synthetic stores for benchmarks and tests.
"""
