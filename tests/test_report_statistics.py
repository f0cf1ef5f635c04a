"""The report's numbers: selection by validation accuracy, 95% CIs, averages, domain-shift summary, matched
hyperparameter comparisons and which trials fANOVA may use."""

from __future__ import annotations

import math
from statistics import fmean
from typing import Any

import numpy as np
import pytest
from report_helpers import trial_row

from pipeline.report.collect import typed_trial
from pipeline.report.labels import COOP_BEST
from pipeline.report.statistics import (
    AccuracyPoint,
    average_points,
    baseline_points,
    best_config_points,
    best_context_trials,
    ci95,
    coop_points,
    domain_shift_table,
    importance_trials,
    independent_keys,
    matched_effects,
    mean_std,
    param_importances,
    value_order,
)

PHOTO = "a photo of a"


def typed(dataset: str, shots: int, seed: int, val: float, test: float, search: str = "grid",
          **hyper: Any) -> dict[str, Any]:
    """A trial as the report holds it: a trials.csv row read back as strings, then typed."""
    row = trial_row(dataset, shots, seed, val, test, **hyper)
    return typed_trial({k: "" if v is None else str(v) for k, v in row.items()}, search)  # as the CSV holds it


def test_mean_std_is_over_finite_values_with_population_std() -> None:
    assert mean_std([1.0, math.nan, 3.0]) == (2.0, 1.0, 2)
    mean, std, n = mean_std([math.nan])
    assert math.isnan(mean) and math.isnan(std) and n == 0


def test_ci95_is_coops_parse_test_res_formula() -> None:
    accuracies = [71.2, 74.9, 69.3]
    mean, std, n = mean_std(accuracies)
    # parse_test_res.py --ci95: 1.96 * np.std(res) / np.sqrt(len(res)), numpy's default ddof=0
    assert ci95(std, n) == pytest.approx(1.96 * np.std(accuracies) / np.sqrt(len(accuracies)))
    assert AccuracyPoint("m", "D", 16, mean, std, n).ci95 == pytest.approx(ci95(std, n))
    assert math.isnan(ci95(0.0, 1)) and math.isnan(ci95(math.nan, 3))


def test_values_sort_numerically() -> None:
    assert sorted([16, 4, 8], key=value_order) == [4, 8, 16]
    assert sorted([0.02, 0.002], key=value_order) == [0.002, 0.02]
    assert sorted([True, False], key=value_order) == [False, True]
    assert sorted(["middle", "end", "front"], key=value_order) == ["end", "front", "middle"]


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


def test_best_configuration_is_chosen_on_seed_averaged_val_across_variants() -> None:
    trials = [typed("D", 4, 1, val=99, test=10, csc=True), typed("D", 4, 2, val=41, test=12, csc=True),  # mean 70
              typed("D", 4, 1, val=80, test=50), typed("D", 4, 2, val=80, test=52),  # mean 80: selected
              typed("D", 16, 1, val=90, test=70, csc=True), typed("D", 16, 2, val=92, test=72, csc=True)]
    points = {p.shots: p for p in best_config_points(trials)}
    assert {p.method for p in points.values()} == {COOP_BEST}
    assert (points[4].config, points[4].mean, points[4].val_mean, points[4].n) == (trials[2]["config"], 51, 80, 2)
    assert points[16].config == trials[4]["config"] and points[16].mean == 71


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


def test_the_interpreted_contexts_are_the_best_and_the_best_unified_at_the_most_shots() -> None:
    trials = [typed("D", 16, 1, val=80, test=0), typed("D", 16, 2, val=80, test=0),
              typed("D", 16, 3, val=99, test=0, csc=True), typed("D", 4, 1, val=100, test=0),
              typed("E", 8, 1, val=70, test=0, csc=True), typed("F", 2, 1, val=50, test=0),
              typed("F", 2, 2, val=40, test=0, csc=True)]
    best = best_context_trials(trials)
    # D: the CSC trial has the best val and is shown; the best unified one too (equal val: the lower seed).
    assert (best["D"].best["seed"], best["D"].best["csc"]) == (3, True)
    assert (best["D"].best_unified["seed"], best["D"].best_unified["csc"]) == (1, False)
    assert best["E"].best["csc"] and best["E"].best_unified is None  # no unified context at all
    assert not best["F"].best["csc"] and best["F"].best_unified is None  # the best is unified already


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


