"""The paper's reproduction profile, for real, in miniature: configs/paper_rn50.yaml's grid (all its prompt
variants, CoOp's per-shot epochs rule switched off for speed) on generated copies of ImageNet, Caltech101,
OxfordPets and the four ImageNet variants in the official layout, with the tiny random-weight CLIP, through
the stages DVC runs: prepare -> features -> sweep -> baselines -> domain shift -> report. Every report
section must be filled from these runs."""

from __future__ import annotations

import base64
import copy
import csv
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from fixtures_data import BUILDERS
from mlflow import MlflowClient
from PIL import Image
from report_helpers import check_html, sections

from pipeline.data.fewshot import eval_list_path, read_eval_list
from pipeline.engine.backbone import count_tokens
from pipeline.engine.context import load_context
from pipeline.engine.train import default_epochs
from pipeline.params import load_params, params_from_dict
from pipeline.sweep.space import build_space

pytestmark = pytest.mark.slow  # end to end: stages and tools run as real processes

REPO = Path(__file__).resolve().parents[1]
PROFILES = [REPO / "configs" / "paper_rn50.yaml", REPO / "configs" / "paper_vitb16.yaml"]
TRAINED = ["ImageNet", "Caltech101", "OxfordPets"]
VARIANTS_OF_IMAGENET = ["ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"]
PAPER_DATASETS = ["ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101",
                  "FGVCAircraft", "SUN397", "DTD", "EuroSAT", "UCF101"]
# (n_ctx, ctx_init, csc, position) every profile must train: the paper's four M=16 variants and its
# word initialisation (plus "a photo of a" at the middle, which a product grid cannot leave out).
PAPER_VARIANTS = {(16, "", False, "end"), (16, "", True, "end"), (16, "", False, "middle"), (16, "", True, "middle"),
                  (4, "a photo of a", False, "end"), (4, "a photo of a", False, "middle")}


def variants(configs: list[dict[str, Any]]) -> set[tuple]:
    return {(c["n_ctx"], c["ctx_init"], c["csc"], c["class_token_position"]) for c in configs}


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_paper_profile_is_the_papers_grid(profile: Path) -> None:
    params = load_params(profile)
    assert params.backbone.pretrained == "openai" and params.backbone.arch in ("RN50", "ViT-B-16")
    assert params.data.shots == [1, 2, 4, 8, 16] and params.data.seeds == [1, 2, 3]
    assert params.data.datasets == PAPER_DATASETS + VARIANTS_OF_IMAGENET
    assert params.sweep.gpus_per_trial == 1 and params.train.precision in ("amp", "fp16")
    assert params.train.epochs is None and params.sweep.search == "grid"
    configs = build_space(params).enumerate()
    assert {c["dataset"] for c in configs} == set(PAPER_DATASETS)  # the variants are test-only: no trials
    assert variants(configs) == PAPER_VARIANTS
    assert len(configs) == len(PAPER_DATASETS) * 5 * 3 * len(PAPER_VARIANTS)
    for c in configs:  # CoOp's schedule: 50 epochs on ImageNet and for 1 shot, 100 for 2/4, 200 for 8/16
        assert c["epochs"] == default_epochs(c["dataset"], c["shots"])
        assert c["epochs"] == (50 if c["dataset"] == "ImageNet" or c["shots"] == 1 else 100 if c["shots"] <= 4
                               else 200)
    assert count_tokens("a photo of a") == 4


