"""The baselines stage's library: the params key that selects linear-probe protocols, a row per protocol
(in baselines.csv and MLflow), lpclip's plain train features, and the report's protocol labels."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fixtures_data import build_generic
from mlflow import MlflowClient
from PIL import Image
from report_helpers import BASELINE_COLUMNS, sections, write_csv

from pipeline.data.datasets import load_dataset
from pipeline.data.fewshot import (
    eval_list_path,
    make_eval_list,
    make_fewshot_split,
    read_fewshot_split,
    split_path,
    write_eval_list,
    write_fewshot_split,
)
from pipeline.data.images import build_transforms
from pipeline.engine.backbone import Backbone
from pipeline.evaluate.baselines import plain_train_features, run_baselines
from pipeline.evaluate.inputs import StageError, open_cache
from pipeline.evaluate.linear_probe import lpclip_linear_probe
from pipeline.features.assemble import load_fewshot_features
from pipeline.features.build import build_dataset_features
from pipeline.features.cache import FeatureConfig, feature_cache_dir, update_feature_cache
from pipeline.params import ParamsError, load_params, params_from_dict
from pipeline.report.collect import collect
from pipeline.report.html import render

# ---------------------------------------------------------------------------------------- params key


@pytest.mark.parametrize("value", [["official"], [], ["lpclip", "lpclip"]])
def test_bad_protocols_name_the_key_and_the_choices(value: list[str]) -> None:
    with pytest.raises(ParamsError, match=r"baselines\.linear_probe_protocols .*choose from: lpclip .*grid"):
        params_from_dict({"baselines": {"linear_probe_protocols": value}})


def test_protocol_errors_in_a_file_name_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"baselines": {"linear_probe_protocols": "lpclip"}}))
    with pytest.raises(ParamsError, match=r"params.yaml: baselines.linear_probe_protocols: expected a list"):
        load_params(path)
    path.write_text(yaml.safe_dump({"baselines": {"protocol": ["lpclip"]}}))
    with pytest.raises(ParamsError, match=r"unknown key 'baselines.protocol'"):
        load_params(path)
    assert params_from_dict({}).baselines.linear_probe_protocols == ["lpclip"]  # the official one by default


# ------------------------------------------------------------------------------------ the stage


def stage_params(root: Path, protocols: list[str]) -> Any:
    return params_from_dict({
        "data": {"root": str(root / "data"), "datasets": ["mydata"], "shots": [2], "seeds": [1, 2],
                 "splits_dir": str(root / "splits")},
        "features": {"dir": str(root / "cache"), "views": 2},
        "train": {"device": "cpu"},
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "baselines-test"},
        "report": {"baselines_dir": str(root / "out")},
        "baselines": {"linear_probe_protocols": protocols},
    })


@pytest.fixture
def stage_root(tmp_path: Path) -> Path:
    """mydata (3 classes x 6 train images) with 2-shot splits for seeds 1 and 2."""
    build_generic(tmp_path / "data", "mydata")
    splits = load_dataset("mydata", tmp_path / "data")
    write_eval_list(make_eval_list(splits), eval_list_path(tmp_path / "splits", "mydata"))
    for seed in (1, 2):
        write_fewshot_split(make_fewshot_split(splits, 2, seed), split_path(tmp_path / "splits", "mydata", 2, seed))
    return tmp_path


@pytest.mark.slow
def test_stage_runs_each_protocol_and_records_it(stage_root: Path, tiny: Backbone) -> None:
    params = stage_params(stage_root, ["lpclip", "grid"])
    build_dataset_features(stage_root / "cache", stage_root / "data", stage_root / "splits", "mydata", [2], [1, 2],
                           tiny, views=2, progress=False)
    rows = run_baselines(params, stage_root / "out", methods=["linear-probe"], progress=False)

    with (stage_root / "out" / "baselines.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert "protocol" in table[0]
    assert sorted((r["protocol"], r["seed"], r["views"]) for r in table) == [
        ("grid", "1", "2"), ("grid", "2", "2"), ("lpclip", "1", ""), ("lpclip", "2", "")]
    client = MlflowClient(params.tracking.uri)
    for r in table:
        run = client.get_run(r["mlflow_run_id"])
        assert run.data.params["protocol"] == r["protocol"] and run.data.tags["baseline.protocol"] == r["protocol"]
        assert run.data.metrics["test_acc"] == pytest.approx(float(r["test_acc"]), abs=1e-3)
    assert "search_coarse" in client.get_run(next(r for r in table if r["protocol"] == "lpclip")["mlflow_run_id"]
                                             ).data.params

    # lpclip trained on the training images encoded with the test transform, not on the augmented views.
    _, test_tf = build_transforms(tiny.image_size, tiny.mean, tiny.std)
    config = FeatureConfig.from_params(tiny, params.features)
    cache = open_cache(params, "mydata", config)
    for row in (r for r in rows if r["protocol"] == "lpclip"):
        split_file = split_path(stage_root / "splits", "mydata", 2, row["seed"])
        data = load_fewshot_features(params.features.dir, split_file, config, cache=cache)
        plain = plain_train_features(cache, read_fewshot_split(split_file), "mydata")
        with torch.no_grad():
            direct = torch.cat([tiny.encode_images(test_tf(Image.open(stage_root / "data" / item.path).convert("RGB"))
                                                   [None]) for item in read_fewshot_split(split_file).train])
        assert torch.allclose(plain, direct, atol=2e-2, rtol=1e-2)
        assert not torch.allclose(plain, data.train[:, 0], atol=2e-2, rtol=1e-2)  # not an augmented view
        expected = lpclip_linear_probe(data, plain)
        assert (row["C"], row["test_acc"], row["val_acc"]) == (
            f"{expected['C']:g}", round(expected["test_acc"], 4), round(expected["val_acc"], 4))


@pytest.mark.slow
def test_stage_says_how_to_get_the_plain_train_features(stage_root: Path, tiny: Backbone) -> None:
    """A cache whose eval store lacks the training images (built before they were added) is refused for
    lpclip with the command that adds them."""
    params = stage_params(stage_root, ["lpclip"])
    config = FeatureConfig.from_params(tiny, params.features)
    cache_dir = feature_cache_dir(stage_root / "cache", "mydata", tiny.arch, tiny.pretrained)
    build_dataset_features(stage_root / "cache", stage_root / "data", stage_root / "splits", "mydata", [2], [1, 2],
                           tiny, views=2, progress=False)
    train_keys = open_cache(params, "mydata", config).paths("train")
    shutil.rmtree(cache_dir)
    splits = [read_fewshot_split(split_path(stage_root / "splits", "mydata", 2, seed)) for seed in (1, 2)]
    evaluation = {item.path for split in splits for item in split.val}
    evaluation |= {item.path for item in load_dataset("mydata", stage_root / "data").test}
    update_feature_cache(cache_dir, stage_root / "data", train_keys, evaluation, tiny, config, progress=False)
    with pytest.raises(StageError, match=r"lpclip .*test-transform features.*rerun `dvc repro features`"):
        run_baselines(params, stage_root / "out", methods=["linear-probe"], progress=False)


# ------------------------------------------------------------------------------------------ the report


def test_report_labels_linear_probe_numbers_with_their_protocol(report_workspace: dict[str, Any]) -> None:
    rows = [{"method": "linear-probe", "protocol": protocol, "dataset": "Caltech101", "shots": 16, "seed": seed,
             "val_acc": 50, "test_acc": base + seed} for protocol, base in (("lpclip", 70.0), ("grid", 80.0))
            for seed in (1, 2)]
    rows.append({"method": "linear-probe", "protocol": "", "dataset": "Caltech101", "shots": 16, "seed": 1,
                 "val_acc": 50, "test_acc": 40.0})  # a row from before protocols were recorded
    write_csv(report_workspace["root"] / "out" / "baselines" / "baselines.csv", [*BASELINE_COLUMNS, "protocol"],
              rows)
    numbers = sections(render(collect(report_workspace["params"])))["accuracy"]
    table_rows = {m.group(1): m.group(0) for m in re.finditer(r"<tr><td>Caltech101</td><td>([^<]*)</td>.*?</tr>",
                                                              numbers)}
    assert "71.50 ± 0.50" in table_rows["Linear probe CLIP (official lpclip protocol)"]
    assert "81.50 ± 0.50" in table_rows["Linear probe CLIP (our C grid on augmented views)"]
    assert "40.00" in table_rows["Linear probe CLIP (protocol not recorded)"]
    assert "Linear probe CLIP</td>" not in numbers  # never unlabelled


@pytest.mark.slow
def test_zero_shot_rows_for_the_base_and_new_classes(stage_root: Path, tiny: Backbone) -> None:
    """CoCoOp Table 1's CLIP row: zero-shot on the base half with base names, on the new half with new names."""
    from pipeline.data.protocols import base_new_labels
    from pipeline.evaluate.zero_shot import zero_shot_weights

    params = stage_params(stage_root, ["lpclip"])
    build_dataset_features(stage_root / "cache", stage_root / "data", stage_root / "splits", "mydata", [2], [1, 2],
                           tiny, views=2, progress=False)
    rows = run_baselines(params, stage_root / "out", methods=["zero-shot"], progress=False)
    by_protocol = {r["protocol"]: float(r["test_acc"]) for r in rows}
    assert set(by_protocol) == {"", "base", "new"}
    # Reference: a classifier over each half's names alone, on that half's test images.
    config = FeatureConfig.from_params(tiny, params.features)
    data = load_fewshot_features(params.features.dir, split_path(stage_root / "splits", "mydata", 2, 1), config,
                                 cache=open_cache(params, "mydata", config))
    halves = dict(zip(("base", "new"), base_new_labels(range(len(data.classnames))), strict=True))
    for half, labels in halves.items():
        weights = zero_shot_weights(tiny, [data.classnames[i] for i in labels], (data.template,))
        mask = torch.isin(data.test_labels, torch.tensor(labels))
        logits = torch.nn.functional.normalize(data.test[mask].float(), dim=-1) @ weights.t()
        truth = torch.tensor([labels.index(int(y)) for y in data.test_labels[mask]])
        expected = 100.0 * float((logits.argmax(-1) == truth).float().mean())
        assert by_protocol[half] == pytest.approx(expected, abs=1e-3)
