"""The paper's baselines on cached features: zero-shot CLIP (hand-crafted prompt, prompt ensemble), linear probe."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.engine.backbone import Backbone
from pipeline.features import FewShotFeatures

log = logging.getLogger(__name__)

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
# CLIP's protocol sweeps the inverse regularisation strength C; this is a coarse log grid over it.
LINEAR_PROBE_C = tuple(float(c) for c in np.logspace(-6, 6, 13))


def _names(classnames: list[str]) -> list[str]:
    return [n.replace("_", " ") for n in classnames]


@torch.no_grad()
def zero_shot_weights(backbone: Backbone, classnames: list[str], templates: list[str] | tuple[str, ...]) -> torch.Tensor:
    """(C, E) normalised classifier: per class, the mean of its normalised template embeddings, renormalised."""
    weights = []
    for name in _names(classnames):
        texts = [t.format(name) for t in templates]
        weights.append(F.normalize(F.normalize(backbone.encode_text(texts), dim=-1).mean(0), dim=-1))
    return torch.stack(weights)


def accuracy(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    """Top-1 accuracy (%) of a cosine classifier."""
    if len(labels) == 0:
        return float("nan")
    logits = F.normalize(features.float().to(weights.device), dim=-1) @ weights.t()
    return 100.0 * float((logits.argmax(-1).cpu() == labels).float().mean())


def zero_shot_accuracy(backbone: Backbone, data: FewShotFeatures, template: str | None = None) -> float:
    """Zero-shot CLIP with the dataset's hand-crafted CoOp prompt on the test split."""
    weights = zero_shot_weights(backbone, data.classnames, [template or data.template])
    return accuracy(data.test, data.test_labels, weights)


def ensemble_templates(dataset: str, template: str) -> tuple[str, ...]:
    """The official ensemble: the seven templates, plus the dataset's hand-crafted one except on ImageNet.

    As CoOp's ZeroshotCLIP2, which adds the custom template for every dataset whose name is not exactly
    "ImageNet" (so ImageNet-V2/-Sketch/-A/-R do get it).
    """
    return ENSEMBLE_TEMPLATES if dataset == "ImageNet" else (*ENSEMBLE_TEMPLATES, template)


def ensemble_accuracy(backbone: Backbone, data: FewShotFeatures) -> float:
    """Zero-shot CLIP with the official prompt ensemble (`ensemble_templates`)."""
    weights = zero_shot_weights(backbone, data.classnames, ensemble_templates(data.dataset, data.template))
    return accuracy(data.test, data.test_labels, weights)


def linear_probe(data: FewShotFeatures, c_grid: tuple[float, ...] = LINEAR_PROBE_C, seed: int = 0) -> dict:
    """Logistic regression on the frozen (normalised) features; C picked on the val split as CLIP does.

    Trains on every cached view of each training image. Returns the chosen C (the first best on val), its val and test accuracy, and val accuracy per C.
    """
    from sklearn.linear_model import LogisticRegression

    def norm(t: torch.Tensor) -> np.ndarray:
        return F.normalize(t.float(), dim=-1).numpy()

    n, views, dim = data.train.shape
    x_train = norm(data.train.reshape(n * views, dim))
    y_train = data.train_labels.repeat_interleave(views).numpy()
    x_val, y_val = norm(data.val), data.val_labels.numpy()
    best: tuple[float, float, LogisticRegression] | None = None
    val_by_c = {}
    for c in c_grid:
        clf = LogisticRegression(C=c, max_iter=1000, random_state=seed)
        clf.fit(x_train, y_train)
        val_acc = 100.0 * float((clf.predict(x_val) == y_val).mean()) if len(y_val) else 0.0
        val_by_c[c] = val_acc
        if best is None or val_acc > best[1]:
            best = (c, val_acc, clf)
    assert best is not None
    c, val_acc, clf = best
    test_acc = 100.0 * float((clf.predict(norm(data.test)) == data.test_labels.numpy()).mean())
    return {"C": c, "val_acc": val_acc, "test_acc": test_acc, "val_by_C": val_by_c}
