"""The report's numbers: mean ± std and 95% CI over seeds, the val-selected configurations, base-to-new and
cross-dataset results, matched hyperparameter comparisons."""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from statistics import fmean, pstdev
from typing import Any, NamedTuple

from pipeline.data.protocols import BASE2NEW, XD, harmonic_mean
from pipeline.evaluate.methods import BASE_CLASSES, LEARNED_METHOD_NAMES, NEW_CLASSES, PROBE, ZERO_SHOT
from pipeline.report.labels import (
    COOP_BEST,
    DEFAULT_METHOD,
    DEFAULT_PROTOCOL,
    HYPERPARAMETER_NAMES,
    METHOD_NAMES,
    probe_method,
    variant_label,
)

# The hyperparameters whose effect the sweep section shows, where the sweep varied them (the methods' own ones
# are null for the other methods).
HYPERPARAMETERS = ("n_ctx", "ctx_init", "csc", "class_token_position", "lr", "epochs", "batch_size", "precision",
                   "kg_weight", "meta_reduction")
# Searches whose trials cover the space evenly enough for fANOVA (Optuna's TPE concentrates on good regions).
COVERING_SEARCHES = ("grid", "random")


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


def ci95(std: float, n: int) -> float:
    """Half-width of the 95% confidence interval as CoOp's parse_test_res.py --ci95 computes it: 1.96 times the
    population std (numpy's default ddof=0) over sqrt(n). NaN for fewer than two values (no spread to speak of)."""
    return 1.96 * std / math.sqrt(n) if n > 1 and math.isfinite(std) else math.nan


