"""Cache frozen CLIP image features keyed by image path, and assemble them into CoOp training inputs.

CoOp never updates the image encoder, so every image is encoded once and training runs on cached
features. Train images are cached in V augmented views (CoOp's random-resized-crop + flip; V = 1 means
the plain test transform), val/test images, and train images too, in one test-transform view (the
"eval" store). Each view's randomness is seeded from (train key, view index, base seed), so a rebuilt
cache is identical. The train key is the image path, or with `views_per_seed` the path and the split
seed (``<path>#seed<S>``): the seeds of an experiment then see different views of an image they share,
as the official runs see different crops.

`features.views: online` is the exact mode: the train store stays empty, and training crops every
training image afresh every epoch (`TrainImages`, `AugmentedImages`; the engine encodes them).

Layout of one cache (one dataset x backbone), see `feature_cache_dir`::

    <cache root>/<dataset>/<arch>__<pretrained>/
        manifest.json                backbone, weights fingerprint, transform, views, dtype, shards
        train-00000.safetensors      "features" (N, V, D); metadata "paths": JSON list of N train keys
        eval-00000.safetensors       "features" (N, D)     (val, test and train images)

Updates are incremental: only images missing from a valid cache are encoded, written as a new shard,
then the manifest is replaced atomically. A cache built with another configuration is rebuilt by the
writer and refused by the reader.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm import tqdm

from pipeline.atomic import atomic_write, write_json_atomic
from pipeline.data.datasets import DEFAULT_TEMPLATE, DatasetError, Item
from pipeline.data.fewshot import eval_list_path, read_eval_list, read_fewshot_split, split_path
from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.engine.backbone import Backbone
    from pipeline.params import FeatureParams

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
}
DTYPE_ALIASES = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16"}
TRAIN_CROP_SCALE = (0.08, 1.0)
INTERPOLATION = "bicubic"
STORES = ("train", "eval")
MAX_SHARDS = 8  # more shards than this are merged into one, so reads stay a handful of files
ONLINE = "online"  # features.views value of the exact mode: fresh crops every epoch, none cached
RERUN = "rerun `dvc repro features` (or `python -m stages.features ...`)"


class FeatureCacheError(UserError, RuntimeError):
    """The feature cache is missing, corrupt, or does not match the requested configuration."""


class CacheMismatchError(FeatureCacheError):
    """The cache was built with a different backbone, transform, views or dtype."""


class ImageReadError(FeatureCacheError):
    """An image file could not be opened or decoded."""


def canonical_dtype(name: str) -> str:
    """'fp16' / 'float16' -> 'float16' (the name stored in manifests); ValueError for anything else."""
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"feature dtype must be one of {sorted([*DTYPES, *DTYPE_ALIASES])}, got {name!r}.")
    return name


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that determines a cached feature; a cache is valid only for an equal config."""

    arch: str
    pretrained: str | None
    fingerprint: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    views: int | str = 1  # cached views per train image (1 = the test transform), or ONLINE: none cached
    dtype: str = "float16"
    augment_seed: int = 0
    views_per_seed: bool = True  # train views keyed by (path, split seed): seeds see different views

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        check_views(self.views)
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}.")
        if self.online or self.views == 1:
            # Nothing augmented is cached (one test-transform view is the same for every seed), so keying
            # train entries per seed would only duplicate them.
            object.__setattr__(self, "views_per_seed", False)

    @property
    def online(self) -> bool:
        """Exact mode: no train views are cached; training crops the images afresh every epoch."""
        return self.views == ONLINE

    @classmethod
    def from_backbone(
        cls,
        backbone: Backbone,
        views: int | str = 1,
        dtype: str = "float16",
        augment_seed: int = 0,
        views_per_seed: bool = True,
    ) -> FeatureConfig:
        """The cache configuration for `backbone`."""
        return cls(
            arch=backbone.arch,
            pretrained=backbone.pretrained,
            fingerprint=backbone.fingerprint,
            image_size=int(backbone.image_size),
            mean=tuple(float(v) for v in backbone.mean),  # type: ignore[arg-type]
            std=tuple(float(v) for v in backbone.std),  # type: ignore[arg-type]
            views=views,
            dtype=dtype,
            augment_seed=augment_seed,
            views_per_seed=views_per_seed,
        )

    @classmethod
    def from_params(cls, backbone: Backbone, features: FeatureParams) -> FeatureConfig:
        """The cache configuration of params.yaml's `features` section."""
        return cls.from_backbone(
            backbone,
            views=features.views,
            dtype=canonical_dtype(features.dtype),
            augment_seed=features.seed,
            views_per_seed=features.views_per_seed,
        )

    def manifest_fields(self) -> dict[str, Any]:
        """The fields compared against a cache's manifest (JSON-normalised: tuples become lists)."""
        return {
            "arch": self.arch,
            "pretrained": self.pretrained,
            "fingerprint": self.fingerprint,
            "transform": {
                "image_size": self.image_size,
                "mean": list(self.mean),
                "std": list(self.std),
                "interpolation": INTERPOLATION,
                "train_crop_scale": list(TRAIN_CROP_SCALE),
                "train_flip": True,
            },
            "views": self.views,
            "dtype": self.dtype,
            "augment_seed": self.augment_seed,
            "views_per_seed": self.views_per_seed,
        }


