"""KgCoOp (Yao et al., CVPR 2023): CoOp plus a pull of each class's text feature towards its hand-crafted prompt's.

The loss is cross-entropy + lambda * (1 - mean over classes of cos(w_c, w_c^clip)), where w_c is class c's
text feature from the learned prompt and w_c^clip the frozen CLIP's feature of the hand-crafted prompt
("a photo of a {}." or the dataset's template), both L2-normalised. This is the official code
(htyao89/KgCoOp, trainers/kgcoop.py: `1.0 - torch.mean(cos(text_features, text_features_old))`); the
paper writes the mean squared Euclidean distance of the normalised features, which is twice that
(||a - b||^2 = 2 - 2 cos for unit vectors), so lambda = 8.0 here is the official scripts' W = 8.0.
Only the context is learned: at inference a KgCoOp context is a CoOp context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.engine.backbone import Backbone
from pipeline.engine.prompt import CoOp, PromptConfig

# KgCoOp's CUSTOM_TEMPLATES agree with the templates registered for our datasets (CoOp's) except on DTD,
# where CoOp's zero-shot prompt is "{} texture." and KgCoOp's anchor "a photo of a {}, a type of texture.".
ANCHOR_TEMPLATES = {"DTD": "a photo of a {}, a type of texture."}

ANCHOR_BATCH = 256  # hand-crafted prompts encoded at a time (77 tokens each: bounds the memory on 1000 classes)


def anchor_template(dataset: str, template: str) -> str:
    """The hand-crafted prompt KgCoOp anchors a dataset's classes to: its own table, else the dataset's template."""
    return ANCHOR_TEMPLATES.get(dataset, template)


@torch.no_grad()
def hand_crafted_features(backbone: Backbone, classnames: list[str], template: str) -> torch.Tensor:
    """(C, E) L2-normalised fp32 text features of `template` filled with each class name, by the frozen CLIP."""
    if "{}" not in template:
        raise ValueError(f"KgCoOp's hand-crafted template {template!r} has no '{{}}' for the class name")
    texts = [template.format(name) for name in classnames]
    features = torch.cat([backbone.encode_text(texts[start : start + ANCHOR_BATCH])
                          for start in range(0, len(texts), ANCHOR_BATCH)])
    return F.normalize(features, dim=-1)


class KgCoOp(CoOp):
    """CoOp trained with KgCoOp's knowledge-guided loss (`kg_weight` = lambda) towards hand-crafted features."""

    def __init__(
        self,
        backbone: Backbone,
        classnames: list[str],
        cfg: PromptConfig,
        template: str,
        kg_weight: float = 8.0,
        precision: str = "fp32",
        shared_prefix: bool | None = None,
        generator: torch.Generator | None = None,
        pack_tokens: bool | None = None,
    ) -> None:
        """`template`: the hand-crafted prompt ("a photo of a {}."; `anchor_template` picks a dataset's)."""
        super().__init__(backbone, classnames, cfg, precision, shared_prefix, generator, pack_tokens)
        self.kg_weight = kg_weight
        self.template = template
        anchors = hand_crafted_features(backbone, self.prompt_learner.classnames, template)
        self.register_buffer("anchors", anchors, persistent=False)

    def knowledge_loss(self, text_features: torch.Tensor) -> torch.Tensor:
        """1 - mean_c cos(w_c, w_c^clip) of normalised class text features (C, E): the official L_kg."""
        return 1.0 - (text_features * self.anchors).sum(dim=-1).mean()

    def loss(self, image_features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy + kg_weight * knowledge_loss, the class text features computed once for both."""
        text = self.text_features()
        logits = self.logit_scale * image_features @ text.t()
        return F.cross_entropy(logits.float(), labels) + self.kg_weight * self.knowledge_loss(text), logits

