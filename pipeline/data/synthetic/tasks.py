"""Downstream few-shot tasks of the generated world, and a source task's shifted test sets, as dataset folders.

Each task is a classification of single-object scenes (`world.sample_scene` with one object, one copy):
every class fixes some attributes (its shape, its colour, or both) and the rest vary as nuisances (size,
texture, background, position, angle). `write_task` renders a task into the layout the generic reader
takes (`<root>/<Name>/images/...` + `split_<Name>.json`); every image is drawn from a random stream keyed by
(seed, task name, split, label, index), so a task's files depend on the seed alone, never on which other
tasks are written or in what order.

The tasks (`TASKS`), each of a different kind:

* ``WorldShape`` (coarse, the source): the 8 shapes, on the backgrounds white/black/grey/beige;
* ``WorldColourShape`` (fine-grained): 25 colour x shape combinations, close colours and shapes included;
* ``WorldRareColour`` (rare names): the 10 colours named by the synonyms the captions seldom use
  ("scarlet", "cobalt", ...: about 2% of captions each, against about 9% for "red" or "blue");

and WorldShape's shifted test sets (test-only, WorldShape's classes and labels), which stand in for
ImageNet-V2/-Sketch/-A/-R: ``WorldShapeBackgrounds`` (backgrounds the source never shows: navy, teal),
``WorldShapeLines`` (outline drawings), ``WorldShapeNoise`` (strong pixel noise), ``WorldShapePalette``
(paler, hue-shifted colours). Their hand-crafted prompts are registered in `pipeline.data.datasets`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_write, write_text_atomic
from pipeline.data.synthetic.world import COLOUR_WORDS, SHAPES, Pools, Scene, WorldError, render, sample_scene

log = logging.getLogger(__name__)

WORLD_SEED = 0  # the seed data/world is generated with
IMAGE_SIZE = 32  # pixels: the input size of the CLIP pretrained on the world (coop-tiny)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class WorldClass:
    """One class: its name (what prompts call it) and the attribute pools it fixes, e.g. {"shapes": ("star",)}."""

    name: str
    pools: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """A dataset of the world: classes, images per class in train/val/test, the nuisances' pools, the style."""

    name: str
    kind: str  # what the task tests: coarse, fine-grained, rare names, or shifted (a source's test set)
    classes: tuple[WorldClass, ...]
    counts: tuple[int, int, int]  # images per class in train, val, test
    pools: Pools  # what every class draws its other attributes from
    style: str = "normal"  # world.render's style
    source: str | None = None  # a shifted test set: the task whose classes (and labels) it shares

    @property
    def test_only(self) -> bool:
        return self.source is not None

    @property
    def classnames(self) -> list[str]:
        return [c.name for c in self.classes]


# One object, one copy: the class attribute is unambiguous in every image.
SINGLE = Pools(max_kinds=1, max_count=1)
SOURCE_BACKGROUNDS = ("white", "black", "grey", "beige")
HELD_OUT_BACKGROUNDS = ("navy", "teal")  # never behind a WorldShape training image
SOURCE_POOLS = dataclasses.replace(SINGLE, backgrounds=SOURCE_BACKGROUNDS)

FINE_COLOURS = ("red", "orange", "pink", "purple", "blue")
FINE_SHAPES = ("circle", "square", "diamond", "star")
# The second word for each colour in world.COLOUR_WORDS: the captions use it about a fifth as often as the
# canonical name.
RARE_COLOUR_NAMES = {colour: words[1] for colour, words in COLOUR_WORDS.items()}

