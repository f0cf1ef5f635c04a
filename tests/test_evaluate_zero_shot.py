"""Zero-shot CLIP: the hand-crafted template's classifier, and the official prompt ensemble's templates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES, separable_problem

from pipeline.engine.inputs import EvalFeatures
from pipeline.evaluate.zero_shot import (
    ensemble_accuracy,
    ensemble_templates,
    zero_shot_accuracy,
    zero_shot_weights,
)


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


def test_test_only_features_score_like_a_few_shot_split(tiny):
    """The domain-shift stage scores zero-shot CLIP on EvalFeatures: same test set, same numbers."""
    data = separable_problem(tiny, CLASSNAMES)
    data.dataset, data.template = "ImageNetV2", "a photo of a {}, a type of pet."
    target = EvalFeatures(data.dataset, data.classnames, data.test, data.test_labels, data.template)
    weights = zero_shot_weights(tiny, CLASSNAMES, [data.template])
    expected = 100.0 * float(((F.normalize(data.test, dim=-1) @ weights.t()).argmax(-1) == data.test_labels)
                             .float().mean())
    assert zero_shot_accuracy(tiny, target) == zero_shot_accuracy(tiny, data) == pytest.approx(expected)
    assert ensemble_accuracy(tiny, target) == ensemble_accuracy(tiny, data)
