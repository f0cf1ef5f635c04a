"""The features stage's command: settings from --params, flags overriding them, online mode, errors as exit 2."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch
from fixtures_data import build_generic

from pipeline.features.build import split_image_paths
from pipeline.params import FeatureParams
from stages import features as features_stage
from stages import prepare as prepare_stage

pytestmark = pytest.mark.filterwarnings("ignore:Backbone coop-tiny has RANDOM weights")

PARAMS = """
data:
  root: {root}/data
  datasets: [mydata]
  shots: [1, 2]
  seeds: [4]
  splits_dir: {root}/splits
backbone:
  arch: coop-tiny
  pretrained: null
features:
  dir: {root}/cache
  views: 2
  dtype: fp16
  seed: 3
  batch_size: 5
"""


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A generic dataset (3 classes x 6 train / 2 val / 3 test images), its params file and split files."""
    build_generic(tmp_path / "data", "mydata")
    (tmp_path / "params.yaml").write_text(PARAMS.format(root=tmp_path))
    assert prepare_stage.main(["--params", str(tmp_path / "params.yaml")]) == 0
    return tmp_path


def manifest(cache_root: Path) -> dict:
    return json.loads((cache_root / "mydata" / "coop-tiny__random" / "manifest.json").read_text())


def test_settings_come_from_params(workspace: Path) -> None:
    assert features_stage.main(["--params", str(workspace / "params.yaml"), "--no-progress"]) == 0
    config = manifest(workspace / "cache")["config"]
    assert config["views"] == 2 and config["dtype"] == "float16" and config["augment_seed"] == 3
    assert config["views_per_seed"] is True and config["arch"] == "coop-tiny"
    train, evaluation = split_image_paths(workspace / "splits", "mydata", [1, 2], [4], per_seed=True)
    stores = manifest(workspace / "cache")["stores"]
    assert stores["train"]["count"] == len(train) and stores["eval"]["count"] == len(evaluation)


def test_flags_override_params(workspace: Path) -> None:
    flags = ["--views", "3", "--augment-seed", "5", "--dtype", "fp32", "--no-views-per-seed", "--shots", "2",
             "--out", str(workspace / "flagged"), "--device", "cpu", "--no-progress"]
    assert features_stage.main(["--params", str(workspace / "params.yaml"), *flags]) == 0
    config = manifest(workspace / "flagged")["config"]
    assert config["views"] == 3 and config["augment_seed"] == 5 and config["dtype"] == "float32"
    assert config["views_per_seed"] is False
    # Keys without a flag still come from params: seed 4's split, 2-shot only (the --shots flag).
    train, _ = split_image_paths(workspace / "splits", "mydata", [2], [4])
    assert manifest(workspace / "flagged")["stores"]["train"]["count"] == len(train)
    assert not (workspace / "cache").exists()  # features.dir was overridden by --out


def test_flags_alone_take_the_other_keys_from_the_typed_defaults(
    workspace: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (workspace / "empty.yaml").write_text("")  # every key at its default (pipeline/params.py)
    args = [
        "--params", str(workspace / "empty.yaml"), "--dataset", "mydata", "--data-root", str(workspace / "data"),
        "--splits-dir", str(workspace / "splits"), "--shots", "2", "--seeds", "4",
        "--out", str(workspace / "defaults"), "--pretrained", "none", "--no-progress",
    ]  # fmt: skip
    assert features_stage.main(args) == 0
    config = manifest(workspace / "defaults")["config"]
    defaults = FeatureParams()
    assert config["views"] == defaults.views and config["augment_seed"] == defaults.seed
    assert config["views_per_seed"] is defaults.views_per_seed and config["dtype"] == "float16"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert features_stage.main(args) == 0
    assert "encoded 0 train / 0 eval images" in caplog.text  # a rerun encodes nothing
    with caplog.at_level(logging.ERROR):
        assert features_stage.main([*args, "--seeds", "9"]) == 2  # the later flag wins
    assert "shot2_seed9.json does not exist; run the prepare stage first" in caplog.text


def test_online_caches_no_train_views(workspace: Path) -> None:
    args = ["--params", str(workspace / "params.yaml"), "--no-progress"]
    assert features_stage.main([*args, "--views", "online"]) == 0
    stores = manifest(workspace / "cache")["stores"]
    assert manifest(workspace / "cache")["config"]["views"] == "online" and stores["train"]["count"] == 0
    train, evaluation = split_image_paths(workspace / "splits", "mydata", [1, 2], [4])
    assert stores["eval"]["count"] == len(evaluation) and train <= evaluation
    with pytest.raises(SystemExit):
        features_stage.main([*args, "--views", "sometimes"])
    with pytest.raises(SystemExit):
        features_stage.main([*args, "--dtype", "int8"])


def test_views_flag_follows_the_params_rule() -> None:
    assert [features_stage._views(text) for text in ("1", "16", "online")] == [1, 16, "online"]
    for text in ("0", "-1", "sometimes", "2.5", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=r"features.views must be >= 1 .* or 'online'"):
            features_stage._views(text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_unavailable_device_is_reported(workspace: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert features_stage.main(["--params", str(workspace / "params.yaml"), "--device", "cuda"]) == 2
    assert "'cuda' requested but no CUDA GPU is visible" in caplog.text
    assert not (workspace / "cache").exists()
