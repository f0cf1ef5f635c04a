"""Online augmentation (features.views: online): fresh, seeded crops every epoch, encoded by the frozen tower."""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from pipeline.engine.backbone import Backbone, load_backbone
from pipeline.engine.inputs import TrainImages
from pipeline.engine.prompt import PromptConfig
from pipeline.engine.train import TrainConfig, online_batches, train_coop
from pipeline.features.assemble import load_fewshot_features
from pipeline.features.build import build_dataset_features
from pipeline.features.cache import FeatureConfig, open_feature_cache
from stages import prepare as prepare_stage

DEMO_ROOT = Path(__file__).resolve().parents[1] / "data" / "demo"


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights are expected here
        return load_backbone("coop-tiny", None)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, backbone: Backbone) -> Path:
    """The bundled demo's 2-shot splits (seeds 1, 2) and an online-mode feature cache."""
    root = tmp_path_factory.mktemp("online")
    logging.getLogger("stages.prepare").setLevel(logging.WARNING)
    (root / "defaults.yaml").write_text("")  # every key at its default unless a flag gives it
    assert prepare_stage.main(["--params", str(root / "defaults.yaml"), "--dataset", "FashionMNIST", "--data-root",
                               str(DEMO_ROOT), "--out", str(root / "splits"), "--shots", "2", "--seeds", "1", "2"]) == 0
    update = build_dataset_features(root / "cache", DEMO_ROOT, root / "splits", "FashionMNIST", [2], [1, 2],
                                    backbone, views="online", dtype="float32", progress=False)
    assert update.encoded["train"] == 0 and update.total["train"] == 0  # no train views cached
    return root


def load(demo: Path, backbone: Backbone, seed: int = 1, data_root: Path | None = DEMO_ROOT, **kwargs):
    config = FeatureConfig.from_backbone(backbone, views="online", dtype="float32")
    split = demo / "splits" / "FashionMNIST" / f"shot2_seed{seed}.json"
    return load_fewshot_features(demo / "cache", split, config, data_root=data_root, **kwargs)


def reference_crop(images: TrainImages, key: str, path: str, epoch: int, trial_seed: int) -> torch.Tensor:
    """The official CoOp train transform, seeded by the documented rule, written out independently."""
    text = f"{images.augment_seed}\0online\0{trial_seed}\0{epoch}\0{key}"
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)
    transform = T.Compose([
        T.RandomResizedCrop(images.image_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(images.mean, images.std),
    ])
    torch.manual_seed(seed)
    return transform(Image.open(Path(images.data_root) / path).convert("RGB"))


def test_online_features_are_open_clip_features_of_the_seeded_crops(demo: Path, backbone: Backbone) -> None:
    data = load(demo, backbone)
    images = data.train_images
    assert images is not None and Path(images.data_root) == DEMO_ROOT.resolve()
    assert data.train.shape == (20, 1, backbone.embed_dim)  # the test-transform view, for the baselines
    # A repeated image (a split drawn with repetition) gets crops of its own: key "<path>#1".
    images = replace(images, paths=(*images.paths[:5], images.paths[0]))
    batches = [[(5, 0), (0, 0), (3, 0)], [(1, 2), (5, 2), (0, 2)]]
    with torch.no_grad():
        for (features, indices), batch in zip(online_batches(backbone, images, 7, batches), batches, strict=True):
            assert indices.tolist() == [i for i, _ in batch]
            crops = torch.stack([
                reference_crop(images, images.paths[i] + ("#1" if i == 5 else ""), images.paths[i], epoch, 7)
                for i, epoch in batch
            ])
            expected = F.normalize(backbone.model.encode_image(crops), dim=-1)
            assert features.shape == expected.shape
            torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(features[1], features[2])  # the same image, its repeat: different crops


def test_crops_differ_by_epoch_and_trial_seed_and_repeat_exactly(demo: Path, backbone: Backbone) -> None:
    images = load(demo, backbone).train_images
    assert images is not None
    seed1, seed2 = images.crops(1), images.crops(2)
    crop, index = seed1[(0, 0)]
    assert index == 0 and crop.shape == (3, backbone.image_size, backbone.image_size)
    assert torch.equal(crop, images.crops(1)[(0, 0)][0])  # same (seed, epoch): same crop
    assert not torch.equal(crop, seed1[(0, 1)][0])  # next epoch
    assert not torch.equal(crop, seed2[(0, 0)][0])  # other trial seed
    other_base = replace(images, augment_seed=5).crops(1)
    assert not torch.equal(crop, other_base[(0, 0)][0])  # other features.seed
    # Loader workers decode in other processes, in another order: the features are the same.
    batches = [[(i, e) for i in range(8)] for e in range(2)]
    plain = [f for f, _ in online_batches(backbone, images, 1, batches)]
    forked = [f for f, _ in online_batches(backbone, replace(images, num_workers=2), 1, batches)]
    for a, b in zip(plain, forked, strict=True):
        assert torch.equal(a, b)


def test_online_training_runs_and_is_deterministic(demo: Path, backbone: Backbone) -> None:
    data = load(demo, backbone)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.01, warmup_epochs=0)
    first = train_coop(backbone, data, PromptConfig(n_ctx=4), cfg, progress=False)
    again = train_coop(backbone, data, PromptConfig(n_ctx=4), cfg, progress=False)
    assert [m.epoch for m in first.epochs] == [1, 2, 3] and first.epochs[-1].val_acc is not None
    assert 0.0 <= first.test_acc <= 100.0 and all(m.loss > 0 for m in first.epochs)
    assert torch.equal(first.ctx, again.ctx)  # two runs, same seed: the same crops, the same context
    assert [m.loss for m in first.epochs] == [m.loss for m in again.epochs]
    # The cached (test-transform) train tensor is not what online training reads: other features, other context.
    cached = train_coop(backbone, replace(data, train_images=None), PromptConfig(n_ctx=4), cfg, progress=False)
    assert not torch.allclose(cached.ctx, first.ctx)


