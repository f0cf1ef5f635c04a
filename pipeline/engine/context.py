"""The learned-context artifact: the context tensor as safetensors plus JSON metadata beside it.

`ctx.safetensors` holds the tensor ``ctx`` ((M, D) unified or (C, M, D) class-specific), and for CoCoOp
also its meta-network (``meta_net.linear1.weight``, ...); `ctx.json` says everything needed to rebuild
the classifier: method and its hyperparameters, backbone, variant, class names, and where it came from
(dataset, shots, seed, accuracies). Both files are written atomically. A KgCoOp context is used as a CoOp
context (its loss alone differs); a CoCoOp file is read with `load_learned` and `methods.learned_model`.
"""

from __future__ import annotations

import json
import logging
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

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

# The methods whose classifier is CoOp's with the saved context alone (KgCoOp differs only in its training
# loss); the others (CoCoOp: context + meta-network) are rebuilt by pipeline/engine/methods.py::learned_model.
CONTEXT_METHODS = ("coop", "kgcoop")


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
    method: str = "coop"  # methods.METHODS; files written before methods existed are CoOp's
    method_params: dict[str, Any] = field(default_factory=dict)  # methods.MethodConfig.hyperparameters()

    @property
    def prompt_config(self) -> PromptConfig:
        return PromptConfig(self.n_ctx, self.ctx_init, self.csc, self.class_token_position)


