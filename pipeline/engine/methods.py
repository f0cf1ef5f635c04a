"""The prompt-learning methods the engine trains (CoOp, CoCoOp, KgCoOp): typed config, training, saved models.

A method is a model class with CoOp's hooks (`loss`, `trained_parameters`, `learned_tensors`, `predict`);
`train_method` runs any of them with CoOp's loop, schedule, evaluation, seeding and curves (`train_coop`),
and `learned_model` rebuilds the classifier from what `context.save_learned` wrote.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from pipeline.data.datasets import DEFAULT_TEMPLATE
from pipeline.engine.backbone import Backbone
from pipeline.engine.cocoop import CoCoOp
from pipeline.engine.context import CONTEXT_METHODS, ContextFileError, ContextMeta, check_fits
from pipeline.engine.inputs import EvalFeatures, FewShotFeatures
from pipeline.engine.kgcoop import KgCoOp, anchor_template
from pipeline.engine.prompt import CoOp, PromptConfig
from pipeline.engine.train import (
    EpochMetrics,
    ModelBuilder,
    TrainConfig,
    TrainResult,
    evaluate,
    graph_model,
    train_coop,
)

COOP, COCOOP, KGCOOP = "coop", "cocoop", "kgcoop"
METHODS = (COOP, COCOOP, KGCOOP)

# Each method's hyperparameters of its own (MethodConfig fields), by method.
METHOD_HYPERPARAMETERS = {COOP: (), COCOOP: ("meta_reduction",), KGCOOP: ("kg_weight",)}

# The official recipes, for the sweep's defaults: CoCoOp's configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml
# (KaiyangZhou/CoOp), KgCoOp's configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml + scripts/base2new_train.sh
# (htyao89/KgCoOp; its CTX_INIT: True always means "a photo of a"). Both: SGD lr 0.002, one constant warm-up
# epoch at 1e-5, cosine, as CoOp (TrainConfig's defaults); base-to-new on 16 shots.
OFFICIAL_RECIPES = {
    COCOOP: {"ctx_init": "a photo of a", "batch_size": 1, "epochs": 10, "meta_reduction": 16},
    KGCOOP: {"ctx_init": "a photo of a", "batch_size": 128, "epochs": 100, "kg_weight": 8.0},
}


@dataclass(frozen=True)
class MethodConfig:
    """Which method trains and its own hyperparameters (defaults: the official scripts'); see METHOD_HYPERPARAMETERS."""

    name: str = COOP
    kg_weight: float = 8.0  # KgCoOp's lambda (its scripts' TRAINER.COOP.W), on 1 - mean cos (kgcoop.py)
    meta_reduction: int = 16  # CoCoOp: the meta-network's hidden width is the image feature width // this

    def to_dict(self) -> dict:
        return asdict(self)

    def hyperparameters(self) -> dict:
        """The hyperparameters that apply to this method (none for CoOp)."""
        return {key: getattr(self, key) for key in METHOD_HYPERPARAMETERS.get(self.name, ())}


def validate_method(method: MethodConfig, prompt: PromptConfig) -> None:
    """ValueError naming the key, for a method that does not exist or does not apply to the prompt."""
    if method.name not in METHODS:
        raise ValueError(f"unknown method {method.name!r}; choose one of {', '.join(METHODS)}")
    if method.name == KGCOOP and not (math.isfinite(method.kg_weight) and method.kg_weight >= 0):
        raise ValueError(f"kg_weight must be a finite number >= 0 (got {method.kg_weight}); KgCoOp's scripts use 8.0")
    if method.name == COCOOP:
        if method.meta_reduction < 1:
            raise ValueError(f"meta_reduction must be >= 1 (got {method.meta_reduction}); CoCoOp's is 16")
        if prompt.csc:
            raise ValueError("method cocoop learns one context for all classes, shifted per image: csc: true does "
                             "not apply (set csc: false)")


def build_method_model(
    backbone: Backbone,
    classnames: list[str],
    prompt: PromptConfig,
    method: MethodConfig,
    precision: str = "fp32",
    shared_prefix: bool | None = None,
    generator: torch.Generator | None = None,
    pack_tokens: bool | None = None,
    dataset: str = "",
    template: str = DEFAULT_TEMPLATE,
) -> CoOp:
    """The model `method` trains; `dataset` and `template` choose KgCoOp's hand-crafted prompt."""
    validate_method(method, prompt)
    if method.name == COCOOP:
        return CoCoOp(backbone, classnames, prompt, precision, shared_prefix, generator, pack_tokens,
                      method.meta_reduction)
    if method.name == KGCOOP:
        return KgCoOp(backbone, classnames, prompt, anchor_template(dataset, template), method.kg_weight, precision,
                      shared_prefix, generator, pack_tokens)
    return CoOp(backbone, classnames, prompt, precision, shared_prefix, generator, pack_tokens)


def method_builder(method: MethodConfig, dataset: str = "", template: str = DEFAULT_TEMPLATE) -> ModelBuilder:
    """`train_coop`'s model builder for `method`: its model, CUDA-graphed where the config and model allow."""
    def build(backbone: Backbone, classnames: list[str], prompt: PromptConfig, cfg: TrainConfig,
              generator: torch.Generator) -> CoOp:
        model = build_method_model(backbone, classnames, prompt, method, cfg.precision, cfg.shared_prefix, generator,
                                   cfg.pack_tokens, dataset, template)
        return graph_model(model, cfg)

    return build


def train_method(
    backbone: Backbone,
    data: FewShotFeatures,
    prompt: PromptConfig,
    cfg: TrainConfig,
    method: MethodConfig,
    epochs: int | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `method` on a few-shot split with CoOp's loop (`train_coop`); KgCoOp's hand-crafted prompt is the
    dataset's (`kgcoop.anchor_template`). `TrainResult.learned` holds what it learned."""
    validate_method(method, prompt)
    build = method_builder(method, data.dataset, data.template)
    return train_coop(backbone, data, prompt, cfg, epochs, on_epoch, progress, build)


def saved_method(meta: ContextMeta) -> MethodConfig:
    """The method a context file's metadata names, checked; ContextFileError if unknown or it does not apply."""
    try:
        method = MethodConfig(meta.method, **meta.method_params)
        validate_method(method, meta.prompt_config)
    except (TypeError, ValueError) as e:
        raise ContextFileError(f"context metadata names method {meta.method!r} with {meta.method_params}: {e}") from None
    return method


def learned_model(backbone: Backbone, tensors: dict[str, torch.Tensor], meta: ContextMeta,
                  classnames: list[str] | None = None, precision: str = "fp32") -> CoOp:
    """The frozen classifier a saved method gives (`context.load_learned`'s tensors and metadata): CoOp's with the
    context for CoOp and KgCoOp (whose loss alone differs), CoCoOp with its meta-network; checked against the
    backbone (and classes, if given)."""
    method = saved_method(meta)
    names = check_fits(backbone, tensors["ctx"], meta, classnames)
    if method.name in CONTEXT_METHODS:
        model = CoOp(backbone, names, meta.prompt_config, precision)
    else:
        model = CoCoOp(backbone, names, meta.prompt_config, precision, meta_reduction=method.meta_reduction)
    try:
        load_learned_tensors(model, tensors)
    except (ValueError, RuntimeError) as e:
        raise ContextFileError(f"the saved {meta.method} model does not fit this backbone and its metadata: {e}") from None
    model.requires_grad_(False)
    return model


def learned_accuracy(backbone: Backbone, tensors: dict[str, torch.Tensor], meta: ContextMeta,
                     target: EvalFeatures) -> float:
    """Test accuracy (%) on `target`, with its class names, of what a method learned (base-to-new's new classes,
    a transfer target); a class-specific context must have the target's classes."""
    model = learned_model(backbone, tensors, meta, target.classnames)
    features = torch.nn.functional.normalize(target.test.to(backbone.device), dim=-1)
    return evaluate(model, features, target.test_labels.to(backbone.device))


def load_learned_tensors(model: CoOp, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `learned_tensors()`' output back into a model of the same method and shape; ValueError if they differ."""
    expected = model.learned_tensors()
    if set(tensors) != set(expected):
        raise ValueError(f"expected the tensors {sorted(expected)}, found {sorted(tensors)}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model's {tuple(expected[name].shape)}")
    with torch.no_grad():
        ctx = model.prompt_learner.ctx
        ctx.copy_(tensors["ctx"].to(ctx.device, ctx.dtype))
        if isinstance(model, CoCoOp):
            state = {name.removeprefix("meta_net."): t for name, t in tensors.items() if name != "ctx"}
            model.meta_net.load_state_dict(state)
