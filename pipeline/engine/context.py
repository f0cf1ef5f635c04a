"""The learned-context artifact: the context tensor as safetensors plus JSON metadata beside it.

`ctx.safetensors` holds one tensor, ``ctx`` ((M, D) unified or (C, M, D) class-specific);
`ctx.json` says everything needed to rebuild the classifier: backbone, variant, class names, and
where it came from (dataset, shots, seed, accuracies). Both files are written atomically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.atomic import atomic_write
from pipeline.engine.backbone import Backbone
from pipeline.engine.prompt import CoOp, PromptConfig
from pipeline.errors import UserError

FORMAT_VERSION = 1


class ContextFileError(UserError, ValueError):
    """A context file is missing, malformed, or does not fit the backbone/classes it is used with."""


@dataclass
class ContextMeta:
    arch: str
    pretrained: str | None
    fingerprint: str
    n_ctx: int
    class_token_position: str
    csc: bool
    ctx_init: str
    classnames: list[str]
    dataset: str = ""
    shots: int = 0
    seed: int = 0
    val_acc: float | None = None
    test_acc: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def prompt_config(self) -> PromptConfig:
        return PromptConfig(self.n_ctx, self.ctx_init, self.csc, self.class_token_position)


def metadata_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_context(path: str | Path, ctx: torch.Tensor, meta: ContextMeta) -> Path:
    """Write `path` (.safetensors) and its .json metadata; returns the tensor file's path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ContextFileError(f"context files end in .safetensors, got {path}")
    expected_dims = 3 if meta.csc else 2
    if ctx.dim() != expected_dims or ctx.shape[-2] != meta.n_ctx:
        raise ContextFileError(f"context of shape {tuple(ctx.shape)} does not match n_ctx={meta.n_ctx}, csc={meta.csc}")
    tensor = ctx.detach().to("cpu", torch.float32).contiguous()
    atomic_write(path, lambda tmp: save_file({"ctx": tensor}, tmp))
    text = json.dumps(asdict(meta), indent=2, sort_keys=True)
    atomic_write(metadata_path(path), lambda tmp: Path(tmp).write_text(text))
    return path


def load_metadata(path: str | Path) -> ContextMeta:
    """The metadata of context `path` (.safetensors or its .json) without reading the tensor."""
    meta_file = metadata_path(path)
    if not meta_file.is_file():
        raise ContextFileError(f"context file {meta_file} does not exist (a context is a .safetensors + .json pair)")
    try:
        return ContextMeta(**json.loads(meta_file.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ContextFileError(f"{meta_file} is not valid context metadata: {e}") from None


def load_context(path: str | Path) -> tuple[torch.Tensor, ContextMeta]:
    """Read a context and its metadata; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ContextFileError(f"context file {path} does not exist (a context is a .safetensors + .json pair)")
    meta = load_metadata(path)
    try:
        tensors = load_file(str(path))
    except SafetensorError as e:
        raise ContextFileError(f"{path} is not a safetensors file ({e}); pass the context's .safetensors") from None
    if set(tensors) != {"ctx"}:
        raise ContextFileError(f"{path} should hold one tensor 'ctx', found {sorted(tensors)}")
    ctx = tensors["ctx"]
    if ctx.dim() != (3 if meta.csc else 2) or ctx.shape[-2] != meta.n_ctx:
        raise ContextFileError(f"{path}: tensor shape {tuple(ctx.shape)} disagrees with its metadata")
    if meta.csc and ctx.shape[0] != len(meta.classnames):
        raise ContextFileError(f"{path}: {ctx.shape[0]} class contexts but {len(meta.classnames)} class names")
    return ctx, meta


def context_model(
    backbone: Backbone,
    ctx: torch.Tensor,
    meta: ContextMeta,
    classnames: list[str] | None = None,
    precision: str = "fp32",
) -> CoOp:
    """A CoOp classifier with a saved context, checked against the backbone (and classes, if given)."""
    if meta.arch != backbone.arch:
        raise ContextFileError(
            f"context was learned on backbone {meta.arch!r} but the loaded backbone is {backbone.arch!r}; "
            f"load {meta.arch} (pretrained {meta.pretrained!r})"
        )
    if ctx.shape[-1] != backbone.text_width:
        raise ContextFileError(
            f"context width {ctx.shape[-1]} does not match the text tower width {backbone.text_width}"
        )
    if meta.fingerprint != backbone.fingerprint:
        import logging

        logging.getLogger(__name__).warning(
            "context was learned with weights %s; backbone has %s", meta.fingerprint, backbone.fingerprint
        )
    names = meta.classnames if classnames is None else classnames
    if meta.csc and len(names) != ctx.shape[0]:
        raise ContextFileError(
            f"class-specific context has {ctx.shape[0]} classes but {len(names)} class names were given"
        )
    model = CoOp(backbone, names, meta.prompt_config, precision)
    with torch.no_grad():
        model.prompt_learner.ctx.copy_(ctx.to(model.prompt_learner.ctx.device))
    model.requires_grad_(False)
    return model
