"""Learned-context files (save, load, checks) and the nearest words of a context."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES, separable_problem

from pipeline.engine.context import ContextFileError, ContextMeta, context_model, load_context, save_context
from pipeline.engine.interpret import nearest_words
from pipeline.engine.prompt import CoOp, PromptConfig
from pipeline.engine.train import TrainConfig, train_coop


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


def test_nearest_words_recover_the_words_a_context_was_built_from(tiny):
    model = CoOp(tiny, CLASSNAMES, PromptConfig(ctx_init="a photo of a"))
    rows = nearest_words(model.prompt_learner.ctx.detach() + 1e-4, tiny, k=3)
    assert [r[0][0] for r in rows] == ["a", "photo", "of", "a"]
    assert all(len(r) == 3 and r[0][1] <= r[1][1] <= r[2][1] for r in rows)
