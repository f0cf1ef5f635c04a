"""Learned-context files (save, load, checks) and the nearest words of a context."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES, separable_problem

from pipeline.engine.backbone import decode_tokens
from pipeline.engine.context import ContextFileError, ContextMeta, context_model, load_context, save_context
from pipeline.engine.interpret import nearest_words
from pipeline.engine.prompt import CoOp, PromptConfig
from pipeline.engine.train import TrainConfig, TrainResult, train_coop

# Vocabulary entries as CLIP's byte-level BPE spells them, and the text they stand for.
ENCODED = {"ðŁĳĳ</w>": "👑", "âĢĶ</w>": "—", "cafÃ©</w>": "café", "photo</w>": "photo", "of": "of"}


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


def _token_id(piece: str) -> int:
    return open_clip.tokenizer._tokenizer.encoder[piece]


def test_decoded_tokens_are_the_text_they_stand_for() -> None:
    assert decode_tokens([_token_id(p) for p in ENCODED]) == list(ENCODED.values())
    # A piece of a character's bytes (the crown's first three of four) cannot be text: shown escaped.
    assert decode_tokens([_token_id("ðŁĳ")]) == ["\\xf0\\x9f\\x91"]
    # The reference: the tokenizer's own decode, which joins pieces and turns end-of-word markers into spaces.
    ids = open_clip.tokenizer._tokenizer.encode("a café 👑 photo")
    assert " ".join(decode_tokens(ids)) == open_clip.tokenizer._tokenizer.decode(ids).strip() == "a café 👑 photo"


def test_trial_artifacts_show_the_decoded_nearest_words(tiny, tmp_path) -> None:
    from pipeline.params import TrainParams
    from pipeline.sweep.trial import TrialSettings, write_artifacts

    pieces = list(ENCODED)
    model = CoOp(tiny, CLASSNAMES, PromptConfig(n_ctx=len(pieces)))
    with torch.no_grad():  # a context made of those tokens' embeddings: each vector's nearest word is its own
        model.prompt_learner.ctx.copy_(tiny.model.token_embedding.weight[[_token_id(p) for p in pieces]])
    settings = TrialSettings("s", tiny.arch, tiny.pretrained, tiny.fingerprint, TrainParams(device="cpu"), "", "", "",
                             "", {}, {}, nearest_words=1)
    config = {"n_ctx": len(pieces), "ctx_init": "", "csc": False, "class_token_position": "end",
              "dataset": "synthetic", "shots": 2, "seed": 1, "lr": 0.002, "epochs": 1}
    data = separable_problem(tiny, CLASSNAMES)
    write_artifacts(tmp_path, config, settings, tiny, data, TrainResult(model), TrainConfig(), "key")
    text = (tmp_path / "nearest_words.json").read_text(encoding="utf-8")
    vectors = json.loads(text)["vectors"]
    assert [v["words"][0]["word"] for v in vectors] == list(ENCODED.values())
    assert "👑" in text and "ðŁ" not in text  # readable as it is in MLflow's artifact viewer, not escaped
    lines = (tmp_path / "nearest_words.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split(": ")[1].split(" (")[0] for line in lines] == list(ENCODED.values())
