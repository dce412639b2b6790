"""Table II from records (kept for users: the code lives in :mod:`advseg.stats.summary`)."""

from advseg.stats.summary import (
    CELL_COLUMNS,
    PROTOCOLS,
    Protocol,
    cell_label,
    protocol_dice,
    summarize,
    summarize_cells,
)

__all__ = [
    "CELL_COLUMNS",
    "PROTOCOLS",
    "Protocol",
    "cell_label",
    "protocol_dice",
    "summarize",
    "summarize_cells",
]
