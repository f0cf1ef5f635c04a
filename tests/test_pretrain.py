"""Pretraining on the synthetic world: exact truncated text path, bit-identical reruns, card, shipped checkpoint."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from pipeline.data.synthetic.corpus import attribute_set, make_corpus, render_images
from pipeline.data.synthetic.world import TEMPLATES
from pipeline.engine.backbone import WeightsUnavailableError, load_backbone, tokenize
from pipeline.params import ParamsError, PretrainParams, load_params, params_from_dict
from pipeline.pretrain import card_path, create_model, encode_text, lr_at, pretrain, save, sha256_of
from stages import pretrain as stage

REPO = Path(__file__).resolve().parents[1]
SHORT = PretrainParams(corpus_size=256, heldout_size=64, zero_shot_size=16, steps=24, batch_size=32, lr=2e-3,
                       warmup_steps=4, eval_every=8)


@pytest.fixture(scope="module")
def short_run() -> object:
    return pretrain(SHORT, progress=False)


def test_truncated_text_path_equals_open_clips_encode_text() -> None:
    model = create_model("coop-tiny", 0).eval()
    tokens = tokenize(make_corpus(0, 64).captions)
    with torch.no_grad():
        assert torch.allclose(encode_text(model, tokens), model.encode_text(tokens), atol=1e-5, rtol=0)


def test_schedule_warms_up_then_decays_to_zero() -> None:
    p = dataclasses.replace(SHORT, steps=100, warmup_steps=10, lr=1.0)
    assert lr_at(0, p) == pytest.approx(0.1) and lr_at(9, p) == pytest.approx(1.0)
    assert lr_at(10, p) == pytest.approx(1.0) and lr_at(55, p) == pytest.approx(0.5)
    assert lr_at(100, p) == pytest.approx(0.0, abs=1e-12)


def test_short_pretraining_is_bit_identical_twice_and_lowers_the_loss(short_run: object) -> None:
    again = pretrain(SHORT, progress=False)
    first, second = short_run.model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert short_run.history == again.history
    losses = [row["loss"] for row in short_run.history]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.2
    untrained = create_model("coop-tiny", SHORT.seed).state_dict()
    assert not torch.equal(untrained["text_projection"], first["text_projection"])


def test_checkpoint_loads_through_load_backbone_and_the_card_describes_it(short_run: object,
                                                                        tmp_path: Path) -> None:
    path = tmp_path / "world.safetensors"
    card = save(short_run, path)
    assert json.loads(card_path(path).read_text()) == card
    assert card["sha256"] == sha256_of(path) and card["bytes"] == path.stat().st_size
    assert card["steps"] == SHORT.steps and card["corpus"]["size"] == SHORT.corpus_size
    assert set(card["zero_shot"]) == {"shape", "colour"} and card["final_loss"] == round(short_run.final_loss, 4)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        backbone = load_backbone(SHORT.arch, str(path))
    assert not any("RANDOM" in str(w.message) for w in warned)
    loaded = backbone.model.state_dict()
    for name, tensor in short_run.model.state_dict().items():
        expected = tensor.half().float() if tensor.is_floating_point() else tensor
        assert torch.equal(loaded[name], expected), name
    with pytest.raises(WeightsUnavailableError, match=f"backbone.arch: {SHORT.arch}"):
        load_backbone("coop-tiny", str(path))


def test_pretrain_params_are_validated_with_the_key_named() -> None:
    assert load_params(REPO / "params.yaml").pretrain.out.endswith(".safetensors")
    with pytest.raises(ParamsError, match="pretrain.warmup_steps"):
        params_from_dict({"pretrain": {"steps": 10, "warmup_steps": 10}})
    with pytest.raises(ParamsError, match="pretrain.out"):
        params_from_dict({"pretrain": {"out": "models/x.pt"}})
    with pytest.raises(ParamsError, match="unknown key 'pretrain.epochs'"):
        params_from_dict({"pretrain": {"epochs": 3}})


def test_stage_writes_checkpoint_and_card_and_rejects_bad_flags(tmp_path: Path) -> None:
    raw = {"pretrain": {**{k: v for k, v in dataclasses.asdict(SHORT).items() if k != "out"}, "steps": 6,
                        "eval_every": 6}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    out = tmp_path / "m" / "tiny.safetensors"
    assert stage.main(["--params", str(params), "--out", str(out), "--no-progress"]) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["sha256"] == sha256_of(out) and card["steps"] == 6
    assert stage.main(["--params", str(params), "--out", str(tmp_path / "x.pt")]) == 2


# ------------------------------------------------------------------------------ the shipped checkpoint

SHIPPED = REPO / load_params(REPO / "params.yaml").pretrain.out


def test_shipped_card_matches_the_shipped_checkpoint() -> None:
    card = json.loads(card_path(SHIPPED).read_text())
    assert card["sha256"] == sha256_of(SHIPPED)
    assert card["checkpoint"] == SHIPPED.name


@pytest.mark.parametrize("task", ["shape", "colour"])
def test_shipped_checkpoint_is_well_above_chance_zero_shot_on_a_fresh_held_out_task(task: str) -> None:
    card = json.loads(card_path(SHIPPED).read_text())
    backbone = load_backbone(card["arch"], str(SHIPPED))
    # A seed the card's own evaluation never used: new scenes of the world.
    scenes, labels, classes = attribute_set(card["corpus"]["seed"] + 1000, 240, task)
    pixels = torch.from_numpy(render_images(scenes, backbone.image_size)).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(backbone.mean).view(1, 3, 1, 1), torch.tensor(backbone.std).view(1, 3, 1, 1)
    images = F.normalize(backbone.encode_images((pixels - mean) / std), dim=-1)
    text = F.normalize(backbone.encode_text([TEMPLATES[task].format(c) for c in classes]), dim=-1)
    accuracy = float(((images @ text.T).argmax(-1) == torch.tensor(labels)).float().mean())
    assert accuracy >= 2.0 / len(classes), f"{task}: {100 * accuracy:.1f}% vs chance {100 / len(classes):.1f}%"
    assert np.isfinite(card["final_loss"])