def test_domain_shift_rows_of_other_methods_and_protocols_stay_apart() -> None:
    def row(method: str, protocol: str, acc: float, seed: int) -> dict[str, str]:
        return {"method": method, "n_ctx": "4", "ctx_init": PHOTO, "csc": "False", "class_token_position": "end",
                "source": "ImageNet", "target": "ImageNetV2", "shots": "16", "seed": str(seed), "test_acc": str(acc),
                "protocol": protocol}

    rows = [row("CoCoOp", "fewshot", 60, 1), row("CoCoOp", "fewshot", 62, 2), row("CoCoOp", "xd", 50, 1),
            row("CoOp", "fewshot", 40, 1), row("KgCoOp", "", 45, 1)]  # no protocol: few-shot
    table = domain_shift_table(rows)
    assert table is not None and table.coop_shots == [16]
    assert {name: by_target["ImageNetV2"] for name, by_target in table.accuracy.items()} == {
        f"CoCoOp '{PHOTO}' (M=4), end, unified": (61, 1, 2),
        f"CoCoOp '{PHOTO}' (M=4), end, unified (xd trials)": (50, 0, 1),
        f"CoOp '{PHOTO}' (M=4), end, unified": (40, 0, 1),
        f"KgCoOp '{PHOTO}' (M=4), end, unified": (45, 0, 1)}


def demo_grid(shots: tuple[int, ...] = (1, 16), seeds: tuple[int, ...] = (1, 2)) -> list[dict[str, Any]]:
    """The demo's three configurations: M=16 unified, M=16 CSC, and M=4 from 'a photo of a' (unified only)."""
    out = []
    for k in shots:
        for seed in seeds:
            base = 50 + k + seed
            out += [typed("D", k, seed, val=base, test=base + 1),
                    typed("D", k, seed, val=base + 3 * k, test=base + 2 * k, csc=True),
                    typed("D", k, seed, val=base - 2, test=base + 5, n_ctx=4, ctx_init=PHOTO)]
    return out


def test_matched_effects_compare_only_trials_that_differ_in_one_hyperparameter() -> None:
    trials = demo_grid()
    effects, unmatched = matched_effects(trials)
    assert unmatched == []
    (init, csc) = effects
    # 'a photo of a' fixes M=4 and occurs only unified: one factor, compared with M=16 random init among
    # unified contexts only; the reference is the smaller value (M=4 before M=16).
    assert (init.keys, init.value, init.reference) == (("n_ctx", "ctx_init"), (16, ""), (4, PHOTO))
    assert init.condition == (("csc", False),)
    assert init.test_deltas == [-4] * 4 and init.val_deltas == [2] * 4
    # CSC against unified, both M=16 random init: never against the M=4 context.
    assert (csc.keys, csc.value, csc.reference) == (("csc",), (True,), (False,))
    assert csc.condition == (("n_ctx", 16), ("ctx_init", ""))
    assert sorted(zip(csc.shots, csc.test_deltas, strict=True)) == [(1, 1), (1, 1), (16, 31), (16, 31)]
    assert csc.test_deltas_at(16) == [31, 31]


