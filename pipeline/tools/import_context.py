"""Import a context trained by the official CoOp code (a Dassl checkpoint) as this project's context artifact.

The official trainer saves ``output/.../prompt_learner/model.pth.tar-<epoch>``: a pickled dict with
``state_dict`` (``ctx`` plus the frozen ``token_prefix``/``token_suffix`` embeddings, which we ignore),
``epoch``, ``optimizer`` and ``scheduler`` state. The file is read with ``torch.load(weights_only=True)``:
nothing in it is executed. Dassl's scheduler state holds pickled ``torch.optim`` objects (the warm-up
scheduler keeps its cosine successor, which keeps the SGD optimizer); those few names are mapped to an
inert placeholder that only absorbs their state, so no optimizer or scheduler code runs either. Any other
pickled object makes the import fail.

The context's shape gives n_ctx and unified vs class-specific; the class-token position and the class
names (for CSC: one per context row, in label order) come from the command line.

    python -m pipeline.tools.import_context --checkpoint model.pth.tar-50 --arch RN50 --pretrained openai \\
        --dataset ImageNet --data-root data/coop --position end --out contexts/imagenet_rn50.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import pickle
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import cli
from pipeline.errors import UserError

if TYPE_CHECKING:
    import torch

    from pipeline.engine.context import ContextMeta

log = logging.getLogger(__name__)

# Pickled classes a Dassl checkpoint legitimately contains (inside its scheduler state). They are never
# imported: each is replaced by `_Inert` (or, for defaultdict, by a plain dict) during unpickling.
_ALLOWED_PREFIXES = ("torch.optim.", "dassl.optim.")
_ALLOWED_NAMES = ("collections.defaultdict", "builtins.dict")
_GLOBAL_IN_ERROR = re.compile(r"GLOBAL (\S+) was not an allowed global")
_MAX_STUBS = 32
_WNID_LINE = re.compile(r"n\d{8} +\S")


class CheckpointError(UserError, ValueError):
    """The checkpoint cannot be imported: unreadable, refused, or not a CoOp context."""


class _Inert:
    """Stands in for an optimizer/scheduler class while unpickling; keeps the pickled state as attributes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args


def _inert_defaultdict(*args: Any) -> dict:
    # defaultdict(factory) is rebuilt as an empty plain dict; the unpickler then fills in its items.
    return {}


def _stub_for(name: str) -> Any:
    return _inert_defaultdict if name == "collections.defaultdict" else _Inert


