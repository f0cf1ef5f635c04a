"""Class lists with equal names (CLIP's ImageNet list: two 'missile', two 'sunglasses') work everywhere.

A class is its label index, as in the official CoOp code: equal names give equal prompts (unified context)
or separate contexts (CSC), and nothing maps a class by its name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import separable_problem
from fixtures_data import write_image
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image

import pipeline.engine.prompt as prompt_module
from pipeline.data.datasets import duplicate_classnames, load_dataset
from pipeline.data.fewshot import EvalList, make_eval_list
from pipeline.data.images import build_transforms
from pipeline.engine.context import ContextMeta, context_model, load_context, save_context
from pipeline.engine.inputs import EvalFeatures
from pipeline.engine.interpret import format_entry, nearest_word_entries, nearest_words
from pipeline.engine.prompt import CoOp, PromptConfig
from pipeline.engine.reference import official_logits
from pipeline.engine.train import TrainConfig, evaluate, train_coop
from pipeline.evaluate.domain_shift import context_accuracy, restrict, subset_rows
from pipeline.evaluate.linear_probe import grid_linear_probe
from pipeline.evaluate.zero_shot import ENSEMBLE_TEMPLATES, accuracy, zero_shot_accuracy, zero_shot_weights
from pipeline.report.html import first_class_context
from pipeline.tools.import_context import import_context, read_classnames
from pipeline.tools.predict import main as predict_main

NAMES = list(IMAGENET_CLASSNAMES)
MISSILES, SUNGLASSES = [657, 744], [836, 837]
FIRST_OF_NAME = [NAMES.index(name) for name in NAMES]  # the lowest label with each class's name


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """No class list reported yet in this process, and the prompt learner's warnings captured."""
    monkeypatch.setattr(prompt_module, "_duplicates_reported", set())
    caplog.set_level(logging.WARNING, logger="pipeline.engine.prompt")
    return caplog


def duplicate_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "pipeline.engine.prompt" and "given to several" in r.getMessage()]


def meta_for(tiny, model: CoOp, classnames: list[str]) -> ContextMeta:
    cfg = model.prompt_learner.cfg
    return ContextMeta(tiny.arch, tiny.pretrained, tiny.fingerprint, model.prompt_learner.n_ctx,
                       cfg.class_token_position, cfg.csc, cfg.ctx_init, list(classnames), "ImageNet", 1, 1)


def imagenet_variant(root: Path, name: str, folder: str, image_dir: str, labels: list[int]) -> EvalList:
    """The test list of an ImageNet variant read by the dataset reader from the official layout: CoOp's
    classnames.txt with all 1000 classes (wnids standing in, sorted like the real ones) and one image
    folder per class of the subset."""
    base = root / folder
    base.mkdir(parents=True)
    (base / "classnames.txt").write_text("".join(f"n{i:08d} {n}\n" for i, n in enumerate(NAMES)), encoding="utf-8")
    for label in labels:
        write_image(base / image_dir / f"n{label:08d}" / "0.jpg", label)
    return make_eval_list(load_dataset(name, root))


def subset_labels(offset: int) -> list[int]:
    """200 ImageNet labels including both 'missile' and both 'sunglasses' classes."""
    chosen = set(MISSILES + SUNGLASSES)
    chosen |= set(range(offset, 1000, 5)[: 200 - len(chosen)])
    assert len(chosen) == 200
    return sorted(chosen)


