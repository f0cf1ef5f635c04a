"""Linear-probe protocols: the official lpclip C search and probe, the baselines stage's protocol column,
the params key that selects protocols, and the report's protocol labels."""

from __future__ import annotations

import csv
import functools
import math
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from fixtures_data import build_generic
from mlflow import MlflowClient
from PIL import Image
from test_report import BASELINE_COLUMNS, sections, write_csv
from test_report import workspace as workspace  # noqa: F401  (fixture)

from pipeline.baselines_run import StageError, feature_config, open_cache, plain_train_features, run_baselines
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
from pipeline.engine.backbone import Backbone
from pipeline.engine.baselines import LPCLIP_COARSE_C, lpclip_linear_probe, lpclip_search
from pipeline.features import (
    FewShotFeatures,
    build_dataset_features,
    build_transforms,
    feature_cache_dir,
    load_fewshot_features,
    update_feature_cache,
)
from pipeline.params import ParamsError, load_params, params_from_dict
from pipeline.report import collect, render

# ------------------------------------------------------------------------------------------ the C search


def test_lpclip_search_takes_the_official_steps() -> None:
    """Val accuracy -|log10 C - 0.3|, the official procedure worked by hand: the coarse peak is C = 1 (log 0),
    then [-1, 1] -> right wins -> [0, 1] -> left -> [0, .5] -> right -> [.25, .5] -> left -> [.25, .375] ->
    left -> [.25, .3125] -> right -> [.28125, .3125] -> right -> [.296875, .3125] -> left: C = 10^.296875."""
    calls: list[float] = []

    def val_accuracy(c: float) -> float:
        calls.append(math.log10(c))
        return -abs(math.log10(c) - 0.3)

    search = lpclip_search(val_accuracy)
    rounds = [(-1, 1), (0, 1), (0, 0.5), (0.25, 0.5), (0.25, 0.375), (0.25, 0.3125), (0.28125, 0.3125),
              (0.296875, 0.3125)]
    assert calls == pytest.approx([6, 4, 2, 0, -2, -4, -6, *[x for r in rounds for x in r]], abs=1e-12)
    ends = [math.log10(c) for lc, _, rc, _ in search.rounds for c in (lc, rc)]
    assert ends == pytest.approx([x for r in rounds for x in r], abs=1e-12)
    assert [c for c, _ in search.coarse] == list(LPCLIP_COARSE_C)
    assert math.log10(search.C) == pytest.approx(0.296875, abs=1e-12)
    # A brute-force dense grid puts the optimum at 0.3: the search ends within its last interval of it.
    dense = np.linspace(-7, 7, 14001)
    best = dense[np.argmax([-abs(x - 0.3) for x in dense])]
    assert abs(math.log10(search.C) - best) <= 0.3125 - 0.296875


def test_lpclip_search_ties_keep_the_first_coarse_value_and_the_left_end() -> None:
    """Equal accuracies everywhere: the coarse argmax is the first value (1e6), and every round keeps its
    left end, 1e5, so the interval shrinks onto it from the right."""
    search = lpclip_search(lambda c: 50.0)
    assert pytest.approx(1e5, rel=1e-12) == search.C
    assert [lc for lc, _, _, _ in search.rounds] == pytest.approx([1e5] * 8, rel=1e-12)
    assert [math.log10(rc) for _, _, rc, _ in search.rounds] == pytest.approx(
        [7, 6, 5.5, 5.25, 5.125, 5.0625, 5.03125, 5.015625], abs=1e-12)


# ------------------------------------------------------------------------------------------- the probe