SHAPE_CLASSES = tuple(WorldClass(shape, {"shapes": (shape,)}) for shape in SHAPES)
# The demo's source: outline drawings, a style the pretraining corpus (filled shapes only) never shows.
SOURCE = Task("WorldSketch", "coarse", SHAPE_CLASSES, (48, 12, 50), SOURCE_POOLS, "lines")
SHIFTED = (
    # A fresh sample of the same generator (its name keys new random streams), as ImageNet-V2 re-collects ImageNet.
    Task("WorldSketchV2", "shifted", SHAPE_CLASSES, (0, 0, 50), SOURCE_POOLS, "lines", SOURCE.name),
    Task("WorldSketchBackgrounds", "shifted", SHAPE_CLASSES, (0, 0, 50),
         dataclasses.replace(SINGLE, backgrounds=HELD_OUT_BACKGROUNDS), "lines", SOURCE.name),
    Task("WorldSketchPastel", "shifted", SHAPE_CLASSES, (0, 0, 50), SOURCE_POOLS, "lines+palette", SOURCE.name),
    Task("WorldSketchLarge", "shifted", SHAPE_CLASSES, (0, 0, 50),
         dataclasses.replace(SOURCE_POOLS, sizes=("medium", "large")), "lines", SOURCE.name),
)
TASKS: tuple[Task, ...] = (
    Task("WorldShape", "coarse", SHAPE_CLASSES, (48, 12, 50), SOURCE_POOLS),
    SOURCE,
    Task("WorldPastel", "fine-grained",
         tuple(WorldClass(f"{colour} {shape}", {"colours": (colour,), "shapes": (shape,)})
               for colour in FINE_COLOURS for shape in FINE_SHAPES),
         (32, 8, 20), SINGLE, "palette"),
    Task("WorldPastelRare", "rare names",
         tuple(WorldClass(name, {"colours": (colour,)}) for colour, name in RARE_COLOUR_NAMES.items()),
         (40, 10, 40), SINGLE, "palette"),
    *SHIFTED,
)


def get_task(name: str) -> Task:
    """The task called `name`; WorldError lists the known ones."""
    for task in TASKS:
        if task.name == name:
            return task
    raise WorldError(f"unknown world task {name!r}; choose from {', '.join(t.name for t in TASKS)}")


def image_path(split: str, classname: str, index: int) -> str:
    """Where image `index` of a class in `split` lies, relative to the task's images/ folder."""
    return f"{split}/{classname.replace(' ', '_')}/{index:04d}.png"


def scene_rng(seed: int, task: str, split: str, label: int, index: int) -> np.random.Generator:
    """The random stream of one image: keyed by name, not position, so tasks never shift each other."""
    return np.random.default_rng([seed, zlib.crc32(task.encode()), SPLITS.index(split), label, index])


def task_scene(task: Task, split: str, label: int, index: int, seed: int = WORLD_SEED) -> Scene:
    """The scene of image `index` of class `label` in `split`."""
    return sample_scene(scene_rng(seed, task.name, split, label, index), task.pools, **task.classes[label].pools)


def split_filename(task: Task) -> str:
    return f"split_{task.name}.json"


def write_task(task: Task, root: Path | str, seed: int = WORLD_SEED, size: int = IMAGE_SIZE) -> Path:
    """Render `task` into `<root>/<Name>/` (images first, the split file last); returns the split file."""
    folder = Path(root) / task.name
    items: dict[str, list[list[Any]]] = {}
    for split, count in zip(SPLITS, task.counts, strict=True):
        items[split] = []
        for label, c in enumerate(task.classes):
            for index in range(count):
                path = image_path(split, c.name, index)
                image = render(task_scene(task, split, label, index, seed), size, task.style)
                atomic_write(folder / "images" / path, lambda tmp, image=image: image.save(tmp, format="PNG"))
                items[split].append([path, label, c.name])
    data: dict[str, Any] = {**items, "test_only": task.test_only,
                            "generator": {"seed": seed, "image_size": size, "style": task.style, "kind": task.kind,
                                          "source": task.source}}
    split_file = folder / split_filename(task)
    write_text_atomic(split_file, json.dumps(data, separators=(",", ":")) + "\n")
    log.info("%s (%s): %d classes, %s train/val/test images -> %s", task.name, task.kind, len(task.classes),
             "/".join(str(len(items[s])) for s in SPLITS), folder)
    return split_file


def write_world(root: Path | str, tasks: Sequence[Task] = TASKS, seed: int = WORLD_SEED,
                size: int = IMAGE_SIZE) -> list[Path]:
    """Write every task in `tasks` under `root`; returns their split files."""
    return [write_task(task, root, seed, size) for task in tasks]
