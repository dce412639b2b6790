"""Statistics computed from records: Table II and its confidence intervals.

- :mod:`~advseg.stats.summary`: the paper's Table II from per-slice pixel counts (the one
  implementation of the Dice protocols);
- :mod:`~advseg.stats.bootstrap`: confidence intervals over cases for every number of Table II.
"""