def scaled_problem(seed: int = 3, classes: int = 4, shots: int = 4, dim: int = 16) -> tuple[FewShotFeatures, torch.Tensor]:
    """Noisy Gaussian classes with per-row scales from 0.2 to 5, so normalising the features matters.
    Returns the split (its `train` holds unrelated "augmented views") and the plain train features."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(classes).repeat_interleave(n)
        x = means[y] + torch.randn(len(y), dim, generator=g)
        return x * torch.empty(len(y), 1).uniform_(0.2, 5.0, generator=g), y

    plain, train_y = sample(shots)
    val, val_y = sample(8)
    test, test_y = sample(20)
    views = torch.randn(len(train_y), 3, dim, generator=g)  # must not be used
    return FewShotFeatures(["a", "b", "c", "d"][:classes], views, train_y, val, val_y, test, test_y), plain


def sklearn_reference(x: np.ndarray, y: np.ndarray, c: float) -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(solver="lbfgs", max_iter=1000, C=c).fit(x, y)


def test_lpclip_probe_fits_raw_plain_features_like_sklearn() -> None:
    data, plain = scaled_problem()
    result = lpclip_linear_probe(data, plain)
    x, y = plain.double().numpy(), data.train_labels.numpy()
    xv, yv = data.val.double().numpy(), data.val_labels.numpy()

    @functools.cache
    def val_acc(c: float, normalise: bool = False) -> float:
        def norm(a: np.ndarray) -> np.ndarray:
            return a / np.linalg.norm(a, axis=1, keepdims=True) if normalise else a

        return 100.0 * float((sklearn_reference(norm(x), y, c).predict(norm(xv)) == yv).mean())

    search = result["search"]
    seen = [*search.coarse, *[p for r in search.rounds for p in (r[:2], r[2:])]]
    assert [acc for _, acc in seen] == pytest.approx([val_acc(c) for c, _ in seen])
    # The features are used raw: on normalised ones some coarse C scores differently.
    assert any(val_acc(c, normalise=True) != acc for c, acc in search.coarse)
    final = sklearn_reference(x, y, result["C"])
    assert result["val_acc"] == pytest.approx(val_acc(result["C"]))
    assert result["test_acc"] == pytest.approx(
        100.0 * float((final.predict(data.test.double().numpy()) == data.test_labels.numpy()).mean()))
    assert lpclip_linear_probe(data, plain) == result  # deterministic


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
    config = feature_config(params, tiny)
    cache = open_cache(params, "mydata", config)
    for row in (r for r in rows if r["protocol"] == "lpclip"):
        split_file = split_path(stage_root / "splits", "mydata", 2, row["seed"])
        data = load_fewshot_features(params.features.dir, split_file, config, cache=cache)
        plain = plain_train_features(cache, split_file, "mydata")
        with torch.no_grad():
            direct = torch.cat([tiny.encode_images(test_tf(Image.open(stage_root / "data" / item.path).convert("RGB"))
                                                   [None]) for item in read_fewshot_split(split_file).train])
        assert torch.allclose(plain, direct, atol=2e-2, rtol=1e-2)
        assert not torch.allclose(plain, data.train[:, 0], atol=2e-2, rtol=1e-2)  # not an augmented view
        expected = lpclip_linear_probe(data, plain)
        assert (row["C"], row["test_acc"], row["val_acc"]) == (
            f"{expected['C']:g}", round(expected["test_acc"], 4), round(expected["val_acc"], 4))


def test_stage_says_how_to_get_the_plain_train_features(stage_root: Path, tiny: Backbone) -> None:
    """A cache whose eval store lacks the training images (built before they were added) is refused for
    lpclip with the command that adds them."""
    params = stage_params(stage_root, ["lpclip"])
    config = feature_config(params, tiny)
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


def test_report_labels_linear_probe_numbers_with_their_protocol(workspace: dict[str, Any]) -> None:  # noqa: F811
    rows = [{"method": "linear-probe", "protocol": protocol, "dataset": "Caltech101", "shots": 16, "seed": seed,
             "val_acc": 50, "test_acc": base + seed} for protocol, base in (("lpclip", 70.0), ("grid", 80.0))
            for seed in (1, 2)]
    rows.append({"method": "linear-probe", "protocol": "", "dataset": "Caltech101", "shots": 16, "seed": 1,
                 "val_acc": 50, "test_acc": 40.0})  # a row from before protocols were recorded
    write_csv(workspace["root"] / "out" / "baselines" / "baselines.csv", [*BASELINE_COLUMNS, "protocol"], rows)
    numbers = sections(render(collect(workspace["params"])))["accuracy"]
    table_rows = {m.group(1): m.group(0) for m in re.finditer(r"<tr><td>Caltech101</td><td>([^<]*)</td>.*?</tr>",
                                                              numbers)}
    assert "71.50 ± 0.50" in table_rows["Linear probe CLIP (official lpclip protocol)"]
    assert "81.50 ± 0.50" in table_rows["Linear probe CLIP (our C grid on augmented views)"]
    assert "40.00" in table_rows["Linear probe CLIP (protocol not recorded)"]
    assert "Linear probe CLIP</td>" not in numbers  # never unlabelled
