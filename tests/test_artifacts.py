"""Learned-context files, the predict CLI, nearest words and the baselines."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES, separable_problem
from PIL import Image

from pipeline.engine.baselines import (
    ensemble_accuracy,
    ensemble_templates,
    linear_probe,
    zero_shot_accuracy,
    zero_shot_weights,
)
from pipeline.engine.context import ContextFileError, ContextMeta, context_model, load_context, save_context
from pipeline.engine.interpret import nearest_words
from pipeline.engine.prompt import CoOp, PromptConfig
from pipeline.engine.train import TrainConfig, train_coop
from pipeline.features import build_transforms
from pipeline.predict import main as predict_main


def _meta(tiny, model: CoOp, classnames=CLASSNAMES) -> ContextMeta:
    cfg = model.prompt_learner.cfg
    return ContextMeta(tiny.arch, tiny.pretrained, tiny.fingerprint, model.prompt_learner.n_ctx,
                       cfg.class_token_position, cfg.csc, cfg.ctx_init, list(classnames), "synthetic", 4, 1,
                       val_acc=50.0, test_acc=40.0)


@pytest.mark.parametrize("csc", [False, True])
def test_context_round_trip_rebuilds_the_same_classifier(tiny, tmp_path, csc):
    data = separable_problem(tiny, CLASSNAMES)
    result = train_coop(tiny, data, PromptConfig(n_ctx=3, csc=csc, class_token_position="middle"), TrainConfig(),
                        epochs=2, progress=False)
    path = save_context(tmp_path / "ctx.safetensors", result.ctx, _meta(tiny, result.model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctx.json", "ctx.safetensors"]  # no temp files left
    ctx, meta = load_context(path)
    assert torch.equal(ctx, result.ctx)
    assert meta.classnames == CLASSNAMES and meta.csc == csc and meta.test_acc == 40.0
    rebuilt = context_model(tiny, ctx, meta)
    images = F.normalize(data.test, dim=-1)
    with torch.no_grad():
        assert torch.allclose(rebuilt(images), result.model(images), atol=1e-6)


def test_context_checks_backbone_and_classes(tiny, tmp_path):
    model = CoOp(tiny, CLASSNAMES, PromptConfig(n_ctx=2, csc=True))
    meta = _meta(tiny, model)
    path = save_context(tmp_path / "c.safetensors", model.prompt_learner.ctx, meta)
    ctx, meta = load_context(path)
    with pytest.raises(ContextFileError, match="6 classes but 2 class names"):
        context_model(tiny, ctx, meta, classnames=["a", "b"])
    meta.arch = "RN50"
    with pytest.raises(ContextFileError, match="learned on backbone 'RN50'"):
        context_model(tiny, ctx, meta)
    with pytest.raises(ContextFileError, match="does not exist"):
        load_context(tmp_path / "missing.safetensors")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ContextFileError, match="not valid context metadata"):
        load_context(path)


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
    path = save_context(tmp_path / "colours.safetensors", model.prompt_learner.ctx, _meta(tiny, model, classnames))
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
    path = save_context(tmp_path / "c.safetensors", model.prompt_learner.ctx, _meta(tiny, model))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    assert predict_main(["--context", str(path), str(bad)]) == 2
    assert "broken.jpg" in caplog.text


def test_nearest_words_recover_the_words_a_context_was_built_from(tiny):
    model = CoOp(tiny, CLASSNAMES, PromptConfig(ctx_init="a photo of a"))
    rows = nearest_words(model.prompt_learner.ctx.detach() + 1e-4, tiny, k=3)
    assert [r[0][0] for r in rows] == ["a", "photo", "of", "a"]
    assert all(len(r) == 3 and r[0][1] <= r[1][1] <= r[2][1] for r in rows)


def test_zero_shot_uses_the_template_and_ensemble_averages(tiny):
    data = separable_problem(tiny, CLASSNAMES)
    # Put each class's test images exactly on its zero-shot text direction: accuracy must be 100%.
    weights = zero_shot_weights(tiny, CLASSNAMES, ["a photo of a {}, a type of pet."])
    data.test = weights[data.test_labels] * 3.0
    data.template = "a photo of a {}, a type of pet."
    assert zero_shot_accuracy(tiny, data) == 100.0
    direct = F.normalize(tiny.encode_text(["a photo of a cat, a type of pet."]), dim=-1)[0]
    assert torch.allclose(weights[0], direct, atol=1e-6)
    assert 0.0 <= ensemble_accuracy(tiny, data) <= 100.0


# The official CoOp code's IMAGENET_TEMPLATES_SELECT (trainers/imagenet_templates.py), in its order.
OFFICIAL_TEMPLATES_SELECT = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]


@pytest.mark.parametrize("dataset", ["ImageNet", "ImageNetV2", "OxfordPets"])
def test_ensemble_uses_the_official_templates(tiny, dataset):
    """ZeroshotCLIP2: the seven templates, plus the dataset's own one on every dataset but ImageNet."""
    data = separable_problem(tiny, CLASSNAMES)
    data.dataset, data.template = dataset, "a photo of a {}, a type of pet."
    official = OFFICIAL_TEMPLATES_SELECT + ([] if dataset == "ImageNet" else [data.template])
    assert list(ensemble_templates(dataset, data.template)) == official
    # Test features between the official classifier and one built with the other template list: the two
    # classifiers disagree on them, so the accuracy says which one ensemble_accuracy built.
    other = OFFICIAL_TEMPLATES_SELECT + ([data.template] if dataset == "ImageNet" else [])
    weights, other_weights = zero_shot_weights(tiny, CLASSNAMES, official), zero_shot_weights(tiny, CLASSNAMES, other)
    data.test = torch.randn(400, weights.shape[1], generator=torch.Generator().manual_seed(0))
    data.test_labels = (data.test @ weights.t()).argmax(-1)
    assert (data.test_labels != (data.test @ other_weights.t()).argmax(-1)).any()
    assert ensemble_accuracy(tiny, data) == 100.0


def test_linear_probe_picks_c_on_val_like_sklearn(tiny):
    from sklearn.linear_model import LogisticRegression

    data = separable_problem(tiny, CLASSNAMES)
    data.val_labels = data.val_labels.roll(1)  # mislabel val so the C values disagree on it
    grid = (1e-3, 1.0, 100.0)
    result = linear_probe(data, c_grid=grid)
    x = F.normalize(data.train.flatten(0, 1), dim=-1).numpy()
    y = data.train_labels.repeat_interleave(data.train.shape[1]).numpy()
    reference = {}
    for c in grid:
        clf = LogisticRegression(C=c, max_iter=1000, random_state=0).fit(x, y)
        reference[c] = 100.0 * float((clf.predict(F.normalize(data.val, dim=-1).numpy()) == data.val_labels.numpy()).mean())
    assert result["val_by_C"] == pytest.approx(reference)
    assert result["C"] == max(grid, key=lambda c: (reference[c], -grid.index(c)))
    assert result["val_acc"] == pytest.approx(reference[result["C"]])
