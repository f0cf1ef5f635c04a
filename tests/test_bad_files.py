"""Bad input files (tests/bad_files/ and corrupt copies of real ones) fed to the commands that read them: exit 2, one message naming the file, nothing half-written."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors import safe_open
from safetensors.torch import save_file
from sweep_helpers import PYTHON, REPO, base_params

from pipeline.data.datasets import DatasetError
from pipeline.data.fewshot import read_fewshot_split
from pipeline.engine.backbone import Backbone
from pipeline.engine.context import ContextFileError, ContextMeta, save_context
from pipeline.features.cache import FeatureCacheError, FeatureConfig, feature_cache_dir, open_feature_cache
from pipeline.params import FeatureParams
from pipeline.tools.predict import predict
from pipeline.tracking import SweepRun

pytestmark = pytest.mark.slow  # the stages run as processes

BAD = Path(__file__).parent / "bad_files"
DATASET = "FashionMNIST"
IMAGE = REPO / "data" / "demo" / "fashion_mnist" / "images" / "bag" / "t10k_00427.png"
REBUILD = "rerun `dvc repro features`"
PAIR_HINT = "use the .safetensors and .json a trial saved together"


def command(module: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m module args` from `cwd` (an empty folder, to see anything written there)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([PYTHON, "-m", module, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def refusal(done: subprocess.CompletedProcess, one_line: bool = True) -> str:
    """The first line of the message of a command that refused its input: exit status 2, no traceback, one
    ERROR record (the cli's), and with `one_line` nothing after that line."""
    output = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 2, output
    assert "Traceback" not in done.stderr, output
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and " ERROR pipeline: " in errors[0], output
    message = done.stderr[done.stderr.index(errors[0]):].split(" ERROR pipeline: ", 1)[1].rstrip("\n")
    if one_line:
        assert "\n" not in message, output
    return message.splitlines()[0]


def assert_names(message: str, path: Path, *fragments: str) -> None:
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden temp files included) with its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class Workspace:
    """A private copy of the demo workspace (split files and feature cache) and its params file."""

    root: Path
    params: Path

    @property
    def split(self) -> Path:
        return self.root / "splits" / DATASET / "shot1_seed1.json"

    @property
    def cache(self) -> Path:
        return feature_cache_dir(self.root / "features", DATASET, "coop-tiny", None)

    @property
    def written_by_a_sweep(self) -> list[Path]:
        return [self.root / name for name in ("ray", "results", "mlruns")]


@pytest.fixture
def workspace(demo_ws, tmp_path: Path) -> Workspace:
    root = tmp_path / "ws"
    for folder in ("splits", "features"):
        shutil.copytree(demo_ws.root / folder, root / folder)
    params = root / "params.yaml"
    params.write_text(json.dumps(base_params(root)))  # JSON is YAML
    return Workspace(root, params)


# --------------------------------------------------------------------------------------------- params files

PARAMS_CASES = {
    "shots_not_a_list.yaml": ("data.shots: expected a list", "'four'"),
    "lr_negative.yaml": ("train.lr must be > 0", "got -1"),
    "method_unknown.yaml": ("sweep.space.method: unknown method 'vpt'", "expected one of coop, cocoop, kgcoop"),
    "protocol_unknown.yaml": ("sweep.space.protocol: expected one of fewshot, base2new, xd", "'b2n'"),
    "transfer_targets_empty.yaml": ("transfer.targets must be null", "or a list of distinct dataset names, got []"),
    "unknown_top_level_key.yaml": ("unknown key 'trian'", "did you mean 'train'?"),
    "yaml_syntax_error.yaml": ("is not valid YAML at line 4, column 8", "correct it there"),
    "not_a_mapping.yaml": ("expected a mapping of keys", "['data', 'train']"),
    "key_twice.yaml": ("not valid YAML at line 4", "key 'train' appears twice", "correct it there"),
    "latin1_not_utf8.yaml": ("is not UTF-8 text", "save it as UTF-8"),
}


def test_the_params_corpus_is_what_the_cases_name() -> None:
    assert sorted(p.name for p in (BAD / "params").iterdir()) == sorted(PARAMS_CASES)


