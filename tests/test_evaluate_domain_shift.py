"""The domain-shift stage's library: the source and targets from params, variant classes matched by ImageNet
label or else by name, and a run on the generated world's source task and its shifted sets (CoOp, CoCoOp and
KgCoOp models; base-to-new trials are no sources).

ImageNet transfer is checked end to end in test_paper_grid.py and on CLIP's real class list in
test_classnames.py; an empty table without the source (and the report's line for it) in test_report_html.py.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from pipeline.data.datasets import load_dataset
from pipeline.data.fewshot import (
    EvalList,
    eval_list_path,
    make_eval_list,
    make_fewshot_split,
    read_eval_list,
    split_path,
    write_eval_list,
    write_fewshot_split,
)
from pipeline.data.synthetic.tasks import SHAPE_CLASSES, SOURCE, get_task, write_world
from pipeline.engine.backbone import Backbone
from pipeline.engine.cocoop import CoCoOp
from pipeline.engine.context import ContextMeta, save_learned
from pipeline.engine.methods import METHODS, learned_model
from pipeline.engine.prompt import PromptConfig
from pipeline.evaluate.domain_shift import (
    COLUMNS,
    name_rows,
    run_domain_shift,
    shift_targets,
    subset_rows,
    target_rows,
    trial_protocol,
)
from pipeline.evaluate.inputs import StageError, open_cache
from pipeline.evaluate.methods import LEARNED_METHOD_NAMES, learned_method_name
from pipeline.features.assemble import load_eval_features
from pipeline.features.build import build_dataset_features
from pipeline.features.cache import FeatureConfig
from pipeline.params import Params, ParamsError, params_from_dict


def variant(labels: list[int] | None, names: list[str] | None = None) -> EvalList:
    names = names or [f"class {i}" for i in range(len(labels or [0, 1]))]
    return EvalList(dataset="ImageNetA", classnames=names, template="a photo of a {}.", test=[],
                    imagenet_labels=labels, test_only=True)


def shifted(names: list[str]) -> EvalList:
    return EvalList(dataset="WorldSketchV2", classnames=names, template="a photo of a {}.", test=[],
                    test_only=True)


def test_variant_classes_map_to_the_source_rows_of_their_imagenet_labels() -> None:
    source_labels = [5, 3, 9, 1]  # the source's class list need not be in label order
    assert subset_rows(source_labels, variant([1, 9])) == [3, 2]
    assert subset_rows(None, variant([7, 0])) == [7, 0]  # no list: the 1000 ImageNet classes in order


def test_unmatched_variants_are_refused_naming_the_classes() -> None:
    not_among = r"'class 1' \(ImageNet label 4\) are not among the 4 ImageNet classes"
    with pytest.raises(StageError, match=not_among):
        subset_rows([5, 3, 9, 1], variant([1, 4]))
    with pytest.raises(StageError, match="ImageNetA has no ImageNet label map"):
        subset_rows([5, 3, 9, 1], variant(None))


def test_learned_rows_name_every_engine_method_as_the_papers_do() -> None:
    assert set(LEARNED_METHOD_NAMES) == set(METHODS)
    assert [learned_method_name(m) for m in ("coop", "cocoop", "kgcoop")] == ["CoOp", "CoCoOp", "KgCoOp"]
    with pytest.raises(ValueError, match="unknown method 'maple'"):
        learned_method_name("maple")


def test_trials_of_sweeps_without_a_protocol_column_are_few_shot() -> None:
    assert trial_protocol({"trial_key": "k"}) == "fewshot" and trial_protocol({"protocol": ""}) == "fewshot"
    assert trial_protocol({"protocol": "base2new"}) == "base2new"


def test_a_missing_sweep_says_to_run_it_first(tmp_path: Path) -> None:
    params = params_from_dict({"sweep": {"results_dir": str(tmp_path / "sweep")}})
    with pytest.raises(StageError, match=r"trials.csv is missing; run the sweep first \(dvc repro sweep\)"):
        run_domain_shift(params, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ source and targets by name


def test_a_shifted_set_without_a_label_map_is_matched_by_class_name() -> None:
    source = ["circle", "square", "triangle", "star"]
    assert name_rows(source, shifted(source)) == [0, 1, 2, 3]
    assert name_rows(source, shifted(["star", "square"])) == [3, 1]  # a subset, in its own order
    assert name_rows(["missile", "missile"], shifted(["missile", "missile"])) == [0, 1]  # the same list: itself
    with pytest.raises(StageError, match=r"WorldSketchV2: classes 'heart' are not among the 4 classes"):
        name_rows(source, shifted(["circle", "heart"]))
    with pytest.raises(StageError, match=r"classes 'missile' name several source classes"):
        name_rows(["missile", "tank", "missile"], shifted(["missile"]))


def test_targets_use_the_imagenet_label_map_only_when_the_source_has_one() -> None:
    imagenet = EvalList("ImageNet", ["a", "b", "c"], "a photo of a {}.", [], imagenet_labels=[7, 8, 9])
    assert target_rows(imagenet, variant([9, 7], ["c", "a"])) == [2, 0]
    assert target_rows(imagenet, variant([8, 9], ["x", "y"])) == [1, 2]  # labels decide, not names
    world = EvalList("WorldShape", ["circle", "square"], "a photo of a {}.", [])
    assert target_rows(world, shifted(["square"])) == [1]
    assert target_rows(world, variant([1], ["square"])) == [1]  # a map the source lacks is not used


def test_targets_are_the_listed_shifted_sets_that_data_datasets_holds() -> None:
    paper = ["ImageNet", "Caltech101", "ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"]
    defaults = params_from_dict({"data": {"datasets": paper}})
    assert (defaults.domain_shift.source, defaults.domain_shift.targets) == (
        "ImageNet", ["ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"])
    assert shift_targets(defaults) == ["ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"]
    assert shift_targets(params_from_dict({})) == []  # the demo: FashionMNIST alone
    world = params_from_dict({
        "data": {"datasets": ["WorldShape", "WorldSketchBackgrounds", "WorldPastelRare", "WorldSketchV2"]},
        "domain_shift": {"source": "WorldShape",
                         "targets": ["WorldSketchV2", "WorldSketchBackgrounds", "WorldSketchPastel"]}})
    assert shift_targets(world) == ["WorldSketchBackgrounds", "WorldSketchV2"]  # in data.datasets' order


@pytest.mark.parametrize(("raw", "message"), [
    ({"source": "ImageNet", "targets": ["ImageNetV2", "ImageNet"]}, "distinct datasets other than the source"),
    ({"targets": ["ImageNetA", "ImageNetA"]}, "distinct datasets other than the source"),
    ({"source": " "}, "domain_shift.source and domain_shift.targets must name datasets"),
    ({"targets": "ImageNetA"}, "domain_shift.targets: expected a list"),
    ({"sources": ["ImageNet"]}, "unknown key 'domain_shift.sources'"),
])
def test_bad_domain_shift_params_name_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        params_from_dict({"domain_shift": raw})


# ------------------------------------------------------------------ the world's source and shifted sets

SUBSET = "WorldSketchSubset"  # a user's own shifted set of three of the source's classes (generic reader)


def world_params(root: Path) -> Params:
    return params_from_dict({
        "data": {"root": str(root / "data"), "datasets": [SOURCE.name, "WorldSketchV2", "WorldSketchBackgrounds", SUBSET],
                 "shots": [2], "seeds": [1], "splits_dir": str(root / "splits")},
        "features": {"dir": str(root / "cache"), "views": 1},
        "train": {"device": "cpu"},
        "sweep": {"results_dir": str(root / "sweep")},
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "domain-shift-test"},
        "report": {"baselines_dir": str(root / "out")},
        "domain_shift": {"source": SOURCE.name,
                         "targets": ["WorldSketchV2", "WorldSketchBackgrounds", "WorldSketchPastel", SUBSET]},
    })


# The trials write_trials saves: key -> (method, csc, protocol). A base2new trial learned the base half of the
# classes: no domain-shift source (if it were used, its classes would not match the source's and the run fail).
TRIALS = {"unified": ("coop", False, ""), "csc": ("coop", True, "fewshot"), "cocoop": ("cocoop", False, "xd"),
          "kgcoop": ("kgcoop", False, "fewshot"), "cocoop-b2n": ("cocoop", False, "base2new")}


def write_trials(params: Params, backbone: Backbone, classnames: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """A finished sweep: trials.csv with 2-shot models of TRIALS (random contexts and meta-networks), saved
    where the sweep puts them; returns each trial's tensors."""
    results = Path(params.sweep.results_dir)
    generator = torch.Generator().manual_seed(0)
    learned, rows = {}, []
    for key, (method, csc, protocol) in TRIALS.items():
        names = classnames[: (len(classnames) + 1) // 2] if protocol == "base2new" else classnames
        shape = (len(names), 4, backbone.text_width) if csc else (4, backbone.text_width)
        tensors = {"ctx": torch.randn(shape, generator=generator)}
        params_of_method = {}
        if method == "cocoop":
            model = CoCoOp(backbone, names, PromptConfig(n_ctx=4), generator=generator, meta_reduction=4)
            tensors = model.learned_tensors()
            params_of_method = {"meta_reduction": 4}
        elif method == "kgcoop":
            params_of_method = {"kg_weight": 8.0}
        meta = ContextMeta(backbone.arch, None, backbone.fingerprint, 4, "end", csc, "", names, SOURCE.name, 2, 1,
                           method=method, method_params=params_of_method)
        save_learned(results / "contexts" / key / "ctx.safetensors", tensors, meta)
        learned[key] = tensors
        rows.append({"trial_key": key, "dataset": SOURCE.name, "state": "FINISHED", "shots": 2, "seed": 1,
                     "n_ctx": 4, "ctx_init": "", "csc": csc, "class_token_position": "end", "config": key,
                     "mlflow_run_id": "", "protocol": protocol})
    with (results / "trials.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return learned


@pytest.mark.slow  # an MLflow run
def test_world_contexts_are_evaluated_on_the_shifted_sets(tmp_path: Path, tiny: Backbone) -> None:
    params = world_params(tmp_path)
    subset = dataclasses.replace(get_task("WorldSketchV2"), name=SUBSET, classes=SHAPE_CLASSES[5:1:-1])
    tasks = [dataclasses.replace(SOURCE, counts=(2, 1, 2))] + [
        dataclasses.replace(t, counts=(0, 0, 2)) for t in (get_task("WorldSketchV2"), get_task("WorldSketchBackgrounds"),
                                                             subset)]
    write_world(tmp_path / "data", tasks)  # prepare and features, as their stages do
    for name in params.data.datasets:
        splits = load_dataset(name, tmp_path / "data")
        write_eval_list(make_eval_list(splits), eval_list_path(tmp_path / "splits", name))
        if not splits.test_only:
            write_fewshot_split(make_fewshot_split(splits, 2, 1), split_path(tmp_path / "splits", name, 2, 1))
        build_dataset_features(tmp_path / "cache", tmp_path / "data", tmp_path / "splits", name, [2], [1], tiny,
                               views=1, progress=False)
    learned = write_trials(params, tiny, SOURCE.classnames)

    rows = run_domain_shift(params, tmp_path / "out", progress=False)

    targets = [SOURCE.name, "WorldSketchV2", "WorldSketchBackgrounds", SUBSET]  # Pastel is not in data.datasets
    sources = [key for key, (_, _, protocol) in TRIALS.items() if protocol != "base2new"]
    with (tmp_path / "out" / "domain_shift.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == COLUMNS and len(table) == len(rows) == 2 * len(targets) + len(sources) * len(targets)
    assert {r["source"] for r in table} == {SOURCE.name}
    assert {(r["method"], r["target"]) for r in table} == {
        (m, t) for m in ("zero-shot", "zero-shot-ensemble", "CoOp", "CoCoOp", "KgCoOp") for t in targets}
    assert sorted({r["trial_key"] for r in table if r["trial_key"]}) == sorted(sources)
    config = FeatureConfig.from_params(tiny, params.features)
    source_rows = list(range(len(SOURCE.classnames)))
    for r in (r for r in table if r["trial_key"]):
        # The reference: the saved model over all of the source's classes, its logits read at the columns of
        # the target's classes (the subset's, by name: cross, star, diamond, triangle -> rows 5, 4, 3, 2);
        # CoCoOp's logits per image, from that image's own prompts.
        method, csc, protocol = TRIALS[r["trial_key"]]
        evaluation = read_eval_list(eval_list_path(params.data.splits_dir, r["target"]))
        columns = [SOURCE.classnames.index(name) for name in evaluation.classnames]
        assert columns == (source_rows if r["target"] != SUBSET else [5, 4, 3, 2])
        meta = ContextMeta(tiny.arch, None, tiny.fingerprint, 4, "end", csc, "", SOURCE.classnames, method=method,
                           method_params={"meta_reduction": 4} if method == "cocoop" else {})
        model = learned_model(tiny, learned[r["trial_key"]], meta)
        features = load_eval_features(params.features.dir, eval_list_path(params.data.splits_dir, r["target"]),
                                      config, cache=open_cache(params, r["target"], config))
        with torch.no_grad():
            logits = model(F.normalize(features.test, dim=-1))[:, columns]
        expected = 100.0 * float((logits.argmax(-1) == features.test_labels).float().mean())
        assert float(r["test_acc"]) == pytest.approx(expected, abs=1e-3), r
        assert r["method"] == LEARNED_METHOD_NAMES[method] and r["protocol"] == (protocol or "fewshot")
        assert (r["shots"], r["seed"], r["csc"]) == ("2", "1", str(csc))
    run = MlflowClient(params.tracking.uri).search_runs(
        [MlflowClient(params.tracking.uri).get_experiment_by_name("domain-shift-test").experiment_id])[0]
    assert run.data.params["source"] == SOURCE.name
    assert run.data.params["targets"] == ",".join(targets[1:])


def test_an_unprepared_target_says_to_run_prepare(tmp_path: Path, tiny: Backbone) -> None:
    params = world_params(tmp_path)
    write_trials(params, tiny, SOURCE.classnames)
    with pytest.raises(StageError, match=r"splits/WorldSketch/test.json does not exist; run the prepare stage"):
        run_domain_shift(params, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