def test_real_imagenet_class_list_trains_evaluates_and_transfers(tiny, tmp_path, fresh_warnings):
    assert duplicate_classnames(NAMES) == {"missile": MISSILES, "sunglasses": SUNGLASSES}
    data = separable_problem(tiny, NAMES, shots=1, views=1)
    cfg = TrainConfig(lr=0.02, warmup_epochs=0, batch_size=500)  # 2 steps an epoch over the 1000 images

    # Unified context: one context, equal prompts for equal names.
    unified = train_coop(tiny, data, PromptConfig(n_ctx=2), cfg, epochs=1, progress=False)
    model = unified.model
    assert model.prompt_learner.n_cls == 1000
    prompts = model.prompt_learner().detach()
    for a, b in (MISSILES, SUNGLASSES):
        assert torch.equal(prompts[a], prompts[b])
    text = model.text_features().detach()
    for a, b in (MISSILES, SUNGLASSES):
        torch.testing.assert_close(text[a], text[b], rtol=0, atol=1e-6)
    assert 0.0 <= unified.test_acc <= 100.0 and 0.0 <= unified.val_acc <= 100.0
    # One image per class on its text direction, the same image for equal names (their directions are
    # equal up to rounding): all right but one of each equal-name pair.
    assert evaluate(model, text[FIRST_OF_NAME], torch.arange(1000)) == pytest.approx(99.8)

    # CSC from the same words: every class starts with the same context, so the two 'missile' rows can
    # only differ because each label trained its own.
    csc = train_coop(tiny, data, PromptConfig(ctx_init="a photo", csc=True), cfg, epochs=1, progress=False)
    ctx = csc.ctx
    assert ctx.shape == (1000, 2, tiny.text_width)
    initial = CoOp(tiny, NAMES, PromptConfig(ctx_init="a photo", csc=True)).prompt_learner.ctx.detach()
    assert torch.equal(initial[MISSILES[0]], initial[MISSILES[1]])
    for a, b in (MISSILES, SUNGLASSES):
        assert not torch.allclose(ctx[a], ctx[b], rtol=0, atol=1e-5)
    csc_text = csc.model.text_features().detach()
    assert evaluate(csc.model, csc_text, torch.arange(1000)) == 100.0

    # Zero-shot and the prompt ensemble: equal names give equal classifier rows.
    for templates in ([data.template], (data.template, *ENSEMBLE_TEMPLATES)):
        weights = zero_shot_weights(tiny, NAMES, templates)
        assert weights.shape == (1000, tiny.embed_dim)
        for a, b in (MISSILES, SUNGLASSES):
            assert torch.equal(weights[a], weights[b])
        assert 0.0 <= accuracy(data.test, data.test_labels, weights) <= 100.0
    assert 0.0 <= zero_shot_accuracy(tiny, data) <= 100.0

    # The linear probe never sees names: it tells all 1000 classes apart on these separable features.
    probe = grid_linear_probe(data, c_grid=(1.0,))
    assert probe["test_acc"] > 95.0

    # The context artifact keeps the list as it is, duplicates included, and rebuilds the classifier.
    path = save_context(tmp_path / "ctx.safetensors", ctx, meta_for(tiny, csc.model, NAMES))
    loaded, meta = load_context(path)
    assert meta.classnames == NAMES and torch.equal(loaded, ctx)
    rebuilt = context_model(tiny, loaded, meta)
    torch.testing.assert_close(rebuilt.text_features(), csc_text, rtol=0, atol=1e-6)

    # Nearest words of the CSC context: rows named by label, checked against the plain computation.
    entries = nearest_word_entries(ctx, tiny, NAMES, k=2)
    assert [e["label"] for e in entries] == [c for c in range(1000) for _ in range(2)]
    for label in MISSILES:
        first = entries[2 * label]
        assert first["class"] == "missile" and first["position"] == 1
        expected = nearest_words(ctx[label], tiny, k=2)[0]
        assert [(w["word"], w["distance"]) for w in first["words"]] == expected
        assert format_entry(first).startswith(f"[{label} missile] v1: ")

    # Domain shift: ImageNet-A/-R style 200-class subsets read from the official layout, mapped by label.
    for name, folder, image_dir, offset in (("ImageNetA", "imagenet-adversarial", "imagenet-a", 0),
                                            ("ImageNetR", "imagenet-rendition", "imagenet-r", 3)):
        labels = subset_labels(offset)
        evaluation = imagenet_variant(tmp_path / name, name, folder, image_dir, labels)
        assert evaluation.classnames == [NAMES[i] for i in labels]  # duplicates kept, nothing merged
        rows = subset_rows(list(range(1000)), evaluation)
        assert rows == labels  # the two 'missile' classes keep rows 657 and 744
        for trained, full_text, expected in ((unified, text, 99.0), (csc, csc_text, 100.0)):
            # One test image per class on the full classifier's direction for that class's row (unified: the
            # same image for equal names, as above).
            image_rows = [FIRST_OF_NAME[r] for r in rows] if not trained.model.prompt_learner.csc else rows
            target = EvalFeatures(evaluation.dataset, evaluation.classnames, 3.0 * full_text[image_rows],
                                  torch.arange(200), evaluation.template, evaluation.imagenet_labels)
            trained_ctx, trained_meta = trained.ctx, meta_for(tiny, trained.model, NAMES)
            sub, sub_meta = restrict(trained_ctx, trained_meta, rows, target.classnames)
            assert sub_meta.classnames == target.classnames
            assert torch.equal(sub, trained_ctx[rows] if trained_meta.csc else trained_ctx)
            sub_text = context_model(tiny, sub, sub_meta).text_features()
            torch.testing.assert_close(sub_text, full_text[rows], rtol=0, atol=1e-5)
            # Unified: one of each of the 2 equal-name pairs is missed; CSC tells them apart.
            assert context_accuracy(tiny, trained_ctx, trained_meta, rows, target) == pytest.approx(expected)

    # One warning per class list: the 1000-class list, then each 200-class subset (their own labels).
    messages = duplicate_warnings(fresh_warnings)
    assert len(messages) == 3
    assert "'missile' = labels 657, 744" in messages[0] and "'sunglasses' = labels 836, 837" in messages[0]
    assert "of the 1000 labels" in messages[0]
    assert all("of the 200 labels" in m and "'missile'" in m and "'sunglasses'" in m for m in messages[1:])