def miniature_params(root: Path) -> dict[str, Any]:
    """configs/paper_rn50.yaml with only what cannot run here overridden: data, backbone, sizes, services."""
    raw = yaml.safe_load(PROFILES[0].read_text())
    params = copy.deepcopy(raw)
    params["data"].update(root=str(root / "data"), datasets=TRAINED + VARIANTS_OF_IMAGENET, shots=[1, 16],
                          seeds=[1, 2], splits_dir=str(root / "splits"))
    params["backbone"] = {"arch": "coop-tiny", "pretrained": None}
    params["features"].update(dir=str(root / "features"), views=2, batch_size=64)
    params["train"].update(epochs=2, precision="fp32", device="cpu")
    params["sweep"].update(max_concurrent=2, cpus_per_trial=1, gpus_per_trial=0, storage=str(root / "ray"),
                           results_dir=str(root / "out" / "sweep"))
    params["sweep"]["space"]["dataset"] = TRAINED
    params["tracking"] = {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "paper-miniature"}
    params["report"] = {"dir": str(root / "out" / "report"), "baselines_dir": str(root / "out" / "baselines")}
    assert params["sweep"]["space"]["ctx_init"] == raw["sweep"]["space"]["ctx_init"]  # the variants stay
    params_from_dict(params)  # still valid
    return params