def check_views(views: int | str) -> None:
    """ValueError unless `views` is a number of cached views (>= 1) or ONLINE."""
    if views != ONLINE and (isinstance(views, bool) or not isinstance(views, int) or views < 1):
        raise ValueError(
            f"features.views must be an integer >= 1 (cached views per train image) or {ONLINE!r}, got {views!r}."
        )


def online_workers(num_workers: int | None, cpus_per_trial: float) -> int:
    """Image-decoding processes of an online trial: features.num_workers, else all its CPUs but one."""
    return num_workers if num_workers is not None else max(0, int(cpus_per_trial) - 1)


def train_key(path: str, seed: int, per_seed: bool) -> str:
    """Key of a train image's cached views: its path, or with per-seed views its path and split seed."""
    return f"{path}#seed{seed}" if per_seed else path


def image_of_key(key: str, per_seed: bool) -> str:
    """The data-root-relative image path a train key was made from (`train_key`'s inverse)."""
    return key.rsplit("#seed", 1)[0] if per_seed else key


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


@dataclass
class CacheUpdate:
    """What one `update_feature_cache` call did."""

    cache_dir: Path
    encoded: dict[str, int] = field(default_factory=dict)  # store -> newly encoded images
    total: dict[str, int] = field(default_factory=dict)  # store -> cached images afterwards
    rebuilt: bool = False


# ------------------------------------------------------------------------------------------ transforms


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


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB, or raise ImageReadError naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(
            f"Cannot read image {path}: {type(error).__name__}: {error}. Replace the file, or remove it "
            "from the dataset's split lists, then rerun."
        ) from None


class _ImageViews(Dataset):
    """Cache key i -> (V, 3, H, W): V seeded augmented views (train keys), or one test-transform view."""

    def __init__(self, data_root: Path, keys: Sequence[str], config: FeatureConfig, augment: bool) -> None:
        self.data_root = data_root
        self.keys = list(keys)
        self.views = config.views if augment else 1
        self.augment = augment and config.views > 1
        self.per_seed = augment and config.views_per_seed
        self.seed = config.augment_seed
        self.train_tf, self.test_tf = build_transforms(config.image_size, config.mean, config.std)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        key = self.keys[index]
        image = load_image(self.data_root / image_of_key(key, self.per_seed))
        if not self.augment:
            return self.test_tf(image).unsqueeze(0)
        return torch.stack([seeded(self.train_tf, image, view_seed(key, v, self.seed)) for v in range(self.views)])


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

    def check(self) -> None:
        """FileNotFoundError, naming the data root, when this machine cannot see the first image."""
        first = Path(self.data_root) / self.paths[0] if self.paths else Path(self.data_root)
        if not first.exists():
            raise FileNotFoundError(
                f"online augmentation (features.views: {ONLINE}) reads the training images, but {first} does "
                f"not exist on this machine: every machine that trains must see data.root ({self.data_root}) "
                "at the same path, e.g. on a shared filesystem; or cache views (features.views: <int>)."
            )