@pytest.mark.parametrize(("shared", "pack"), [(False, False), (True, False), (False, True), (True, True)])
def test_equal_names_give_equal_prompts_and_text_features(tiny, shared, pack):
    names = ["missile", "cat", "missile", "sports_car", "sports car"]  # '_' reads as a space in prompts
    model = CoOp(tiny, names, PromptConfig(n_ctx=3), shared_prefix=shared, pack_tokens=pack,
                 generator=torch.Generator().manual_seed(0))
    prompts = model.prompt_learner().detach()
    assert torch.equal(prompts[0], prompts[2]) and torch.equal(prompts[3], prompts[4])
    assert not torch.equal(prompts[0], prompts[1])
    features = F.normalize(torch.randn(7, tiny.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.no_grad():
        logits = model(features)
    torch.testing.assert_close(logits[:, 0], logits[:, 2], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[:, 3], logits[:, 4], rtol=0, atol=1e-5)
    # The official 77-token forward over the same list, duplicates and all.
    reference = official_logits(tiny, names, model.prompt_learner.ctx.detach(), "end", features)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_warning_is_logged_once_per_class_list(tiny, fresh_warnings):
    names = ["missile", "cat", "missile"]
    for csc in (False, True, False):
        CoOp(tiny, names, PromptConfig(n_ctx=2, csc=csc))
    CoOp(tiny, ["cat", "dog"], PromptConfig(n_ctx=2))  # no equal names: nothing to say
    messages = duplicate_warnings(fresh_warnings)
    assert len(messages) == 1 and "'missile' = labels 0, 2" in messages[0]


def test_empty_name_is_still_refused_with_its_label(tiny):
    with pytest.raises(ValueError, match=r"class name '_' \(label 1\) is empty"):
        CoOp(tiny, ["cat", "_"], PromptConfig(n_ctx=2))


def test_imagenet_reader_keeps_equal_names_apart(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.data.datasets")
    evaluation = imagenet_variant(tmp_path, "ImageNetA", "imagenet-adversarial", "imagenet-a", subset_labels(0))
    assert evaluation.classnames.count("missile") == 2 and evaluation.classnames.count("sunglasses") == 2
    labels = evaluation.imagenet_labels
    assert [labels[i] for i, n in enumerate(evaluation.classnames) if n == "missile"] == MISSILES
    # Expected, so an info line and not a second warning beside the prompt learner's.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("'missile'" in r.getMessage() for r in caplog.records)


def test_import_reads_coop_classnames_txt_and_keeps_equal_names(tiny, tmp_path):
    from test_tools_import_context import dassl_checkpoint

    lines = [f"n{i:08d} {n}" for i, n in enumerate(NAMES)]
    path = tmp_path / "classnames.txt"
    path.write_text("\n".join(lines[500:] + lines[:500]) + "\n")  # labels follow the sorted wnids
    names = read_classnames(path, None, None, None)
    assert names == NAMES
    ctx = 0.02 * torch.randn(1000, 2, tiny.text_width, generator=torch.Generator().manual_seed(0))
    checkpoint = tmp_path / "model.pth.tar-50"
    dassl_checkpoint(checkpoint, ctx, 1000)
    out, meta = import_context(checkpoint, tmp_path / "in.safetensors", "coop-tiny", None, names, dataset="ImageNet")
    loaded, meta = load_context(out)
    assert meta.csc and meta.classnames == NAMES and torch.equal(loaded, ctx)


def test_predict_names_shared_class_names_with_their_label(tiny, tmp_path, capsys):
    names = ["missile", "cat", "missile"]
    model = CoOp(tiny, names, PromptConfig(n_ctx=2, csc=True), generator=torch.Generator().manual_seed(0))
    path = save_context(tmp_path / "c.safetensors", model.prompt_learner.ctx, meta_for(tiny, model, names))
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 40), (250, 10, 10)).save(image)
    _, transform = build_transforms(tiny.image_size, tiny.mean, tiny.std)
    with torch.no_grad():
        features = F.normalize(tiny.encode_images(transform(Image.open(image).convert("RGB"))[None]), dim=-1)
        probs = model(features).softmax(-1)[0]

    assert predict_main(["--context", str(path), "--top-k", "3", str(image)]) == 0
    text = capsys.readouterr().out
    assert "missile [label 0] (" in text and "missile [label 2] (" in text and "cat (" in text
    assert predict_main(["--context", str(path), "--json", "--top-k", "3", str(image)]) == 0
    top = json.loads(capsys.readouterr().out)["top"]
    assert sorted(label for _, _, label in top) == [0, 1, 2]
    for name, p, label in top:
        assert name == names[label] and p == pytest.approx(float(probs[label]), abs=1e-4)


def test_report_shows_the_first_class_context_by_label(tiny):
    names = ["missile", "cat", "missile"]
    ctx = torch.randn(3, 2, tiny.text_width, generator=torch.Generator().manual_seed(0))
    vectors = nearest_word_entries(ctx, tiny, names, k=1)
    shown = first_class_context(vectors)
    assert [(v["label"], v["position"]) for v in shown] == [(0, 1), (0, 2)]  # not label 2's 'missile' too


def test_trial_artifacts_name_csc_rows_by_label(tiny, tmp_path):
    from pipeline.params import TrainParams
    from pipeline.sweep.trial import TrialSettings, write_artifacts

    names = ["missile", "cat", "missile"]
    data = separable_problem(tiny, names, shots=2, views=1)
    result = train_coop(tiny, data, PromptConfig(n_ctx=2, csc=True), TrainConfig(), epochs=1, progress=False)
    settings = TrialSettings("s", tiny.arch, tiny.pretrained, tiny.fingerprint, TrainParams(device="cpu"), "", "", "",
                             "", {}, {}, nearest_words=1)
    config = {"n_ctx": 2, "ctx_init": "", "csc": True, "class_token_position": "end", "dataset": "synthetic",
              "shots": 2, "seed": 1, "lr": 0.002, "epochs": 1}
    write_artifacts(tmp_path, config, settings, tiny, data, result, TrainConfig(), "key")
    vectors = json.loads((tmp_path / "nearest_words.json").read_text())["vectors"]
    assert [(v["label"], v["class"], v["position"]) for v in vectors] == [
        (0, "missile", 1), (0, "missile", 2), (1, "cat", 1), (1, "cat", 2), (2, "missile", 1), (2, "missile", 2)]
    lines = (tmp_path / "nearest_words.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "[0 missile] v1", "[0 missile] v2", "[1 cat] v1", "[1 cat] v2", "[2 missile] v1", "[2 missile] v2"]
    assert load_context(tmp_path / "ctx.safetensors")[1].classnames == names
