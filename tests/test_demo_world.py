"""The demo's claims, measured on a fast subset of it: the shipped world CLIP, the world's three tasks and
WorldSketch's shifted sets, CoOp as params.yaml trains it (M=16, unified, end; shots 1, 4, 16; seeds 1-3).

Targets (issue 12): zero-shot at least twice chance on every task; CoOp at 16 shots, averaged over the tasks,
at least 10 points above zero-shot; accuracy rising with shots; the linear probe below CoOp at 1 shot; and a
WorldSketch context keeping an average advantage over zero-shot on the shifted sets. Everything runs through the
project's own code (world writer, reader, few-shot rule, feature cache, engine, baselines), in-process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.datasets import load_dataset
from pipeline.data.fewshot import eval_list_path, split_path, write_dataset_splits
from pipeline.data.synthetic.tasks import get_task, write_world
from pipeline.engine.backbone import Backbone, load_backbone
from pipeline.engine.inputs import FewShotFeatures
from pipeline.engine.prompt import PromptConfig
from pipeline.engine.train import default_epochs, evaluate, train_coop
from pipeline.evaluate.linear_probe import lpclip_linear_probe
from pipeline.evaluate.zero_shot import zero_shot_accuracy
from pipeline.features.assemble import load_eval_features, load_fewshot_features
from pipeline.features.build import build_dataset_features
from pipeline.features.cache import FeatureConfig
from pipeline.params import Params, load_params
from pipeline.sweep.trial import train_config

pytestmark = pytest.mark.slow  # about a minute and a half of training on 2 cores

ROOT = Path(__file__).resolve().parents[1]
SHOTS = (1, 4, 16)
SEEDS = (1, 2, 3)
PROMPT = PromptConfig(n_ctx=16, ctx_init="", csc=False, class_token_position="end")  # the paper's default


@pytest.fixture(scope="module")
def demo() -> Params:
    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="module")
def world_clip(demo: Params) -> Backbone:
    assert demo.backbone.arch == "coop-tiny-rn" and demo.backbone.pretrained is not None
    torch.set_num_threads(2)
    return load_backbone(demo.backbone.arch, str(ROOT / demo.backbone.pretrained))


@pytest.fixture(scope="module")
def features(tmp_path_factory, demo: Params, world_clip: Backbone) -> dict[str, dict]:
    """Per dataset: {"eval": EvalFeatures} and, for the trainable tasks, {(shots, seed): FewShotFeatures}."""
    tasks = [d for d in demo.data.datasets if d != demo.domain_shift.source] + [demo.domain_shift.source]
    root = tmp_path_factory.mktemp("world")
    write_world(root / "data", [get_task(name) for name in tasks])
    config = FeatureConfig.from_params(world_clip, demo.features)
    out: dict[str, dict] = {}
    for name in tasks:
        splits = load_dataset(name, root / "data")
        shots, seeds = ((), ()) if splits.test_only else (SHOTS, SEEDS)
        write_dataset_splits(splits, root / "splits", shots, seeds, demo.data.fewshot_repeat)
        build_dataset_features(root / "cache", root / "data", root / "splits", name, shots, seeds, world_clip,
                               views=demo.features.views, progress=False)
        out[name] = {"eval": load_eval_features(root / "cache", eval_list_path(root / "splits", name), config)}
        for k in shots:
            for seed in seeds:
                out[name][k, seed] = load_fewshot_features(root / "cache", split_path(root / "splits", name, k, seed),
                                                           config)
    return out


@pytest.fixture(scope="module")
def trainable(demo: Params) -> list[str]:
    return [d for d in demo.data.datasets if not get_task(d).test_only]


@pytest.fixture(scope="module")
def coop(demo: Params, world_clip: Backbone, features: dict, trainable: list[str]) -> dict:
    """(dataset, shots, seed) -> the trained CoOp model and its test accuracy, with the demo's train.* settings."""
    results = {}
    for name in trainable:
        for k in SHOTS:
            for seed in SEEDS:
                data: FewShotFeatures = features[name][k, seed]
                cfg = train_config(demo.train, {"lr": demo.train.lr, "epochs": default_epochs(name, k),
                                                "precision": "fp32", "seed": seed})
                result = train_coop(world_clip, data, PROMPT, cfg, progress=False)
                results[name, k, seed] = result
    return results


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_zero_shot_is_at_least_twice_chance_on_every_task(world_clip: Backbone, features: dict,
                                                          demo: Params) -> None:
    for name in demo.data.datasets:
        target = features[name]["eval"]
        chance = 100.0 / len(target.classnames)
        assert zero_shot_accuracy(world_clip, target) >= 2 * chance, name


def test_coop_beats_the_hand_crafted_prompt_and_more_shots_help(world_clip: Backbone, features: dict, coop: dict,
                                                                trainable: list[str]) -> None:
    zero_shot = mean(zero_shot_accuracy(world_clip, features[name]["eval"]) for name in trainable)
    by_shots = {k: mean(coop[name, k, seed].test_acc for name in trainable for seed in SEEDS) for k in SHOTS}
    assert by_shots[16] >= zero_shot + 10, (by_shots, zero_shot)  # measured: 51.0 against 34.5
    assert by_shots[1] < by_shots[4] < by_shots[16], by_shots  # measured: 34.0 < 38.8 < 51.0


def test_the_linear_probe_trails_coop_at_one_shot(features: dict, coop: dict, trainable: list[str]) -> None:
    # views: 1, so each training image's cached view is its test-transform view, what lpclip takes
    probe = mean(lpclip_linear_probe(features[name][1, seed], features[name][1, seed].train[:, 0])["test_acc"]
                 for name in trainable for seed in SEEDS)
    assert probe < mean(coop[name, 1, seed].test_acc for name in trainable for seed in SEEDS)


def test_a_source_context_keeps_an_advantage_on_the_shifted_sets(world_clip: Backbone, features: dict, coop: dict,
                                                                 demo: Params) -> None:
    source, targets = demo.domain_shift.source, demo.domain_shift.targets
    assert targets and all(features[t]["eval"].classnames == features[source]["eval"].classnames for t in targets)
    gains = []
    for target in targets:
        data = features[target]["eval"]
        coop_acc = mean(evaluate(coop[source, 16, seed].model, F.normalize(data.test, dim=-1), data.test_labels)
                        for seed in SEEDS)
        gains.append(coop_acc - zero_shot_accuracy(world_clip, data))
    assert mean(gains) > 0, dict(zip(targets, gains, strict=True))  # measured: +4.1 points on average
