"""Zero-shot CLIP on cached features: the hand-crafted CoOp prompt and the official prompt ensemble."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.engine.backbone import Backbone
from pipeline.engine.inputs import EvalFeatures, FewShotFeatures

# CLIP's seven ImageNet templates chosen for prompt ensembling (CLIP repository, "Prompt_Engineering");
# the official CoOp code calls them IMAGENET_TEMPLATES_SELECT.
ENSEMBLE_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def _readable(classnames: list[str]) -> list[str]:
    return [n.replace("_", " ") for n in classnames]


@torch.no_grad()
def zero_shot_weights(
    backbone: Backbone, classnames: list[str], templates: list[str] | tuple[str, ...], chunk: int = 1024
) -> torch.Tensor:
    """(C, E) normalised classifier: per class, the mean of its normalised template embeddings, renormalised."""
    texts = [t.format(name) for name in _readable(classnames) for t in templates]
    # Encoded in chunks of prompts, not a forward per class: ImageNet's 1000 x 8 prompts in a few passes.
    features = torch.cat([backbone.encode_text(texts[i : i + chunk]) for i in range(0, len(texts), chunk)])
    per_class = F.normalize(features, dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(per_class.mean(1), dim=-1)


def accuracy(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    """Top-1 accuracy (%) of a cosine classifier."""
    if len(labels) == 0:
        return float("nan")
    logits = F.normalize(features.float().to(weights.device), dim=-1) @ weights.t()
    return 100.0 * float((logits.argmax(-1).cpu() == labels).float().mean())


def zero_shot_accuracy(backbone: Backbone, data: FewShotFeatures | EvalFeatures,
                       template: str | None = None) -> float:
    """Zero-shot CLIP with the dataset's hand-crafted CoOp prompt on the test split."""
    weights = zero_shot_weights(backbone, data.classnames, [template or data.template])
    return accuracy(data.test, data.test_labels, weights)


def ensemble_templates(dataset: str, template: str) -> tuple[str, ...]:
    """The official ensemble: the seven templates, plus the dataset's hand-crafted one except on ImageNet.

    As CoOp's ZeroshotCLIP2, which adds the custom template for every dataset whose name is not exactly
    "ImageNet" (so ImageNet-V2/-Sketch/-A/-R do get it).
    """
    return ENSEMBLE_TEMPLATES if dataset == "ImageNet" else (*ENSEMBLE_TEMPLATES, template)


def ensemble_accuracy(backbone: Backbone, data: FewShotFeatures | EvalFeatures) -> float:
    """Zero-shot CLIP with the official prompt ensemble (`ensemble_templates`) on the test split."""
    weights = zero_shot_weights(backbone, data.classnames, ensemble_templates(data.dataset, data.template))
    return accuracy(data.test, data.test_labels, weights)