def _allowed(name: str) -> bool:
    # The unpickler's messages drop the "builtins." prefix ("GLOBAL dict").
    qualified = name if "." in name else f"builtins.{name}"
    return qualified in _ALLOWED_NAMES or qualified.startswith(_ALLOWED_PREFIXES)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint as a dict, read with weights_only=True; CheckpointError if anything else is pickled."""
    import torch

    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    stubs: dict[str, Any] = {}
    for _ in range(_MAX_STUBS):
        globals_ = [(fn, name if "." in name else f"builtins.{name}") for name, fn in stubs.items()]
        try:
            with torch.serialization.safe_globals(globals_), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            match = _GLOBAL_IN_ERROR.search(str(error))
            if match is None:
                raise CheckpointError(
                    f"{path} cannot be read safely (weights_only): {_last_line(error)}"
                ) from None
            name = match.group(1)
            if not _allowed(name) or name in stubs:
                raise CheckpointError(
                    f"refusing {path}: it pickles {name!r}, which is neither a tensor nor optimizer/scheduler "
                    "state of a Dassl checkpoint; only weights are read from checkpoints (weights_only=True)"
                ) from None
            stubs[name] = _stub_for(name)
            continue
        except (RuntimeError, OSError, EOFError) as error:
            raise CheckpointError(f"{path} is not a PyTorch checkpoint: {_last_line(error)}") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict (Dassl checkpoint)")
        return obj
    raise CheckpointError(f"{path} pickles more than {_MAX_STUBS} optimizer/scheduler classes; refusing it")


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def extract_ctx(checkpoint: dict[str, Any], path: Path) -> torch.Tensor:
    """The ``ctx`` tensor of a Dassl prompt-learner checkpoint (or a bare state dict), as float32."""
    import torch

    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(state).__name__}, expected a dict of tensors")
    keys = [k for k in state if k == "ctx" or str(k).endswith(".ctx")]
    if len(keys) != 1:
        raise CheckpointError(
            f"{path}: expected one 'ctx' tensor in the state dict, found {keys or 'none'} among "
            f"{sorted(map(str, state))[:10]}; is this the prompt_learner checkpoint of a CoOp run?"
        )
    ctx = state[keys[0]]
    if not isinstance(ctx, torch.Tensor) or ctx.dim() not in (2, 3) or not ctx.is_floating_point():
        raise CheckpointError(f"{path}: 'ctx' must be a float tensor (M, D) or (C, M, D), got {ctx!r:.80}")
    if not torch.isfinite(ctx).all():
        raise CheckpointError(f"{path}: 'ctx' holds NaN or infinite values")
    return ctx.detach().to(torch.float32).contiguous()


def read_classnames(
    classnames_file: Path | None, dataset: str | None, data_root: Path | None, splits_dir: Path | None
) -> list[str]:
    """Class names in label order: from a file (.txt one per line, or lines "<wnid> <name>" as in CoOp's
    imagenet/classnames.txt; .json a list or a prepare-stage test.json), the prepare stage's test.json under
    `splits_dir`, or the dataset's reader under `data_root`."""
    if classnames_file is not None:
        text = classnames_file.read_text(encoding="utf-8")
        if classnames_file.suffix == ".json":
            data = json.loads(text)
            names = data["classnames"] if isinstance(data, dict) else data
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
            if names and all(_WNID_LINE.match(n) for n in names):
                # CoOp's imagenet/classnames.txt: "n01440764 tench"; a label is its wnid's rank among the
                # sorted wnids, as the official reader sorts the class folders.
                names = [name.strip() for _, name in sorted(n.split(" ", 1) for n in names)]
        # Kept as listed, duplicates included: a class is its position (ImageNet has two 'missile's).
        return [str(n) for n in names]
    if dataset and splits_dir is not None:
        from pipeline.data.datasets import resolve_name
        from pipeline.data.fewshot import eval_list_path, read_eval_list

        info = resolve_name(dataset)
        return read_eval_list(eval_list_path(splits_dir, info.name if info else dataset)).classnames
    if dataset and data_root is not None:
        from pipeline.data.datasets import load_dataset

        return load_dataset(dataset, data_root, check_files=False).classnames
    raise CheckpointError(
        "no class names: pass --classnames FILE, or --dataset with --splits-dir (prepared splits) or --data-root"
    )


