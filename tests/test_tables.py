"""pipeline/tables.py: number cells as every stage writes them, and tables read back as written."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipeline.atomic import write_csv_atomic
from pipeline.tables import csv_number, read_csv_rows


@pytest.mark.parametrize(("value", "cell"), [
    (0.123456, 0.1235), (71.92, 71.92), (0.0, 0.0), (-1.23456, -1.2346),
    (None, ""), (math.nan, ""), (math.inf, ""), (-math.inf, ""),
])
def test_csv_number_rounds_to_4_decimals_and_blanks_what_is_not_a_number(value: float | None,
                                                                          cell: float | str) -> None:
    assert csv_number(value) == cell


def test_read_csv_rows_gives_back_what_write_csv_atomic_wrote(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    rows = [{"method": "zero_shot", "test_acc": csv_number(61.23456), "note": "a, \"quoted\"\nline"},
            {"method": "coop", "test_acc": csv_number(math.nan), "note": ""}]
    write_csv_atomic(path, ["method", "test_acc", "note"], rows)
    assert read_csv_rows(path) == [{"method": "zero_shot", "test_acc": "61.2346", "note": "a, \"quoted\"\nline"},
                                   {"method": "coop", "test_acc": "", "note": ""}]
