"""GPU-hours of trials and grids: steps per trial, step time on a GPU model, the paper grid, 16-shot ImageNet, bundles."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.engine.backbone import count_tokens
from pipeline.engine.flops import PATHS
from pipeline.engine.prompt import prefers_shared_prefix
from pipeline.params import load_params
from pipeline.sweep.estimate import (
    GPUS,
    estimate_gpu_hours,
    estimate_trial,
    imagenet_16shot_estimate,
    steps_per_epoch,
)

REPO = Path(__file__).resolve().parents[1]


def test_steps_and_step_time_follow_the_recipe_and_the_gpu() -> None:
    assert steps_per_epoch(16 * 1000, 32) == 500  # 16-shot ImageNet
    assert steps_per_epoch(10, 32) == 1 and steps_per_epoch(33, 32) == 1 and steps_per_epoch(64, 32) == 2
    h100 = GPUS["H100"]
    assert h100.step_seconds(1e6, "truncated") == pytest.approx(h100.launch_s["truncated"], rel=1e-3)  # launch-bound
    big = 1e15
    assert h100.step_seconds(big, "official") == pytest.approx(big / (989e12 * h100.utilisation["official"]),
                                                               rel=1e-3)  # compute-bound
    alike = h100.launch_s["truncated"] * 989e12 * h100.utilisation["truncated"]  # compute time == floor
    assert h100.step_seconds(alike, "truncated") == pytest.approx(math.sqrt(2) * h100.launch_s["truncated"])
    assert h100.step_seconds(big, "truncated", "fp32") > h100.step_seconds(big, "truncated", "fp16")
    assert GPUS["V100"].step_seconds(big, "official") > h100.step_seconds(big, "official")


def test_grid_estimate_of_the_paper_profile() -> None:
    params = load_params(REPO / "configs" / "paper_rn50.yaml")
    ours = estimate_gpu_hours(params)
    official = estimate_gpu_hours(params, path="official")
    assert len(ours.trials) == len(official.trials) == 990
    for mine, theirs in zip(ours.trials, official.trials, strict=True):
        assert mine.config == theirs.config and mine.steps == theirs.steps
        # shared_prefix null: the engine's GPU rule decides per trial, and so does the model
        expected = "shared" if prefers_shared_prefix("cuda", mine.config["precision"], mine.n_classes,
                                                     mine.layout.prefix) else "truncated"
        assert mine.path == expected
        assert mine.seconds < theirs.seconds
    imagenet16 = [t for t in ours.trials if t.config["dataset"] == "ImageNet" and t.config["shots"] == 16]
    assert {t.steps for t in imagenet16} == {50 * 500} and {t.n_classes for t in imagenet16} == {1000}
    eurosat1 = next(t for t in ours.trials if t.config["dataset"] == "EuroSAT" and t.config["shots"] == 1)
    assert eurosat1.steps == 50 and eurosat1.n_classes == 10  # 10 images: one (short) batch per epoch
    total = ours.gpu_hours
    assert total == pytest.approx(sum(ours.by_dataset().values()))
    longest = max(t.gpu_hours for t in ours.trials)
    for n in (1, 8, 64):
        assert max(total / n, longest) * (1 - 1e-9) <= ours.wall_hours(n) <= total / n + longest
    assert ours.by_dataset()["ImageNet"] == max(ours.by_dataset().values())
    assert "990 trials" in ours.summary()


def test_estimate_reads_real_class_names_when_prepared(tmp_path: Path) -> None:
    folder = tmp_path / "Toy"
    folder.mkdir()
    names = ["a", "b", "an extraordinarily long and unusual class name here"]
    (folder / "test.json").write_text(json.dumps({"classnames": names}))
    config = {"dataset": "Toy", "shots": 4, "n_ctx": 16, "ctx_init": "", "csc": True, "class_token_position": "end",
              "epochs": 10, "precision": "fp16"}
    trial = estimate_trial(config, "RN50", GPUS["H100"], splits_dir=tmp_path)
    assert trial.n_classes == 3 and trial.layout.length == 1 + 16 + max(count_tokens(n) for n in names) + 2
    with pytest.raises(ValueError, match="no class count"):
        estimate_trial(config, "RN50", GPUS["H100"])


def test_imagenet_16shot_estimate_compares_our_paths_with_the_official_one() -> None:
    result = imagenet_16shot_estimate("H100")
    paths = result["paths"]
    assert set(paths) == set(PATHS) and result["steps"] == 25000
    assert paths["official"]["tokens_per_prompt"] == 77 and paths["truncated"]["tokens_per_prompt"] < 77
    assert paths["official"]["tflops_per_step"] > 2 * paths["truncated"]["tflops_per_step"]
    assert paths["official"]["hours"] > paths["truncated"]["hours"] > 0
    assert math.isfinite(result["speedup_vs_official"]) and result["speedup_vs_official"] > 1


def test_cpu_trials_are_costed_in_core_hours_at_the_measured_rate_on_their_cores() -> None:
    import math

    from pipeline.engine.flops import packs_tokens, prompt_layout, step_flops, tower_shape
    from pipeline.sweep.estimate import DEV_CPU, estimate_sweep

    config = {"dataset": "EuroSAT", "shots": 16, "seed": 1, "n_ctx": 16, "ctx_init": "", "csc": False,
              "class_token_position": "end", "epochs": 10, "precision": "fp32"}
    two = estimate_trial(config, "RN50", DEV_CPU, batch=32, cores=2)
    # The reference, written out: the CPU engine's path (shared prefix for a unified context, packed tokens),
    # its FLOPs at 2 cores' rate, combined with the floor, per step; plus the per-trial overhead.
    layout = prompt_layout(16, 12, False, "end", 2.2)
    flops = step_flops(tower_shape("RN50"), 10, layout, "shared", 32,
                       packed=packs_tokens(10, layout, "shared", "fp32", "cpu")).total
    step = math.hypot(DEV_CPU.step_floor_s, flops / (DEV_CPU.text_gflops_per_core * 1e9 * 2))
    assert two.path == "shared" and two.steps == 10 * (160 // 32)
    assert two.seconds == pytest.approx(two.steps * step + DEV_CPU.trial_overhead_s)
    assert estimate_trial(config, "RN50", GPUS["H100"]).path == "truncated"  # 10 classes: the GPU rule differs
    one = estimate_trial(config, "RN50", DEV_CPU, batch=32, cores=1)
    assert one.seconds > two.seconds  # more cores, more FLOP/s
    assert estimate_trial({**config, "precision": "bf16"}, "RN50", DEV_CPU, cores=2).seconds > 10 * two.seconds

    raw = {"data": {"datasets": ["EuroSAT"], "shots": [16], "seeds": [1, 2], "splits_dir": "/nonexistent"},
           "backbone": {"arch": "RN50"}, "train": {"epochs": 10, "batch_size": 32},
           "sweep": {"space": {"n_ctx": [16]}, "cpus_per_trial": 2, "max_concurrent": 3}}
    from pipeline.params import params_from_dict

    cpu = estimate_sweep(params_from_dict(raw))
    assert cpu.on_cpu and cpu.unit == "CPU core-hours" and cpu.slots == (1, 3)
    assert cpu.hours == pytest.approx(2 * two.seconds * 2 / 3600)  # 2 seeds x 2 cores
    assert cpu.wall_hours(2) == pytest.approx(two.seconds / 3600)
    text = cpu.summary()
    assert text.startswith("cost model: 2 trials, ") and "CPU core-hours (2 core(s) per trial; as the params ask: " in text
    assert "sweep.gpus_per_trial = 0, sweep.cpus_per_trial = 2) at the rate measured on" in text
    assert "3 trials at a time" in text and "GPU" not in text.splitlines()[0]
    forced = estimate_sweep(params_from_dict(raw), gpu="A100")  # a GPU named for a CPU sweep: costed there, said so
    assert not forced.on_cpu and "GPU-hours on A100" in forced.summary()
    assert "the params ask for CPU trials (sweep.gpus_per_trial = 0)" in forced.summary()
    raw["sweep"]["gpus_per_trial"] = 1
    gpu = estimate_sweep(params_from_dict(raw))
    assert gpu.unit == "GPU-hours" and gpu.hours == pytest.approx(estimate_gpu_hours(params_from_dict(raw)).hours)


# ------------------------------------------------------------------------------ methods and protocols

COCOOP = {"dataset": "EuroSAT", "protocol": "fewshot", "shots": 16, "seed": 1, "method": "cocoop", "n_ctx": 4,
          "ctx_init": "a photo of a", "csc": False, "class_token_position": "end", "lr": 0.002, "epochs": 10,
          "batch_size": 4, "precision": "fp32", "kg_weight": None, "meta_reduction": 16}


def test_a_cocoop_trial_encodes_images_times_classes_prompts_in_its_steps_and_evaluations() -> None:
    from pipeline.engine.flops import packs_tokens, prompt_layout, step_flops, tower_shape
    from pipeline.sweep.estimate import DEV_CPU

    trial = estimate_trial(COCOOP, "RN50", DEV_CPU, batch=32, cores=2)
    # By hand: EuroSAT has 10 classes and 8,100 test images; 16 shots -> 160 training images, 4 a step (the
    # config's batch_size wins over train.batch_size) -> 40 steps an epoch. "a photo of a" is 4 tokens; on a CPU
    # the engine runs the shared prefix and packs. A step runs 4 images x 10 prompts: 4 times one image's
    # text pass over its 10 prompts, each with its own copy of the shared prefix.
    layout = prompt_layout(4, 12, False, "end", 2.2)
    packed = packs_tokens(10, layout, "shared", "fp32", "cpu")
    per_image = step_flops(tower_shape("RN50"), 10, layout, "shared", 1, packed=packed)
    rate = DEV_CPU.text_gflops_per_core * 1e9 * 2
    step = math.hypot(DEV_CPU.step_floor_s, 4 * per_image.total / rate)
    assert trial.steps == 10 * 40 and trial.flops_per_step == pytest.approx(4 * per_image.total)
    # Evaluation: forward only (a linear layer's backward costs its forward, attention's twice), per image over
    # its 10 prompts, in chunks of 4096 // 10 = 409 images: val (4 shots x 10 classes) once, then the test set.
    forward = per_image.dense / 2 + per_image.attention / 3 + per_image.head / 2

    def chunk(images: int) -> float:
        return math.hypot(DEV_CPU.step_floor_s, images * forward / rate)

    evaluation = chunk(40) + 19 * chunk(409) + chunk(8100 - 19 * 409)
    assert trial.pass_seconds == pytest.approx(evaluation)
    assert trial.seconds == pytest.approx(400 * step + evaluation + DEV_CPU.trial_overhead_s)

    # An epoch's text-tower work is N_train x C prompts whatever the batch: batch 1 has 4x the steps of a quarter
    # of the FLOPs each (and pays the per-step floor 4x as often).
    one = estimate_trial({**COCOOP, "batch_size": 1}, "RN50", DEV_CPU, cores=2)
    assert one.steps == 4 * trial.steps and one.flops_per_step == pytest.approx(trial.flops_per_step / 4)
    assert one.seconds > trial.seconds
    # Against CoOp with the same prompts: CoOp's step runs the 10 prompts once for its whole batch.
    coop = estimate_trial({**COCOOP, "method": "coop"}, "RN50", DEV_CPU, cores=2)
    assert coop.steps == trial.steps and coop.pass_seconds == 0
    # The difference: 3 more images' passes over the prompts (the logits, 4 x 10 dot products, are the same).
    logits = 2 * 2 * 4 * 10 * tower_shape("RN50").embed_dim
    assert trial.flops_per_step - coop.flops_per_step == pytest.approx(3 * per_image.total - logits + logits / 4)
    with pytest.raises(ValueError, match="no test-set size for dataset 'Twenty'"):
        estimate_trial({**COCOOP, "dataset": "Twenty"}, "RN50", DEV_CPU, classes={"Twenty": 20})
    # On a GPU the official recipe (batch 1, 10 epochs) on 16-shot ImageNet: 160,000 steps of 1000 prompts.
    imagenet = estimate_trial({**COCOOP, "dataset": "ImageNet", "batch_size": 1, "precision": "fp16"}, "ViT-B-16",
                              GPUS["H100"])
    assert imagenet.steps == 160_000 and imagenet.n_classes == 1000
    # 50,000 test images x 1000 classes: the evaluation is a sizeable part of the trial.
    assert 0.05 * imagenet.seconds < imagenet.pass_seconds < 0.5 * imagenet.seconds


def test_a_cocoop_epoch_grows_with_training_images_times_classes(tmp_path: Path) -> None:
    from pipeline.sweep.estimate import DEV_CPU

    for name, n in (("Ten", 10), ("Twenty", 20)):  # class names of one token each, 100 test images
        (tmp_path / name).mkdir()
        (tmp_path / name / "test.json").write_text(json.dumps({"classnames": [chr(ord("a") + i) for i in range(n)],
                                                               "test": [{}] * 100}))
    ten, twenty = (estimate_trial({**COCOOP, "dataset": name}, "RN50", DEV_CPU, splits_dir=tmp_path, cores=2)
                   for name in ("Ten", "Twenty"))
    assert twenty.steps == 2 * ten.steps  # twice the images, 4 a step
    # ... and each of them runs twice the prompts: about 4x the training FLOPs (each image's shared prefix
    # is encoded once, whatever the classes: a little under 4x).
    ratio = twenty.steps * twenty.flops_per_step / (ten.steps * ten.flops_per_step)
    assert 3.6 < ratio < 4.0
    # Evaluations: the 100 test images run 20 prompts each instead of 10 (2x), val's 4 x C images too (4x).
    assert 2.0 * ten.pass_seconds < twenty.pass_seconds < 4.0 * ten.pass_seconds


def test_a_base2new_trial_trains_on_the_base_half_and_tests_both_halves() -> None:
    from pipeline.engine.flops import packs_tokens, prompt_layout, step_flops, tower_shape
    from pipeline.sweep.estimate import DEV_CPU

    coop = {**COCOOP, "dataset": "SUN397", "method": "coop", "n_ctx": 16, "ctx_init": "", "batch_size": None,
            "epochs": 20, "protocol": "base2new"}
    trial = estimate_trial(coop, "RN50", DEV_CPU, batch=32, cores=2)
    # SUN397's 397 classes: the first 199 are base; 16 shots of each -> 3184 images, 99 steps of 32 an epoch.
    assert trial.n_classes == 199 and trial.steps == 20 * (16 * 199 // 32)
    half = estimate_trial({**coop, "dataset": "Half", "protocol": "fewshot"}, "RN50", DEV_CPU, batch=32, cores=2,
                          classes={"Half": 199})
    assert (trial.steps, trial.flops_per_step, trial.path) == (half.steps, half.flops_per_step, half.path)
    # The one evaluation more than few-shot's: the 198 new classes' prompts, one forward pass.
    layout = prompt_layout(16, 12, False, "end", 2.2)
    new = step_flops(tower_shape("RN50"), 198, layout, "shared", 0,
                     packed=packs_tokens(198, layout, "shared", "fp32", "cpu"))
    new_pass = math.hypot(DEV_CPU.step_floor_s, (new.dense / 2 + new.attention / 3 + new.head / 2)
                          / (DEV_CPU.text_gflops_per_core * 1e9 * 2))
    assert trial.pass_seconds == pytest.approx(new_pass) and half.pass_seconds == 0
    assert trial.seconds == pytest.approx(half.seconds + new_pass)
    fewshot = estimate_trial({**coop, "protocol": "fewshot"}, "RN50", DEV_CPU, batch=32, cores=2)
    assert fewshot.n_classes == 397 and trial.seconds < 0.6 * fewshot.seconds

    # CoCoOp base-to-new: its tests encode the base classes' share of the test images against the base
    # classes' prompts, and the rest against the new classes'.
    b2n = estimate_trial({**COCOOP, "protocol": "base2new"}, "RN50", DEV_CPU, cores=2)
    five = {"Five": 5}
    base_only = estimate_trial({**COCOOP, "dataset": "Five"}, "RN50", DEV_CPU, cores=2, classes=five,
                               test_images={"Five": 4050})
    val_only = estimate_trial({**COCOOP, "dataset": "Five"}, "RN50", DEV_CPU, cores=2, classes=five,
                              test_images={"Five": 0})
    assert b2n.n_classes == 5 and b2n.steps == 10 * (16 * 5 // 4) == base_only.steps
    assert b2n.flops_per_step == base_only.flops_per_step
    # val on the base classes, then the base test (4050 of EuroSAT's 8100 images) and the new one (4050).
    assert b2n.pass_seconds == pytest.approx(val_only.pass_seconds + 2 * (base_only.pass_seconds
                                                                         - val_only.pass_seconds))


def test_kgcoop_costs_coop_plus_one_pass_over_its_hand_crafted_prompts_and_xd_tests_the_targets() -> None:
    from pipeline.engine.flops import prompt_layout, step_flops, tower_shape
    from pipeline.sweep.estimate import DEV_CPU

    kg = {**COCOOP, "method": "kgcoop", "batch_size": 128, "epochs": 100, "kg_weight": 8.0, "meta_reduction": None}
    kgcoop = estimate_trial(kg, "RN50", DEV_CPU, cores=2)
    coop = estimate_trial({**kg, "method": "coop"}, "RN50", DEV_CPU, cores=2)
    assert (kgcoop.steps, kgcoop.flops_per_step) == (coop.steps, coop.flops_per_step) == (100, coop.flops_per_step)
    anchors = step_flops(tower_shape("RN50"), 10, prompt_layout(0, 12, True, "end"), "official", 0)
    anchor_pass = math.hypot(DEV_CPU.step_floor_s, (anchors.dense / 2 + anchors.attention / 3 + anchors.head / 2)
                             / (DEV_CPU.text_gflops_per_core * 1e9 * 2))
    assert kgcoop.seconds == pytest.approx(coop.seconds + anchor_pass)

    # xd: the targets other than the trial's own dataset are tested too (CoOp: a pass over their prompts).
    xd = {**kg, "method": "coop", "protocol": "xd"}
    targets = ["EuroSAT", "DTD", "Caltech101"]
    transfer = estimate_trial(xd, "RN50", DEV_CPU, cores=2, transfer_targets=targets)
    assert transfer.steps == coop.steps and transfer.pass_seconds > 0
    dtd_only = estimate_trial(xd, "RN50", DEV_CPU, cores=2, transfer_targets=["DTD"])
    caltech_only = estimate_trial(xd, "RN50", DEV_CPU, cores=2, transfer_targets=["Caltech101"])
    assert transfer.pass_seconds == pytest.approx(dtd_only.pass_seconds + caltech_only.pass_seconds)
    assert estimate_trial({**xd, "protocol": "fewshot"}, "RN50", DEV_CPU, cores=2,
                          transfer_targets=targets).seconds == coop.seconds  # only xd trials test on targets
    cocoop_xd = estimate_trial({**COCOOP, "protocol": "xd"}, "RN50", DEV_CPU, cores=2, transfer_targets=["DTD"])
    cocoop = estimate_trial(COCOOP, "RN50", DEV_CPU, cores=2)
    dtd = estimate_trial({**COCOOP, "dataset": "DTD", "epochs": 0}, "RN50", DEV_CPU, cores=2)
    assert cocoop_xd.pass_seconds > cocoop.pass_seconds + 0.5 * dtd.pass_seconds  # DTD's 1692 images x 47 classes


# ------------------------------------------------------------------------------ bundles

CSC = {"dataset": "EuroSAT", "protocol": "fewshot", "shots": 16, "seed": 1, "method": "coop", "n_ctx": 16,
       "ctx_init": "", "csc": True, "class_token_position": "end", "lr": 0.002, "epochs": 10, "batch_size": None,
       "precision": "fp16", "kg_weight": None, "meta_reduction": None}


def test_a_bundle_of_one_costs_what_its_configuration_costs_alone() -> None:
    from pipeline.sweep.estimate import DEV_CPU

    variants = [CSC, {**CSC, "csc": False}, {**CSC, "csc": False, "ctx_init": "a photo of a", "n_ctx": 4},
                {**CSC, "csc": False, "class_token_position": "middle", "dataset": "ImageNet", "shots": 2},
                {**CSC, "protocol": "base2new", "dataset": "SUN397", "csc": False}]
    for config in variants:
        for device, precision in ((GPUS["H100"], "fp16"), (DEV_CPU, "fp32")):
            member = {**config, "precision": precision}
            alone = estimate_trial(member, "RN50", device, cores=2)
            bundle = estimate_trial({"bundle": [member]}, "RN50", device, cores=2)
            assert (bundle.steps, bundle.path, bundle.passes) == (alone.steps, alone.path, 1), member
            assert bundle.flops_per_step == pytest.approx(alone.flops_per_step, rel=1e-12)
            assert bundle.seconds == pytest.approx(alone.seconds, rel=1e-12) and bundle.configs == [member]


def test_a_gpu_bundle_pays_the_step_floor_and_the_trial_overhead_once() -> None:
    from pipeline.sweep.estimate import BUNDLE_MEMBER_OVERHEAD_S

    h100 = GPUS["H100"]
    members = [{**CSC, "seed": seed, "lr": lr} for seed in (1, 2, 3, 4) for lr in (0.002, 0.02)]  # 8 alike
    alone = estimate_trial(members[0], "RN50", h100)
    bundle = estimate_trial({"bundle": members}, "RN50", h100)
    # By hand: CSC prompts (nothing shared) of 10 classes: one truncated pass over the 8 x 10 prompts, its compute
    # 8 members' FLOPs at the truncated path's rate, the floor once; the overhead once, 0.5 s per further member.
    compute = 8 * alone.flops_per_step / (h100.peak_tflops * 1e12 * h100.utilisation["truncated"])
    step = math.hypot(h100.launch_s["truncated"], compute)
    assert bundle.passes == 1 and bundle.path == "truncated" and bundle.steps == alone.steps == 10 * 5
    assert bundle.seconds == pytest.approx(alone.steps * step + h100.trial_overhead_s + 7 * BUNDLE_MEMBER_OVERHEAD_S)
    assert alone.seconds < bundle.seconds < 8 * alone.seconds / 4  # floor-bound steps: far below 8 lone trials
    assert bundle.steps * step < 2 * (alone.seconds - h100.trial_overhead_s)  # 8 steps' work in < 2 lone steps' time

    # Members sharing a prefix: the group decides the path, as the engine's bundle does. "a photo of a" at the end
    # on ImageNet saves 999 x 4 prompt positions alone (under the 4,000 of the GPU rule: truncated), twice that
    # for a pair (shared prefix).
    words = {**CSC, "dataset": "ImageNet", "shots": 1, "csc": False, "ctx_init": "a photo of a", "n_ctx": 4}
    assert estimate_trial(words, "RN50", h100).path == "truncated"
    pair = estimate_trial({"bundle": [words, {**words, "seed": 2}]}, "RN50", h100)
    assert pair.path == "shared" and pair.passes == 1
    mixed = estimate_trial({"bundle": [words, {**words, "seed": 2}, {**words, "csc": True, "ctx_init": ""}]}, "RN50",
                           h100)
    assert mixed.path == "shared+truncated" and mixed.passes == 2

    for bad, match in (([{**CSC, "method": "kgcoop"}], "bundle member 0 trains 'kgcoop'"),
                       ([CSC, {**CSC, "dataset": "DTD"}], "bundle member 1 has 47 classes"),
                       ([], "an empty bundle")):
        with pytest.raises(ValueError, match=match):
            estimate_trial({"bundle": bad}, "RN50", h100)


def test_a_cpu_bundle_costs_its_members_alone() -> None:
    from pipeline.sweep.estimate import DEV_CPU

    member = {**CSC, "dataset": "Caltech101", "csc": False, "precision": "fp32"}
    members = [{**member, "seed": seed} for seed in range(1, 9)]
    for arch in ("RN50", "coop-tiny-rn"):  # compute-bound steps (~0.5 s), and floor-bound ones (the demo's)
        alone = [estimate_trial(m, arch, DEV_CPU, cores=2) for m in members]
        bundle = estimate_trial({"bundle": members}, arch, DEV_CPU, cores=2)
        # 8 members of 100 classes: passes of at most 400 prompts, so two. On CPUs the per-step floor is the
        # members' own (bundled CPU steps measured 1.0-1.3x), and each member pays a CPU trial's overhead: alike
        # members cost exactly what they cost alone.
        assert bundle.passes == 2 and bundle.path == "shared"
        assert bundle.seconds == pytest.approx(sum(t.seconds for t in alone), rel=1e-9)
    floor_bound = alone[0].steps * DEV_CPU.step_floor_s / (alone[0].seconds - DEV_CPU.trial_overhead_s)
    assert floor_bound > 0.5  # coop-tiny-rn: a floor paid once per pass would show


def test_sweep_trials_bundle_as_the_sweep_does_and_the_grid_estimate_costs_them() -> None:
    from pipeline.params import override
    from pipeline.sweep.estimate import estimate_sweep, sweep_trials

    params = load_params(REPO / "configs" / "paper_rn50.yaml")  # GPU trials, sweep.bundle_size auto
    small = override(params, sweep={"space": {**params.sweep.space, "dataset": ["EuroSAT", "ImageNet"]}})
    trials = sweep_trials(small)
    members = [len(t["bundle"]) for t in trials]
    # auto on a GPU: ceil(1600 / C) members, up to the 18 (6 variants x 3 seeds) that share dataset and shots.
    assert members == [18] * 5 + [2] * 45 and sum(members) == 180
    bundled, alone = estimate_sweep(small, trials), estimate_sweep(small)
    assert bundled.configurations == alone.configurations == len(alone.trials) == 180
    assert bundled.count() == "180 configurations in 50 trials (50 bundles of 2-18)"
    assert bundled.by_dataset()["EuroSAT"] < alone.by_dataset()["EuroSAT"] / 5  # 90 trials' overheads: 5
    assert alone.by_dataset()["ImageNet"] / 2 < bundled.by_dataset()["ImageNet"] < alone.by_dataset()["ImageNet"]
    assert "NOT MEASURED on a GPU" in bundled.summary() and "bundle" not in alone.summary()
    # The official code trains one configuration at a time: its estimate of the bundles is the lone one.
    official = estimate_sweep(small, trials, path="official")
    assert official.hours == pytest.approx(estimate_sweep(small, path="official").hours)
    # sweep.bundle_size 1 and the CPU's auto: no bundles, the very same estimate.
    one = override(small, sweep={"bundle_size": 1})
    assert sweep_trials(one) == build_configs(one)
    assert estimate_sweep(one, sweep_trials(one)).hours == alone.hours
    cpu = override(small, sweep={"gpus_per_trial": 0}, train={"precision": "fp32"})
    assert not any("bundle" in t for t in sweep_trials(cpu))


def build_configs(params: object) -> list[dict]:
    from pipeline.sweep.space import build_space

    return build_space(params).enumerate()  # type: ignore[arg-type]


def test_costmodel_prints_the_bundled_cost_beside_the_lone_one(capsys: pytest.CaptureFixture[str],
                                                               tmp_path: Path) -> None:
    from pipeline.sweep.estimate import estimate_sweep, sweep_trials
    from pipeline.tools.costmodel import main

    profile = REPO / "configs" / "paper_b2n_vitb16.yaml"  # GPU trials; its 33 CoOp configurations bundle (auto)
    out = tmp_path / "b2n.json"
    assert main(["--params", str(profile), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cost model: 99 trials, " in printed
    assert "with bundles (sweep.bundle_size auto): 99 configurations in 77 trials (11 bundles of 3), " in printed
    assert "NOT MEASURED on a GPU" in printed
    saved = json.loads(out.read_text())
    params = load_params(profile)
    assert saved["bundled"]["hours"] == pytest.approx(estimate_sweep(params, sweep_trials(params)).hours)
    assert saved["bundled"]["trials"] == 77 and saved["bundled"]["hours"] < saved["hours"]
    assert main(["--params", str(profile), "--official"]) == 0  # the official code: no bundles
    assert "with bundles" not in capsys.readouterr().out