@pytest.mark.parametrize("name", sorted(PARAMS_CASES))
def test_a_bad_params_file_stops_the_sweep_naming_the_file(name: str, tmp_path: Path) -> None:
    path = BAD / "params" / name
    done = command("pipeline.sweep", "--dry-run", "--params", path, cwd=tmp_path)
    assert_names(refusal(done), path, *PARAMS_CASES[name])
    assert done.stdout == "" and not any(tmp_path.iterdir())  # no plan printed, nothing written


# ---------------------------------------------------------------------------------------------- split files

SPLIT_CASES = {
    "row_arity.json": "train[2] must be [path, label, classname], got ['fashion_mnist/images/pullover/",
    "label_out_of_range.json": "train[9] has label 10, outside the file's 10 classes (0..9)",
    "missing_key.json": "lacks the field 'val'",
    "shots_not_a_number.json": "has a malformed shots or seed",
    "not_json.json": "is not valid JSON",
    "truncated.json": "is not valid JSON",
}


def test_the_split_corpus_is_what_the_cases_name() -> None:
    assert sorted(p.name for p in (BAD / "splits").iterdir()) == sorted(SPLIT_CASES)


@pytest.mark.parametrize("name", sorted(SPLIT_CASES))
def test_the_split_reader_names_the_file_and_the_bad_row(name: str) -> None:
    path = BAD / "splits" / name
    with pytest.raises(DatasetError) as info:
        read_fewshot_split(path)
    assert_names(str(info.value), path, SPLIT_CASES[name], "rerun the prepare stage")
    assert str(info.value).count(str(path)) == 1 and "\n" not in str(info.value)  # said once, on one line


@pytest.mark.parametrize("name", ["label_out_of_range.json", "row_arity.json", "truncated.json"])
def test_a_bad_split_file_stops_the_features_stage_before_the_cache_changes(name: str, workspace: Workspace,
                                                                            tmp_path: Path) -> None:
    shutil.copy(BAD / "splits" / name, workspace.split)
    before = snapshot(workspace.root / "features")
    done = command("stages.features", "--params", workspace.params, "--no-progress", cwd=tmp_path / "cwd")
    assert_names(refusal(done), workspace.split, SPLIT_CASES[name], "rerun the prepare stage")
    assert snapshot(workspace.root / "features") == before  # no shard, manifest or temp file written
    assert not any((tmp_path / "cwd").iterdir())


# ------------------------------------------------------------------------------------------- feature shards


def _train_shard(cache: Path) -> tuple[Path, dict[str, str], torch.Tensor]:
    (shard,) = cache.glob("train-*.safetensors")
    with safe_open(str(shard), framework="pt") as f:
        return shard, f.metadata(), f.get_tensor("features")


def _break_shard(cache: Path, kind: str) -> Path:
    """Replace the cache's train shard with a bad one of `kind`; returns the shard's path."""
    shard, metadata, features = _train_shard(cache)
    if kind == "truncated":  # a copy cut short, as by a full disk or an interrupted transfer
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif kind == "other_width":  # same images, another backbone's 32-wide features
        save_file({"features": torch.zeros(*features.shape[:2], 32, dtype=features.dtype)}, str(shard), metadata)
    elif kind == "other_dtype":  # same images, stored as float32 instead of the manifest's float16
        save_file({"features": features.float()}, str(shard), metadata)
    else:  # a corpus file: random bytes, an empty file, another program's safetensors
        shutil.copy(BAD / "shards" / f"{kind}.safetensors", shard)
    return shard


SHARD_CASES = {
    "truncated": "is corrupt (Error while deserializing header: incomplete metadata",
    "other_width": "holds F16 features of shape (55, 2, 32), not the manifest's F16 rows of shape (2, 64)",
    "other_dtype": "holds F32 features of shape (55, 2, 64), not the manifest's F16 rows of shape (2, 64)",
    "random_bytes": "is corrupt (Error while deserializing header",
    "empty": "is corrupt (Error while deserializing header: header too small)",
    "foreign_tensor": "is not a feature shard (tensors ['weight'], metadata []; expected 'features' with 'paths')",
}


def test_the_shard_corpus_is_what_the_cases_name() -> None:
    assert sorted(p.stem for p in (BAD / "shards").iterdir()) == sorted(set(SHARD_CASES) - {
        "truncated", "other_width", "other_dtype"})


