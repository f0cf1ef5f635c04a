"""The engine's inputs: a few-shot split's or a test set's cached features, online mode's training images, and
base-to-new's class split of them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.data.datasets import DEFAULT_TEMPLATE
from pipeline.data.images import OnlineCrops
from pipeline.data.protocols import base_new_labels


@dataclass(frozen=True)
class TrainImages:
    """Online mode's training input: the images to re-crop every epoch, and the crop's settings.

    `paths` are relative to `data_root`, in the split's order (row i of the labels belongs to paths[i]).
    Whoever trains on this reads the image files: a sweep's Ray workers must see `data_root` at the same
    path (e.g. a shared filesystem).
    """

    data_root: str
    paths: tuple[str, ...]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment_seed: int = 0  # features.seed
    num_workers: int = 0  # DataLoader worker processes decoding and cropping images; 0: in the trainer's process

    def sample_keys(self) -> list[str]:
        """Per sample: its path, plus ``#<k>`` for the k-th repeat of a path (a split drawn with repetition),
        so repeats get crops of their own."""
        seen: dict[str, int] = {}
        keys = []
        for path in self.paths:
            k = seen.get(path, 0)
            seen[path] = k + 1
            keys.append(path if k == 0 else f"{path}#{k}")
        return keys

    def crops(self, trial_seed: int) -> OnlineCrops:
        """The dataset of this trial's crops: (sample index, epoch) -> (crop, index)."""
        return OnlineCrops(Path(self.data_root), self.paths, self.sample_keys(), self.image_size, self.mean,
                           self.std, self.augment_seed, trial_seed)

    def check(self) -> None:
        """FileNotFoundError, naming the data root, when this machine cannot see the first image."""
        first = Path(self.data_root) / self.paths[0] if self.paths else Path(self.data_root)
        if not first.exists():
            raise FileNotFoundError(
                f"online augmentation (features.views: online) reads the training images, but {first} does "
                f"not exist on this machine: every machine that trains must see data.root ({self.data_root}) "
                "at the same path, e.g. on a shared filesystem; or cache views (features.views: <int>)."
            )


@dataclass
class FewShotFeatures:
    """Engine input for one few-shot split: cached features and labels, float32 on CPU."""

    classnames: list[str]
    train: torch.Tensor  # (N, V, D) float32, V cached views per image; online: (N, 1, D) test transform
    train_labels: torch.Tensor  # (N,) int64
    val: torch.Tensor  # (Nv, D)
    val_labels: torch.Tensor
    test: torch.Tensor  # (Nt, D)
    test_labels: torch.Tensor
    dataset: str = ""
    template: str = DEFAULT_TEMPLATE
    val_is_test: bool = False
    # Online mode (features.views: online): training encodes fresh crops of these images every epoch, and
    # `train` holds only the images' test-transform view (from the eval store), for the baselines.
    train_images: TrainImages | None = None


@dataclass
class EvalFeatures:
    """Test features of a dataset, e.g. an ImageNet variant for evaluating ImageNet-trained contexts."""

    dataset: str
    classnames: list[str]
    test: torch.Tensor  # (Nt, D) float32
    test_labels: torch.Tensor  # (Nt,) int64, in this dataset's label space
    template: str = DEFAULT_TEMPLATE
    imagenet_labels: list[int] | None = None  # this dataset's label -> ImageNet (1000-class) label


def _keep_classes(features: torch.Tensor, labels: torch.Tensor, kept: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `kept` classes, relabelled 0.. in `kept`'s order."""
    relabel = torch.full((int(labels.max()) + 1 if len(labels) else 0,), -1, dtype=torch.long)
    relabel[kept] = torch.arange(len(kept))
    mask = torch.isin(labels, torch.tensor(kept, dtype=labels.dtype))
    return features[mask], relabel[labels[mask]]


def split_base_new(data: FewShotFeatures) -> tuple[FewShotFeatures, EvalFeatures]:
    """Base-to-new generalisation on features, as the official `subsample_classes` on a few-shot split: the
    base classes' train/val/test to learn on (relabelled 0..), and the new classes' test set with their names.

    The classes are split by `data.protocols.base_new_labels` over the class list (every class has shots in
    a few-shot split, so this equals the official split over the training labels)."""
    base, new = base_new_labels(range(len(data.classnames)))
    train, train_labels = _keep_classes(data.train, data.train_labels, base)
    val, val_labels = _keep_classes(data.val, data.val_labels, base)
    test, test_labels = _keep_classes(data.test, data.test_labels, base)
    images = data.train_images
    if images is not None:
        mask = torch.isin(data.train_labels, torch.tensor(base)).tolist()
        images = dataclasses.replace(images, paths=tuple(p for p, keep in zip(images.paths, mask, strict=True) if keep))
    base_data = dataclasses.replace(
        data, classnames=[data.classnames[i] for i in base], train=train, train_labels=train_labels, val=val,
        val_labels=val_labels, test=test, test_labels=test_labels, train_images=images)
    new_test, new_labels = _keep_classes(data.test, data.test_labels, new)
    new_data = EvalFeatures(data.dataset, [data.classnames[i] for i in new], new_test, new_labels, data.template)
    return base_data, new_data