def metadata_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_context(path: str | Path, ctx: torch.Tensor, meta: ContextMeta,
                 method_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `path` (.safetensors) and its .json metadata; returns the tensor file's path.

    `method_tensors`: what the method learned besides the context (CoCoOp's ``meta_net.*``).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ContextFileError(f"context files end in .safetensors, got {path}")
    expected_dims = 3 if meta.csc else 2
    if ctx.dim() != expected_dims or ctx.shape[-2] != meta.n_ctx:
        raise ContextFileError(f"context of shape {tuple(ctx.shape)} does not match n_ctx={meta.n_ctx}, csc={meta.csc}")
    extra = method_tensors or {}
    if "ctx" in extra:
        raise ContextFileError("method_tensors must not hold 'ctx': the context is passed as ctx")
    if meta.method in CONTEXT_METHODS and extra:
        raise ContextFileError(f"method {meta.method} learns a context alone, yet got tensors {sorted(extra)}")
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in {"ctx": ctx, **extra}.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    text = json.dumps(asdict(meta), indent=2, sort_keys=True)
    atomic_write(metadata_path(path), lambda tmp: Path(tmp).write_text(text))
    return path


# What to do with a context pair whose files do not match or are damaged.
PAIR_HINT = ("use the .safetensors and .json a trial saved together (in its folder under <sweep.results_dir>/"
             "contexts/ and in its MLflow artifacts)")
# ctx.json fields a classifier is rebuilt from, and the type each must have.
META_TYPES: dict[str, type | tuple[type, ...]] = {
    "arch": str, "pretrained": (str, type(None)), "fingerprint": str, "n_ctx": int, "class_token_position": str,
    "csc": bool, "ctx_init": str, "classnames": list, "method": str, "method_params": dict,
}


def load_metadata(path: str | Path) -> ContextMeta:
    """The metadata of context `path` (.safetensors or its .json) without reading the tensor."""
    meta_file = metadata_path(path)
    if not meta_file.is_file():
        raise ContextFileError(f"context file {meta_file} does not exist (a context is a .safetensors + .json pair)")
    try:
        meta = ContextMeta(**json.loads(meta_file.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise ContextFileError(f"{meta_file} is not valid context metadata ({e}); {PAIR_HINT}") from None
    for name, kind in META_TYPES.items():
        value = getattr(meta, name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            wanted = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ContextFileError(f"{meta_file}: {name} is {value!r}, expected {wanted}; {PAIR_HINT}")
    if not all(isinstance(name, str) for name in meta.classnames):
        raise ContextFileError(f"{meta_file}: classnames must be strings; {PAIR_HINT}")
    return meta


def save_learned(path: str | Path, learned: dict[str, torch.Tensor], meta: ContextMeta) -> Path:
    """Write what a method learned (`TrainResult.learned`: ``ctx`` and the method's own tensors) and its metadata."""
    if "ctx" not in learned:
        raise ContextFileError(f"learned tensors {sorted(learned)} have no 'ctx'")
    return save_context(path, learned["ctx"], meta, {k: t for k, t in learned.items() if k != "ctx"})


def load_learned(path: str | Path) -> tuple[dict[str, torch.Tensor], ContextMeta]:
    """Read every tensor of a context file (``ctx``; CoCoOp: and ``meta_net.*``) and its metadata; errors name
    the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ContextFileError(f"context file {path} does not exist (a context is a .safetensors + .json pair)")
    meta = load_metadata(path)
    try:
        tensors = load_file(str(path))
    except SafetensorError as e:
        raise ContextFileError(
            f"{path} is not a safetensors file ({e}); it is never unpickled: pass a context's .safetensors (an "
            "official CoOp checkpoint is converted by python -m pipeline.tools.import_context)") from None
    if "ctx" not in tensors:
        raise ContextFileError(f"{path} should hold the tensor 'ctx', found {sorted(tensors)}")
    ctx = tensors["ctx"]
    expected = f"({len(meta.classnames)}, {meta.n_ctx}, width)" if meta.csc else f"({meta.n_ctx}, width)"
    if ctx.dim() != (3 if meta.csc else 2) or ctx.shape[-2] != meta.n_ctx:
        raise ContextFileError(f"{path}: tensor 'ctx' has shape {tuple(ctx.shape)}, but its metadata (n_ctx="
                               f"{meta.n_ctx}, csc={meta.csc}) wants {expected}; {PAIR_HINT}")
    if meta.csc and ctx.shape[0] != len(meta.classnames):
        raise ContextFileError(f"{path}: {ctx.shape[0]} class contexts but {len(meta.classnames)} class names in its "
                               f"metadata; {PAIR_HINT}")
    return tensors, meta


def load_context(path: str | Path) -> tuple[torch.Tensor, ContextMeta]:
    """Read a context (CoOp's or KgCoOp's: the tensor ``ctx`` alone) and its metadata; errors name the file."""
    tensors, meta = load_learned(path)
    if set(tensors) != {"ctx"}:
        raise ContextFileError(
            f"{path} holds a {meta.method} model ({', '.join(sorted(tensors))}), not a context alone; read it with "
            "pipeline.engine.context.load_learned and pipeline.engine.methods.learned_model")
    return tensors["ctx"], meta


def check_fits(backbone: Backbone, ctx: torch.Tensor, meta: ContextMeta, classnames: list[str] | None = None
               ) -> list[str]:
    """The class names a saved context is used with (`classnames`, else its own), checked against the backbone;
    ContextFileError when they do not fit."""
    if meta.arch != backbone.arch:
        raise ContextFileError(
            f"context was learned on backbone {meta.arch!r} but the loaded backbone is {backbone.arch!r}; "
            f"load {meta.arch} (pretrained {meta.pretrained!r})"
        )
    if ctx.shape[-1] != backbone.text_width:
        raise ContextFileError(  # the metadata's arch is the backbone's: the tensor comes from another model
            f"context width {ctx.shape[-1]} does not match the text tower width {backbone.text_width} of "
            f"{backbone.arch}; {PAIR_HINT}"
        )
    if meta.fingerprint != backbone.fingerprint:
        log.warning("context was learned with weights %s; backbone has %s", meta.fingerprint, backbone.fingerprint)
    names = meta.classnames if classnames is None else classnames
    if meta.csc and len(names) != ctx.shape[0]:
        raise ContextFileError(
            f"class-specific context has {ctx.shape[0]} classes but {len(names)} class names were given"
        )
    return names


def context_model(
    backbone: Backbone,
    ctx: torch.Tensor,
    meta: ContextMeta,
    classnames: list[str] | None = None,
    precision: str = "fp32",
) -> CoOp:
    """A CoOp classifier with a saved context, checked against the backbone (and classes, if given)."""
    if meta.method not in CONTEXT_METHODS:
        raise ContextFileError(
            f"a {meta.method} classifier is more than its context: build it with pipeline.engine.methods.learned_model"
        )
    names = check_fits(backbone, ctx, meta, classnames)
    model = CoOp(backbone, names, meta.prompt_config, precision)
    with torch.no_grad():
        model.prompt_learner.ctx.copy_(ctx.to(model.prompt_learner.ctx.device))
    model.requires_grad_(False)
    return model