def _cache_config(backbone: Backbone) -> FeatureConfig:
    return FeatureConfig.from_params(backbone, FeatureParams(views=2, dtype="fp16", seed=0))


@pytest.mark.parametrize("kind", sorted(SHARD_CASES))
def test_the_cache_reader_names_a_bad_shard(kind: str, workspace: Workspace, tiny: Backbone) -> None:
    shard = _break_shard(workspace.cache, kind)
    with pytest.raises(FeatureCacheError) as info:
        open_feature_cache(workspace.cache, _cache_config(tiny))
    assert_names(str(info.value), shard, SHARD_CASES[kind], REBUILD)
    assert "\n" not in str(info.value)


def test_a_truncated_shard_stops_the_sweep_before_it_starts(workspace: Workspace, tmp_path: Path) -> None:
    shard = _break_shard(workspace.cache, "truncated")
    done = command("pipeline.sweep", "--params", workspace.params, "--name", "bad-shard", cwd=tmp_path / "cwd")
    # The sweep adds the commands that rebuild the features on the lines after the message.
    assert_names(refusal(done, one_line=False), shard, SHARD_CASES["truncated"], REBUILD)
    assert not any(p.exists() for p in [*workspace.written_by_a_sweep, workspace.root / "mlflow.db"])
    assert not any((tmp_path / "cwd").iterdir())


def test_the_features_stage_rebuilds_a_foreign_shard_as_its_message_says(workspace: Workspace, demo_ws,
                                                                          tmp_path: Path, tiny: Backbone) -> None:
    shard = _break_shard(workspace.cache, "other_width")
    done = command("stages.features", "--params", workspace.params, "--no-progress", cwd=tmp_path / "cwd")
    assert done.returncode == 0, done.stderr
    assert f"Rebuilding feature cache {workspace.cache}: it is unreadable (Feature cache shard {shard}" in done.stderr
    rebuilt = open_feature_cache(workspace.cache, _cache_config(tiny))
    original = open_feature_cache(feature_cache_dir(demo_ws.root / "features", DATASET, "coop-tiny", None),
                                  _cache_config(tiny))
    for store in ("train", "eval"):  # seeded views: the rebuilt cache holds the very features it lost
        assert rebuilt.paths(store) == original.paths(store)
        assert torch.equal(rebuilt.features(store), original.features(store))


# -------------------------------------------------------------------------------------------- context files


class _Unpickled:
    """Unpickling this makes the folder `marker`: a context file that is a pickle must never get that far."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.marker),)


def _context(folder: Path, backbone: Backbone, kind: str) -> Path:
    """A context saved by the project's writer, then broken as `kind` says; returns its .safetensors."""
    classnames = json.loads((BAD / "contexts" / "meta_wrong_type.json").read_text())["classnames"]
    meta = ContextMeta(backbone.arch, None, backbone.fingerprint, 4, "end", False, "", classnames, DATASET, 1, 1)
    ctx = 0.02 * torch.randn(4, backbone.text_width, generator=torch.Generator().manual_seed(0))
    path = save_context(folder / "ctx.safetensors", ctx, meta)
    if kind == "wrong_shape":  # 5 context vectors where ctx.json says n_ctx 4
        save_file({"ctx": torch.zeros(5, backbone.text_width)}, str(path))
    elif kind == "wrong_width":  # a context from a model with a 32-wide text tower, under coop-tiny's ctx.json
        save_file({"ctx": torch.zeros(4, 32)}, str(path))
    elif kind == "pickle":  # a pickle named .safetensors
        path.write_bytes(pickle.dumps({"ctx": _Unpickled(folder / "UNPICKLED")}))
    elif kind == "json_missing":
        path.with_suffix(".json").unlink()
    elif kind != "good":  # a corpus ctx.json beside the real tensor
        shutil.copy(BAD / "contexts" / f"{kind}.json", path.with_suffix(".json"))
    return path


