"""The CoOp paper's published numbers (published.json, with sources) the report and the cost model compare with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PUBLISHED_FILE = Path(__file__).with_name("published.json")


def load_published() -> dict[str, Any]:
    """published.json: CoOp's 16-shot and zero-shot accuracies, the official training time, with sources."""
    return json.loads(PUBLISHED_FILE.read_text(encoding="utf-8"))
