"""CoCoOp (Zhou et al., CVPR 2022): a meta-network shifts the context by a bias computed from each image.

As the official code (KaiyangZhou/CoOp, trainers/cocoop.py): meta_net = Linear(E, E // 16) -> ReLU ->
Linear(E // 16, D) on the L2-normalised image feature (E its width, D the text tower's); its output is
added to every one of the M context vectors, so image b has prompts "[SOS] (v_1 + pi_b) ... (v_M + pi_b)
[CLASS]. [EOS]" and its logits are the scaled cosines with its own C class features. The context and the
meta-network train together. A step therefore encodes B x C prompts; they run through the same exact
text paths as CoOp's, the shared prefix (SOS and the context, now one per image) computed once per image.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.engine.backbone import Backbone
from pipeline.engine.prompt import CoOp, PromptConfig
from pipeline.params import OFFICIAL_FP16

EVAL_PROMPTS = 4096  # prompts per evaluation chunk (images x classes): bounds the text tower's activations


def meta_network(image_dim: int, text_width: int, reduction: int = 16,
                 generator: torch.Generator | None = None) -> nn.Sequential:
    """CoCoOp's meta-network, named as the official one (linear1, relu, linear2), on the CPU.

    Initialised as torch's nn.Linear (uniform in +-1/sqrt(fan_in), weights and biases), but drawn from
    `generator` so a seed fixes it whatever else used the global random state.
    """
    hidden = image_dim // reduction
    if reduction < 1 or hidden < 1:
        raise ValueError(f"meta_reduction must be between 1 and the image feature width {image_dim} (got "
                         f"{reduction}): the meta-network's hidden layer has image width // meta_reduction units")
    net = nn.Sequential(OrderedDict([
        ("linear1", nn.Linear(image_dim, hidden)),
        ("relu", nn.ReLU()),
        ("linear2", nn.Linear(hidden, text_width)),
    ]))
    with torch.no_grad():
        for layer in (net.linear1, net.linear2):
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
    return net


class CoCoOp(CoOp):
    """CoOp's prompt learner and text tower with CoCoOp's meta-network: logits from per-image prompts."""

    graphable = False  # prompts per image: a step's shapes follow the batch (not captured as a CUDA graph yet)

    def __init__(
        self,
        backbone: Backbone,
        classnames: list[str],
        cfg: PromptConfig,
        precision: str = "fp32",
        shared_prefix: bool | None = None,
        generator: torch.Generator | None = None,
        pack_tokens: bool | None = None,
        meta_reduction: int = 16,
    ) -> None:
        if cfg.csc:
            raise ValueError("CoCoOp learns one context for all classes, shifted per image; csc: true does not "
                             "apply (set csc: false)")
        if precision == OFFICIAL_FP16:
            raise ValueError(f"precision {OFFICIAL_FP16} reproduces CoOp's fp16 context; CoCoOp trains its context "
                             "and meta-network in fp32: use fp32, bf16, fp16 or amp")
        super().__init__(backbone, classnames, cfg, precision, shared_prefix, generator, pack_tokens)
        self.meta_net = meta_network(backbone.embed_dim, backbone.text_width, meta_reduction,
                                     generator).to(backbone.device)

    def text_features(self) -> torch.Tensor:
        raise TypeError("CoCoOp's class text features depend on the image: use image_text_features(images)")

    def image_text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Normalised image features (B, E) -> each image's own class text features (B, C, E), normalised, fp32."""
        learner = self.prompt_learner
        bias = self.meta_net(image_features)  # (B, D)
        ctx = learner.ctx.unsqueeze(0) + bias.unsqueeze(1)  # (B, M, D): every context vector shifted alike
        prompts = learner.image_prompts(ctx)  # (B, C, L, D)
        images, n_cls = prompts.shape[:2]
        lengths = learner.lengths * images
        if self.shared_prefix:
            p = learner.shared_len
            features = self.text.forward_shared(prompts[:, 0, :p], prompts[:, :, p:].flatten(0, 1),
                                                [n - p for n in lengths])
        else:
            features = self.text(prompts.flatten(0, 1), lengths)
        return F.normalize(features, dim=-1).view(images, n_cls, -1)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Normalised image features (B, E) -> logits (B, C), each image against its own prompts."""
        text = self.image_text_features(image_features)
        return self.logit_scale * torch.einsum("be,bce->bc", image_features, text)

    def trained_parameters(self) -> list[nn.Parameter]:
        """The context and the meta-network's weights."""
        return [self.prompt_learner.ctx, *self.meta_net.parameters()]

    def learned_tensors(self) -> dict[str, torch.Tensor]:
        """``ctx`` and ``meta_net.<layer>.<weight|bias>``, fp32 on the CPU."""
        return {**super().learned_tensors(),
                **{f"meta_net.{name}": t.detach().float().cpu() for name, t in self.meta_net.state_dict().items()}}

    @torch.no_grad()
    def predict(self, image_features: torch.Tensor, chunk: int = EVAL_PROMPTS) -> torch.Tensor:
        """Predicted labels (N,): images in chunks of about `chunk` prompts (images x classes)."""
        images = max(1, chunk // self.prompt_learner.n_cls)
        labels = [self(image_features[start : start + images]).argmax(dim=-1)
                  for start in range(0, len(image_features), images)]
        return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=image_features.device)