def run_stage(module: str, params: Path, *extra: str) -> None:
    done = subprocess.run([sys.executable, "-m", module, "--params", str(params), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{module} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("paper")
    for name in TRAINED + VARIANTS_OF_IMAGENET:
        BUILDERS[name](root / "data")
    raw = miniature_params(root)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_stage("stages.prepare", path)
    run_stage("stages.features", path, "--no-progress")
    done = subprocess.run([sys.executable, "-m", "stages.sweep", "--params", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    run_stage("stages.baselines", path, "--no-progress")
    run_stage("stages.domain_shift", path, "--no-progress")
    run_stage("stages.report", path)
    out = root / "out"
    return {"root": root, "params": load_params(path), "uri": raw["tracking"]["uri"],
            "trials": read_csv(out / "sweep" / "trials.csv"), "baselines": read_csv(out / "baselines" / "baselines.csv"),
            "domain": read_csv(out / "baselines" / "domain_shift.csv"),
            "html": (out / "report" / "index.html").read_text()}


def test_every_trial_of_the_grid_ran(paper_run: dict[str, Any]) -> None:
    trials = paper_run["trials"]
    assert len(trials) == len(TRAINED) * 2 * 2 * len(PAPER_VARIANTS)
    assert all(t["state"] == "FINISHED" for t in trials)
    typed = [{"n_ctx": int(t["n_ctx"]), "ctx_init": t["ctx_init"], "csc": t["csc"] == "True",
              "class_token_position": t["class_token_position"]} for t in trials]
    assert variants(typed) == PAPER_VARIANTS
    assert {t["dataset"] for t in trials} == set(TRAINED)


def test_baselines_are_mlflow_runs_and_a_table(paper_run: dict[str, Any]) -> None:
    rows = paper_run["baselines"]
    zero = [r for r in rows if r["method"].startswith("zero-shot")]
    probe = [r for r in rows if r["method"] == "linear-probe"]
    assert {(r["method"], r["dataset"]) for r in zero} == {(m, d) for m in ("zero-shot", "zero-shot-ensemble")
                                                            for d in TRAINED}
    assert all(r["shots"] == "0" for r in zero)
    assert {(r["dataset"], r["shots"], r["seed"]) for r in probe} == {(d, s, e) for d in TRAINED
                                                                      for s in ("1", "16") for e in ("1", "2")}
    client = MlflowClient(paper_run["uri"])
    for r in rows:
        assert 0.0 <= float(r["test_acc"]) <= 100.0
        run = client.get_run(r["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.params["method"] == r["method"]
        assert run.data.metrics["test_acc"] == pytest.approx(float(r["test_acc"]), abs=1e-3)


def test_domain_shift_transfers_the_imagenet_contexts(paper_run: dict[str, Any]) -> None:
    rows, trials, params = paper_run["domain"], paper_run["trials"], paper_run["params"]
    targets = ["ImageNet", *VARIANTS_OF_IMAGENET]
    imagenet16 = {t["trial_key"]: t for t in trials if t["dataset"] == "ImageNet" and t["shots"] == "16"}
    coop = [r for r in rows if r["method"] == "CoOp"]
    assert {(r["trial_key"], r["target"]) for r in coop} == {(k, t) for k in imagenet16 for t in targets}
    assert {(r["method"], r["target"]) for r in rows if r["method"] != "CoOp"} == {
        (m, t) for m in ("zero-shot", "zero-shot-ensemble") for t in targets}
    for r in coop:
        if r["target"] == "ImageNet":  # the source accuracy is the sweep's own test accuracy, recomputed
            assert float(r["test_acc"]) == pytest.approx(float(imagenet16[r["trial_key"]]["test_acc"]), abs=1e-3)

    # ImageNet-A covers ImageNet classes 1 and 3: a class-specific context must score as the full 4-class
    # classifier restricted to those two classes' columns.
    from pipeline.engine.backbone import load_params_backbone
    from pipeline.engine.context import context_model
    from pipeline.evaluate.inputs import open_cache
    from pipeline.features.assemble import load_eval_features
    from pipeline.features.cache import FeatureConfig
    from pipeline.tracking import trial_artifacts

    csc = next(r for r in coop if r["csc"] == "True" and r["target"] == "ImageNetA")
    folder = trial_artifacts(imagenet16[csc["trial_key"]], Path(params.sweep.results_dir),
                             paper_run["root"] / "fetched", paper_run["uri"])
    ctx, meta = load_context(folder / "ctx.safetensors")
    backbone = load_params_backbone(params, "cpu")
    config = FeatureConfig.from_params(backbone, params.features)
    target = load_eval_features(params.features.dir, eval_list_path(params.data.splits_dir, "ImageNetA"), config,
                                cache=open_cache(params, "ImageNetA", config))
    assert read_eval_list(eval_list_path(params.data.splits_dir, "ImageNetA")).imagenet_labels == [1, 3]
    with torch.no_grad():
        logits = context_model(backbone, ctx, meta)(F.normalize(target.test, dim=-1))[:, [1, 3]]
    expected = 100.0 * float((logits.argmax(-1) == target.test_labels).float().mean())
    assert float(csc["test_acc"]) == pytest.approx(expected, abs=1e-3)


def test_report_sections_are_filled_from_the_runs(paper_run: dict[str, Any]) -> None:
    html, trials = paper_run["html"], paper_run["trials"]
    assert check_html(html) == []
    parts = sections(html)
    assert list(parts) == ["accuracy", "published", "domain", "words", "sweep"]
    for name, body in parts.items():
        assert 'class="empty"' not in body, f"section {name} is empty"
        assert "<table" in body, name
    for uri in html.split('src="')[1:]:
        png = base64.b64decode(uri.split('"')[0].removeprefix("data:image/png;base64,"))
        assert Image.open(io.BytesIO(png)).size[0] > 200
    assert parts["accuracy"].count("<img") == 1 and parts["sweep"].count("<img") == 1
    # Published numbers of the datasets we ran, our 16-shot M=16 end unified results next to them.
    ours = [float(t["test_acc"]) for t in trials if t["dataset"] == "Caltech101" and t["shots"] == "16"
            and t["n_ctx"] == "16" and not t["ctx_init"] and t["csc"] == "False" and t["class_token_position"] == "end"]
    mean = sum(ours) / len(ours)
    for value in ("62.95", "91.83", "87.01", "58.18"):
        assert value in parts["published"]
    assert f"{mean:.2f}" in parts["published"] and f"{mean - 91.83:+.2f}" in parts["published"]
    assert "not a reproduction result" in parts["published"]  # random tiny backbone vs RN50
    for name in VARIANTS_OF_IMAGENET:
        assert name in parts["domain"]
    for dataset in TRAINED:
        assert dataset in parts["words"]
    assert "fANOVA" in parts["sweep"] and "class token position" in parts["sweep"]
    # The page is an artifact of a "report" run.
    client = MlflowClient(paper_run["uri"])
    experiment = client.get_experiment_by_name("paper-miniature")
    runs = client.search_runs([experiment.experiment_id], "tags.`coop.stage` = 'report'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id)] == ["index.html"]