CONTEXT_CASES = {
    "wrong_shape": ("tensor 'ctx' has shape (5, 64), but its metadata (n_ctx=4, csc=False) wants (4, width)",
                    PAIR_HINT),
    "wrong_width": ("context width 32 does not match the text tower width 64 of coop-tiny", PAIR_HINT),
    "meta_arch_rn50": ("(backbone RN50, weights None) cannot be used: context width 64 does not match the text "
                       "tower width 512 of RN50", PAIR_HINT),
    "meta_arch_unknown": ("(backbone coop-huge, weights None) cannot be used: Unknown backbone architecture "
                          "'coop-huge'",),
    "meta_not_json": ("ctx.json is not valid context metadata (Expecting property name", PAIR_HINT),
    "meta_wrong_type": ("ctx.json: n_ctx is 'four', expected int", PAIR_HINT),
    "pickle": ("is not a safetensors file", "it is never unpickled: pass a context's .safetensors"),
    "json_missing": ("ctx.json does not exist (a context is a .safetensors + .json pair)",),
}


def test_the_context_corpus_is_what_the_cases_name() -> None:
    assert sorted(p.stem for p in (BAD / "contexts").iterdir()) == sorted(k for k in CONTEXT_CASES
                                                                          if k.startswith("meta_"))


def test_a_good_context_predicts(tiny: Backbone, tmp_path: Path) -> None:
    # The cases below break this context: it works before they do.
    (row,) = predict(_context(tmp_path, tiny, "good"), [IMAGE])
    assert len(row["top"]) == 3


@pytest.mark.parametrize("kind", sorted(CONTEXT_CASES))
def test_predict_names_a_bad_context_file(kind: str, tiny: Backbone, tmp_path: Path) -> None:
    path = _context(tmp_path, tiny, kind)
    before = snapshot(tmp_path)
    with pytest.raises(ContextFileError) as info:
        predict(path, [IMAGE])
    message = str(info.value)
    assert str(path) in message or str(path.with_suffix(".json")) in message, message
    assert_names(message, tmp_path, *CONTEXT_CASES[kind])
    assert "\n" not in message
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["pickle", "wrong_shape"])
def test_the_predict_command_refuses_a_bad_context(kind: str, tiny: Backbone, tmp_path: Path) -> None:
    path = _context(tmp_path / "ctx", tiny, kind)
    before = snapshot(tmp_path / "ctx")
    done = command("pipeline.tools.predict", "--context", path, IMAGE, cwd=tmp_path / "cwd")
    assert_names(refusal(done), path, *CONTEXT_CASES[kind])
    assert done.stdout == "" and snapshot(tmp_path / "ctx") == before
    assert not (tmp_path / "ctx" / "UNPICKLED").exists()  # never unpickled
    assert not any((tmp_path / "cwd").iterdir())


# -------------------------------------------------------------------- an MLflow store from another project


@pytest.fixture
def store_of_another_project(workspace: Workspace, tmp_path: Path) -> Path:
    """The workspace's mlflow.db copied from another project, whose experiment 'test' keeps its artifacts there."""
    other = tmp_path / "other-project"
    other.mkdir()
    SweepRun.start(f"sqlite:///{other}/mlflow.db", "test", "an earlier sweep", params={}, tags={})
    shutil.copy(other / "mlflow.db", workspace.root / "mlflow.db")
    return other


def _runs(database: Path) -> list[tuple[str, str]]:
    client = MlflowClient(f"sqlite:///{database}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return sorted((r.info.run_id, r.info.status) for r in client.search_runs(experiments))


@pytest.mark.parametrize("stage", ["sweep", "report"])
def test_an_mlflow_store_of_another_project_stops_the_stage_with_nothing_written(
        stage: str, workspace: Workspace, store_of_another_project: Path, tmp_path: Path) -> None:
    database = workspace.root / "mlflow.db"
    runs = _runs(database)
    args = ("--name", "copied") if stage == "sweep" else ("--out", workspace.root / "report")
    done = command(f"stages.{stage}", "--params", workspace.params, *args, cwd=tmp_path / "cwd")
    assert_names(refusal(done), database, f"keeps its artifacts in {store_of_another_project}/mlruns/test",
                 f"not beside the database ({workspace.root}/mlruns/test)", "set tracking.experiment to a new name")
    assert _runs(database) == runs  # no run started
    assert not any(p.exists() for p in [*workspace.written_by_a_sweep, workspace.root / "report"])
    assert not (store_of_another_project / "mlruns").exists()  # nothing written into the other project
    assert not any((tmp_path / "cwd").iterdir())
