"""Images: CoOp's transforms, readable errors for bad files, and views seeded by their key alone."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from fixtures_data import write_image
from PIL import Image

from pipeline.data.images import (
    ImageReadError,
    ImageViews,
    build_transforms,
    image_of_key,
    load_image,
    train_key,
)
from pipeline.errors import UserError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_transforms_follow_coop() -> None:
    train, test = build_transforms(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    image = Image.new("RGB", (64, 48), (255, 0, 0))
    x = test(image)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[0], torch.full((32, 32), 2.0)) and torch.allclose(
        x[1], torch.full((32, 32), -2.0)
    )
    crop = train.transforms[0]
    assert crop.scale == (0.08, 1.0) and crop.interpolation.value == "bicubic"
    assert test.transforms[0].interpolation.value == "bicubic"


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    with pytest.raises(ImageReadError, match=r"Cannot read image .*broken\.png.*Replace the file") as error:
        load_image(bad)
    assert isinstance(error.value, UserError)  # a command reports it as a message, exit status 2


def test_train_keys_name_the_image_and_split_seed() -> None:
    assert train_key("a/b#c.jpg", 3, per_seed=True) == "a/b#c.jpg#seed3"
    assert image_of_key("a/b#c.jpg#seed3", per_seed=True) == "a/b#c.jpg"
    assert train_key("a/b.jpg", 3, per_seed=False) == image_of_key("a/b.jpg", per_seed=False) == "a/b.jpg"


def test_views_follow_the_documented_seed_rule_whatever_the_global_rng(tmp_path: Path) -> None:
    write_image(tmp_path / "img" / "0.png", seed=3, size=40)
    key = train_key("img/0.png", 2, per_seed=True)
    views = ImageViews(tmp_path, [key], 16, MEAN, STD, views=3, per_seed=True, augment_seed=7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = views[0]
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    torch.manual_seed(456)  # another global state: the same views
    assert first.shape == (3, 3, 16, 16) and torch.equal(first, views[0])
    assert not torch.equal(first[0], first[1])
    # The rule written out: view v of key K under base seed B is seeded by sha256("B\0v\0K").
    train_tf, test_tf = build_transforms(16, MEAN, STD)
    image = Image.open(tmp_path / "img" / "0.png").convert("RGB")
    digest = hashlib.sha256(f"7\x002\x00{key}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    assert torch.equal(first[2], train_tf(image))
    plain = ImageViews(tmp_path, ["img/0.png"], 16, MEAN, STD)  # one view: the test transform
    assert torch.equal(plain[0], test_tf(image).unsqueeze(0))
