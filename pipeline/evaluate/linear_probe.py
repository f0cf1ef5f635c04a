"""The linear probe on cached features, in two protocols: the official CoOp one (lpclip) and ours (grid).

`lpclip_linear_probe` runs the official CoOp probe (``lpclip/``): the training images' test-transform
features, not normalised, C from a coarse-then-halving search; `grid_linear_probe` ours: a fixed C grid on
the normalised features of every cached augmented view.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.engine.inputs import FewShotFeatures

log = logging.getLogger(__name__)

# CLIP's protocol sweeps the inverse regularisation strength C; our `grid` protocol uses a coarse log grid.
GRID_C = tuple(float(c) for c in np.logspace(-6, 6, 13))
# The official lpclip search (lpclip/linear_probe.py): these seven C values first, in this order, then
# LPCLIP_STEPS rounds that halve an interval in log10(C) around the best of them (the .sh runs 8 steps).
LPCLIP_COARSE_C = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)
LPCLIP_STEPS = 8
LPCLIP_MAX_ITER = 1000


def grid_linear_probe(data: FewShotFeatures, c_grid: tuple[float, ...] = GRID_C, seed: int = 0) -> dict:
    """Our `grid` protocol: logistic regression on the L2-normalised features, C picked on the val split.

    Trains on every cached (augmented) view of each training image. Returns the chosen C (the first best
    on val), its val and test accuracy, and val accuracy per C.
    """
    from sklearn.linear_model import LogisticRegression

    def norm(t: torch.Tensor) -> np.ndarray:
        return F.normalize(t.float(), dim=-1).numpy()

    n, views, dim = data.train.shape
    x_train = norm(data.train.reshape(n * views, dim))
    y_train = data.train_labels.repeat_interleave(views).numpy()
    x_val, y_val = norm(data.val), data.val_labels.numpy()
    best: tuple[float, float, LogisticRegression] | None = None
    val_by_c = {}
    for c in c_grid:
        clf = LogisticRegression(C=c, max_iter=1000, random_state=seed)
        clf.fit(x_train, y_train)
        val_acc = 100.0 * float((clf.predict(x_val) == y_val).mean()) if len(y_val) else 0.0
        val_by_c[c] = val_acc
        if best is None or val_acc > best[1]:
            best = (c, val_acc, clf)
    assert best is not None
    c, val_acc, clf = best
    test_acc = 100.0 * float((clf.predict(norm(data.test)) == data.test_labels.numpy()).mean())
    return {"C": c, "val_acc": val_acc, "test_acc": test_acc, "val_by_C": val_by_c}


@dataclass
class CSearch:
    """One run of the lpclip C search: the chosen C and every val accuracy it looked at, in order."""

    C: float
    coarse: list[tuple[float, float]]  # (C, val accuracy) over LPCLIP_COARSE_C
    rounds: list[tuple[float, float, float, float]]  # (left C, its val acc, right C, its val acc) per round


def lpclip_search(val_accuracy: Callable[[float], float], coarse: tuple[float, ...] = LPCLIP_COARSE_C,
                  steps: int = LPCLIP_STEPS) -> CSearch:
    """The official lpclip search for C, given the val accuracy of a probe trained with C.

    The first best of `coarse` is the peak; the interval [peak / 10, peak * 10] then goes through `steps`
    rounds: score both ends, keep the better one (the left one on a tie) and halve the interval in log10(C)
    towards it; the answer is the last round's winner. (The winner stays an end of the next interval, and
    the peak comes back as one in round 2.) The arithmetic (numpy log10 / power) is the official one, so
    the C values match it to the bit.
    """
    if steps < 1:
        raise ValueError(f"lpclip_search needs steps >= 1 (the official code reports the last step), got {steps}")
    scored = [(c, val_accuracy(c)) for c in coarse]
    peak = coarse[int(np.argmax([acc for _, acc in scored]))]
    left, right = 1e-1 * peak, 1e1 * peak
    rounds = []
    chosen = peak
    for _ in range(steps):
        acc_left, acc_right = val_accuracy(left), val_accuracy(right)
        rounds.append((left, acc_left, right, acc_right))
        log_left, log_right = np.log10(left), np.log10(right)
        middle = 0.5 * (log_right + log_left)
        if acc_left < acc_right:
            chosen, log_left = right, middle
        else:
            chosen, log_right = left, middle
        left, right = float(np.power(10.0, log_left)), float(np.power(10.0, log_right))
    return CSearch(float(chosen), scored, rounds)


def lpclip_linear_probe(data: FewShotFeatures, train_plain: torch.Tensor) -> dict:
    """The official CoOp linear probe (lpclip/linear_probe.py) on one few-shot split.

    `train_plain` (N, D) holds the features of ``data``'s N training images under the test transform (no
    augmentation; ``data.train``'s augmented views are not used). Features are used as the encoder gives
    them (not normalised), in float64 as the official .npz files load. L-BFGS logistic regression
    (L2, max_iter 1000, sklearn's other defaults), C from `lpclip_search` on ``data.val``. Returns the
    chosen C, its val and test accuracy, and the search.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if train_plain.shape[0] != len(data.train_labels):
        raise ValueError(f"train_plain has {train_plain.shape[0]} rows for {len(data.train_labels)} training labels")
    x_train, y_train = train_plain.double().numpy(), data.train_labels.numpy()
    x_val, y_val = data.val.double().numpy(), data.val_labels.numpy()
    fits: dict[float, tuple[float, LogisticRegression]] = {}  # the search revisits interval ends: fit each C once

    def val_accuracy(c: float) -> float:
        if c not in fits:
            with warnings.catch_warnings():
                # At large C the unnormalised problem often stops at max_iter, as it does in the official run.
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf = LogisticRegression(solver="lbfgs", max_iter=LPCLIP_MAX_ITER, C=c).fit(x_train, y_train)
            fits[c] = (100.0 * float((clf.predict(x_val) == y_val).mean()) if len(y_val) else 0.0, clf)
        return fits[c][0]

    search = lpclip_search(val_accuracy)
    val_acc, clf = fits[search.C]
    test_acc = 100.0 * float((clf.predict(data.test.double().numpy()) == data.test_labels.numpy()).mean())
    log.debug("lpclip: C=%g after %d fits (val %.2f, test %.2f)", search.C, len(fits), val_acc, test_acc)
    return {"C": search.C, "val_acc": val_acc, "test_acc": test_acc, "search": search}
