"""The linear probes: the official lpclip C search and probe against sklearn by hand, and our grid probe."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES, separable_problem

from pipeline.engine.inputs import FewShotFeatures
from pipeline.evaluate.linear_probe import (
    LPCLIP_COARSE_C,
    grid_linear_probe,
    lpclip_linear_probe,
    lpclip_search,
)

# ------------------------------------------------------------------------------------------ the C search


def test_lpclip_search_takes_the_official_steps() -> None:
    """Val accuracy -|log10 C - 0.3|, the official procedure worked by hand: the coarse peak is C = 1 (log 0),
    then [-1, 1] -> right wins -> [0, 1] -> left -> [0, .5] -> right -> [.25, .5] -> left -> [.25, .375] ->
    left -> [.25, .3125] -> right -> [.28125, .3125] -> right -> [.296875, .3125] -> left: C = 10^.296875."""
    calls: list[float] = []

    def val_accuracy(c: float) -> float:
        calls.append(math.log10(c))
        return -abs(math.log10(c) - 0.3)

    search = lpclip_search(val_accuracy)
    rounds = [(-1, 1), (0, 1), (0, 0.5), (0.25, 0.5), (0.25, 0.375), (0.25, 0.3125), (0.28125, 0.3125),
              (0.296875, 0.3125)]
    assert calls == pytest.approx([6, 4, 2, 0, -2, -4, -6, *[x for r in rounds for x in r]], abs=1e-12)
    ends = [math.log10(c) for lc, _, rc, _ in search.rounds for c in (lc, rc)]
    assert ends == pytest.approx([x for r in rounds for x in r], abs=1e-12)
    assert [c for c, _ in search.coarse] == list(LPCLIP_COARSE_C)
    assert math.log10(search.C) == pytest.approx(0.296875, abs=1e-12)
    # A brute-force dense grid puts the optimum at 0.3: the search ends within its last interval of it.
    dense = np.linspace(-7, 7, 14001)
    best = dense[np.argmax([-abs(x - 0.3) for x in dense])]
    assert abs(math.log10(search.C) - best) <= 0.3125 - 0.296875


def test_lpclip_search_ties_keep_the_first_coarse_value_and_the_left_end() -> None:
    """Equal accuracies everywhere: the coarse argmax is the first value (1e6), and every round keeps its
    left end, 1e5, so the interval shrinks onto it from the right."""
    search = lpclip_search(lambda c: 50.0)
    assert pytest.approx(1e5, rel=1e-12) == search.C
    assert [lc for lc, _, _, _ in search.rounds] == pytest.approx([1e5] * 8, rel=1e-12)
    assert [math.log10(rc) for _, _, rc, _ in search.rounds] == pytest.approx(
        [7, 6, 5.5, 5.25, 5.125, 5.0625, 5.03125, 5.015625], abs=1e-12)


# ------------------------------------------------------------------------------------------- the probe


def scaled_problem(seed: int = 3, classes: int = 4, shots: int = 4, dim: int = 16) -> tuple[FewShotFeatures, torch.Tensor]:
    """Noisy Gaussian classes with per-row scales from 0.2 to 5, so normalising the features matters.
    Returns the split (its `train` holds unrelated "augmented views") and the plain train features."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(classes).repeat_interleave(n)
        x = means[y] + torch.randn(len(y), dim, generator=g)
        return x * torch.empty(len(y), 1).uniform_(0.2, 5.0, generator=g), y

    plain, train_y = sample(shots)
    val, val_y = sample(8)
    test, test_y = sample(20)
    views = torch.randn(len(train_y), 3, dim, generator=g)  # must not be used
    return FewShotFeatures(["a", "b", "c", "d"][:classes], views, train_y, val, val_y, test, test_y), plain


def sklearn_reference(x: np.ndarray, y: np.ndarray, c: float) -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(solver="lbfgs", max_iter=1000, C=c).fit(x, y)


def test_lpclip_probe_fits_raw_plain_features_like_sklearn() -> None:
    data, plain = scaled_problem()
    result = lpclip_linear_probe(data, plain)
    x, y = plain.double().numpy(), data.train_labels.numpy()
    xv, yv = data.val.double().numpy(), data.val_labels.numpy()

    @functools.cache
    def val_acc(c: float, normalise: bool = False) -> float:
        def norm(a: np.ndarray) -> np.ndarray:
            return a / np.linalg.norm(a, axis=1, keepdims=True) if normalise else a

        return 100.0 * float((sklearn_reference(norm(x), y, c).predict(norm(xv)) == yv).mean())

    search = result["search"]
    seen = [*search.coarse, *[p for r in search.rounds for p in (r[:2], r[2:])]]
    assert [acc for _, acc in seen] == pytest.approx([val_acc(c) for c, _ in seen])
    # The features are used raw: on normalised ones some coarse C scores differently.
    assert any(val_acc(c, normalise=True) != acc for c, acc in search.coarse)
    final = sklearn_reference(x, y, result["C"])
    assert result["val_acc"] == pytest.approx(val_acc(result["C"]))
    assert result["test_acc"] == pytest.approx(
        100.0 * float((final.predict(data.test.double().numpy()) == data.test_labels.numpy()).mean()))
    assert lpclip_linear_probe(data, plain) == result  # deterministic


# ------------------------------------------------------------------------------------------ the grid probe


def test_grid_probe_picks_c_on_val_like_sklearn(tiny):
    from sklearn.linear_model import LogisticRegression

    data = separable_problem(tiny, CLASSNAMES)
    data.val_labels = data.val_labels.roll(1)  # mislabel val so the C values disagree on it
    grid = (1e-3, 1.0, 100.0)
    result = grid_linear_probe(data, c_grid=grid)
    x = F.normalize(data.train.flatten(0, 1), dim=-1).numpy()
    y = data.train_labels.repeat_interleave(data.train.shape[1]).numpy()
    reference = {}
    for c in grid:
        clf = LogisticRegression(C=c, max_iter=1000, random_state=0).fit(x, y)
        reference[c] = 100.0 * float((clf.predict(F.normalize(data.val, dim=-1).numpy()) == data.val_labels.numpy()).mean())
    assert result["val_by_C"] == pytest.approx(reference)
    assert result["C"] == max(grid, key=lambda c: (reference[c], -grid.index(c)))
    assert result["val_acc"] == pytest.approx(reference[result["C"]])
