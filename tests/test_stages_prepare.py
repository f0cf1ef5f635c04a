"""The prepare stage's command: split files and test lists written, flags overriding params, bad input as exit 2."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fixtures_data import build_generic, build_imagenet, build_imagenet_r

from pipeline.data.datasets import load_dataset
from pipeline.data.fewshot import eval_list_path, make_fewshot_split, read_eval_list, read_fewshot_split
from stages import prepare as prepare_stage


@pytest.fixture
def defaults(tmp_path: Path) -> Path:
    """A params file without keys: every setting at its default (pipeline/params.py) unless a flag gives it."""
    path = tmp_path / "defaults.yaml"
    path.write_text("")
    return path


def test_writes_splits_and_test_list(tmp_path: Path, defaults: Path) -> None:
    build_generic(tmp_path / "data", "mydata")
    out = tmp_path / "splits"
    args = ["--params", str(defaults), "--dataset", "mydata", "--data-root", str(tmp_path / "data"), "--out", str(out),
            "--shots", "1", "2", "--seeds", "1", "3"]
    assert prepare_stage.main(args) == 0
    names = sorted(p.name for p in (out / "mydata").iterdir())
    assert names == ["shot1_seed1.json", "shot1_seed3.json", "shot2_seed1.json", "shot2_seed3.json", "test.json"]
    splits = load_dataset("mydata", tmp_path / "data")
    assert read_fewshot_split(out / "mydata" / "shot2_seed3.json") == make_fewshot_split(splits, 2, 3)
    test = read_eval_list(eval_list_path(out, "mydata"))
    assert test.test == splits.test and test.classnames == splits.classnames and not test.test_only


def test_imagenet_and_variants(tmp_path: Path, defaults: Path) -> None:
    build_imagenet(tmp_path / "data")
    build_imagenet_r(tmp_path / "data")
    out = tmp_path / "splits"
    args = ["--params", str(defaults), "--data-root", str(tmp_path / "data"), "--out", str(out), "--shots", "2",
            "--seeds", "1"]
    assert prepare_stage.main(["--dataset", "ImageNet", "--dataset", "imagenet-rendition", *args]) == 0
    imagenet = read_fewshot_split(out / "ImageNet" / "shot2_seed1.json")
    assert imagenet.val_is_test and len(imagenet.train) == 8 and len(imagenet.val) == 8
    assert sorted(p.name for p in (out / "ImageNetR").iterdir()) == ["test.json"]
    r = read_eval_list(out / "ImageNetR" / "test.json")
    assert r.test_only and r.imagenet_labels == [1, 3]


def test_bad_input_is_reported(tmp_path: Path, defaults: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        args = ["--params", str(defaults), "--dataset", "NoSuchSet", "--data-root", str(tmp_path),
                "--out", str(tmp_path / "o")]
        assert prepare_stage.main(args) == 2
    assert "Unknown dataset 'NoSuchSet'" in caplog.text
    assert not (tmp_path / "o").exists()
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert prepare_stage.main(["--params", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in caplog.text


def test_flags_override_params(tmp_path: Path) -> None:
    build_generic(tmp_path / "data", "mydata")
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  root: {tmp_path / 'data'}\n  datasets: [mydata]\n  shots: [1, 2]\n  seeds: [4]\n"
                      f"  splits_dir: {tmp_path / 'p_splits'}\n")
    assert prepare_stage.main(["--params", str(params)]) == 0
    assert sorted(p.name for p in (tmp_path / "p_splits" / "mydata").iterdir()) == [
        "shot1_seed4.json", "shot2_seed4.json", "test.json"]
    # --shots and --out replace their keys; data.seeds, data.root and data.datasets still come from params.
    assert prepare_stage.main(["--params", str(params), "--shots", "3", "--out", str(tmp_path / "f_splits")]) == 0
    assert sorted(p.name for p in (tmp_path / "f_splits" / "mydata").iterdir()) == ["shot3_seed4.json", "test.json"]


def test_repeat_from_params_and_flag(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    build_generic(tmp_path / "data", "mydata")
    splits = load_dataset("mydata", tmp_path / "data")
    params = tmp_path / "params.yaml"
    out = tmp_path / "splits"
    common = ["--dataset", "mydata", "--data-root", str(tmp_path / "data"), "--out", str(out), "--seeds", "1"]
    params.write_text("data:\n  fewshot_repeat: true\n")
    assert prepare_stage.main([*common, "--shots", "64", "--params", str(params)]) == 0
    assert read_fewshot_split(out / "mydata" / "shot64_seed1.json") == make_fewshot_split(splits, 64, 1, repeat=True)
    assert prepare_stage.main([*common, "--shots", "64", "--params", str(params), "--no-repeat"]) == 0
    assert read_fewshot_split(out / "mydata" / "shot64_seed1.json") == make_fewshot_split(splits, 64, 1)
    params.write_text("data:\n  fewshot_repeat: maybe\n")
    with caplog.at_level(logging.ERROR):
        assert prepare_stage.main([*common, "--shots", "64", "--params", str(params)]) == 2
    assert "data.fewshot_repeat" in caplog.text