class AugmentedImages(Dataset):
    """(sample index, epoch) -> (its CoOp train-transform crop (3, H, W), the index), seeded by `crop_seed`."""

    def __init__(self, images: TrainImages, trial_seed: int) -> None:
        self.data_root = Path(images.data_root)
        self.paths = list(images.paths)
        self.keys = images.sample_keys()
        self.trial_seed = trial_seed
        self.base_seed = images.augment_seed
        self.transform = build_transforms(images.image_size, images.mean, images.std)[0]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = item
        image = load_image(self.data_root / self.paths[index])
        seed = crop_seed(self.keys[index], epoch, self.trial_seed, self.base_seed)
        return seeded(self.transform, image, seed), index


# --------------------------------------------------------------------------------------------- layout


def backbone_tag(arch: str, pretrained: str | None) -> str:
    """Folder-safe name of a backbone; a checkpoint path contributes its file name."""
    weights = (
        "random"
        if pretrained is None
        else Path(pretrained).name
        if ("/" in pretrained or os.sep in pretrained)
        else pretrained
    )
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{arch}__{weights}")


def feature_cache_dir(cache_root: Path | str, dataset: str, arch: str, pretrained: str | None) -> Path:
    return Path(cache_root) / dataset / backbone_tag(arch, pretrained)