def value_order(value: Any) -> tuple[int, Any]:
    """Sort key of hyperparameter values: numbers numerically (4 before 16), then strings; NaN/None first."""
    if isinstance(value, (bool, int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return (1, float(value))
    return (0, "") if value is None or isinstance(value, float) else (2, str(value))


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
    val_mean: float = math.nan  # the seed-averaged val accuracy the configuration was selected on (CoOp only)

    @property
    def ci95(self) -> float:
        return ci95(self.std, self.n)


def best_by_val(members: Sequence[dict[str, Any]], label: Any) -> dict[Any, list[dict[str, Any]]]:
    """Group `members` by label(trial) + config and keep, per label, the configuration with the best
    seed-averaged val accuracy; a configuration with more finished seeds wins over one with fewer (as the
    sweep's summary.csv selects)."""
    groups: dict[tuple[Any, str], list[dict[str, Any]]] = defaultdict(list)
    for t in members:
        groups[(label(t), t["config"])].append(t)
    best: dict[Any, tuple[tuple[int, float], list[dict[str, Any]]]] = {}
    for (key, _), group in groups.items():
        val = mean_std(m["val_acc"] for m in group)[0]
        score = (len(group), val if math.isfinite(val) else -math.inf)
        if key not in best or score > best[key][0]:
            best[key] = (score, group)
    return {key: group for key, (_, group) in best.items()}


def selected_point(method: str, group: Sequence[dict[str, Any]]) -> AccuracyPoint:
    """The test accuracy (mean ± std over seeds) of one selected configuration's trials."""
    first = group[0]
    mean, std, n = mean_std(m["test_acc"] for m in group)
    return AccuracyPoint(method, first["dataset"], first["shots"], mean, std, n, first["config"],
                         [m["trial_key"] for m in group], mean_std(m["val_acc"] for m in group)[0])


def coop_points(trials: Sequence[dict[str, Any]]) -> list[AccuracyPoint]:
    """Per dataset x shots x variant, the configuration with the best mean val accuracy (most seeds first)."""
    best = best_by_val(trials, lambda t: (t["dataset"], t["shots"], variant_label(t)))
    return [selected_point(variant, group) for (_, _, variant), group in sorted(best.items())]


def best_config_points(trials: Sequence[dict[str, Any]]) -> list[AccuracyPoint]:
    """Per dataset x shots, the one CoOp configuration (any variant; other methods' trials are not CoOp's) with
    the best seed-averaged val accuracy: the series COOP_BEST, each point naming its configuration."""
    best = best_by_val([t for t in trials if t["method"] == DEFAULT_METHOD], lambda t: (t["dataset"], t["shots"]))
    return [selected_point(COOP_BEST, group) for _, group in sorted(best.items())]


def baseline_points(rows: Sequence[dict[str, str]]) -> list[AccuracyPoint]:
    """baselines.csv rows as points, one series per method (per protocol for the linear probe); zero-shot's
    base-to-new rows (on half the classes) are `zero_shot_base_new`'s."""
    groups: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in rows:
        if r["method"] == ZERO_SHOT and r.get("protocol") in (BASE_CLASSES, NEW_CLASSES):
            continue
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


class ContextChoice(NamedTuple):
    """The learned contexts the page interprets for one dataset, at its largest shot count."""

    best: dict[str, Any]  # the trial with the highest val accuracy, CSC or not
    best_unified: dict[str, Any] | None  # the best unified one when `best` is CSC (one row of words per position)


def best_context_trials(trials: Sequence[dict[str, Any]]) -> dict[str, ContextChoice]:
    """For each dataset, the trial with the best val accuracy at the dataset's largest shot count (equal val:
    the lower seed) and, when that one is class-specific, also the best unified one."""
    by_dataset: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in trials:
        by_dataset[t["dataset"]].append(t)
    out: dict[str, ContextChoice] = {}
    for dataset, members in sorted(by_dataset.items()):
        top = max(m["shots"] for m in members)
        finite = [m for m in members if m["shots"] == top and math.isfinite(m["val_acc"])]
        if not finite:
            continue
        best = max(finite, key=lambda m: (m["val_acc"], -m["seed"]))
        unified = [m for m in finite if not m["csc"]]
        best_unified = max(unified, key=lambda m: (m["val_acc"], -m["seed"])) if best["csc"] and unified else None
        out[dataset] = ContextChoice(best, best_unified)
    return out


@dataclass
class DomainShiftTable:
    """domain_shift.csv summarised: each method's accuracy on the source's test set and the shifted ones."""

    source: str
    targets: list[str]  # every evaluated test set in file order, the source's included
    coop_shots: list[int]  # the learned methods' shot counts
    accuracy: dict[str, dict[str, tuple[float, float, int]]]  # method label -> target -> (mean, std, n)
    target_average: dict[str, float]  # method label -> mean over the shifted sets (NaN unless it has them all)


def domain_shift_table(rows: Sequence[dict[str, str]]) -> DomainShiftTable | None:
    """Mean ± std over seeds per method (learned methods' rows by variant, and by protocol beyond few-shot) and test
    set, in the file's order; None without rows."""
    if not rows:
        return None
    targets = list(dict.fromkeys(r["target"] for r in rows))
    source = rows[0]["source"]
    method_ids = {name: method for method, name in LEARNED_METHOD_NAMES.items()}  # rows name methods as papers do
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        name = METHOD_NAMES.get(r["method"], r["method"])
        if r["method"] in method_ids:
            name = variant_label({"method": method_ids[r["method"]], "n_ctx": int(r["n_ctx"]), "ctx_init": r["ctx_init"],
                                  "csc": r["csc"] == "True", "class_token_position": r["class_token_position"]})
            if r.get("protocol") not in (None, "", DEFAULT_PROTOCOL):
                name += f" ({r['protocol']} trials)"
        groups[name][r["target"]].append(number_or_nan(r["test_acc"]))
    shifted = [t for t in targets if t != source]
    accuracy = {name: {t: mean_std(values) for t, values in by_target.items()} for name, by_target in groups.items()}
    target_average = {}
    for name, by_target in accuracy.items():
        target_means = [by_target[t][0] for t in shifted if t in by_target]
        target_average[name] = fmean(target_means) if len(target_means) == len(shifted) and shifted else math.nan
    coop_shots = sorted({int(r["shots"]) for r in rows if r["method"] in method_ids})
    return DomainShiftTable(source, targets, coop_shots, accuracy, target_average)


def setting(trial: dict[str, Any]) -> tuple[str, str, str, int, int]:
    """What hyperparameter comparisons hold fixed besides the hyperparameters: dataset, protocol, method, shots,
    seed (methods differ in more than one setting, their own hyperparameter and recipe: the page compares them in
    its per-dataset tables, not as a hyperparameter)."""
    return trial["dataset"], trial["protocol"], trial["method"], trial["shots"], trial["seed"]


def varied_hyperparameters(trials: Sequence[dict[str, Any]]) -> list[str]:
    """The HYPERPARAMETERS that take more than one value within some dataset x protocol x method x shots x seed
    setting (the epochs of CoOp's per-shot schedule change between shot counts only: not varied)."""
    groups: dict[tuple[str, str, str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for t in trials:
        groups[setting(t)].append(t)
    return [k for k in HYPERPARAMETERS if any(len({json.dumps(m[k]) for m in g}) > 1 for g in groups.values())]


@dataclass
class MatchedEffect:
    """Matched comparisons of one hyperparameter value against another: pairs of trials with the same dataset,
    shots and seed and the same value of every other hyperparameter; deltas are value minus reference."""

    keys: tuple[str, ...]  # the hyperparameter, or twins the sweep only changed together (n_ctx and ctx_init)
    value: tuple[Any, ...]
    reference: tuple[Any, ...]
    condition: tuple[tuple[str, Any], ...]  # the other varied hyperparameters' values, the same in every pair
    val_deltas: list[float] = field(default_factory=list)
    test_deltas: list[float] = field(default_factory=list)
    shots: list[int] = field(default_factory=list)  # each pair's shot count

    def test_deltas_at(self, shots: int) -> list[float]:
        return [d for d, k in zip(self.test_deltas, self.shots, strict=True) if k == shots]


def matched_effects(trials: Sequence[dict[str, Any]]) -> tuple[list[MatchedEffect], list[tuple[str, ...]]]:
    """Every matched comparison the trials allow, and the varied hyperparameters that have none.

    Hyperparameters that mirror each other one to one (independent_keys) are one factor. Within each match
    (dataset, protocol, method, shots, seed and all other hyperparameters equal) every value is compared with the match's
    smallest value (value_order: 4 before 16, unified before CSC); the pairs are pooled per value, reference
    and condition, so each difference is stated only for the settings it was measured in.
    """
    varied = varied_hyperparameters(trials)
    effects: dict[tuple[str, ...], MatchedEffect] = {}
    unmatched: list[tuple[str, ...]] = []
    for lead, twins in independent_keys(trials, varied).items():
        keys = (lead, *twins)
        others = [k for k in HYPERPARAMETERS if k not in keys]
        shown = [k for k in varied if k not in keys]
        matches: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
        for t in trials:
            match = json.dumps([*setting(t), *(t[k] for k in others)])
            matches[match][json.dumps([t[k] for k in keys])].append(t)
        found = False
        for by_value in matches.values():
            if len(by_value) < 2:
                continue
            found = True
            groups = sorted(by_value.values(), key=lambda g: [value_order(g[0][k]) for k in keys])
            reference = groups[0]
            condition = tuple((k, reference[0][k]) for k in shown)
            for group in groups[1:]:
                value = tuple(group[0][k] for k in keys)
                ref_value = tuple(reference[0][k] for k in keys)
                effect = effects.setdefault(json.dumps([keys, value, ref_value, condition]),
                                            MatchedEffect(keys, value, ref_value, condition))
                for metric, deltas in (("val_acc", effect.val_deltas), ("test_acc", effect.test_deltas)):
                    deltas.append(mean_std(m[metric] for m in group)[0] - mean_std(m[metric] for m in reference)[0])
                effect.shots.append(reference[0]["shots"])
        if not found:
            unmatched.append(keys)

    def order(e: MatchedEffect) -> list[Any]:
        return [varied.index(e.keys[0]), [value_order(v) for _, v in e.condition],
                [value_order(v) for v in e.value], [value_order(v) for v in e.reference]]

    return sorted(effects.values(), key=order), unmatched


def importance_trials(trials: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """The trials fANOVA may use (those of a grid or random search: its importances assume the trials cover
    the space) and, when some are left out, a sentence saying which and why."""
    covering = [t for t in trials if t.get("search") in COVERING_SEARCHES]
    left_out = defaultdict(int)
    for t in trials:
        if t.get("search") not in COVERING_SEARCHES:
            left_out[t.get("search") or "unknown"] += 1
    if not left_out:
        return covering, ""
    counts = ", ".join(f"{n} {'Optuna TPE' if s == 'optuna' else s}" for s, n in sorted(left_out.items()))
    return covering, (f"left out: {counts} trials (fANOVA assumes trials that cover the space, as a grid or random "
                      "search draws them; a TPE search concentrates on the regions it found good)")


def param_importances(trials: Sequence[dict[str, Any]], keys: Sequence[str]) -> tuple[dict[str, float] | None, str]:
    """fANOVA importances over an Optuna study rebuilt from the trials (objective: val acc minus its
    dataset x protocol x method x shots x seed mean, so differences between those settings do not count). A key that
    mirrors another one to one is reported under the other's name as "a + b". (None, why) when not computed."""
    if not keys:
        return None, "the sweep varied no hyperparameter"
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    twins = independent_keys(trials, keys)
    keys = list(twins)
    groups: dict[tuple[str, str, str, int, int], list[float]] = defaultdict(list)
    for t in trials:
        groups[setting(t)].append(t["val_acc"])
    means = {k: mean_std(v)[0] for k, v in groups.items()}
    choices = {k: sorted({optuna_choice(t[k]) for t in trials}, key=str) for k in keys}
    distributions = {k: CategoricalDistribution(v) for k, v in choices.items() if len(v) > 1}
    if not distributions:
        return None, "no hyperparameter took more than one value"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for t in trials:
        value = t["val_acc"] - means[setting(t)]
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
        names = {k: " + ".join(HYPERPARAMETER_NAMES.get(x, x) for x in [k, *twins[k]]) for k in importances}
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


def protocol_trials(trials: Sequence[dict[str, Any]], protocol: str) -> list[dict[str, Any]]:
    """The trials of one evaluation protocol (few-shot, base-to-new, cross-dataset)."""
    return [t for t in trials if t["protocol"] == protocol]


@dataclass
class BaseNewResult:
    """One method's selected configuration under base-to-new at one dataset x shots (or their average over
    datasets): test accuracy on the base and on the new classes, mean ± std over seeds."""

    base: AccuracyPoint  # .method is the engine's method id; .val_mean the base classes' val accuracy
    new: AccuracyPoint
    seed_h: tuple[float, float, int] = (math.nan, math.nan, 0)  # each trial's own H (h_acc), mean ± std

    @property
    def h(self) -> float:
        """H of the seed-mean base and new accuracies, as CoCoOp's Table 1 computes it from averages."""
        return harmonic_mean(self.base.mean, self.new.mean)


def base_to_new_results(trials: Sequence[dict[str, Any]]) -> list[BaseNewResult]:
    """Per method x dataset x shots, the base-to-new configuration with the best seed-averaged val accuracy on
    the base classes (most finished seeds first, as everywhere): its base and new test accuracy."""
    best = best_by_val(protocol_trials(trials, BASE2NEW), lambda t: (t["method"], t["dataset"], t["shots"]))
    out = []
    for (method, dataset, shots), group in sorted(best.items()):
        base = selected_point(method, group)
        new = AccuracyPoint(method, dataset, shots, *mean_std(t["new_acc"] for t in group), base.config,
                            base.trial_keys, base.val_mean)
        out.append(BaseNewResult(base, new, mean_std(t["h_acc"] for t in group)))
    return out


def zero_shot_base_new(rows: Sequence[dict[str, str]], shots: int) -> list[BaseNewResult]:
    """Zero-shot CLIP's base-to-new row per dataset (baselines.csv's zero-shot rows on the base and new halves),
    at `shots` for the table it joins (zero-shot uses no shots)."""
    halves: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r["method"] == ZERO_SHOT and r.get("protocol") in (BASE_CLASSES, NEW_CLASSES):
            halves[r["dataset"]][r["protocol"]] = number_or_nan(r["test_acc"])
    return [BaseNewResult(AccuracyPoint(ZERO_SHOT, dataset, shots, values[BASE_CLASSES], math.nan, 1),
                          AccuracyPoint(ZERO_SHOT, dataset, shots, values[NEW_CLASSES], math.nan, 1))
            for dataset, values in sorted(halves.items()) if len(values) == 2]


def base_to_new_averages(results: Sequence[BaseNewResult], datasets: Sequence[str]) -> list[BaseNewResult]:
    """Per method x shots with a result on every one of `datasets`: the mean over datasets of the base and of
    the new means (H of those, as the papers' average rows)."""
    bases = {(p.method, p.shots): p for p in average_points([r.base for r in results], datasets)}
    news = {(p.method, p.shots): p for p in average_points([r.new for r in results], datasets)}
    return [BaseNewResult(bases[key], news[key]) for key in sorted(bases.keys() & news.keys())]


@dataclass
class TransferRow:
    """One method's selected cross-dataset configuration on one source at one shot count: its accuracy on the
    source's test set and on each target (mean ± std over seeds)."""

    method: str  # the engine's method id
    source: str
    shots: int
    config: str
    trial_keys: list[str]
    val_mean: float
    source_acc: tuple[float, float, int]
    targets: dict[str, tuple[float, float, int]]  # target -> (mean, std, n); absent: no transfer.csv row
    target_average: float  # mean of the per-target means; NaN unless every target of its source has one


def transfer_table(trials: Sequence[dict[str, Any]], rows: Sequence[dict[str, str]]
                   ) -> tuple[list[TransferRow], dict[str, list[str]]]:
    """Per method x source x shots, the cross-dataset (xd) configuration with the best seed-averaged val accuracy
    on the source, with its trials' transfer.csv accuracies per target; and each source's targets in file order."""
    targets: dict[str, list[str]] = defaultdict(list)
    by_trial: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["target"] not in targets[r["dataset"]]:
            targets[r["dataset"]].append(r["target"])
        by_trial[r["trial_key"]][r["target"]].append(number_or_nan(r["test_acc"]))
    best = best_by_val(protocol_trials(trials, XD), lambda t: (t["dataset"], t["shots"], t["method"]))
    out = []
    for (source, shots, method), group in sorted(best.items()):
        point = selected_point(method, group)
        accuracy = {}
        for target in targets.get(source, []):
            values = [v for t in group for v in by_trial[t["trial_key"]].get(target, [])]
            if values:
                accuracy[target] = mean_std(values)
        means = [accuracy[t][0] for t in targets.get(source, []) if t in accuracy]
        complete = bool(means) and len(means) == len(targets[source]) and all(map(math.isfinite, means))
        out.append(TransferRow(method, source, shots, point.config, point.trial_keys, point.val_mean,
                               (point.mean, point.std, point.n), accuracy, fmean(means) if complete else math.nan))
    return out, {source: list(names) for source, names in targets.items()}
