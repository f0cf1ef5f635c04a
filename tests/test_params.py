"""params.yaml validation: every bad key or value is named, the shipped files load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.params import SEARCHES, ParamsError, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["params.yaml", "configs/paper_rn50.yaml", "configs/paper_vitb16.yaml"])
def test_shipped_params_files_load(path):
    params = load_params(ROOT / path)
    assert params.data.datasets and params.backbone.arch


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"trian": {}}, "unknown key 'trian'"),
        ({"train": {"lrr": 0.1}}, "unknown key 'train.lrr'"),
        ({"train": {"epochs": "many"}}, "train.epochs: expected an integer"),
        ({"train": {"shared_prefix": "yes"}}, "train.shared_prefix"),
        ({"data": {"shots": [1, "two"]}}, r"data.shots\[1\]: expected an integer"),
        ({"data": {"datasets": []}}, "data.datasets is empty"),
        ({"features": {"views": 0}}, "features.views must be >= 1"),
        ({"train": {"precision": "fp8"}}, "train.precision must be"),
        ({"sweep": {"search": "bayes"}}, "sweep.search must be"),
        ({"backbone": {"pretrained": 5}}, "backbone.pretrained: expected str"),
    ],
)
def test_bad_params_name_the_key(raw, message):
    with pytest.raises(ParamsError, match=message):
        params_from_dict(raw)


def test_every_search_is_accepted_and_a_bad_one_lists_them():
    assert [params_from_dict({"sweep": {"search": name}}).sweep.search for name in SEARCHES] == [
        "grid", "random", "optuna"]
    with pytest.raises(ParamsError, match=r"sweep.search must be one of grid, random, optuna, got 'bayes'"):
        params_from_dict({"sweep": {"search": "bayes"}})


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ParamsError, match="bad.yaml is not valid YAML"):
        load_params(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({"train": {"batch_size": True}}))
    with pytest.raises(ParamsError, match=r"wrong.yaml: train.batch_size: expected an integer"):
        load_params(wrong)


def test_defaults_are_coops_recipe():
    train = params_from_dict({}).train
    assert (train.lr, train.momentum, train.weight_decay, train.batch_size) == (0.002, 0.9, 5e-4, 32)
    assert (train.warmup_epochs, train.warmup_lr, train.epochs) == (1, 1e-5, None)


def test_override_replaces_given_keys_and_checks_them_like_a_params_file(tmp_path) -> None:
    from pipeline.params import Params, ParamsError, override

    params = Params()
    changed = override(params, data={"shots": [2], "root": tmp_path, "seeds": None}, sweep={"num_samples": 3})
    assert changed.data.shots == [2] and changed.data.root == str(tmp_path)  # a Path flag becomes the str key
    assert changed.data.seeds == params.data.seeds and changed.sweep.num_samples == 3  # None: not given
    assert changed.train == params.train
    with pytest.raises(ParamsError, match="sweep.num_samples must be >= 1"):
        override(params, sweep={"num_samples": 0})
    with pytest.raises(ParamsError, match="features.batch_size: expected an integer"):
        override(params, features={"batch_size": "many"})
