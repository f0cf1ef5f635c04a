"""The feature cache: frozen CLIP image features in safetensors shards keyed by image, and its manifest.

CoOp never updates the image encoder, so every image is encoded once and training runs on cached
features. Train images are cached in V augmented views (CoOp's random-resized-crop + flip; V = 1 means
the plain test transform), val/test images, and train images too, in one test-transform view (the
"eval" store). Each view's randomness is seeded from (train key, view index, base seed), so a rebuilt
cache is identical. The train key is the image path, or with `views_per_seed` the path and the split
seed (``<path>#seed<S>``): the seeds of an experiment then see different views of an image they share,
as the official runs see different crops. `features.views: online` caches no train views (training
crops the images afresh every epoch).

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.atomic import atomic_write, write_json_atomic
from pipeline.data.images import INTERPOLATION, TRAIN_CROP_SCALE, ImageViews
from pipeline.errors import UserError
from pipeline.params import ONLINE_VIEWS, check_views

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
HEADER_DTYPES = {"float16": "F16", "float32": "F32", "bfloat16": "BF16"}  # DTYPES as safetensors headers name them
STORES = ("train", "eval")
MAX_SHARDS = 8  # more shards than this are merged into one, so reads stay a handful of files
REBUILD_HINT = "rerun `dvc repro features` (or `python -m stages.features ...`)"


class FeatureCacheError(UserError, RuntimeError):
    """The feature cache is missing, corrupt, or does not match the requested configuration."""


class CacheMismatchError(FeatureCacheError):
    """The cache was built with a different backbone, transform, views or dtype."""


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
    views: int | str = 1  # cached views per train image (1 = the test transform), or ONLINE_VIEWS: none cached
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
        return self.views == ONLINE_VIEWS

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


@dataclass
class CacheUpdate:
    """What one `update_feature_cache` call did."""

    cache_dir: Path
    encoded: dict[str, int] = field(default_factory=dict)  # store -> newly encoded images
    total: dict[str, int] = field(default_factory=dict)  # store -> cached images afterwards
    rebuilt: bool = False


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
                f"{missing[:3]}; the cache was built for other splits. Add them to the features stage and {REBUILD_HINT}."
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
        raise FeatureCacheError(f"Feature cache manifest {path} is corrupt ({error}); {REBUILD_HINT}.") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != CACHE_FORMAT_VERSION:
        raise FeatureCacheError(f"Feature cache manifest {path} has an unknown format; {REBUILD_HINT}.")
    return manifest


# Manifest keys added after caches were first written, with the value every older cache was built with.
KEYS_OF_OLDER_CACHES = {"views_per_seed": False}


def _config_differences(manifest: dict[str, Any], config: FeatureConfig) -> list[str]:
    cached = {**KEYS_OF_OLDER_CACHES, **manifest.get("config", {})}
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


def _read_shard(path: Path, manifest: dict[str, Any], store: str, count: int, load: bool = True
                ) -> tuple[list[str], torch.Tensor | None]:
    """A shard's image keys and (with `load`) its features, once its header shows it is one of this cache's
    shards: a 'features' tensor of the manifest's dtype and row shape, 'paths' metadata, `count` rows."""
    if not path.is_file():
        raise FeatureCacheError(f"Feature cache shard {path} is missing; {REBUILD_HINT}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, tensors = f.metadata() or {}, f.keys()
            if "features" not in tensors or "paths" not in metadata:
                raise FeatureCacheError(
                    f"Feature cache shard {path} is not a feature shard (tensors {sorted(tensors)}, metadata "
                    f"{sorted(metadata)}; expected 'features' with 'paths'); {REBUILD_HINT}.")
            paths = json.loads(metadata["paths"])
            header = f.get_slice("features")
            shape, dtype = tuple(header.get_shape()), header.get_dtype()
            features = f.get_tensor("features") if load else None
    except (SafetensorError, json.JSONDecodeError, OSError) as error:
        raise FeatureCacheError(f"Feature cache shard {path} is corrupt ({error}); {REBUILD_HINT}.") from None
    views, dim = manifest["config"]["views"], manifest["feature_dim"]
    row = (views if isinstance(views, int) else 1, dim) if store == "train" else (dim,)
    wanted_dtype = HEADER_DTYPES[manifest["config"]["dtype"]]
    if shape[1:] != row or dtype != wanted_dtype:
        raise FeatureCacheError(
            f"Feature cache shard {path} holds {dtype} features of shape {shape}, not the manifest's {wanted_dtype} "
            f"rows of shape {row}: it belongs to another cache; {REBUILD_HINT}.")
    if not isinstance(paths, list) or len(paths) != count or shape[0] != count:
        raise FeatureCacheError(
            f"Feature cache shard {path} holds {shape[0]} rows for {len(paths)} paths, the manifest says {count}; "
            f"{REBUILD_HINT}.")
    return paths, features


def _load_shard(path: Path, manifest: dict[str, Any], store: str, count: int) -> tuple[list[str], torch.Tensor]:
    paths, features = _read_shard(path, manifest, store, count)
    assert features is not None
    return paths, features


def _load_stores(cache_dir: Path, manifest: dict[str, Any]) -> dict[str, tuple[list[str], torch.Tensor]]:
    stores: dict[str, tuple[list[str], torch.Tensor]] = {}
    for store in STORES:
        entry = manifest["stores"][store]
        all_paths: list[str] = []
        chunks = []
        for shard in entry["shards"]:
            paths, features = _load_shard(cache_dir / shard["file"], manifest, store, shard["count"])
            all_paths.extend(paths)
            chunks.append(features)
        if _paths_checksum(all_paths) != entry["paths_sha256"] or len(set(all_paths)) != len(all_paths):
            raise FeatureCacheError(
                f"Feature cache {cache_dir}: the {store} image list does not match the manifest; {REBUILD_HINT}."
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
        raise FeatureCacheError(f"No feature cache at {cache_dir} (manifest.json missing); {REBUILD_HINT}.")
    diffs = _config_differences(manifest, config)
    if diffs:
        raise CacheMismatchError(
            f"Feature cache {cache_dir} does not match the current configuration: "
            + "; ".join(diffs)
            + f". {REBUILD_HINT}."
        )
    return FeatureCache(cache_dir, manifest, _load_stores(cache_dir, manifest))


def _encode(
    backbone: Backbone,
    data_root: Path,
    keys: list[str],
    config: FeatureConfig,
    train_store: bool,
    batch_size: int,
    num_workers: int,
    progress: bool,
    desc: str,
) -> torch.Tensor:
    """Features of `keys`: (N, V, D) views of train keys for the train store, else (N, D) test transform."""
    views = config.views if train_store else 1
    dataset = ImageViews(data_root, keys, config.image_size, config.mean, config.std, views=views,
                         per_seed=train_store and config.views_per_seed, augment_seed=config.augment_seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out: list[torch.Tensor] = []
    dtype = DTYPES[config.dtype]
    with tqdm(total=len(keys), desc=desc, unit="img", disable=not progress, mininterval=1.0) as bar:
        for batch in loader:
            b, v = batch.shape[:2]
            features = backbone.encode_images(batch.flatten(0, 1)).float().cpu()
            features = features.reshape(b, v, -1)
            out.append((features if train_store else features[:, 0]).to(dtype))
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
        raise ValueError(f"views={ONLINE_VIEWS!r} caches no train views; pass the train images as eval paths only.")
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
    """Image paths of a store, read from the shards' headers only (no tensors loaded)."""
    paths: list[str] = []
    for shard in manifest["stores"][store]["shards"]:
        paths.extend(_read_shard(cache_dir / shard["file"], manifest, store, shard["count"], load=False)[0])
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
                f"Feature dimension changed from {manifest['feature_dim']} to {dim}; {REBUILD_HINT}."
            )
        manifest["feature_dim"] = dim
        entry = manifest["stores"][store]
        entry["shards"].append(_write_shard(cache_dir, store, paths, features))
        if len(entry["shards"]) > MAX_SHARDS:
            loaded = [_load_shard(cache_dir / s["file"], manifest, store, s["count"]) for s in entry["shards"]]
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
    tensors, metadata = {"features": features.contiguous()}, {"paths": json.dumps(paths)}
    atomic_write(cache_dir / name, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return {"file": name, "count": len(paths), "paths_sha256": _paths_checksum(paths)}
