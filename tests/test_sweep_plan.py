"""Sweep planning: the trials of grid/random/optuna, the checks before anything starts, the dry-run listing."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from pipeline.params import Params, params_from_dict
from pipeline.sweep.plan import SweepError, check_precision, feature_key, plan_sweep
from pipeline.sweep.space import SpaceError, build_space, trial_key


def make_params(space: dict[str, Any], **sweep: Any) -> Params:
    return params_from_dict({"data": {"datasets": ["FashionMNIST"], "shots": [1], "seeds": [1, 2]},
                             "sweep": {"space": space, **sweep}})


def test_plan_caps_samples_and_grid_ignores_them() -> None:
    space = {"n_ctx": [4, 8]}  # x 2 seeds: 4 distinct configurations
    grid = plan_sweep(make_params(space, search="grid", num_samples=1))
    assert grid.configs == build_space(make_params(space)).enumerate() and grid.num_samples == 4
    random = plan_sweep(make_params(space, search="random", num_samples=3))
    assert len(random.configs) == 3 and random.num_samples == 3
    assert len({trial_key(c) for c in random.configs}) == 3
    optuna = plan_sweep(make_params(space, search="optuna", num_samples=50))
    assert optuna.num_samples == 4 and len(optuna.configs) == 4


def test_random_draw_is_seeded_by_optuna_seed() -> None:
    space = {"n_ctx": [2, 4, 8, 16], "csc": [False, True]}
    draw = [trial_key(c) for c in plan_sweep(make_params(space, search="random", num_samples=5)).configs]
    assert draw == [trial_key(c) for c in plan_sweep(make_params(space, search="random", num_samples=5)).configs]
    other = plan_sweep(make_params(space, search="random", num_samples=5, optuna_seed=1)).configs
    assert draw != [trial_key(c) for c in other]


def test_plan_refuses_what_cannot_run() -> None:
    with pytest.raises(SpaceError, match="nothing to search"):
        plan_sweep(make_params({}, search="optuna"))
    params = make_params({"n_ctx": [4, 8]})
    # Flags replace validated params, so the plan checks the counts again and names them.
    with pytest.raises(SweepError, match=r"sweep\.num_samples .*got 0, 2"):
        plan_sweep(replace(params, sweep=replace(params.sweep, num_samples=0)))
    with pytest.raises(SweepError, match=r"sweep\.max_concurrent"):
        plan_sweep(replace(params, sweep=replace(params.sweep, max_concurrent=-1)))


def test_fp16_and_amp_need_a_gpu_per_trial() -> None:
    for precision in ("fp16", "amp"):
        params = make_params({"precision": ["fp32", precision]})
        with pytest.raises(SweepError, match=f"precision {precision} needs a GPU.*sweep.gpus_per_trial"):
            check_precision(params, plan_sweep(params))
        check_precision(replace(params, sweep=replace(params.sweep, gpus_per_trial=0.5)), plan_sweep(params))
    params = make_params({"precision": ["fp32", "bf16", "fp16-official"]})
    check_precision(params, plan_sweep(params))


def test_fingerprint_changes_with_the_search_and_space_only() -> None:
    base = plan_sweep(make_params({"n_ctx": [4, 8]})).fingerprint()
    assert plan_sweep(make_params({"n_ctx": [4, 8]}, max_concurrent=5)).fingerprint() == base
    assert plan_sweep(make_params({"n_ctx": [4, 16]})).fingerprint() != base
    assert plan_sweep(make_params({"n_ctx": [4, 8]}, search="random")).fingerprint() != base


def test_describe_lists_every_trial_and_the_count() -> None:
    plan = plan_sweep(make_params({"n_ctx": [4, 8], "ctx_init": ["", "a photo of a"]}))
    listing = plan.describe()
    assert listing.startswith("grid: 6 trials:")  # (2 random-init n_ctx + 1 word init) x 2 seeds
    for config in plan.configs:
        assert trial_key(config) in listing
    assert "'a photo of a'" in listing and "6 trial(s) would run (grid; max 2 at a time)." in listing
    assert "... 4 more" in plan.describe(limit=2)
    optuna = plan_sweep(make_params({"n_ctx": [4, 8]}, search="optuna", num_samples=3)).describe()
    assert optuna.startswith("optuna (TPE): up to 3 trials") and "3 trial(s) would run" in optuna


def test_triples_are_the_feature_sets_the_trials_need() -> None:
    plan = plan_sweep(params_from_dict({"data": {"shots": [1, 2], "seeds": [1, 2]},
                                        "sweep": {"space": {"n_ctx": [4, 8]}}}))
    assert plan.triples == [("FashionMNIST", s, seed) for s in (1, 2) for seed in (1, 2)]
    assert len({feature_key(*t) for t in plan.triples}) == 4