def test_online_cache_holds_no_train_views_and_a_missing_root_is_named(demo: Path, backbone: Backbone) -> None:
    config = FeatureConfig.from_backbone(backbone, views="online", dtype="float32")
    assert config.online and not config.views_per_seed
    cache = open_feature_cache(demo / "cache" / "FashionMNIST" / "coop-tiny__random", config)
    assert cache.manifest["config"]["views"] == "online" and cache.paths("train") == []
    data = load(demo, backbone, seed=2)
    paths = data.train_images.paths  # type: ignore[union-attr]
    assert torch.equal(data.train[:, 0], cache.gather("eval", list(paths)))
    assert load(demo, backbone, data_root=None).train_images is None  # baselines only: no image reads
    moved = replace(data, train_images=replace(data.train_images, data_root="/nonexistent/data"))
    with pytest.raises(FileNotFoundError, match=r"data.root \(/nonexistent/data\).*shared filesystem"):
        train_coop(backbone, moved, PromptConfig(n_ctx=4), TrainConfig(epochs=1), progress=False)


def test_cost_model_counts_the_image_encoder_per_image_and_epoch() -> None:
    from pipeline.engine.flops import image_encoder_gflops
    from pipeline.params import params_from_dict
    from pipeline.sweep.estimate import (
        DECODE_SECONDS_PER_IMAGE,
        GPUS,
        estimate_gpu_hours,
        estimate_trial,
        online_image_seconds,
    )

    gpu = GPUS["H100"]
    config = {"dataset": "ImageNet", "shots": 16, "seed": 1, "n_ctx": 16, "ctx_init": "", "csc": False,
              "class_token_position": "end", "epochs": 50, "precision": "fp16"}
    cached = estimate_trial(config, "RN50", gpu)
    online = estimate_trial(config, "RN50", gpu, online=True, loader_workers=64)
    image_flops = 32 * image_encoder_gflops("RN50") * 1e9  # every step encodes its 32 crops
    assert online.steps == cached.steps == 50 * 500  # so every training image once per epoch
    assert online.flops_per_step - cached.flops_per_step == pytest.approx(image_flops)
    assert online.seconds - cached.seconds == pytest.approx(online.steps * online_image_seconds(gpu, image_flops))
    starved = estimate_trial(config, "RN50", gpu, online=True, loader_workers=1)  # one decoding process
    assert starved.seconds == pytest.approx(starved.steps * 32 * DECODE_SECONDS_PER_IMAGE + gpu.trial_overhead_s)
    official = estimate_trial(config, "RN50", gpu, path="official")
    assert estimate_trial(config, "RN50", gpu, path="official", online=True).seconds == official.seconds

    raw = {"data": {"datasets": ["ImageNet"], "shots": [16], "seeds": [1], "splits_dir": "/nonexistent"},
           "backbone": {"arch": "RN50"}, "sweep": {"space": {"n_ctx": [16]}}}
    base = estimate_gpu_hours(params_from_dict(raw))
    raw["features"] = {"views": "online", "online_workers": 64}
    exact = estimate_gpu_hours(params_from_dict(raw))
    assert exact.gpu_hours > base.gpu_hours
    assert "assumption: features.views = online: every step also encodes its 32" in exact.summary()
    assert "features.views = online" not in base.summary()
