"""The report's numbers: selection by validation accuracy, averages, domain-shift summary, hyperparameter effects."""

from __future__ import annotations

import math
from typing import Any

import pytest
from report_helpers import trial_row

from pipeline.report.collect import typed_trial
from pipeline.report.statistics import (
    average_points,
    baseline_points,
    best_context_trials,
    coop_points,
    domain_shift_table,
    hyperparameter_effects,
    independent_keys,
    mean_std,
    param_importances,
)


def typed(dataset: str, shots: int, seed: int, val: float, test: float, **hyper: Any) -> dict[str, Any]:
    """A trial as the report holds it: a trials.csv row read back as strings, then typed."""
    return typed_trial({k: str(v) for k, v in trial_row(dataset, shots, seed, val, test, **hyper).items()})


def test_mean_std_is_over_finite_values_with_population_std() -> None:
    assert mean_std([1.0, math.nan, 3.0]) == (2.0, 1.0, 2)
    mean, std, n = mean_std([math.nan])
    assert math.isnan(mean) and math.isnan(std) and n == 0


def test_each_variant_uses_the_configuration_best_on_validation_never_test() -> None:
    trials = []
    for seed in (1, 2):
        trials.append(typed("D", 16, seed, val=95, test=90 + seed, lr=0.002))  # best on val
        trials.append(typed("D", 16, seed, val=85, test=99, lr=0.02))  # best on test
        trials.append(typed("D", 16, seed, val=90, test=88, csc=True))
    points = {p.method: p for p in coop_points(trials)}
    assert set(points) == {"CoOp M=16, end, unified", "CoOp M=16, end, CSC"}
    paper = points["CoOp M=16, end, unified"]
    assert paper.config == trials[0]["config"]
    assert (paper.mean, paper.std, paper.n) == (91.5, 0.5, 2)
    assert paper.trial_keys == [trials[0]["trial_key"], trials[3]["trial_key"]]


def test_a_configuration_with_more_seeds_wins_over_a_better_one_with_fewer() -> None:
    trials = [typed("D", 1, 1, val=99, test=50, lr=0.02)]
    trials += [typed("D", 1, seed, val=60, test=70, lr=0.002) for seed in (1, 2)]
    (point,) = coop_points(trials)
    assert point.mean == 70 and point.n == 2


def test_baseline_points_are_one_series_per_linear_probe_protocol() -> None:
    rows = [{"method": "linear-probe", "protocol": protocol, "dataset": "D", "shots": "4", "test_acc": str(acc)}
            for protocol, acc in (("lpclip", 50), ("lpclip", 52), ("grid", 40), ("", 30))]
    rows.append({"method": "zero-shot", "dataset": "D", "shots": "0", "test_acc": ""})
    points = {p.method: p for p in baseline_points(rows)}
    assert points["linear-probe/lpclip"].mean == 51 and points["linear-probe/grid"].mean == 40
    assert points["linear-probe"].mean == 30  # rows from before protocols were recorded
    assert points["zero-shot"].n == 0


def test_the_average_needs_every_dataset() -> None:
    points = baseline_points([{"method": "zero-shot", "dataset": d, "shots": str(s), "test_acc": str(a)}
                              for d, s, a in (("A", 1, 10), ("B", 1, 30), ("A", 2, 50))])
    (average,) = average_points(points, ["A", "B"])
    assert (average.dataset, average.shots, average.mean, average.n) == ("Average", 1, 20, 2)


def test_the_interpreted_context_is_the_best_unified_one_at_the_most_shots() -> None:
    trials = [typed("D", 16, 1, val=80, test=0), typed("D", 16, 2, val=80, test=0),
              typed("D", 16, 3, val=99, test=0, csc=True), typed("D", 4, 1, val=100, test=0),
              typed("E", 8, 1, val=70, test=0, csc=True)]
    best = best_context_trials(trials)
    assert (best["D"]["seed"], best["D"]["csc"]) == (1, False)  # equal val: the lower seed
    assert best["E"]["csc"]  # no unified context: the CSC one


def test_domain_shift_table_averages_the_shifted_sets_only() -> None:
    def row(method: str, target: str, acc: float, seed: int = 1) -> dict[str, str]:
        coop = method == "CoOp"
        return {"method": method, "n_ctx": "16" if coop else "", "ctx_init": "", "csc": "False" if coop else "",
                "class_token_position": "end" if coop else "", "source": "ImageNet", "target": target,
                "shots": "16" if coop else "0", "seed": str(seed), "test_acc": str(acc)}

    rows = [row("CoOp", "ImageNet", 60, 1), row("CoOp", "ImageNet", 62, 2), row("CoOp", "ImageNetV2", 50),
            row("CoOp", "ImageNetA", 30), row("zero-shot", "ImageNet", 55), row("zero-shot", "ImageNetV2", 45)]
    table = domain_shift_table(rows)
    assert table is not None and domain_shift_table([]) is None
    assert (table.source, table.targets, table.coop_shots) == ("ImageNet", ["ImageNet", "ImageNetV2", "ImageNetA"],
                                                                [16])
    coop = table.accuracy["CoOp M=16, end, unified"]
    assert coop["ImageNet"] == (61, 1, 2)
    assert table.target_average["CoOp M=16, end, unified"] == 40  # (50 + 30) / 2; the source does not count
    assert math.isnan(table.target_average["Zero-shot CLIP"])  # no ImageNetA result


def test_hyperparameter_effects_are_relative_to_their_setting() -> None:
    trials = [typed("D", 1, 1, val=80, test=70, lr=0.002), typed("D", 1, 1, val=70, test=90, lr=0.02),
              typed("E", 1, 1, val=10, test=10)]  # alone in its setting: says nothing
    effects = hyperparameter_effects(trials)
    assert list(effects) == ["lr"]
    by_value = {e.value: e for e in effects["lr"]}
    assert by_value[0.002].val_deltas == [5] and by_value[0.002].test_deltas == [-10]
    assert by_value[0.02].val_deltas == [-5] and by_value[0.02].test_deltas == [10]


def test_importances_cover_the_varied_hyperparameters() -> None:
    trials = [typed("D", shots, seed, val=80 + 3 * seed + (5 if csc else 0) + (2 if lr == 0.02 else 0), test=0,
                    lr=lr, csc=csc)
              for shots in (1, 16) for seed in (1, 2) for lr in (0.002, 0.02) for csc in (False, True)]
    importances, why = param_importances(trials, ["csc", "lr"])
    assert why == "" and set(importances) == {"class-specific context (CSC)", "learning rate"}
    assert sum(importances.values()) == pytest.approx(1.0)
    assert importances["class-specific context (CSC)"] > importances["learning rate"]
    assert param_importances(trials, []) == (None, "the sweep varied no hyperparameter")


def test_mirrored_hyperparameters_are_reported_once() -> None:
    trials = [typed("D", 1, 1, 50, 50, **hyper)
              for hyper in ({"n_ctx": 16, "ctx_init": "", "csc": False}, {"n_ctx": 4, "ctx_init": "a photo of a"},
                            {"n_ctx": 16, "ctx_init": "", "csc": True})]
    assert independent_keys(trials, ["n_ctx", "ctx_init", "csc"]) == {"n_ctx": ["ctx_init"], "csc": []}