def _paths_checksum(paths: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _save_atomic(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# ---------------------------------------------------------------------------------------------- cache


class FeatureCache:
    """A validated, fully loaded cache: path -> row lookup per store."""

    def __init__(
        self, cache_dir: Path, manifest: dict[str, Any], stores: dict[str, tuple[list[str], torch.Tensor]]
    ):
        self.cache_dir = cache_dir
        self.manifest = manifest
        self._stores = stores
        self._index = {name: {p: i for i, p in enumerate(paths)} for name, (paths, _) in stores.items()}

    def paths(self, store: str) -> list[str]:
        return self._stores[store][0]

    def features(self, store: str) -> torch.Tensor:
        return self._stores[store][1]

    def gather(self, store: str, paths: Sequence[str]) -> torch.Tensor:
        """Rows for `paths` (in order, repeats allowed) as float32."""
        index = self._index[store]
        missing = [p for p in paths if p not in index]
        if missing:
            raise FeatureCacheError(
                f"{len(missing)} image(s) are not in the {store} feature cache {self.cache_dir}, e.g. "
                f"{missing[:3]}; the cache was built for other splits. Add them to the features stage and {RERUN}."
            )
        rows = torch.tensor([index[p] for p in paths], dtype=torch.long)
        return self._stores[store][1].index_select(0, rows).float()


def _read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    path = cache_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FeatureCacheError(f"Feature cache manifest {path} is corrupt ({error}); {RERUN}.") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != CACHE_FORMAT_VERSION:
        raise FeatureCacheError(f"Feature cache manifest {path} has an unknown format; {RERUN}.")
    return manifest


def _config_differences(manifest: dict[str, Any], config: FeatureConfig) -> list[str]:
    cached = manifest.get("config", {})
    wanted = config.manifest_fields()
    diffs = []
    for key, value in wanted.items():
        if key == "transform" and isinstance(cached.get(key), dict):
            for sub, sub_value in value.items():
                if cached[key].get(sub) != sub_value:
                    diffs.append(
                        f"transform.{sub}: cache has {cached[key].get(sub)!r}, configuration wants {sub_value!r}"
                    )
        elif cached.get(key) != value:
            diffs.append(f"{key}: cache has {cached.get(key)!r}, configuration wants {value!r}")
    return diffs


def _load_shard(path: Path, expected_count: int, store: str) -> tuple[list[str], torch.Tensor]:
    if not path.is_file():
        raise FeatureCacheError(f"Feature cache shard {path} is missing; {RERUN}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            paths = json.loads((f.metadata() or {})["paths"])
            features = f.get_tensor("features")
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as error:
        raise FeatureCacheError(f"Feature cache shard {path} is corrupt ({error}); {RERUN}.") from None
    if len(paths) != expected_count or features.shape[0] != expected_count:
        raise FeatureCacheError(
            f"Feature cache shard {path} holds {features.shape[0]} rows for {len(paths)} paths, the manifest "
            f"says {expected_count}; {RERUN}."
        )
    if (store == "train") != (features.dim() == 3):
        raise FeatureCacheError(f"Feature cache shard {path} has shape {tuple(features.shape)}; {RERUN}.")
    return paths, features


def _load_stores(cache_dir: Path, manifest: dict[str, Any]) -> dict[str, tuple[list[str], torch.Tensor]]:
    stores: dict[str, tuple[list[str], torch.Tensor]] = {}
    for store in STORES:
        entry = manifest["stores"][store]
        all_paths: list[str] = []
        chunks = []
        for shard in entry["shards"]:
            paths, features = _load_shard(cache_dir / shard["file"], shard["count"], store)
            all_paths.extend(paths)
            chunks.append(features)
        if _paths_checksum(all_paths) != entry["paths_sha256"] or len(set(all_paths)) != len(all_paths):
            raise FeatureCacheError(
                f"Feature cache {cache_dir}: the {store} image list does not match the manifest; {RERUN}."
            )
        dim = manifest["feature_dim"] or 0
        views = manifest["config"]["views"]
        empty_shape = (0, views if isinstance(views, int) else 1, dim) if store == "train" else (0, dim)
        features = (
            torch.cat(chunks)
            if chunks
            else torch.empty(empty_shape, dtype=DTYPES[manifest["config"]["dtype"]])
        )
        stores[store] = (all_paths, features)
    return stores


def open_feature_cache(cache_dir: Path | str, config: FeatureConfig) -> FeatureCache:
    """Load a cache, refusing it when its manifest does not match `config`."""
    cache_dir = Path(cache_dir)
    manifest = _read_manifest(cache_dir)
    if manifest is None:
        raise FeatureCacheError(f"No feature cache at {cache_dir} (manifest.json missing); {RERUN}.")
    diffs = _config_differences(manifest, config)
    if diffs:
        raise CacheMismatchError(
            f"Feature cache {cache_dir} does not match the current configuration: "
            + "; ".join(diffs)
            + f". {RERUN}."
        )
    return FeatureCache(cache_dir, manifest, _load_stores(cache_dir, manifest))


def _encode(
    backbone: Backbone,
    data_root: Path,
    paths: list[str],
    config: FeatureConfig,
    augment: bool,
    batch_size: int,
    num_workers: int,
    progress: bool,
    desc: str,
) -> torch.Tensor:
    dataset = _ImageViews(data_root, paths, config, augment)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out: list[torch.Tensor] = []
    dtype = DTYPES[config.dtype]
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, mininterval=1.0) as bar:
        for batch in loader:
            b, v = batch.shape[:2]
            features = backbone.encode_images(batch.flatten(0, 1)).float().cpu()
            features = features.reshape(b, v, -1)
            out.append((features if augment else features[:, 0]).to(dtype))
            bar.update(b)
    return torch.cat(out)


def update_feature_cache(
    cache_dir: Path | str,
    data_root: Path | str,
    train_paths: Iterable[str],
    eval_paths: Iterable[str],
    backbone: Backbone,
    config: FeatureConfig,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> CacheUpdate:
    """Encode the images not yet in the cache: `train_paths` in `config.views` views, `eval_paths` in one.

    Paths are relative to `data_root`; with `config.views_per_seed` the train entries are `train_key`s
    (path and split seed). Online mode caches no train views: `train_paths` must then be empty. Nothing
    is written unless every new image was encoded; an image that cannot be read raises ImageReadError
    naming it.
    """
    cache_dir, data_root = Path(cache_dir), Path(data_root)
    if config.fingerprint != backbone.fingerprint:
        raise ValueError(
            "config.fingerprint does not belong to the given backbone; build it with from_backbone()."
        )
    wanted = {"train": sorted(set(train_paths)), "eval": sorted(set(eval_paths))}
    if config.online and wanted["train"]:
        raise ValueError(f"views={ONLINE!r} caches no train views; pass the train images as eval paths only.")
    existing = _existing_cache(cache_dir, config)
    rebuilt = existing is None and (cache_dir / "manifest.json").exists()
    manifest = existing or _empty_manifest(config)
    cached = {store: _shard_paths(cache_dir, manifest, store) for store in STORES}

    new_rows: dict[str, tuple[list[str], torch.Tensor]] = {}
    for store in STORES:
        have = set(cached[store])
        todo = [p for p in wanted[store] if p not in have]
        log.info(
            "%s features: %d wanted, %d cached, %d to encode",
            store,
            len(wanted[store]),
            len(wanted[store]) - len(todo),
            len(todo),
        )
        if todo:
            features = _encode(
                backbone,
                data_root,
                todo,
                config,
                store == "train",
                batch_size,
                num_workers,
                progress,
                f"encode {store}",
            )
            new_rows[store] = (todo, features)

    encoded = {s: len(new_rows[s][0]) if s in new_rows else 0 for s in STORES}
    if new_rows or existing is None:
        _write_update(cache_dir, manifest, new_rows, cached)
    total = {s: len(cached[s]) + encoded[s] for s in STORES}
    return CacheUpdate(cache_dir, encoded, total, rebuilt)


def _empty_manifest(config: FeatureConfig) -> dict[str, Any]:
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "config": config.manifest_fields(),
        "feature_dim": None,
        "stores": {s: {"shards": [], "count": 0, "paths_sha256": _paths_checksum([])} for s in STORES},
    }


def _existing_cache(cache_dir: Path, config: FeatureConfig) -> dict[str, Any] | None:
    """The manifest of a valid cache for `config`, or None (with the reason logged) if it must be rebuilt."""
    try:
        manifest = _read_manifest(cache_dir)
        if manifest is None:
            return None
        diffs = _config_differences(manifest, config)
        if diffs:
            log.warning("Rebuilding feature cache %s: %s", cache_dir, "; ".join(diffs))
            return None
        for store in STORES:
            paths = _shard_paths(cache_dir, manifest, store)
            if _paths_checksum(paths) != manifest["stores"][store]["paths_sha256"]:
                raise FeatureCacheError(f"the {store} image list does not match the manifest")
        return manifest
    except (FeatureCacheError, KeyError, TypeError) as error:
        log.warning("Rebuilding feature cache %s: it is unreadable (%s)", cache_dir, error)
        return None


def _shard_paths(cache_dir: Path, manifest: dict[str, Any], store: str) -> list[str]:
    """Image paths of a store, read from the shards' metadata only (no tensors loaded)."""
    paths: list[str] = []
    for shard in manifest["stores"][store]["shards"]:
        path = cache_dir / shard["file"]
        try:
            with safe_open(str(path), framework="pt") as f:
                paths.extend(json.loads((f.metadata() or {})["paths"]))
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as error:
            raise FeatureCacheError(f"shard {path} is unreadable ({error})") from None
    return paths


def _write_update(
    cache_dir: Path,
    manifest: dict[str, Any],
    new_rows: dict[str, tuple[list[str], torch.Tensor]],
    cached: dict[str, list[str]],
) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(json.dumps(manifest))  # private copy
    for store, (paths, features) in new_rows.items():
        dim = int(features.shape[-1])
        if manifest["feature_dim"] not in (None, dim):
            raise FeatureCacheError(
                f"Feature dimension changed from {manifest['feature_dim']} to {dim}; {RERUN}."
            )
        manifest["feature_dim"] = dim
        entry = manifest["stores"][store]
        entry["shards"].append(_write_shard(cache_dir, store, paths, features))
        if len(entry["shards"]) > MAX_SHARDS:
            loaded = [_load_shard(cache_dir / s["file"], s["count"], store) for s in entry["shards"]]
            merged_paths = [p for shard_paths, _ in loaded for p in shard_paths]
            entry["shards"] = [
                _write_shard(cache_dir, store, merged_paths, torch.cat([f for _, f in loaded]))
            ]
        all_paths = cached[store] + paths
        entry["count"] = len(all_paths)
        entry["paths_sha256"] = _paths_checksum(all_paths)
    write_json_atomic(cache_dir / "manifest.json", manifest)
    # Only now that the new manifest is in place are superseded and orphaned shards safe to delete.
    referenced = {s["file"] for store in STORES for s in manifest["stores"][store]["shards"]}
    for path in cache_dir.glob("*.safetensors"):
        if path.name not in referenced:
            path.unlink(missing_ok=True)


def _write_shard(cache_dir: Path, store: str, paths: list[str], features: torch.Tensor) -> dict[str, Any]:
    taken = {p.name for p in cache_dir.glob(f"{store}-*.safetensors")}
    n = 0
    while f"{store}-{n:05d}.safetensors" in taken:
        n += 1
    name = f"{store}-{n:05d}.safetensors"
    _save_atomic({"features": features.contiguous()}, {"paths": json.dumps(paths)}, cache_dir / name)
    return {"file": name, "count": len(paths), "paths_sha256": _paths_checksum(paths)}


# --------------------------------------------------------------------------------------------- stages


def split_image_paths(
    splits_dir: Path | str, dataset: str, shots: Iterable[int], seeds: Iterable[int], per_seed: bool = False
) -> tuple[set[str], set[str]]:
    """(train keys, eval paths) needed by the given few-shot split files plus the dataset's test list.

    Train keys are image paths, or with `per_seed` (FeatureConfig.views_per_seed) `train_key`s: path and
    split seed. Eval paths include the train images: their one test-transform view is what the official
    linear probe (CoOp's lpclip/) trains on. Test-only datasets (ImageNet variants) need just their test
    list; `shots` and `seeds` are ignored.
    """
    train: set[str] = set()
    evaluation_list = read_eval_list(eval_list_path(splits_dir, dataset))
    evaluation: set[str] = {item.path for item in evaluation_list.test}
    if evaluation_list.test_only:
        return train, evaluation
    for k in shots:
        for seed in seeds:
            split = read_fewshot_split(split_path(splits_dir, dataset, k, seed))
            train.update(train_key(item.path, split.seed, per_seed) for item in split.train)
            evaluation.update(item.path for item in (*split.val, *split.train))
    return train, evaluation


def build_dataset_features(
    cache_root: Path | str,
    data_root: Path | str,
    splits_dir: Path | str,
    dataset: str,
    shots: Iterable[int],
    seeds: Iterable[int],
    backbone: Backbone,
    views: int | str = 1,
    dtype: str = "float16",
    augment_seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    views_per_seed: bool = True,
) -> CacheUpdate:
    """Bring one dataset's cache up to date for the given split files (what the features stage runs).

    `views` ONLINE caches no train views (training crops the images itself), only the eval store.
    """
    config = FeatureConfig.from_backbone(
        backbone, views=views, dtype=dtype, augment_seed=augment_seed, views_per_seed=views_per_seed
    )
    train, evaluation = split_image_paths(splits_dir, dataset, shots, seeds, config.views_per_seed)
    if config.online:
        train = set()
    cache_dir = feature_cache_dir(cache_root, dataset, backbone.arch, backbone.pretrained)
    update = update_feature_cache(
        cache_dir, data_root, train, evaluation, backbone, config, batch_size, num_workers, progress
    )
    log.info(
        "%s: encoded %d train / %d eval images; cache %s holds %d / %d",
        dataset,
        update.encoded["train"],
        update.encoded["eval"],
        cache_dir,
        update.total["train"],
        update.total["eval"],
    )
    return update


def _labels(items: Sequence[Item]) -> torch.Tensor:
    return torch.tensor([item.label for item in items], dtype=torch.long)


def load_fewshot_features(
    cache_root: Path | str,
    split_file: Path | str,
    config: FeatureConfig,
    test_file: Path | str | None = None,
    cache: FeatureCache | None = None,
    data_root: Path | str | None = None,
    num_workers: int = 0,
) -> FewShotFeatures:
    """Features of one few-shot split file (train views, val, and the dataset's test list).

    `test_file` defaults to ``test.json`` beside the split file. Pass an already opened `cache` to assemble
    several splits of one dataset without reloading the cache. In online mode (`config.online`) `train` is
    each train image's test-transform view, and with `data_root` the result also carries the split's
    `TrainImages` (decoded by `num_workers` processes), which training needs; without it, it serves the
    baselines only.
    """
    split = read_fewshot_split(split_file)
    evaluation = read_eval_list(test_file if test_file is not None else Path(split_file).parent / "test.json")
    if evaluation.dataset != split.dataset or evaluation.classnames != split.classnames:
        raise DatasetError(
            f"{split_file} and {test_file} belong to different datasets or class lists; rerun the prepare stage."
        )
    if cache is None:
        cache = open_feature_cache(
            feature_cache_dir(cache_root, split.dataset, config.arch, config.pretrained), config
        )
    paths = [item.path for item in split.train]
    if config.online:
        train = cache.gather("eval", paths).unsqueeze(1)
    else:
        train = cache.gather("train", [train_key(p, split.seed, config.views_per_seed) for p in paths])
    train_images = None
    if config.online and data_root is not None:
        train_images = TrainImages(
            data_root=str(Path(data_root).resolve()),
            paths=tuple(paths),
            image_size=config.image_size,
            mean=config.mean,
            std=config.std,
            augment_seed=config.augment_seed,
            num_workers=num_workers,
        )
    return FewShotFeatures(
        classnames=split.classnames,
        train=train,
        train_labels=_labels(split.train),
        val=cache.gather("eval", [item.path for item in split.val]),
        val_labels=_labels(split.val),
        test=cache.gather("eval", [item.path for item in evaluation.test]),
        test_labels=_labels(evaluation.test),
        dataset=split.dataset,
        template=evaluation.template,
        val_is_test=split.val_is_test,
        train_images=train_images,
    )


def load_eval_features(
    cache_root: Path | str, test_file: Path | str, config: FeatureConfig, cache: FeatureCache | None = None
) -> EvalFeatures:
    """Test features of one dataset from its ``test.json`` (e.g. ImageNet-A for an ImageNet-trained context)."""
    evaluation = read_eval_list(test_file)
    if cache is None:
        cache = open_feature_cache(
            feature_cache_dir(cache_root, evaluation.dataset, config.arch, config.pretrained), config
        )
    return EvalFeatures(
        dataset=evaluation.dataset,
        classnames=evaluation.classnames,
        test=cache.gather("eval", [item.path for item in evaluation.test]),
        test_labels=_labels(evaluation.test),
        template=evaluation.template,
        imagenet_labels=evaluation.imagenet_labels,
    )
