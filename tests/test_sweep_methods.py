"""Methods and protocols as sweep dimensions: the conditional space (which keys apply to which method and
protocol, refused combinations), stable trial keys, base-to-new's class split of the cached features, the
result tables' base/new/H and transfer rows, and the checks that run before any trial."""

from __future__ import annotations

import hashlib
import json
import math
import random

import optuna
import pytest
import torch

from pipeline.data.datasets import DatasetSplits, Item
from pipeline.data.protocols import harmonic_mean, subsample_classes
from pipeline.engine.inputs import FewShotFeatures, split_base_new
from pipeline.params import Params, params_from_dict
from pipeline.sweep.results import TrialRecord, summarize, transfer_rows, write_results
from pipeline.sweep.space import SpaceError, build_space, config_label, trial_key
from pipeline.sweep.trial import method_config, train_config

WORDS = "a photo of a"
METHODS = ["coop", "cocoop", "kgcoop"]
PROTOCOLS = ["fewshot", "base2new", "xd"]


def make_params(space: dict, **sections: dict) -> Params:
    raw = {"data": {"datasets": ["FashionMNIST"], "shots": [16], "seeds": [1, 2]}, "sweep": {"space": space}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return params_from_dict(raw)


# ------------------------------------------------------------------------------------------ the space


def test_grid_over_methods_and_protocols_keeps_only_what_applies() -> None:
    space = {"method": METHODS, "protocol": PROTOCOLS, "csc": [False, True], "ctx_init": ["", WORDS]}
    configs = build_space(make_params(space)).enumerate()
    assert len({trial_key(c) for c in configs}) == len(configs)
    for c in configs:
        # Independent statement of the rules: a class-specific context only for CoOp, random init, not xd.
        if c["csc"]:
            assert c["method"] == "coop" and c["protocol"] != "xd" and c["ctx_init"] == ""
        assert (c["kg_weight"] is not None) == (c["method"] == "kgcoop")
        assert (c["meta_reduction"] is not None) == (c["method"] == "cocoop")
    # CoOp: 2 inits x unified + csc only where allowed; others: 2 inits, unified; x 2 seeds.
    coop = {"fewshot": 3, "base2new": 3, "xd": 2}
    expected = sum(coop.values()) + 2 * 2 * 3
    assert len(configs) == expected * 2
    # Official recipes fill null epochs and batch sizes; CoOp keeps train.batch_size (null) and per-shot epochs.
    cocoop = next(c for c in configs if c["method"] == "cocoop")
    kgcoop = next(c for c in configs if c["method"] == "kgcoop")
    coop_cfg = next(c for c in configs if c["method"] == "coop")
    assert (cocoop["epochs"], cocoop["batch_size"], cocoop["meta_reduction"]) == (10, 1, 16)
    assert (kgcoop["epochs"], kgcoop["batch_size"], kgcoop["kg_weight"]) == (100, 128, 8.0)
    assert (coop_cfg["epochs"], coop_cfg["batch_size"]) == (200, None)


def test_a_set_epochs_or_batch_size_overrides_the_recipe() -> None:
    configs = build_space(make_params({"method": ["cocoop"], "batch_size": [4], "epochs": [3]})).enumerate()
    assert {(c["batch_size"], c["epochs"]) for c in configs} == {(4, 3)}
    cfg = train_config(make_params({}).train, configs[0])
    assert cfg.batch_size == 4 and cfg.epochs == 3
    assert train_config(make_params({}).train, {**configs[0], "batch_size": None}).batch_size == 32


def test_a_method_hyperparameter_is_searched_only_for_its_method() -> None:
    configs = build_space(make_params({"method": METHODS, "kg_weight": [1.0, 8.0], "meta_reduction": [8, 16]}))
    by_method: dict[str, set] = {}
    for c in configs.enumerate():
        by_method.setdefault(c["method"], set()).add((c["kg_weight"], c["meta_reduction"]))
    assert by_method == {"coop": {(None, None)}, "kgcoop": {(1.0, None), (8.0, None)},
                         "cocoop": {(None, 8), (None, 16)}}
    assert method_config(next(c for c in configs.enumerate() if c["method"] == "kgcoop")).kg_weight == 1.0


@pytest.mark.parametrize(("space", "words"), [
    ({"method": ["cocoop"], "csc": [True]}, ["method cocoop", "csc"]),
    ({"method": ["coop", "kgcoop"], "csc": [True]}, ["method kgcoop", "one context"]),
    ({"protocol": ["xd"], "csc": [True]}, ["protocol", "'xd'", "unified"]),
    ({"method": ["coop", "vpt"]}, ["method", "'vpt'", "coop, cocoop, kgcoop"]),
    ({"protocol": ["b2n"]}, ["protocol", "'b2n'", "fewshot, base2new, xd"]),
    ({"kg_weight": [-1]}, ["kg_weight", "-1"]),
    ({"meta_reduction": [0]}, ["meta_reduction", "0"]),
    ({"batch_size": [0]}, ["batch_size", "0"]),
])
def test_keys_that_do_not_apply_are_refused_naming_them(space: dict, words: list[str]) -> None:
    with pytest.raises(SpaceError) as error:
        build_space(make_params(space))
    for word in words:
        assert word in str(error.value)


def test_transfer_targets_are_validated() -> None:
    from pipeline.params import ParamsError

    with pytest.raises(ParamsError, match="transfer.targets"):
        make_params({}, transfer={"targets": ["A", "A"]})
    with pytest.raises(ParamsError, match="unknown key 'transfer.target'"):
        params_from_dict({"transfer": {"target": ["A"]}})


def test_coop_fewshot_trials_keep_the_keys_they_had_before_methods() -> None:
    """A CoOp few-shot configuration hashes exactly its pre-method keys (resume and MLflow lookups rely on it)."""
    before = ("dataset", "shots", "seed", "n_ctx", "ctx_init", "csc", "class_token_position", "lr", "epochs",
              "precision")
    for config in build_space(make_params({"csc": [False, True], "ctx_init": ["", WORDS]})).enumerate():
        text = json.dumps({k: config[k] for k in before}, sort_keys=True, separators=(",", ":"))
        assert trial_key(config) == hashlib.sha256(text.encode()).hexdigest()[:16]
        old = {k: config[k] for k in before}  # a resumed sweep's config without the new keys
        assert trial_key(old) == trial_key(config)


def test_other_methods_and_protocols_get_their_own_keys_and_labels() -> None:
    configs = build_space(make_params({"method": METHODS, "protocol": PROTOCOLS, "ctx_init": [WORDS]})).enumerate()
    assert len({trial_key(c) for c in configs}) == len(configs) == 3 * 3 * 2
    labels = {c["method"]: config_label(c) for c in configs}
    assert labels["coop"] == "init='a photo of a' unified end lr=0.002 ep=200 fp32"
    assert labels["cocoop"] == "cocoop(r=16) init='a photo of a' unified end lr=0.002 ep=10 bs=1 fp32"
    assert labels["kgcoop"] == "kgcoop(λ=8) init='a photo of a' unified end lr=0.002 ep=100 bs=128 fp32"


def test_optuna_asks_for_a_key_only_where_it_applies() -> None:
    space = build_space(make_params({"method": METHODS, "protocol": PROTOCOLS, "csc": [False, True],
                                     "ctx_init": ["", WORDS], "n_ctx": [4, 16], "kg_weight": [1.0, 8.0]}))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    define = space.define_by_run()
    valid = {trial_key(c) for c in space.enumerate()}
    for _ in range(60):
        trial = study.ask()
        config = define(trial)
        assert trial_key(config) in valid
        asked = set(trial.params)
        assert ("csc" in asked) == (config["method"] == "coop" and config["protocol"] != "xd"
                                    and config["ctx_init"] == "")
        assert ("kg_weight" in asked) == (config["method"] == "kgcoop")
        study.tell(trial, random.random())


# ------------------------------------------------------------------------------------------ base-to-new features


def test_base_new_split_of_features_matches_the_official_rule_on_items() -> None:
    """split_base_new on features equals subsample_classes (the transcribed official rule) on the same items."""
    classes = [f"class{i}" for i in range(7)]
    gen = torch.Generator().manual_seed(0)

    def items(n_per_class: int, tag: str) -> list[Item]:
        order = torch.randperm(7 * n_per_class, generator=gen).tolist()
        return [Item(f"{tag}{i}", i % 7, classes[i % 7]) for i in order]

    train, val, test = items(2, "tr"), items(1, "va"), items(3, "te")
    splits = DatasetSplits("D", classes, train, val, test)

    def feats(rows: list[Item]) -> torch.Tensor:  # a feature that names its item
        return torch.tensor([[float(int(r.path[2:])), float(r.label)] for r in rows])

    data = FewShotFeatures(classes, feats(train)[:, None, :], torch.tensor([r.label for r in train]), feats(val),
                           torch.tensor([r.label for r in val]), feats(test), torch.tensor([r.label for r in test]),
                           dataset="D")
    base_data, new_test = split_base_new(data)
    base, new = subsample_classes(splits, "base"), subsample_classes(splits, "new")
    assert base_data.classnames == base.classnames == classes[:4]
    assert new_test.classnames == new.classnames == classes[4:]
    for got, got_labels, want in ((base_data.train[:, 0], base_data.train_labels, base.train),
                                  (base_data.val, base_data.val_labels, base.val),
                                  (base_data.test, base_data.test_labels, base.test),
                                  (new_test.test, new_test.test_labels, new.test)):
        assert got[:, 0].tolist() == [float(int(r.path[2:])) for r in want]
        assert got_labels.tolist() == [r.label for r in want]


# ------------------------------------------------------------------------------------------ result tables


def record(config: dict, val: float, test: float, new: float | None = None, **kw) -> TrialRecord:
    h = harmonic_mean(test, new) if new is not None else None
    return TrialRecord(config=config, trial_key=trial_key(config), state="FINISHED", val_acc=val, test_acc=test,
                       new_acc=new, h_acc=h, **kw)


def test_base_to_new_summary_selects_per_protocol_and_takes_h_of_the_means(tmp_path) -> None:
    configs = build_space(make_params({"method": ["coop", "cocoop"], "protocol": ["fewshot", "base2new"],
                                       "ctx_init": [WORDS]})).enumerate()
    values = {("coop", "fewshot"): (90, 80, None), ("cocoop", "fewshot"): (85, 82, None),
              ("coop", "base2new"): (95, 90, 50), ("cocoop", "base2new"): (94, 88, 70)}
    records = []
    for c in configs:
        val, test, new = values[(c["method"], c["protocol"])]
        shift = c["seed"]  # seeds differ, so means and std are real
        records.append(record(c, val + shift, test + shift, None if new is None else new - shift))
    summaries = {(s.config["method"], s.protocol): s for s in summarize(records)}
    best = {s.protocol: s.config["method"] for s in summaries.values() if s.best}
    assert best == {"fewshot": "coop", "base2new": "coop"}  # by val within each protocol, never across
    b2n = summaries[("cocoop", "base2new")]
    assert b2n.test_mean == 89.5 and b2n.new_mean == 68.5
    assert math.isclose(b2n.h_of_means, 2 * 89.5 * 68.5 / (89.5 + 68.5))
    files = write_results(tmp_path, records)
    names = sorted(p.name for p in files.metrics.iterdir())
    assert names == ["FashionMNIST-16shot-base2new.json", "FashionMNIST-16shot.json"]
    metrics = json.loads((files.metrics / "FashionMNIST-16shot-base2new.json").read_text())
    assert metrics["new_acc"] == 48.5 and metrics["test_acc"] == 91.5
    header = files.trials.read_text().splitlines()[0].split(",")
    assert {"protocol", "method", "new_acc", "h_acc", "kg_weight", "meta_reduction", "batch_size"} <= set(header)


def test_transfer_rows_one_per_trial_and_target(tmp_path) -> None:
    (config,) = [c for c in build_space(make_params({"protocol": ["xd"]}, data={"seeds": [1]})).enumerate()]
    records = [record(config, 60, 70, transfer={"B": 40.0, "A": 30.0}),
               TrialRecord(config={**config, "seed": 2}, state="FAILED", transfer={"A": 1.0})]
    rows = transfer_rows(records)
    assert [(r["target"], r["test_acc"]) for r in rows] == [("A", 30.0), ("B", 40.0)]
    assert {r["dataset"] for r in rows} == {"FashionMNIST"}
    files = write_results(tmp_path, records)
    assert files.transfer.read_text().count("\n") == 3


# ------------------------------------------------------------------------------------------ checks before trials


def test_protocols_that_cannot_run_are_refused_before_any_trial() -> None:
    from pipeline.sweep.inputs import MissingInputsError, SweepInputs, check_protocols
    from pipeline.sweep.plan import feature_key, plan_sweep

    def inputs(n_classes: int, targets: dict) -> SweepInputs:
        labels = torch.arange(n_classes)
        data = FewShotFeatures([f"c{i}" for i in range(n_classes)], torch.zeros(n_classes, 1, 2), labels,
                               torch.zeros(n_classes, 2), labels, torch.zeros(n_classes, 2), labels)
        return SweepInputs(None, {feature_key("FashionMNIST", 16, s): data for s in (1, 2)}, {}, targets)  # type: ignore[arg-type]

    b2n = plan_sweep(make_params({"protocol": ["base2new"]}))
    check_protocols(b2n, inputs(2, {}))
    with pytest.raises(MissingInputsError, match="base2new .* FashionMNIST has 1 class"):
        check_protocols(b2n, inputs(1, {}))
    xd = plan_sweep(make_params({"protocol": ["xd"]}))
    with pytest.raises(MissingInputsError, match="transfer.targets"):
        check_protocols(xd, inputs(3, {"FashionMNIST": None}))  # only itself: nothing to transfer to
