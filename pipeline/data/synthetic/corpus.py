"""Image-caption pairs of the synthetic world by seed, train and held-out splits, plus attribute test sets.

Pair `i` of a split depends only on (seed, split, i), so a larger corpus extends a smaller one and the
held-out split never shares a draw with the training split. Generated here, no external data: ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.data.synthetic.world import (
    COLOURS,
    DEFAULT_POOLS,
    SHAPES,
    Pools,
    Scene,
    WorldError,
    caption,
    render,
    sample_scene,
)

SPLITS = {"train": 0, "heldout": 1, "attribute": 2}  # independent random streams per split
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS)}  # what attribute_set can label


@dataclass(frozen=True)
class Corpus:
    """Scenes and one caption each; images are rendered on demand (`images`)."""

    scenes: list[Scene]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.scenes)

    def images(self, size: int = 32, style: str = "normal") -> np.ndarray:
        """(N, size, size, 3) uint8 renders of every scene."""
        return render_images(self.scenes, size, style)


def pair_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one pair: a function of (seed, split, index) only."""
    if split not in SPLITS:
        raise WorldError(f"unknown corpus split {split!r}; choose from {tuple(SPLITS)}")
    return np.random.default_rng([seed, SPLITS[split], index])


def make_corpus(seed: int, size: int, split: str = "train", pools: Pools | None = None) -> Corpus:
    """`size` (scene, caption) pairs of `split`, each drawn from its own seeded stream."""
    scenes, captions = [], []
    for index in range(size):
        rng = pair_rng(seed, split, index)
        scene = sample_scene(rng, pools or DEFAULT_POOLS)
        scenes.append(scene)
        captions.append(caption(scene, rng))
    return Corpus(scenes, captions)


def render_images(scenes: Sequence[Scene], size: int = 32, style: str = "normal") -> np.ndarray:
    """(N, size, size, 3) uint8 renders of `scenes`."""
    images = np.empty((len(scenes), size, size, 3), np.uint8)
    for i, scene in enumerate(scenes):
        images[i] = np.asarray(render(scene, size, style))
    return images


def attribute_set(
    seed: int, size: int, attribute: str, pools: Pools | None = None
) -> tuple[list[Scene], list[int], list[str]]:
    """A balanced classification set: single-object scenes labelled by `attribute` (shape or colour).

    Returns (scenes, labels, class names); label i is the class names' i-th value, classes taken in
    turn (scene j has class j mod C), the other attributes drawn from `pools`.
    """
    if attribute not in ATTRIBUTES:
        raise WorldError(f"unknown attribute {attribute!r}; choose from {tuple(ATTRIBUTES)}")
    pools = pools or DEFAULT_POOLS
    classes = list(pools.shapes if attribute == "shape" else pools.colours)
    scenes, labels = [], []
    for index in range(size):
        label = index % len(classes)
        only = {"shapes": (classes[label],)} if attribute == "shape" else {"colours": (classes[label],)}
        scene = sample_scene(pair_rng(seed, "attribute", index), pools, max_kinds=1, max_count=1, **only)
        scenes.append(scene)
        labels.append(label)
    return scenes, labels, classes
