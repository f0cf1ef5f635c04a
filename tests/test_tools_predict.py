"""The predict tool: classifies image files with a saved context as the model does, names a broken image."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES
from PIL import Image

from pipeline.data.images import build_transforms
from pipeline.engine.context import ContextMeta, save_context
from pipeline.engine.prompt import CoOp, PromptConfig
from pipeline.tools.predict import main as predict_main


def context_meta(tiny, model: CoOp, classnames=CLASSNAMES) -> ContextMeta:
    cfg = model.prompt_learner.cfg
    return ContextMeta(tiny.arch, tiny.pretrained, tiny.fingerprint, model.prompt_learner.n_ctx,
                       cfg.class_token_position, cfg.csc, cfg.ctx_init, list(classnames), "synthetic", 4, 1,
                       val_acc=50.0, test_acc=40.0)


def test_predict_cli_classifies_images_like_the_model(tiny, tmp_path, capsys):
    classnames = ["red", "green", "blue"]
    colours = {"red": (250, 10, 10), "green": (10, 250, 10), "blue": (10, 10, 250)}
    _, test_transform = build_transforms(tiny.image_size, tiny.mean, tiny.std)
    files, images = [], []
    for name, rgb in colours.items():
        f = tmp_path / f"{name}.png"
        Image.new("RGB", (40, 40), rgb).save(f)
        files.append(f)
        images.append(test_transform(Image.open(f).convert("RGB")))
    model = CoOp(tiny, classnames, PromptConfig(n_ctx=4, csc=True), generator=torch.Generator().manual_seed(0))
    path = save_context(tmp_path / "colours.safetensors", model.prompt_learner.ctx, context_meta(tiny, model, classnames))
    with torch.no_grad():
        expected = model(F.normalize(tiny.encode_images(torch.stack(images)), dim=-1)).softmax(-1)

    assert predict_main(["--context", str(path), "--json", "--top-k", "2", *map(str, files)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == [str(f) for f in files]
    for row, probs in zip(rows, expected, strict=True):
        best = int(probs.argmax())
        assert row["top"][0][0] == classnames[best]
        assert row["top"][0][1] == pytest.approx(float(probs[best]), abs=1e-4)
        assert len(row["top"]) == 2


def test_predict_cli_names_a_corrupt_image(tiny, tmp_path, caplog):
    model = CoOp(tiny, CLASSNAMES, PromptConfig(n_ctx=2))
    path = save_context(tmp_path / "c.safetensors", model.prompt_learner.ctx, context_meta(tiny, model))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    assert predict_main(["--context", str(path), str(bad)]) == 2
    assert "broken.jpg" in caplog.text
