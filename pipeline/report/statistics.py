"""The report's numbers: mean ± std over seeds, the best configuration per CoOp variant, hyperparameter effects."""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from statistics import fmean, pstdev
from typing import Any, NamedTuple

from pipeline.evaluate.methods import COOP, PROBE
from pipeline.report.labels import HYPERPARAMETER_NAMES, METHOD_NAMES, probe_method, variant_label

# The hyperparameters whose effect the sweep section shows, where the sweep varied them.
HYPERPARAMETERS = ("n_ctx", "ctx_init", "csc", "class_token_position", "lr", "epochs", "precision")


def number_or_nan(value: str | None) -> float:
    """A CSV cell as a float; empty or unreadable cells (failed trials, no val split) are NaN."""
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean and population std (ddof=0, as CoOp's result parser) of the finite values, and their count."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    return fmean(finite), pstdev(finite), len(finite)


@dataclass
class AccuracyPoint:
    """One point of a curve: mean ± std over seeds of one method's test accuracy at one dataset x shots."""

    method: str
    dataset: str
    shots: int
    mean: float
    std: float
    n: int
    config: str = ""
    trial_keys: list[str] = field(default_factory=list)


def coop_points(trials: Sequence[dict[str, Any]]) -> list[AccuracyPoint]:
    """Per dataset x shots x variant, the configuration with the best mean val accuracy (most seeds first)."""
    groups: dict[tuple[str, int, str, str], list[dict[str, Any]]] = defaultdict(list)
    for t in trials:
        groups[(t["dataset"], t["shots"], variant_label(t), t["config"])].append(t)
    best: dict[tuple[str, int, str], tuple[tuple[int, float], list[dict[str, Any]]]] = {}
    for (dataset, shots, variant, _), members in groups.items():
        val = mean_std(m["val_acc"] for m in members)[0]
        score = (len(members), val if math.isfinite(val) else -math.inf)
        key = (dataset, shots, variant)
        if key not in best or score > best[key][0]:
            best[key] = (score, members)
    out = []
    for (dataset, shots, variant), (_, members) in sorted(best.items()):
        mean, std, n = mean_std(m["test_acc"] for m in members)
        out.append(AccuracyPoint(variant, dataset, shots, mean, std, n, members[0]["config"],
                                 [m["trial_key"] for m in members]))
    return out


def baseline_points(rows: Sequence[dict[str, str]]) -> list[AccuracyPoint]:
    """baselines.csv rows as points, one series per method (per protocol for the linear probe)."""
    groups: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in rows:
        method = probe_method(r.get("protocol") or "") if r["method"] == PROBE else r["method"]
        groups[(method, r["dataset"], int(r["shots"]))].append(number_or_nan(r["test_acc"]))
    return [AccuracyPoint(method, dataset, shots, *mean_std(values)) for (method, dataset, shots), values in
            sorted(groups.items())]


def average_points(points: Sequence[AccuracyPoint], datasets: Sequence[str]) -> list[AccuracyPoint]:
    """Mean over datasets of each method's per-dataset means, where every dataset has that point."""
    groups: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for p in points:
        groups[(p.method, p.shots)][p.dataset] = p.mean
    out = []
    for (method, shots), values in sorted(groups.items()):
        if set(datasets) <= set(values):
            out.append(AccuracyPoint(method, "Average", shots, fmean(values[d] for d in datasets), math.nan,
                                     len(datasets)))
    return out


def best_context_trials(trials: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each dataset, the trial whose learned context the page interprets: the best by val at the
    dataset's largest shot count, unified contexts preferred (one row of words per position, as in the
    paper's interpretation table)."""
    by_dataset: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in trials:
        by_dataset[t["dataset"]].append(t)
    out: dict[str, dict[str, Any]] = {}
    for dataset, members in sorted(by_dataset.items()):
        top = max(m["shots"] for m in members)
        candidates = [m for m in members if m["shots"] == top]
        unified = [m for m in candidates if not m["csc"]]
        finite = [m for m in (unified or candidates) if math.isfinite(m["val_acc"])]
        if finite:
            out[dataset] = max(finite, key=lambda m: (m["val_acc"], -m["seed"]))
    return out


@dataclass
class DomainShiftTable:
    """domain_shift.csv summarised: each method's accuracy on the source's test set and the shifted ones."""

    source: str
    targets: list[str]  # every evaluated test set in file order, the source's included
    coop_shots: list[int]
    accuracy: dict[str, dict[str, tuple[float, float, int]]]  # method label -> target -> (mean, std, n)
    target_average: dict[str, float]  # method label -> mean over the shifted sets (NaN unless it has them all)


def domain_shift_table(rows: Sequence[dict[str, str]]) -> DomainShiftTable | None:
    """Mean ± std over seeds per method (CoOp rows by variant) and test set, in the file's order; None without rows."""
    if not rows:
        return None
    targets = list(dict.fromkeys(r["target"] for r in rows))
    source = rows[0]["source"]
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        name = METHOD_NAMES.get(r["method"], r["method"]) if r["method"] != COOP else variant_label(
            {"n_ctx": int(r["n_ctx"]), "ctx_init": r["ctx_init"], "csc": r["csc"] == "True",
             "class_token_position": r["class_token_position"]})
        groups[name][r["target"]].append(number_or_nan(r["test_acc"]))
    shifted = [t for t in targets if t != source]
    accuracy = {name: {t: mean_std(values) for t, values in by_target.items()} for name, by_target in groups.items()}
    target_average = {}
    for name, by_target in accuracy.items():
        target_means = [by_target[t][0] for t in shifted if t in by_target]
        target_average[name] = fmean(target_means) if len(target_means) == len(shifted) and shifted else math.nan
    coop_shots = sorted({int(r["shots"]) for r in rows if r["method"] == COOP})
    return DomainShiftTable(source, targets, coop_shots, accuracy, target_average)


class ValueEffect(NamedTuple):
    """The trials with one value of a hyperparameter: their accuracies minus their setting's mean."""

    value: Any
    val_deltas: list[float]
    test_deltas: list[float]


def hyperparameter_effects(trials: Sequence[dict[str, Any]]) -> dict[str, list[ValueEffect]]:
    """For each hyperparameter the sweep really varied (within some dataset x shots x seed): per value, the
    trials' val and test accuracy relative to the mean of their dataset x shots x seed group."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for t in trials:
        groups[(t["dataset"], t["shots"], t["seed"])].append(t)
    varied = [k for k in HYPERPARAMETERS if any(len({json.dumps(m[k]) for m in g}) > 1 for g in groups.values())]
    out: dict[str, list[ValueEffect]] = {}
    for key in varied:
        by_value: dict[str, ValueEffect] = {}
        for members in groups.values():
            if len({json.dumps(m[key]) for m in members}) < 2:
                continue  # this group says nothing about `key`
            val_mean = mean_std(m["val_acc"] for m in members)[0]
            test_mean = mean_std(m["test_acc"] for m in members)[0]
            for m in members:
                effect = by_value.setdefault(json.dumps(m[key]), ValueEffect(m[key], [], []))
                effect.val_deltas.append(m["val_acc"] - val_mean)
                effect.test_deltas.append(m["test_acc"] - test_mean)
        out[key] = sorted(by_value.values(), key=lambda e: str(e.value))
    return out


def param_importances(trials: Sequence[dict[str, Any]], keys: Sequence[str]) -> tuple[dict[str, float] | None, str]:
    """fANOVA importances over an Optuna study rebuilt from the trials (objective: val acc minus its
    dataset x shots x seed mean, so differences between datasets and shot counts do not count). A key that
    mirrors another one to one is reported under the other's name as "a = b". (None, why) when not computed."""
    if not keys:
        return None, "the sweep varied no hyperparameter"
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    twins = independent_keys(trials, keys)
    keys = list(twins)
    groups: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    for t in trials:
        groups[(t["dataset"], t["shots"], t["seed"])].append(t["val_acc"])
    means = {k: mean_std(v)[0] for k, v in groups.items()}
    choices = {k: sorted({optuna_choice(t[k]) for t in trials}, key=str) for k in keys}
    distributions = {k: CategoricalDistribution(v) for k, v in choices.items() if len(v) > 1}
    if not distributions:
        return None, "no hyperparameter took more than one value"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for t in trials:
        value = t["val_acc"] - means[(t["dataset"], t["shots"], t["seed"])]
        if not math.isfinite(value):
            continue
        study.add_trial(optuna.trial.create_trial(
            params={k: optuna_choice(t[k]) for k in distributions}, distributions=distributions, value=value))
    if len(study.trials) < 2:
        return None, "fewer than two finished trials"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
        names = {k: " = ".join(HYPERPARAMETER_NAMES.get(x, x) for x in [k, *twins[k]]) for k in importances}
        return {names[k]: v for k, v in importances.items()}, ""
    except (RuntimeError, ValueError, ZeroDivisionError) as error:
        return None, f"fANOVA could not be computed ({error})"


def independent_keys(trials: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, list[str]]:
    """`keys` without those that mirror an earlier key one to one over the trials, mapped to the keys they
    stand for (a word initialisation fixes M, so with one init word list n_ctx and ctx_init carry the same
    information, and fANOVA would split one effect between them)."""
    def one_to_one(a: str, b: str) -> bool:
        pairs = {(json.dumps(t[a]), json.dumps(t[b])) for t in trials}
        return len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})

    kept: dict[str, list[str]] = {}
    for key in keys:
        twin = next((other for other in kept if one_to_one(other, key)), None)
        if twin is None:
            kept[key] = []
        else:
            kept[twin].append(key)
    return kept


def optuna_choice(value: Any) -> Any:
    """A hyperparameter value as an Optuna categorical choice (which takes only None, bool, int, float, str)."""
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
