"""Images: loading, CoOp's transforms, and the seeded augmented views and online crops drawn from them.

Every random crop is seeded from what identifies it (image key, view or epoch, seeds), never from the
batch, worker or global RNG, so a rebuilt cache or a rerun trial sees the very same pixels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T

from pipeline.errors import UserError

TRAIN_CROP_SCALE = (0.08, 1.0)  # CoOp's random-resized-crop scale range
INTERPOLATION = "bicubic"


class ImageReadError(UserError, RuntimeError):
    """An image file could not be opened or decoded."""


SPLIT_ADVICE = "Replace the file, or remove it from the dataset's split lists, then rerun."


def load_image(path: Path, advice: str = SPLIT_ADVICE) -> Image.Image:
    """Open an image as RGB, or raise ImageReadError naming the file (and `advice`: what to do about it)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"Cannot read image {path}: {type(error).__name__}: {error}. {advice}".rstrip()) from None


def build_transforms(
    image_size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[T.Compose, T.Compose]:
    """CoOp's (train, test) image transforms for a backbone input size and normalisation."""
    bicubic = T.InterpolationMode.BICUBIC
    normalize = T.Normalize(mean=list(mean), std=list(std))
    train = T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=TRAIN_CROP_SCALE, interpolation=bicubic),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            normalize,
        ]
    )
    test = T.Compose(
        [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size), T.ToTensor(), normalize]
    )
    return train, test


def train_key(path: str, seed: int, per_seed: bool) -> str:
    """Key of a train image's cached views: its path, or with per-seed views its path and split seed."""
    return f"{path}#seed{seed}" if per_seed else path


def image_of_key(key: str, per_seed: bool) -> str:
    """The data-root-relative image path a train key was made from (`train_key`'s inverse)."""
    return key.rsplit("#seed", 1)[0] if per_seed else key


def _seed_of(text: str) -> int:
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def view_seed(key: str, view: int, base_seed: int) -> int:
    """Seed of one cached view: depends only on the train key (`train_key`), view index and base seed."""
    return _seed_of(f"{base_seed}\0{view}\0{key}")


def crop_seed(key: str, epoch: int, trial_seed: int, base_seed: int) -> int:
    """Seed of an online crop: the sample's key (`TrainImages.sample_keys`), 0-based epoch, trial seed and
    features.seed; nothing else (not the batch, worker or step), so a run is reproducible."""
    return _seed_of(f"{base_seed}\0online\0{trial_seed}\0{epoch}\0{key}")


def seeded(transform: Callable[[Image.Image], torch.Tensor], image: Image.Image, seed: int) -> torch.Tensor:
    """`transform(image)` drawing its randomness from a private RNG seeded with `seed`.

    The global RNG is restored afterwards: results do not depend on batch order, workers or global seeding.
    """
    with torch.random.fork_rng(devices=[]):
        # The CPU generator alone (what the transforms draw from): torch.manual_seed would also queue a lazy
        # seeding of every accelerator, recording a stack trace each time (a third of a small image's cost).
        torch.default_generator.manual_seed(seed)
        return transform(image)


class ImageViews(Dataset):
    """Key i -> (V, 3, H, W): V > 1 seeded train-transform views of its image (`view_seed`), or with V = 1
    its one test-transform view."""

    def __init__(
        self,
        data_root: Path,
        keys: Sequence[str],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        views: int = 1,
        per_seed: bool = False,
        augment_seed: int = 0,
    ) -> None:
        self.data_root = data_root
        self.keys = list(keys)
        self.views = views
        self.per_seed = per_seed  # keys are `train_key`s: path and split seed
        self.augment_seed = augment_seed
        self.train_tf, self.test_tf = build_transforms(image_size, mean, std)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        key = self.keys[index]
        image = load_image(self.data_root / image_of_key(key, self.per_seed))
        if self.views == 1:
            return self.test_tf(image).unsqueeze(0)
        return torch.stack(
            [seeded(self.train_tf, image, view_seed(key, v, self.augment_seed)) for v in range(self.views)]
        )


class OnlineCrops(Dataset):
    """(sample index, epoch) -> (CoOp's train-transform crop of the sample's image (3, H, W), the index),
    seeded by `crop_seed` from the sample's key."""

    def __init__(
        self,
        data_root: Path,
        paths: Sequence[str],
        keys: Sequence[str],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment_seed: int,
        trial_seed: int,
    ) -> None:
        self.data_root = data_root
        self.paths = list(paths)
        self.keys = list(keys)
        self.augment_seed = augment_seed
        self.trial_seed = trial_seed
        self.transform = build_transforms(image_size, mean, std)[0]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = item
        image = load_image(self.data_root / self.paths[index])
        seed = crop_seed(self.keys[index], epoch, self.trial_seed, self.augment_seed)
        return seeded(self.transform, image, seed), index
