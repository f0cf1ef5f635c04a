"""The stages' CSV tables: how a number is written into a cell, and how a table is read back as rows."""

from __future__ import annotations

import csv
import math
from pathlib import Path


def csv_number(value: float | None) -> float | str:
    """A number as a CSV cell: rounded to 4 decimals, blank when missing or not finite (NaN, inf)."""
    return round(value, 4) if value is not None and math.isfinite(value) else ""


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """A CSV table with a header line as rows of strings (column -> cell)."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
