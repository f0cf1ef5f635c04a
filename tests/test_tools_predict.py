"""The predict tool: classifies image files with a saved context or CoCoOp model as the model does, skips and names
bad images."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES, separable_problem
from PIL import Image

from pipeline.data.images import build_transforms
from pipeline.engine import cocoop
from pipeline.engine.context import ContextMeta, save_context, save_learned
from pipeline.engine.methods import MethodConfig, train_method
from pipeline.engine.prompt import CoOp, PromptConfig
from pipeline.engine.train import TrainConfig
from pipeline.tools import predict as predict_module
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


def colour_images(tiny, tmp_path):
    """Three single-colour image files and their test-time tensors."""
    _, test_transform = build_transforms(tiny.image_size, tiny.mean, tiny.std)
    files = []
    for name, rgb in {"red": (250, 10, 10), "green": (10, 250, 10), "blue": (10, 10, 250)}.items():
        files.append(tmp_path / f"{name}.png")
        Image.new("RGB", (40, 40), rgb).save(files[-1])
    return files, torch.stack([test_transform(Image.open(f).convert("RGB")) for f in files])


def test_predict_cli_classifies_with_a_trained_cocoop_model_as_the_model_does(tiny, tmp_path, capsys, monkeypatch):
    classnames = ["red", "green", "blue"]
    method = MethodConfig("cocoop", meta_reduction=8)
    cfg = TrainConfig(lr=0.02, batch_size=1, warmup_epochs=0, seed=1)
    trained = train_method(tiny, separable_problem(tiny, classnames, shots=2, views=1), PromptConfig(n_ctx=4), cfg,
                           method, epochs=1, progress=False)
    meta = dataclasses.replace(context_meta(tiny, trained.model, classnames), method="cocoop",
                               method_params=method.hyperparameters())
    path = save_learned(tmp_path / "cocoop.safetensors", trained.learned, meta)
    files, images = colour_images(tiny, tmp_path)
    with torch.no_grad():
        features = F.normalize(tiny.encode_images(images), dim=-1)
        expected = trained.model(features).softmax(-1)
        context_alone = CoOp(tiny, classnames, PromptConfig(n_ctx=4))
        context_alone.prompt_learner.ctx.copy_(trained.ctx)
        without_meta_net = context_alone(features).softmax(-1)
    assert not torch.allclose(expected, without_meta_net, atol=1e-3)  # the meta-network matters here

    monkeypatch.setattr(cocoop, "EVAL_PROMPTS", len(classnames))  # one image per pass: the chunks join up
    assert predict_main(["--context", str(path), "--json", "--top-k", "3", *map(str, files)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == [str(f) for f in files]
    for row, probs in zip(rows, expected, strict=True):
        assert [name for name, _, _ in row["top"]] == [classnames[i] for i in probs.argsort(descending=True)]
        assert [p for _, p, _ in row["top"]] == pytest.approx(sorted(probs.tolist(), reverse=True), abs=1e-4)


def _context(tiny, tmp_path):
    model = CoOp(tiny, CLASSNAMES, PromptConfig(n_ctx=2), generator=torch.Generator().manual_seed(0))
    return save_context(tmp_path / "c.safetensors", model.prompt_learner.ctx, context_meta(tiny, model))


def test_predict_cli_reports_each_unreadable_image_and_classifies_the_rest(tiny, tmp_path, capsys, caplog,
                                                                          monkeypatch):
    path = _context(tiny, tmp_path)
    good = [tmp_path / "a.png", tmp_path / "b.png"]
    Image.new("RGB", (40, 40), (200, 30, 30)).save(good[0])
    Image.new("RGB", (40, 40), (30, 30, 200)).save(good[1])
    broken, missing = tmp_path / "broken.jpg", tmp_path / "missing.png"
    broken.write_bytes(b"not an image")
    files = [broken, good[0], missing, good[1], broken]

    monkeypatch.setattr(predict_module, "BATCH_SIZE", 2)  # batches of 2: one readable each, then none
    assert predict_main(["--context", str(path), "--json", *map(str, files)]) == 1
    monkeypatch.undo()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == [str(f) for f in files]  # one row per image, in the order given
    assert ["top" in r for r in rows] == [False, True, False, True, False]
    assert "broken.jpg" in rows[0]["error"] and "no such file" in rows[2]["error"] and "broken.jpg" in rows[4]["error"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("broken.jpg" in m for m in errors) and any("missing.png" in m for m in errors)
    assert "split lists" not in caplog.text  # dataset advice means nothing to a user of predict
    assert any("3 of 5 image(s) could not be read" in m for m in errors)

    # The readable images get the same answer as when they are classified alone.
    caplog.clear()
    assert predict_main(["--context", str(path), "--json", *map(str, good)]) == 0
    alone = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [alone[0]["top"], alone[1]["top"]] == [rows[1]["top"], rows[3]["top"]]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_predict_cli_exits_1_when_no_image_is_readable(tiny, tmp_path, capsys, caplog):
    path = _context(tiny, tmp_path)
    assert predict_main(["--context", str(path), str(tmp_path / "nothing.png")]) == 1
    assert capsys.readouterr().out == ""
    assert "nothing.png" in caplog.text


def test_predict_cli_accepts_either_file_of_a_context(tiny, tmp_path, capsys):
    path = _context(tiny, tmp_path)
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    outputs = []
    for context in (path, path.with_suffix(".json")):
        assert predict_main(["--context", str(context), "--json", str(image)]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and json.loads(outputs[0])["top"]


def test_predict_cli_names_a_bad_context_file(tiny, tmp_path, caplog):
    path = _context(tiny, tmp_path)
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    other = tmp_path / "c.pt"
    other.write_bytes(b"")
    assert predict_main(["--context", str(other), str(image)]) == 2
    assert "c.pt" in caplog.text and ".safetensors file or the .json" in caplog.text
    caplog.clear()
    path.write_bytes(b"{}")  # not a safetensors file: a message naming it, not a traceback
    assert predict_main(["--context", str(path.with_suffix(".json")), str(image)]) == 2
    assert "c.safetensors is not a safetensors file" in caplog.text
