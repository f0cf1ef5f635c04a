"""Locate the bundled Fashion-MNIST demo dataset (data/demo in the repository)."""

from __future__ import annotations

from pathlib import Path

DEMO_ROOT = Path(__file__).resolve().parents[2] / "data" / "demo"
DEMO_DATASET = "FashionMNIST"


def demo_root() -> Path:
    """The demo data root, or a clear error when running outside a repository checkout."""
    if not (DEMO_ROOT / "fashion_mnist" / "split_zhou_FashionMNIST.json").is_file():
        raise FileNotFoundError(
            f"The bundled demo dataset is not at {DEMO_ROOT}/fashion_mnist; it ships with the repository "
            "checkout (not the installed package). Rebuild it with `python data/demo/make_demo.py`."
        )
    return DEMO_ROOT
