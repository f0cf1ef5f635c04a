"""Search space: canonical CoOp configurations, grid dedupe, random draws, Optuna's conditional space,
the searchers that never hand out a duplicate, and errors that name the bad key."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import optuna
import pytest
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from pipeline.engine.backbone import count_tokens
from pipeline.params import Params, ParamsError, params_from_dict
from pipeline.sweep.searchers import ConfigListSearcher, UniqueSearcher
from pipeline.sweep.space import (
    CONFIG_KEYS,
    SearchSpace,
    SpaceError,
    build_space,
    check_searchable,
    trial_key,
)

WORDS = "a photo of a"


def make_params(space: dict, **sections: dict) -> Params:
    raw = {"data": {"datasets": ["FashionMNIST"], "shots": [1], "seeds": [1, 2]}, "sweep": {"space": space}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return params_from_dict(raw)


def valid(config: dict) -> bool:
    """The CoOp rule, stated independently of the implementation."""
    if config["ctx_init"]:
        return config["csc"] is False and config["n_ctx"] == count_tokens(config["ctx_init"])
    return config["n_ctx"] >= 1


FULL = {"n_ctx": [4, 8, 16], "ctx_init": ["", WORDS], "csc": [False, True], "class_token_position": ["end", "middle"]}


def test_grid_drops_impossible_and_duplicate_combinations() -> None:
    configs = build_space(make_params(FULL)).enumerate()
    # Random init: 3 n_ctx x 2 csc x 2 positions; word init: one n_ctx (its token count), unified only, x 2
    # positions; all per seed (2 seeds).
    assert len(configs) == (3 * 2 * 2 + 1 * 1 * 2) * 2
    assert len({trial_key(c) for c in configs}) == len(configs)
    assert all(valid(c) for c in configs)
    word = [c for c in configs if c["ctx_init"]]
    assert {c["n_ctx"] for c in word} == {count_tokens(WORDS)} == {4}
    assert all(set(c) == set(CONFIG_KEYS) for c in configs)
    # Every possible combination is covered: the raw product, made canonical, gives the same set.
    raw = itertools.product(FULL["n_ctx"], FULL["ctx_init"], FULL["csc"], FULL["class_token_position"], [1, 2])
    expected = set()
    for n_ctx, init, csc, pos, seed in raw:
        if init and csc:
            continue
        expected.add((count_tokens(init) if init else n_ctx, init, csc, pos, seed))
    assert {(c["n_ctx"], c["ctx_init"], c["csc"], c["class_token_position"], c["seed"]) for c in configs} == expected


def test_epochs_null_means_the_per_shot_default_or_train_epochs() -> None:
    configs = build_space(make_params({"epochs": [None, 50]}, data={"shots": [1, 8]})).enumerate()
    by_shots = {s: sorted({c["epochs"] for c in configs if c["shots"] == s}) for s in (1, 8)}
    assert by_shots == {1: [50], 8: [50, 200]}  # 1-shot: default 50 == explicit 50, deduplicated
    configs = build_space(make_params({}, train={"epochs": 7})).enumerate()
    assert {c["epochs"] for c in configs} == {7}


def test_random_draw_is_distinct_valid_seeded_and_capped() -> None:
    space = build_space(make_params(FULL))
    everything = {trial_key(c) for c in space.enumerate()}
    draw = space.sample(10, seed=3)
    keys = [trial_key(c) for c in draw]
    assert len(keys) == len(set(keys)) == 10
    assert set(keys) <= everything and all(valid(c) for c in draw)
    assert keys == [trial_key(c) for c in space.sample(10, seed=3)]
    assert keys != [trial_key(c) for c in space.sample(10, seed=4)]
    assert len(space.sample(1000, seed=0)) == len(everything)


def test_optuna_space_asks_n_ctx_and_csc_only_under_random_init() -> None:
    space = build_space(make_params(FULL))
    define = space.define_by_run()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    branches = set()
    rng = random.Random(0)
    for _ in range(80):
        trial = study.ask()
        config = define(trial)
        assert valid(config)
        if config["ctx_init"]:
            assert "n_ctx" not in trial.params and "csc" not in trial.params
        else:
            assert {"n_ctx", "csc"} <= set(trial.params)
        branches.add(bool(config["ctx_init"]))
        study.tell(trial, rng.random())
    assert branches == {True, False}


def test_optuna_never_offers_word_init_when_csc_must_be_true() -> None:
    space = build_space(make_params({"ctx_init": ["", WORDS], "csc": [True], "n_ctx": [4, 8]}))
    assert all(not c["ctx_init"] for c in space.enumerate())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        assert define_ok(space, study)


def define_ok(space: SearchSpace, study: optuna.Study) -> bool:
    trial = study.ask()
    config = space.define_by_run()(trial)
    study.tell(trial, 0.0)
    return valid(config) and not config["ctx_init"]


@pytest.mark.parametrize(
    ("space", "needle"),
    [
        ({"nctx": [4]}, "sweep.space.nctx"),
        ({"n_ctx": []}, "sweep.space.n_ctx"),
    ],
)
def test_unknown_key_and_empty_range_are_refused_on_load(space: dict, needle: str) -> None:
    with pytest.raises(ParamsError, match=needle.replace(".", r"\.")):
        make_params(space)


@pytest.mark.parametrize(
    ("space", "needle"),
    [
        ({"class_token_position": ["top"]}, "sweep.space.class_token_position"),
        ({"n_ctx": [0]}, "sweep.space.n_ctx"),
        ({"csc": ["yes"]}, "sweep.space.csc"),
        ({"lr": [-1.0]}, "sweep.space.lr"),
        ({"precision": ["fp8"]}, "sweep.space.precision"),
        ({"ctx_init": [WORDS], "csc": [True]}, "no valid combination"),
    ],
)
def test_bad_values_name_the_key(space: dict, needle: str) -> None:
    with pytest.raises(SpaceError, match=needle.replace(".", r"\.")):
        build_space(make_params(space))


def test_optuna_with_nothing_to_search_is_refused() -> None:
    # Only data axes vary; and n_ctx "varies" but a word init pins it.
    for space in ({}, {"n_ctx": [4, 8, 16], "ctx_init": [WORDS]}, {"csc": [False, True], "ctx_init": [WORDS]}):
        with pytest.raises(SpaceError, match="nothing to search"):
            check_searchable(build_space(make_params(space)), "optuna")
        check_searchable(build_space(make_params(space)), "grid")  # a grid over seeds is fine
    check_searchable(build_space(make_params({"lr": [0.002, 0.01]})), "optuna")


def _optuna_searcher(space: SearchSpace, seed: int = 0) -> UniqueSearcher:
    inner = OptunaSearch(space=space.define_by_run(), metric="val_acc", mode="max",
                         sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=2))
    return UniqueSearcher(inner, space)


def test_unique_searcher_hands_out_each_configuration_once_then_finishes() -> None:
    space = build_space(make_params({"n_ctx": [4, 8], "ctx_init": ["", WORDS]}, data={"seeds": [1]}))
    assert len(space.enumerate()) == 3
    searcher = _optuna_searcher(space)
    seen = []
    for i in range(8):
        config = searcher.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            break
        assert config is not None and valid(config)
        seen.append(trial_key(config))
        searcher.on_trial_result(f"t{i}", {"val_acc": 10.0 * i, "training_iteration": 1})
        searcher.on_trial_complete(f"t{i}", {"val_acc": 10.0 * i})
    assert sorted(seen) == sorted(trial_key(c) for c in space.enumerate())
    assert searcher.suggest("t-last") == Searcher.FINISHED


def test_unique_searcher_with_pending_trials_and_restored_state() -> None:
    space = build_space(make_params({"n_ctx": [4, 8, 16], "class_token_position": ["end", "front"]},
                                    data={"seeds": [1]}))
    searcher = _optuna_searcher(space, seed=5)
    first = [searcher.suggest(f"p{i}") for i in range(4)]  # none completes: repeats must still be avoided
    assert len({trial_key(c) for c in first}) == 4
    clone = _optuna_searcher(space, seed=5)
    clone.set_state(searcher.get_state())
    assert set(clone.get_state()["handed"]) == {trial_key(c) for c in first}


def test_config_list_searcher_resumes_from_its_json_state(tmp_path: Path) -> None:
    configs = build_space(make_params({"n_ctx": [4, 8]})).enumerate()
    searcher = ConfigListSearcher(configs)
    assert searcher.suggest("a") == configs[0] and searcher.suggest("b") == configs[1]
    path = tmp_path / "state.json"
    searcher.save(str(path))
    restored = ConfigListSearcher([])
    restored.restore(str(path))
    assert [restored.suggest("c"), restored.suggest("d")] == configs[2:]
    assert restored.suggest("e") == Searcher.FINISHED


def test_the_optuna_study_survives_a_driver_restart(tmp_path: Path) -> None:
    """What Ray Tune saves into the experiment folder (SearchGenerator.save_to_dir) and a resumed driver reads
    back: TPE's study keeps every told trial (history restored, not re-sampled), and no handed-out
    configuration is handed out again."""
    from ray.tune.search import SearchGenerator

    from pipeline.sweep.plan import plan_sweep
    from pipeline.sweep.searchers import build_searcher

    plan = plan_sweep(make_params({"n_ctx": [1, 2, 4, 8, 16], "lr": [0.001, 0.002, 0.004]},
                                  sweep={"search": "optuna", "num_samples": 12}))
    first = build_searcher(plan, 0)
    first.set_search_properties("val_acc", "max", {})
    handed = []
    for i in range(5):
        config = first.suggest(f"t{i}")
        handed.append(trial_key(config))
        first.on_trial_complete(f"t{i}", {"val_acc": float(i)})
    SearchGenerator(first).save_to_dir(str(tmp_path), "driver-1")

    second = build_searcher(plan, 0)  # a new driver process builds a fresh searcher, then restores it
    second.set_search_properties("val_acc", "max", {})
    SearchGenerator(second).restore_from_dir(str(tmp_path))
    def told(searcher: UniqueSearcher) -> list[tuple[dict, float | None]]:
        return [(t.params, t.value) for t in searcher.searcher._ot_study.trials]

    assert told(second) == told(first) and len(told(first)) >= 5  # repeats answered from results count too
    assert {v for _, v in told(second)} >= {0.0, 1.0, 2.0, 3.0, 4.0}
    after = [trial_key(second.suggest(f"t{i}")) for i in range(5, 12)]
    assert not set(after) & set(handed) and len(set(after)) == len(after)
