"""What a run leaves on disk, and how it is read back: the formats between producers and reports.

- :mod:`~advseg.runs.records`: per-slice robustness records (parquet), the one data format between
  evaluation and reports; :mod:`~advseg.runs.record_rows` builds their rows.
- :mod:`~advseg.runs.traces`: convergence traces of iterative attacks.
- :mod:`~advseg.runs.provenance`: which advseg version, device and date produced a run's numbers.
- :mod:`~advseg.runs.examples`: the example images kept for the report's panels.
- :mod:`~advseg.runs.names`: how names become file names inside a run directory.

Nothing here imports torch, a model or an attack: every layer above may read and write runs.
"""