def import_context(
    checkpoint: Path,
    out: Path,
    arch: str,
    pretrained: str | None,
    classnames: list[str],
    position: str = "end",
    n_ctx: int | None = None,
    csc: bool | None = None,
    ctx_init: str = "",
    dataset: str = "",
    shots: int = 0,
    seed: int = 0,
    load_weights: bool = True,
    device: str = "auto",
) -> tuple[Path, ContextMeta]:
    """Convert an official CoOp checkpoint into ``out`` (.safetensors) + its .json metadata.

    n_ctx and csc are read off the tensor; when given they must agree with it. With `load_weights` the
    backbone is loaded (on `device`) to record its fingerprint and to build the classifier once as a check.
    """
    from pipeline.engine.backbone import WeightsUnavailableError, count_tokens, load_backbone, resolve_device
    from pipeline.engine.context import ContextFileError, ContextMeta, context_model, save_context
    from pipeline.engine.flops import tower_shape
    from pipeline.engine.prompt import POSITIONS

    if position not in POSITIONS:
        raise CheckpointError(f"--position must be one of {', '.join(POSITIONS)}, got {position!r}")
    raw = load_checkpoint(checkpoint)
    ctx = extract_ctx(raw, checkpoint)
    found_csc, found_n_ctx, width = ctx.dim() == 3, int(ctx.shape[-2]), int(ctx.shape[-1])
    if n_ctx is not None and n_ctx != found_n_ctx:
        raise CheckpointError(f"--n-ctx {n_ctx} but the checkpoint's context has {found_n_ctx} vectors")
    if csc is not None and csc != found_csc:
        raise CheckpointError(
            f"--csc {'given' if csc else 'not given'} but the checkpoint's context is "
            f"{'class-specific (C, M, D)' if found_csc else 'unified (M, D)'}"
        )
    if found_csc and ctx.shape[0] != len(classnames):
        raise CheckpointError(
            f"the class-specific context has {ctx.shape[0]} class rows but {len(classnames)} class names were given"
        )
    expected_width = tower_shape(arch).width
    if width != expected_width:
        raise CheckpointError(f"context width {width} does not match the {arch} text tower width {expected_width}")
    if ctx_init.strip() and count_tokens(ctx_init.strip()) != found_n_ctx:
        raise CheckpointError(
            f"--ctx-init {ctx_init!r} is {count_tokens(ctx_init.strip())} tokens but the context has {found_n_ctx}"
        )
    fingerprint = f"{arch}:unknown"
    backbone = None
    if load_weights:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                backbone = load_backbone(arch, pretrained, resolve_device(device))
            fingerprint = backbone.fingerprint
        except WeightsUnavailableError as error:
            log.warning("weights %s/%s unavailable (%s); the context's fingerprint is left unknown",
                        arch, pretrained, str(error)[:120])
    meta = ContextMeta(
        arch=arch, pretrained=pretrained, fingerprint=fingerprint, n_ctx=found_n_ctx,
        class_token_position=position, csc=found_csc, ctx_init=ctx_init.strip(), classnames=list(classnames),
        dataset=dataset, shots=shots, seed=seed,
        extra={"source": "official CoOp checkpoint", "checkpoint": checkpoint.name,
               "checkpoint_sha256": _sha256(checkpoint), "epoch": raw.get("epoch"),
               "ignored_keys": sorted(k for k in raw.get("state_dict", {}) if not str(k).endswith("ctx"))},
    )
    if backbone is not None:
        try:  # the prompts must fit the model (class names long enough to overflow 77 tokens, ...)
            context_model(backbone, ctx, meta)
        except (ContextFileError, ValueError) as error:
            raise CheckpointError(f"the imported context does not work with {arch}: {error}") from None
    path = save_context(out, ctx, meta)
    log.info("imported %s: %s context, n_ctx=%d, %d classes -> %s", checkpoint, "CSC" if found_csc else "unified",
             found_n_ctx, len(classnames), path)
    return path, meta


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m pipeline.tools.import_context", __doc__, params=False)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="the official checkpoint, e.g. output/.../prompt_learner/model.pth.tar-50")
    parser.add_argument("--arch", required=True, help="open_clip architecture it was trained with: RN50, ViT-B-16, ...")
    parser.add_argument("--pretrained", default="openai",
                        help="weights tag or checkpoint file of that backbone, 'none' for random (default openai)")
    parser.add_argument("--dataset", default="",
                        help="dataset the context was trained on (recorded; also where class names come from)")
    parser.add_argument("--classnames", type=Path,
                        help="class names in label order: a .txt (one per line, or '<wnid> <name>' lines as in "
                        "CoOp's imagenet/classnames.txt) or a .json (list, or a prepare-stage test.json); "
                        "overrides --dataset as their source")
    parser.add_argument("--splits-dir", type=Path,
                        help="read the class names from <DIR>/<dataset>/test.json written by stages.prepare")
    parser.add_argument("--data-root", type=Path,
                        help="read the class names with the dataset's reader from this data root (official layout)")
    # No `choices`: they live with the prompt learner, which imports torch; import_context checks the value.
    parser.add_argument("--position", default="end", metavar="{end,middle,front}",
                        help="class token position the context was trained with (default end)")
    parser.add_argument("--n-ctx", type=int, help="expected number of context vectors (checked against the tensor)")
    parser.add_argument("--csc", action="store_true", default=None,
                        help="expect a class-specific context (checked; inferred from the tensor when left out)")
    parser.add_argument("--ctx-init", default="", help="the words it was initialised from, if any (recorded)")
    parser.add_argument("--shots", type=int, default=0, help="shots per class it was trained with (recorded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of its run (recorded)")
    parser.add_argument("--no-weights", action="store_true",
                        help="do not load the backbone (no fingerprint, no check that the classifier builds)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output .safetensors file; its .json metadata is written beside it")
    cli.add_device(parser, "the backbone loaded for the check")
    return parser


def run(args: argparse.Namespace, params: None) -> None:
    pretrained = None if str(args.pretrained).lower() in ("none", "null", "random", "") else args.pretrained
    try:
        names = read_classnames(args.classnames, args.dataset or None, args.data_root, args.splits_dir)
        import_context(args.checkpoint, args.out, args.arch, pretrained, names, args.position, args.n_ctx,
                       args.csc, args.ctx_init, args.dataset, args.shots, args.seed, not args.no_weights,
                       args.device)
    except UserError:
        raise
    except (KeyError, ValueError) as error:  # a class-names file of the wrong shape, an unknown --arch, ...
        raise CheckpointError(f"{type(error).__name__}: {error}") from None


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