def test_matched_effects_reference_straightforward_pairs() -> None:
    """A full grid n_ctx x csc: every effect is the mean over (dataset, shots, seed) of the paired differences,
    computed here directly, per value of the other hyperparameter."""
    rng = np.random.default_rng(0)
    trials = [typed(d, k, seed, val=float(rng.uniform(0, 100)), test=float(rng.uniform(0, 100)), n_ctx=m, csc=c)
              for d in ("A", "B") for k in (1, 4) for seed in (1, 2) for m in (16, 4) for c in (False, True)]
    effects, unmatched = matched_effects(trials)
    assert unmatched == []
    got = {(e.keys, e.condition): (e.value, e.reference, fmean(e.test_deltas), len(e.test_deltas)) for e in effects}

    def acc(t: dict[str, Any]) -> float:
        return t["test_acc"]

    def paired(key: str, high: Any, low: Any, other: str, fixed: Any) -> float:
        cells = {(t["dataset"], t["shots"], t["seed"], t[key]): acc(t) for t in trials if t[other] == fixed}
        return fmean(cells[(d, k, s, high)] - cells[(d, k, s, low)] for d in ("A", "B") for k in (1, 4) for s in (1, 2))

    for m in (4, 16):
        assert got[(("csc",), (("n_ctx", m),))][:2] == ((True,), (False,))
        assert got[(("csc",), (("n_ctx", m),))][2:] == (pytest.approx(paired("csc", True, False, "n_ctx", m)), 8)
    for c in (False, True):
        assert got[(("n_ctx",), (("csc", c),))][:2] == ((16,), (4,))
        assert got[(("n_ctx",), (("csc", c),))][2] == pytest.approx(paired("n_ctx", 16, 4, "csc", c))
    assert len(effects) == 4


def test_hyperparameters_never_varied_alone_have_no_matched_comparison() -> None:
    # lr and CSC change together in one seed and apart in none: as a small TPE search might leave it.
    trials = [typed("D", 1, 1, val=80, test=70, lr=0.002), typed("D", 1, 1, val=70, test=90, lr=0.02, csc=True),
              typed("D", 1, 2, val=70, test=90, lr=0.002, csc=True),
              typed("E", 1, 1, val=10, test=10)]  # alone in its setting: says nothing
    effects, unmatched = matched_effects(trials)
    assert effects == [] and unmatched == [("csc",), ("lr",)]
    lr_only = [typed("D", 1, 1, val=80, test=70, lr=0.002), typed("D", 1, 1, val=70, test=90, lr=0.02)]
    (lr,) = matched_effects(lr_only)[0]
    assert (lr.value, lr.reference, lr.val_deltas, lr.test_deltas) == ((0.02,), (0.002,), [-10], [20])


def test_importances_use_grid_and_random_trials_only() -> None:
    grid = demo_grid()
    tpe = [typed("D", 1, 1, 50, 50, search="optuna", lr=0.01)]
    covering, why = importance_trials([*grid, *tpe])
    assert covering == grid and "1 Optuna TPE trials" in why and "cover the space" in why
    assert importance_trials(grid) == (grid, "")
    assert importance_trials(tpe)[0] == []


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
    importances, _ = param_importances(demo_grid(), ["n_ctx", "ctx_init", "csc"])
    assert set(importances) == {"context length M + initialisation", "class-specific context (CSC)"}


def test_harmonic_mean_is_cocoops_h() -> None:
    from pipeline.data.protocols import harmonic_mean

    assert harmonic_mean(82.69, 63.22) == pytest.approx(71.656, abs=1e-3)  # CoCoOp's Table 1, CoOp's average
    assert math.isnan(harmonic_mean(80.0, math.nan)) and harmonic_mean(0.0, 0.0) == 0.0


def test_transfer_average_needs_every_target() -> None:
    from pipeline.report.statistics import transfer_table

    trials = [typed("Caltech101", 16, seed, val=80.0, test=70.0 + seed, protocol="xd") for seed in (1, 2)]
    rows = [{"trial_key": t["trial_key"], "dataset": "Caltech101", "target": target, "test_acc": str(acc + t["seed"])}
            for t in trials for target, acc in (("DTD", 40.0), ("EuroSAT", 50.0))]
    (row,), targets = transfer_table(trials, rows)
    assert targets == {"Caltech101": ["DTD", "EuroSAT"]}
    assert row.source_acc == (71.5, 0.5, 2) and row.targets["DTD"] == (41.5, 0.5, 2)
    assert row.target_average == pytest.approx((41.5 + 51.5) / 2)
    # EuroSAT evaluated only for a trial the selection did not pick: no EuroSAT cell, no average.
    (row,), _ = transfer_table(trials, [r for r in rows if r["target"] == "DTD"] + [
        {**rows[1], "trial_key": "another-trial"}])
    assert "EuroSAT" not in row.targets and math.isnan(row.target_average)
