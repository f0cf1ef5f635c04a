"""The world's downstream tasks: their definitions, files deterministic by seed, the reader and prepare on them,
shifted sets with the source's classes, and class names that are rare in the pretraining captions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.datasets import DATASETS, WORLD_TASKS, load_dataset
from pipeline.data.fewshot import make_fewshot_split
from pipeline.data.synthetic.corpus import make_corpus
from pipeline.data.synthetic.tasks import (
    HELD_OUT_BACKGROUNDS,
    IMAGE_SIZE,
    SOURCE,
    SOURCE_BACKGROUNDS,
    TASKS,
    WORLD_SEED,
    get_task,
    image_path,
    task_scene,
    write_task,
    write_world,
)
from pipeline.data.synthetic.world import COLOURS, SHAPES, WorldError, render
from pipeline.params import PretrainParams

REPO = Path(__file__).resolve().parents[1]
SHIFTED = [t for t in TASKS if t.test_only]
TRAINABLE = [t for t in TASKS if not t.test_only]


def mini(task, train: int = 2, val: int = 1, test: int = 2):
    """`task` with a few images per class: the same first images as the full task (images are keyed by index)."""
    return dataclasses.replace(task, counts=(0, 0, test) if task.test_only else (train, val, test))


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- definitions


def test_three_kinds_of_task_and_a_source_with_four_shifted_sets() -> None:
    kinds = {t.name: t.kind for t in TRAINABLE}
    assert kinds == {"WorldShape": "coarse", "WorldSketch": "coarse", "WorldPastel": "fine-grained",
                     "WorldPastelRare": "rare names"}
    assert {t.name: len(t.classes) for t in TRAINABLE} == {
        "WorldShape": 8, "WorldSketch": 8, "WorldPastel": 20, "WorldPastelRare": 10}
    # Only WorldShape is drawn in the pretraining corpus's style; the others are domains it never shows.
    assert {t.name: t.style for t in TRAINABLE} == {"WorldShape": "normal", "WorldSketch": "lines",
                                                    "WorldPastel": "palette", "WorldPastelRare": "palette"}
    assert SOURCE.name == "WorldSketch"
    assert [t.name for t in SHIFTED] == ["WorldSketchV2", "WorldSketchBackgrounds", "WorldSketchPastel",
                                         "WorldSketchLarge"]
    assert [t.style for t in SHIFTED] == ["lines", "lines", "lines+palette", "lines"]
    for task in SHIFTED:
        assert task.source == SOURCE.name and task.classnames == SOURCE.classnames and task.counts[:2] == (0, 0)
    for task in TASKS:
        assert len(set(task.classnames)) == len(task.classes)  # a class is its name


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_sizes_cover_16_shots_for_three_seeds_and_a_test_set_of_hundreds(task) -> None:
    train, val, test = task.counts
    assert test * len(task.classes) >= 400
    if not task.test_only:
        assert train >= 2 * 16 and val >= 4  # 16-shot draws of seeds 1-3 differ; val takes min(K, 4) shots


def test_each_class_fixes_its_attributes_and_the_nuisances_vary() -> None:
    fine = get_task("WorldPastel")
    for label, c in enumerate(fine.classes):
        objects = [task_scene(fine, "train", label, i).objects for i in range(3)]
        assert all(len(o) == 1 and o[0].count == 1 for o in objects)  # one object, one copy
        assert {f"{o[0].colour} {o[0].shape}" for o in objects} == {c.name}
    rare = get_task("WorldPastelRare")
    assert [task_scene(rare, "test", label, 0).objects[0].colour for label in range(10)] == list(COLOURS)
    shapes = [task_scene(SOURCE, "train", label, 0).objects[0].shape for label in range(8)]
    assert shapes == list(SHAPES)
    scenes = [task_scene(SOURCE, "train", 0, i) for i in range(40)]
    assert len({s.objects[0].size for s in scenes}) > 1 and len({s.objects[0].texture for s in scenes}) > 1
    assert {s.background for s in scenes} <= set(SOURCE_BACKGROUNDS)


def test_the_background_shift_shows_only_backgrounds_the_source_never_does() -> None:
    shifted = get_task("WorldSketchBackgrounds")
    seen = {task_scene(shifted, "test", label, i).background for label in range(8) for i in range(10)}
    assert seen == set(HELD_OUT_BACKGROUNDS) and not seen & set(SOURCE_BACKGROUNDS)


def test_the_v2_set_is_a_fresh_sample_of_the_source_and_the_large_set_only_larger_drawings() -> None:
    v2, large = get_task("WorldSketchV2"), get_task("WorldSketchLarge")
    assert (v2.pools, v2.style) == (SOURCE.pools, SOURCE.style)
    fresh = [task_scene(v2, "test", label, i) for label in range(8) for i in range(5)]
    assert not {s.objects for s in fresh} & {task_scene(SOURCE, "test", label, i).objects
                                             for label in range(8) for i in range(5)}
    sizes = {task_scene(large, "test", label, i).objects[0].size for label in range(8) for i in range(10)}
    assert sizes == {"medium", "large"}


def test_rare_class_names_are_rare_in_the_pretraining_captions() -> None:
    """The rare-name task's class names appear in far fewer captions than the coarse task's."""
    captions = make_corpus(PretrainParams().corpus_seed, 3000).captions

    def share(word: str) -> float:
        pattern = re.compile(rf"\b{re.escape(word)}\b")
        return sum(bool(pattern.search(c)) for c in captions) / len(captions)

    rare = {name: share(name) for name in get_task("WorldPastelRare").classnames}
    common = {name: share(name) for name in SOURCE.classnames}
    assert all(value > 0 for value in rare.values())  # rare, not unseen
    assert max(rare.values()) < 0.5 * min(common.values()), (rare, common)


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(WorldError, match=r"unknown world task 'WorldShapes'; choose from WorldShape, "):
        get_task("WorldShapes")


# -------------------------------------------------------------------------------------------- the files


def test_files_depend_on_the_seed_alone(tmp_path: Path) -> None:
    source, lines = mini(SOURCE), mini(get_task("WorldSketchV2"))
    write_world(tmp_path / "a", [source, lines])
    write_world(tmp_path / "b", [lines])  # another selection and order: the same files
    write_world(tmp_path / "c", [lines], seed=WORLD_SEED + 1)
    first = digests(tmp_path / "a" / lines.name)
    assert first == digests(tmp_path / "b" / lines.name)
    second = digests(tmp_path / "c" / lines.name)
    assert first.keys() == second.keys()
    changed = [k for k in first if k.endswith(".png") and first[k] != second[k]]
    assert len(changed) == len([k for k in first if k.endswith(".png")])  # another seed, other images


def test_an_image_is_its_scene_rendered_in_the_tasks_style(tmp_path: Path) -> None:
    from PIL import Image

    for name in ("WorldShape", "WorldSketch", "WorldSketchPastel", "WorldPastel"):
        task = mini(get_task(name))
        write_task(task, tmp_path)
        written = Image.open(tmp_path / name / "images" / image_path("test", task.classnames[3], 1))
        expected = render(task_scene(task, "test", 3, 1), IMAGE_SIZE, task.style)
        assert written.size == (IMAGE_SIZE, IMAGE_SIZE) and written.mode == "RGB"
        assert np.array_equal(np.asarray(written), np.asarray(expected))


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_the_reader_loads_each_task_with_its_prompt(tmp_path: Path, task) -> None:
    small = mini(task)
    write_task(small, tmp_path)
    splits = load_dataset(task.name, tmp_path)
    assert splits.classnames == task.classnames
    assert [len(splits.train), len(splits.val), len(splits.test)] == [n * len(task.classes) for n in small.counts]
    assert splits.test_only == task.test_only
    assert splits.template == WORLD_TASKS[task.name][0] == DATASETS[task.name].template
    assert all(splits.classnames[item.label] == item.classname for item in splits.train + splits.test)
    assert all(item.path.startswith(f"{task.name}/images/") for item in splits.test)
    data = json.loads((tmp_path / task.name / f"split_{task.name}.json").read_text())
    assert data["generator"] == {"seed": WORLD_SEED, "image_size": IMAGE_SIZE, "style": task.style,
                                 "kind": task.kind, "source": task.source}
    if not task.test_only:
        split = make_fewshot_split(splits, 2, 1)
        assert len(split.train) == 2 * len(task.classes) and len(split.val) == len(task.classes)


def test_the_registry_names_every_task_and_no_other() -> None:
    assert list(WORLD_TASKS) == [t.name for t in TASKS]
    assert {name: test_only for name, (_, test_only) in WORLD_TASKS.items()} == {t.name: t.test_only for t in TASKS}


def test_shifted_sets_load_with_the_sources_classes_and_labels(tmp_path: Path) -> None:
    write_world(tmp_path, [mini(t) for t in (SOURCE, *SHIFTED)])
    source = load_dataset(SOURCE.name, tmp_path)
    for task in SHIFTED:
        shifted = load_dataset(task.name, tmp_path)
        assert shifted.classnames == source.classnames
        assert {(i.label, i.classname) for i in shifted.test} == {(i.label, i.classname) for i in source.test}


@pytest.mark.slow
def test_the_command_writes_every_task_in_full(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "stages.world", "--out", str(tmp_path / "world")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for task in TASKS:
        splits = load_dataset(task.name, tmp_path / "world")
        assert [len(splits.train), len(splits.val), len(splits.test)] == [n * len(task.classes) for n in task.counts]
    again = subprocess.run([sys.executable, "-m", "stages.world", "--out", str(tmp_path / "again"), "--task",
                            "WorldSketchPastel"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert digests(tmp_path / "again" / "WorldSketchPastel") == digests(tmp_path / "world" / "WorldSketchPastel")
    bad = subprocess.run([sys.executable, "-m", "stages.world", "--out", str(tmp_path / "bad"), "--task", "Nope"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "unknown world task 'Nope'" in bad.stderr
