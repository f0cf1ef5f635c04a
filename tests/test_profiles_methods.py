"""The methods' paper profiles (configs/paper_b2n_vitb16.yaml, configs/paper_xd_vitb16.yaml): they load, list the
papers' trials with each method's official recipe, and dry-run with their cost."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from pipeline.params import load_params
from pipeline.sweep.estimate import estimate_sweep, sweep_trials, transfer_targets
from pipeline.sweep.plan import plan_sweep
from stages.sweep import main as sweep_main

REPO = Path(__file__).resolve().parents[1]
PAPER_DATASETS = ["ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101", "FGVCAircraft",
                  "SUN397", "DTD", "EuroSAT", "UCF101"]


def recipe(config: dict) -> tuple:
    """What a trial trains with besides its dataset and seed."""
    return (config["method"], config["n_ctx"], config["ctx_init"], config["csc"], config["epochs"],
            config["batch_size"], config["lr"], config["kg_weight"], config["meta_reduction"])


def test_base_to_new_profile_runs_the_three_methods_official_recipes_on_the_11_datasets() -> None:
    params = load_params(REPO / "configs" / "paper_b2n_vitb16.yaml")
    assert (params.backbone.arch, params.backbone.pretrained) == ("ViT-B-16", "openai")
    configs = plan_sweep(params).configs
    assert len(configs) == 3 * 11 * 3 == 99
    assert Counter((c["dataset"], c["seed"]) for c in configs) == {(d, s): 3 for d in PAPER_DATASETS for s in (1, 2, 3)}
    assert {(c["protocol"], c["shots"], c["class_token_position"]) for c in configs} == {("base2new", 16, "end")}
    by_recipe = Counter(recipe(c) for c in configs if c["dataset"] != "ImageNet")
    assert by_recipe == {
        # CoOp as the CoCoOp paper's baseline (vit_b16_ctxv1): "a photo of a", 200 epochs, train.batch_size (32)
        ("coop", 4, "a photo of a", False, 200, None, 0.002, None, None): 30,
        ("cocoop", 4, "a photo of a", False, 10, 1, 0.002, None, 16): 30,
        ("kgcoop", 4, "a photo of a", False, 100, 128, 0.002, 8.0, None): 30,
    }
    assert {c["epochs"] for c in configs if c["dataset"] == "ImageNet" and c["method"] == "coop"} == {50}
    assert params.train.batch_size == 32


def test_cross_dataset_profile_learns_on_imagenet_and_transfers_to_the_other_10() -> None:
    params = load_params(REPO / "configs" / "paper_xd_vitb16.yaml")
    configs = plan_sweep(params).configs
    assert len(configs) == 2 * 3 == 6
    assert {(c["dataset"], c["protocol"], c["shots"]) for c in configs} == {("ImageNet", "xd", 16)}
    assert Counter(recipe(c) for c in configs) == {
        ("coop", 4, "a photo of a", False, 50, None, 0.002, None, None): 3,  # vit_b16_ep50_ctxv1
        ("cocoop", 4, "a photo of a", False, 10, 1, 0.002, None, 16): 3,
    }
    assert transfer_targets(params) == PAPER_DATASETS  # test-only ImageNet variants are not transfer targets
    assert params.domain_shift.targets == ["ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"]


@pytest.mark.parametrize(("profile", "trials", "settings"), [
    ("paper_b2n_vitb16.yaml", 99, ["cocoop base2new", "coop base2new", "kgcoop base2new"]),
    ("paper_xd_vitb16.yaml", 6, ["cocoop xd", "coop xd"]),
])
def test_profiles_dry_run_with_their_trial_count_and_gpu_hours(profile: str, trials: int, settings: list[str],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert sweep_main(["--params", str(REPO / "configs" / profile), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"{trials} trial(s) would run (grid;" in printed
    # GPU profiles bundle (sweep.bundle_size: auto): the cost with bundles, then the one without.
    cost = re.search(rf"cost model: {trials} configurations in \d+ trials \([^)]*\), ([0-9.]+) GPU-hours on H100",
                     printed)
    assert cost is not None, printed[-2000:]
    params = load_params(REPO / "configs" / profile)
    assert float(cost.group(1)) == pytest.approx(estimate_sweep(params, sweep_trials(params)).hours, rel=5e-3)
    estimate = estimate_sweep(params)
    alone = re.search(rf"without bundles \(--bundle-size 1\): {trials} trials, ([0-9.]+) GPU-hours", printed)
    assert alone is not None and float(alone.group(1)) == pytest.approx(estimate.hours, rel=5e-3)
    by_method = estimate.by_method()
    assert sorted(by_method) == settings and sum(by_method.values()) == pytest.approx(estimate.hours)
    for setting in settings:
        assert re.search(rf"^  {setting} +[0-9.]+ GPU-h$", printed, re.MULTILINE), setting
    # CoCoOp's per-image prompts make it the dearest method of each profile.
    assert max(by_method, key=by_method.get).startswith("cocoop")
