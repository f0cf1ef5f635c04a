"""Cost model of CoOp sweeps: FLOPs of one training step of the text path, GPU-hours per trial and per grid.

CoOp trains only the context vectors, so a step is: the frozen text transformer over every class prompt
(forward + backward to the context; no weight gradients), logits against a batch of image features, and
an SGD update of the context. The model counts matrix-multiply FLOPs (2 per multiply-add) the way
``torch.utils.flop_counter`` does, for three ways of running the text path:

* ``official``: the official CoOp code: every prompt padded to the full 77 tokens, plus the frozen image
  encoder's forward pass on the batch's images (no feature cache);
* ``truncated``: our path for class-specific contexts: only ``L = longest EOS + 1`` tokens per prompt;
* ``shared``: our path for unified contexts: the prompt prefix common to all classes (SOS and, for
  ``end``/``middle``, the context words before the class name) runs once, every class runs only its own
  suffix against the prefix's cached keys and values.

A step's time combines its compute time ``FLOPs / (peak x utilisation)`` with a per-step floor (kernel
launches) in quadrature; a trial adds a fixed overhead. With online augmentation (``features.views:
online``) our steps also run the image encoder on the batch's fresh crops, in the trial's precision. `GPUS` holds the figures, fitted to H100
measurements (within 20% of every measured step) or, for other GPUs, assumed; `python -m pipeline.costmodel
--measure` times real steps on the local accelerator next to the model's FLOPs, to check or recalibrate
(docs/reproduce.md has what we measured).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.params import Params

log = logging.getLogger(__name__)

PATHS = ("official", "truncated", "shared")
OFFICIAL_TOKENS = 77
# Class names are tokenised only when the prepared split files are at hand; otherwise the longest class
# name is assumed to be this many BPE tokens, and names this long on average (ImageNet's CLIP class names:
# longest 12 tokens, mean 2.2).
ASSUMED_MAX_NAME_TOKENS = 12
ASSUMED_MEAN_NAME_TOKENS = 2.2
# Online augmentation: CPU seconds to decode one training image and make its crop (load, RandomResizedCrop
# to 224 px bicubic, flip, to tensor, normalise), measured on one core of the development CPU for a
# 500 x 375 JPEG, ImageNet's typical size (0.7 ms decode + 2.0 ms transform).
DECODE_SECONDS_PER_IMAGE = 2.8e-3

# Classes per dataset (CoOp's Table 1 statistics), so a dry run works before any data is prepared.
DATASET_CLASSES: dict[str, int] = {
    "ImageNet": 1000,
    "Caltech101": 100,
    "OxfordPets": 37,
    "StanfordCars": 196,
    "OxfordFlowers": 102,
    "Flowers102": 102,
    "Food101": 101,
    "FGVCAircraft": 100,
    "SUN397": 397,
    "DTD": 47,
    "EuroSAT": 10,
    "UCF101": 101,
    "FashionMNIST": 10,
}


@dataclass(frozen=True)
class GPU:
    """Throughput of one accelerator for CoOp steps, by path. A step costs its launch-bound floor (the time
    to issue its kernels, whatever their work) and its compute time, combined in quadrature: close to the
    larger one when one dominates, more than either when they are alike."""

    name: str
    peak_tflops: float  # dense fp16/bf16 tensor-core peak (datasheet)
    peak_tflops_fp32: float  # plain fp32 (no TF32), what precision=fp32 runs at
    utilisation: dict[str, float]  # fraction of peak each path's matmuls reach
    launch_s: dict[str, float]  # per-step floor, by path
    trial_overhead_s: float  # per trial: worker start, backbone to GPU, features in, evaluation, MLflow

    def step_seconds(self, flops: float, path: str, precision: str = "fp16") -> float:
        peak = self.peak_tflops_fp32 if precision == "fp32" else self.peak_tflops
        return math.hypot(self.launch_s[path], flops / (peak * 1e12 * self.utilisation[path]))


# Measured on one H100 SXM (80 GB HBM3) with `python -m pipeline.costmodel --measure` (RN50 and ViT-B/16
# text towers, 10 / 100 / 1000 classes, fp16 / bf16, our paths CUDA-graphed as train_coop runs them on a
# GPU, the official step eager; table in docs/reproduce.md). The fit is within 20% of every measured step:
# floors 2.0 ms (truncated), 3.4 ms (shared prefix: twice the layer calls) and 26 ms (official: eager
# kernels, 32 images through the image encoder); 1000-class steps reach 16% of the 989 TFLOP/s datasheet
# peak on the truncated and official paths and 10% on the shared-prefix path (masked attention over
# expanded keys). A100 and V100 rows are ASSUMPTIONS: their datasheet peaks (312 and 125 TFLOP/s dense
# fp16, 19.5 and 15.7 fp32) with the H100's utilisation and floors.
_H100_UTILISATION = {"truncated": 0.16, "shared": 0.10, "official": 0.16}
_H100_LAUNCH = {"truncated": 0.0020, "shared": 0.0034, "official": 0.026}
GPUS: dict[str, GPU] = {
    "H100": GPU("H100", 989.0, 67.0, _H100_UTILISATION, _H100_LAUNCH, 20.0),
    "A100": GPU("A100", 312.0, 19.5, _H100_UTILISATION, _H100_LAUNCH, 20.0),
    "V100": GPU("V100", 125.0, 15.7, _H100_UTILISATION, _H100_LAUNCH, 20.0),
}


@dataclass(frozen=True)
class TowerShape:
    """What the FLOP count needs to know about a CLIP text tower."""

    width: int
    layers: int
    embed_dim: int
    mlp_ratio: float = 4.0
    context_length: int = OFFICIAL_TOKENS


@functools.cache
def tower_shape(arch: str) -> TowerShape:
    """The text tower of an open_clip architecture (from its model config; no weights are loaded)."""
    import open_clip

    from pipeline.engine.backbone import register_project_models

    register_project_models()
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    text = config["text_cfg"]
    return TowerShape(
        width=int(text["width"]),
        layers=int(text["layers"]),
        embed_dim=int(config["embed_dim"]),
        mlp_ratio=float(text.get("mlp_ratio", 4.0)),
        context_length=int(text.get("context_length", OFFICIAL_TOKENS)),
    )


@functools.cache
def image_encoder_gflops(arch: str) -> float:
    """Forward GFLOPs of the image encoder on one image, counted on the meta device (no weights, no data)."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.engine.backbone import register_project_models

    register_project_models()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger().disabled, was = True, logging.getLogger().disabled  # open_clip's "no weights" line
        try:
            model = open_clip.create_model(arch, pretrained=None, device="meta")
        finally:
            logging.getLogger().disabled = was
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encode_image(torch.empty(1, 3, int(size), int(size), device="meta"))
    return counter.get_total_flops() / 1e9


# ----------------------------------------------------------------------------------------------- FLOPs


def layer_flops(queries: int, keys: int, shape: TowerShape) -> tuple[float, float]:
    """(projection + MLP FLOPs, attention FLOPs) of one residual block's forward for one sequence.

    `queries` tokens are computed, attending to `keys` tokens (keys = queries without a cached prefix).
    """
    dense = queries * (_qkv_flops(shape) + _out_mlp_flops(shape))
    attention = 2.0 * 2.0 * queries * keys * shape.width  # q @ k^T and attn @ v over all heads
    return dense, attention


def _qkv_flops(shape: TowerShape) -> float:
    """Per token: the packed q/k/v projection."""
    return 2.0 * 3 * shape.width**2


def _out_mlp_flops(shape: TowerShape) -> float:
    """Per token: the attention output projection and the MLP (up and down)."""
    return 2.0 * (shape.width**2 + 2 * shape.width * shape.mlp_ratio * shape.width)


@dataclass(frozen=True)
class PromptLayout:
    """Tokens one CoOp prompt set runs: `length` per prompt, of which `prefix` are shared by all classes."""

    length: int  # L: positions up to the longest EOS, inclusive
    prefix: int  # P: SOS + context before the class name, identical in every prompt (0: nothing shared)
    mean_length: float | None = None  # mean positions up to each prompt's own EOS; None: all are L long

    @property
    def real_length(self) -> float:
        return float(self.length) if self.mean_length is None else self.mean_length


def prompt_layout(
    n_ctx: int, max_name_tokens: int, csc: bool, position: str, mean_name_tokens: float | None = None
) -> PromptLayout:
    """Our prompt geometry (pipeline.engine.prompt): SOS, n_ctx context, class name, '.', EOS."""
    length = 1 + n_ctx + max_name_tokens + 2
    mean = None if mean_name_tokens is None else 1 + n_ctx + mean_name_tokens + 2
    if csc:
        return PromptLayout(length, 0, mean)
    shared_ctx = {"end": n_ctx, "middle": n_ctx // 2, "front": 0}[position]
    # The engine skips sharing when only SOS would be shared: it saves nothing.
    return PromptLayout(length, 1 + shared_ctx if shared_ctx > 0 else 0, mean)


def packs_tokens(n_classes: int, layout: PromptLayout, path: str, precision: str, device_type: str = "cuda") -> bool:
    """Whether the engine runs only the real tokens (pipeline.engine.text.Packing) on this path."""
    from pipeline.engine.prompt import prefers_packing

    skipped = layout.prefix if path == "shared" else 0
    padded = n_classes * (layout.length - skipped)
    real = round(n_classes * (layout.real_length - skipped))
    return path != "official" and prefers_packing(device_type, precision, padded, real)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step, by part (forward + backward where there is a backward)."""

    dense: float  # qkv / output projections and MLPs of every layer
    attention: float  # q @ k^T and attn @ v of every layer
    image: float  # the official path encodes the batch's images every step; ours reads a cache
    head: float  # final projection of the C EOS states, logits of the batch against the C classes

    @property
    def total(self) -> float:
        return self.dense + self.attention + self.image + self.head


def step_flops(
    shape: TowerShape,
    n_classes: int,
    layout: PromptLayout,
    path: str,
    batch: int = 32,
    image_gflops: float = 0.0,
    packed: bool = False,
) -> StepFlops:
    """FLOPs of one CoOp step on `path` (official | truncated | shared).

    Our paths: projections and MLPs run on `layout.real_length` tokens per prompt when `packed` (else on
    all L positions), attention on the padded grid, and in the last layer the output projection and MLP
    only on each prompt's EOS row. Backward runs only to the inputs (the tower is frozen): a linear layer's
    input gradient costs what its forward did, attention's backward (dQ, dK, dV, dP) twice its forward.
    Elementwise work (layer norms, softmax, GELU) is not counted, as in ``torch.utils.flop_counter``.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    if path == "official":
        dense, attention = layer_flops(shape.context_length, shape.context_length, shape)
        dense, attention = shape.layers * n_classes * dense, shape.layers * n_classes * attention
    else:
        p = layout.prefix if path == "shared" else 0
        s = layout.length - p  # padded positions per prompt in the per-class pass
        rows = n_classes * ((layout.real_length if packed else layout.length) - p)
        dense = shape.layers * rows * _qkv_flops(shape) + (
            ((shape.layers - 1) * rows + n_classes) * _out_mlp_flops(shape)
        )
        attention = shape.layers * n_classes * layer_flops(s, p + s, shape)[1]
        if p:
            prefix_dense, prefix_attention = layer_flops(p, p, shape)
            dense += shape.layers * prefix_dense
            attention += shape.layers * prefix_attention
    dense_total, attention_total = 2.0 * dense, 3.0 * attention
    if path == "shared" and layout.prefix > 0:
        # The prefix's output of the last layer is never read, so its MLP, output projection and attention
        # get no backward pass (its keys and values do, through the suffix).
        p = layout.prefix
        dense_total -= p * _out_mlp_flops(shape)
        attention_total -= 2.0 * layer_flops(p, p, shape)[1]
    head = 2.0 * (2.0 * n_classes * shape.width * shape.embed_dim + 2.0 * batch * n_classes * shape.embed_dim)
    image = batch * image_gflops * 1e9 if path == "official" else 0.0
    return StepFlops(dense_total, attention_total, image, head)


def steps_per_epoch(n_train: int, batch: int) -> int:
    """Optimizer steps per epoch: Dassl drops the last incomplete batch (one batch if N < batch)."""
    return max(1, n_train // min(batch, max(n_train, 1)))


# ------------------------------------------------------------------------------------------- estimates


@dataclass
class TrialEstimate:
    config: dict[str, Any]
    n_classes: int
    steps: int
    layout: PromptLayout
    path: str
    flops_per_step: float
    seconds: float

    @property
    def gpu_hours(self) -> float:
        return self.seconds / 3600.0


@dataclass
class GridEstimate:
    """GPU time of a set of trials on one assumed GPU model; one trial holds one GPU."""

    gpu: GPU
    trials: list[TrialEstimate]
    assumptions: list[str] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return sum(t.gpu_hours for t in self.trials)

    def wall_hours(self, n_gpus: int) -> float:
        """Wall time on `n_gpus` GPUs with one trial per GPU (greedy longest-first packing)."""
        if n_gpus < 1:
            raise ValueError("n_gpus must be >= 1")
        loads = [0.0] * n_gpus
        for seconds in sorted((t.seconds for t in self.trials), reverse=True):
            loads[loads.index(min(loads))] += seconds
        return max(loads) / 3600.0

    def by_dataset(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.trials:
            out[t.config["dataset"]] = out.get(t.config["dataset"], 0.0) + t.gpu_hours
        return out

    def summary(self, n_gpus: Sequence[int] = (1, 8, 32)) -> str:
        """A few lines for a --dry-run printout."""
        lines = [
            f"cost model: {len(self.trials)} trials, {self.gpu_hours:.1f} GPU-hours on {self.gpu.name} "
            "(one GPU per trial)",
            "  wall time: " + ", ".join(f"{n} GPU{'s' if n > 1 else ''} {self.wall_hours(n):.1f} h" for n in n_gpus),
        ]
        for dataset, hours in sorted(self.by_dataset().items(), key=lambda kv: -kv[1]):
            lines.append(f"  {dataset:<14} {hours:8.2f} GPU-h")
        lines += [f"  assumption: {a}" for a in self.assumptions]
        return "\n".join(lines)


def _class_name_tokens(splits_dir: str | Path | None, dataset: str) -> tuple[int, int, float] | None:
    """(classes, longest and mean class name in tokens) from the prepare stage's test.json, if it exists."""
    if splits_dir is None:
        return None
    from pipeline.data.datasets import resolve_name

    info = resolve_name(dataset)
    path = Path(splits_dir) / (info.name if info else dataset) / "test.json"
    if not path.is_file():
        return None
    from pipeline.engine.backbone import count_tokens

    names = json.loads(path.read_text(encoding="utf-8"))["classnames"]
    tokens = [count_tokens(str(n).replace("_", " ")) for n in names]
    return len(names), max(tokens), sum(tokens) / len(tokens)


def estimate_trial(
    config: dict[str, Any],
    arch: str,
    gpu: GPU,
    batch: int = 32,
    path: str | None = None,
    splits_dir: str | Path | None = None,
    classes: dict[str, int] | None = None,
    shared_prefix: bool | None = None,
    pack_tokens: bool | None = None,
    online: bool = False,
    loader_workers: int = 0,
) -> TrialEstimate:
    """GPU seconds of one trial configuration (keys as in the sweep: dataset, shots, n_ctx, csc, ...).

    `online` (features.views: online): our paths also encode every step's training images (a fresh crop
    of each image every epoch) with the image encoder, at the official path's utilisation, and a step
    takes at least the CPU time of decoding its images on `loader_workers` processes (0: in the trial's
    own process, before the GPU work).

    `path` None picks what our engine runs on a GPU: the shared-prefix path for unified contexts where
    `shared_prefix` (train.shared_prefix) allows it (None: where the engine's own rule prefers it),
    the truncated path otherwise. `pack_tokens` (train.pack_tokens) likewise: None follows the engine's
    rule for running only each prompt's real tokens.
    """
    from pipeline.engine.backbone import count_tokens
    from pipeline.engine.prompt import prefers_shared_prefix
    from pipeline.engine.train import default_epochs

    dataset, shots = str(config["dataset"]), int(config["shots"])
    found = _class_name_tokens(splits_dir, dataset)
    if found is not None:
        n_classes, name_tokens, mean_name_tokens = found
    else:
        table = {**DATASET_CLASSES, **(classes or {})}
        if dataset not in table:
            raise ValueError(
                f"no class count for dataset {dataset!r}: prepare it first (so test.json exists) or pass "
                f"classes={{{dataset!r}: N}}"
            )
        n_classes, name_tokens, mean_name_tokens = table[dataset], ASSUMED_MAX_NAME_TOKENS, ASSUMED_MEAN_NAME_TOKENS
    init = str(config.get("ctx_init") or "").strip()
    n_ctx = count_tokens(init) if init else int(config.get("n_ctx", 16))
    csc = bool(config.get("csc", False))
    position = str(config.get("class_token_position", "end"))
    layout = prompt_layout(n_ctx, name_tokens, csc, position, mean_name_tokens)
    precision = str(config.get("precision") or "fp16")
    if path is None:
        if shared_prefix is None:
            shared_prefix = prefers_shared_prefix("cuda", precision, n_classes, layout.prefix)
        path = "shared" if layout.prefix > 0 and shared_prefix else "truncated"
    packed = packs_tokens(n_classes, layout, path, precision) if pack_tokens is None else pack_tokens
    epochs = config.get("epochs") or default_epochs(dataset, shots)
    steps = int(epochs) * steps_per_epoch(shots * n_classes, batch)
    shape = tower_shape(arch)
    image = image_encoder_gflops(arch) if path == "official" else 0.0
    flops = step_flops(shape, n_classes, layout, path, batch, image, packed and path != "official").total
    step_seconds = gpu.step_seconds(flops, path, precision)
    if online and path != "official":
        # The engine encodes the crops in a forward of its own (train.image_dtype: the trial's precision).
        images = min(batch, shots * n_classes)
        image_flops = images * image_encoder_gflops(arch) * 1e9
        step_seconds += online_image_seconds(gpu, image_flops, precision)
        decode_seconds = images * DECODE_SECONDS_PER_IMAGE
        if loader_workers > 0:
            step_seconds = max(step_seconds, decode_seconds / loader_workers)  # workers decode ahead
        else:
            step_seconds += decode_seconds
        flops += image_flops
    seconds = steps * step_seconds + gpu.trial_overhead_s
    return TrialEstimate(dict(config), n_classes, steps, layout, path, flops, seconds)


def online_image_seconds(gpu: GPU, image_flops: float, precision: str = "fp16") -> float:
    """Seconds of one online step's image forward: the precision's peak at the official step's utilisation."""
    peak = gpu.peak_tflops_fp32 if precision == "fp32" else gpu.peak_tflops
    return image_flops / (peak * 1e12 * gpu.utilisation["official"])


def _online_assumption(gpu: GPU, arch: str, batch: int, workers: int) -> str:
    where = f"{workers} loader worker(s) per trial" if workers else "the trial's own process (0 loader workers)"
    return (
        f"features.views = online: every step also encodes its {batch} freshly cropped training images with the "
        f"{arch} image encoder ({image_encoder_gflops(arch):.1f} GFLOPs each; every training image once per epoch) "
        f"in the trial's precision at {gpu.utilisation['official']:.0%} of its peak, after decoding and cropping "
        f"them ({DECODE_SECONDS_PER_IMAGE * 1e3:g} ms of CPU per image) on {where} (features.num_workers, "
        "default sweep.cpus_per_trial - 1)"
    )


def _assumptions(gpu: GPU, splits_dir: str | Path | None) -> list[str]:
    return [
        f"{gpu.name}: {gpu.peak_tflops:g} TFLOP/s fp16/bf16 dense peak ({gpu.peak_tflops_fp32:g} fp32), "
        "utilisation " + ", ".join(f"{v:.0%} ({k})" for k, v in gpu.utilisation.items()),
        "per-step floor " + ", ".join(f"{v * 1e3:g} ms ({k})" for k, v in gpu.launch_s.items())
        + f" (CUDA-graphed ours, eager official), {gpu.trial_overhead_s:g} s per trial",
        "class counts and name lengths from "
        + (f"{splits_dir}/<dataset>/test.json where prepared, else " if splits_dir else "")
        + f"CoOp's dataset statistics with class names of {ASSUMED_MEAN_NAME_TOKENS:g} tokens on average, "
        f"{ASSUMED_MAX_NAME_TOKENS} at most",
        "packed steps (only real tokens) reach the utilisation fitted on padded ones",
        "feature caching (the features stage: one pass over the images, views x train + test) is not included",
    ]


def estimate_gpu_hours(
    params: Params,
    trials: Iterable[dict[str, Any]] | None = None,
    gpu: str | GPU = "H100",
    path: str | None = None,
) -> GridEstimate:
    """GPU-hours of a sweep: each trial config (the sweep's canonical dicts) on one `gpu`.

    `trials` None enumerates params' grid (or the first sweep.num_samples configurations of a random or
    Optuna search). `path` None models our engine (with features.views: online, its image encoding
    too); "official" models the official CoOp code on the same trials. Call `.summary()` for a printout, `.gpu_hours` / `.wall_hours(n)` for numbers.
    """
    from pipeline.features import online_workers

    spec = GPUS[gpu] if isinstance(gpu, str) else gpu
    if trials is None:
        from pipeline.sweep.space import build_space

        configs = build_space(params).enumerate()
        if params.sweep.search != "grid":
            configs = configs[: params.sweep.num_samples]
    else:
        configs = list(trials)
    splits_dir = params.data.splits_dir
    online = params.features.views == "online" and path != "official"
    workers = online_workers(params.features.num_workers, params.sweep.cpus_per_trial)
    estimates = [
        estimate_trial(c, params.backbone.arch, spec, params.train.batch_size, path, splits_dir,
                       shared_prefix=params.train.shared_prefix, pack_tokens=params.train.pack_tokens, online=online,
                       loader_workers=workers)
        for c in configs
    ]
    assumptions = _assumptions(spec, splits_dir)
    if online:
        assumptions.insert(0, _online_assumption(spec, params.backbone.arch, params.train.batch_size, workers))
    return GridEstimate(spec, estimates, assumptions)


# The time the CoOp authors give for one 16-shot ImageNet run on one GPU (pipeline/published.json).
def imagenet_16shot_estimate(gpu: str | GPU = "H100", arch: str = "RN50") -> dict[str, Any]:
    """Cost of one 16-shot ImageNet CoOp trial (1000 classes, 50 epochs, M=16, end, unified), ours vs official.

    Returns hours on `gpu` for our shared-prefix path, our truncated path and the official 77-token path
    (with its per-step image encoding), their FLOPs per step, and the published wall time for reference.
    """
    spec = GPUS[gpu] if isinstance(gpu, str) else gpu
    config = {"dataset": "ImageNet", "shots": 16, "seed": 1, "n_ctx": 16, "ctx_init": "", "csc": False,
              "class_token_position": "end", "epochs": 50, "precision": "fp16"}
    names = _imagenet_name_tokens()
    out: dict[str, Any] = {"gpu": spec.name, "arch": arch, "classes": 1000, "epochs": 50, "batch": 32,
                           "steps": 50 * steps_per_epoch(16 * 1000, 32), "paths": {}}
    for path in PATHS:
        estimate = estimate_trial(config, arch, spec, 32, path, classes={"ImageNet": 1000})
        if names is not None and path != "official":
            # Use the real ImageNet class names' lengths rather than the generic assumption.
            layout = prompt_layout(16, names[0], False, "end", names[1])
            packed = packs_tokens(1000, layout, path, "fp16")
            flops = step_flops(tower_shape(arch), 1000, layout, path, 32, packed=packed).total
            seconds = estimate.steps * spec.step_seconds(flops, path) + spec.trial_overhead_s
            estimate = TrialEstimate(config, 1000, estimate.steps, layout, path, flops, seconds)
        out["paths"][path] = {"tflops_per_step": estimate.flops_per_step / 1e12, "hours": estimate.gpu_hours,
                              "tokens_per_prompt": OFFICIAL_TOKENS if path == "official" else estimate.layout.length,
                              "mean_tokens_per_prompt": OFFICIAL_TOKENS if path == "official"
                              else estimate.layout.real_length}
    published = load_published().get("timing", {}).get("imagenet_16shot_one_gpu_hours")
    out["published_official_hours"] = published
    out["speedup_vs_official"] = out["paths"]["official"]["hours"] / out["paths"]["shared"]["hours"]
    return out


def _imagenet_name_tokens() -> tuple[int, float] | None:
    """(longest, mean) ImageNet class name in CLIP tokens, from open_clip's class list."""
    try:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        from pipeline.engine.backbone import count_tokens
    except ImportError:
        return None
    tokens = [count_tokens(n) for n in IMAGENET_CLASSNAMES]
    return max(tokens), sum(tokens) / len(tokens)


def load_published() -> dict[str, Any]:
    """pipeline/published.json: the paper's numbers the report and benchmarks compare against."""
    return json.loads((Path(__file__).parent / "published.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------- measurement


def measure(
    arch: str = "RN50",
    n_classes: int = 1000,
    device: str = "cuda",
    precision: str = "fp16",
    repeats: int = 20,
    batch: int = 32,
    variants: Sequence[tuple[int, bool, str]] = ((16, False, "end"), (16, True, "end")),
    graph: bool = True,
) -> list[dict[str, Any]]:
    """Time real CoOp steps (random weights: same shapes, same cost) and put the model's FLOPs beside them.

    For each variant (n_ctx, csc, position): our engine's step (shared prefix where it applies, and the
    truncated path), and for the "end" position the official step (fp16 CLIP, 77-token prompts, the batch's
    images through the image encoder). `repeats` timed steps follow 3 warm-up steps. Class names are
    ImageNet's (open_clip's list), numbered beyond 1000. `graph` replays our text path as a CUDA graph, as
    train_coop does on a GPU (train.cuda_graph; never with amp); the official step always runs eagerly.
    """
    import torch
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from pipeline.engine.backbone import count_tokens, load_backbone
    from pipeline.engine.reference import official_train_step

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(arch, None, device=device)
    official_dtype = torch.float16 if device.startswith("cuda") and precision != "fp32" else torch.float32
    names = [IMAGENET_CLASSNAMES[i % 1000] + ("" if i < 1000 else f" {i // 1000}") for i in range(n_classes)]
    # CLIP's list names two classes "missile" (and a few other pairs); prompts must differ.
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name} {seen[name]}"
    name_tokens = [count_tokens(n) for n in names]
    shape = tower_shape(arch)
    image_gflops = image_encoder_gflops(arch)
    generator = torch.Generator().manual_seed(0)
    image_features = torch.nn.functional.normalize(torch.randn(batch, backbone.embed_dim, generator=generator), dim=-1)
    image_features = image_features.to(device)
    labels = torch.randint(n_classes, (batch,), generator=generator).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for n_ctx, csc, position in variants:
        layout = prompt_layout(n_ctx, max(name_tokens), csc, position, sum(name_tokens) / len(name_tokens))
        paths = [p for p in ("shared", "truncated") if p != "shared" or layout.prefix > 0]
        paths += ["official"] if position == "end" else []
        for path in paths:
            packed = False
            if path == "official":
                step, _ = official_train_step(backbone, names, n_ctx, csc, position, batch, official_dtype)
            else:
                step, packed = _our_step(backbone, names, n_ctx, csc, position, precision, path, image_features, labels,
                                 graph)
            for _ in range(3):
                step()
            sync()
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            sync()
            seconds = (time.perf_counter() - start) / repeats
            flops = step_flops(shape, n_classes, layout, path, batch, image_gflops, packed)
            rows.append({
                "arch": arch, "classes": n_classes, "n_ctx": n_ctx, "csc": csc, "position": position,
                "path": path, "precision": str(official_dtype) if path == "official"
                else precision,
                "seconds_per_step": seconds, "model_tflops_per_step": flops.total / 1e12,
                "model_text_tflops_per_step": (flops.dense + flops.attention) / 1e12,
                "achieved_tflops": flops.total / seconds / 1e12,
                "tokens": OFFICIAL_TOKENS if path == "official" else layout.length, "packed": packed,
                "prefix": layout.prefix if path == "shared" else 0,
                "cuda_graph": path != "official" and graph and device.startswith("cuda") and precision != "amp",
                "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
            })
            log.info("%s", rows[-1])
            del step
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


def _our_step(backbone: Any, names: list[str], n_ctx: int, csc: bool, position: str, precision: str,
              path: str, image_features: Any, labels: Any, graph: bool = False) -> tuple[Any, bool]:
    """(one step of pipeline.engine.train's inner loop as a closure, whether it packs tokens)."""
    from pipeline.engine.prompt import PromptConfig
    from pipeline.engine.train import TrainConfig, TrainStep, build_model

    cfg = TrainConfig(precision=precision, shared_prefix=path == "shared", cuda_graph=graph)
    model = build_model(backbone, names, PromptConfig(n_ctx=n_ctx, csc=csc, class_token_position=position), cfg)
    step = TrainStep(model, cfg)
    return (lambda: step(image_features, labels)), model.pack_tokens


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.costmodel",
        description="GPU-hours of a CoOp sweep from a params file (the cost model behind --dry-run), the "
        "16-shot ImageNet estimate, or measured step times on this machine's accelerator.",
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file whose grid to cost (default params.yaml)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="H100",
                        help="assumed GPU model for the estimate (default H100)")
    parser.add_argument("--official", action="store_true",
                        help="cost the grid as the official CoOp code would run it (77 tokens, image encoder)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 32],
                        help="GPU counts to print wall times for (default 1 8 32)")
    parser.add_argument("--imagenet", action="store_true",
                        help="print the 16-shot ImageNet trial estimate (ours vs official) as JSON and exit")
    parser.add_argument("--measure", action="store_true",
                        help="time real steps on --device and print them beside the model's FLOPs (JSON lines)")
    parser.add_argument("--arch", default="RN50", help="architecture for --measure/--imagenet (default RN50)")
    parser.add_argument("--classes", type=int, nargs="+", default=[1000],
                        help="class counts for --measure (default 1000)")
    parser.add_argument("--device", default="cuda", help="torch device for --measure (default cuda)")
    parser.add_argument("--precision", default="fp16", choices=["fp32", "bf16", "fp16", "amp"],
                        help="precision for --measure (default fp16, the official CoOp setting)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per --measure case (default 20)")
    parser.add_argument("--no-graph", action="store_true",
                        help="--measure our steps eagerly instead of as CUDA graphs (train.cuda_graph: false)")
    parser.add_argument("--out", type=Path, help="also write --measure / --imagenet results to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result: Any
    if args.measure:
        result = []
        for n in args.classes:
            rows = measure(args.arch, n, args.device, args.precision, args.repeats, graph=not args.no_graph)
            sys.stdout.write("".join(json.dumps(row) + "\n" for row in rows))
            sys.stdout.flush()
            result += rows
    elif args.imagenet:
        result = imagenet_16shot_estimate(args.gpu, args.arch)
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        from pipeline.params import ParamsError, load_params

        try:
            params = load_params(args.params)
        except ParamsError as error:
            log.error("%s", error)
            return 2
        estimate = estimate_gpu_hours(params, gpu=args.gpu, path="official" if args.official else None)
        sys.stdout.write(estimate.summary(args.gpus) + "\n")
        result = {"gpu": asdict(estimate.gpu), "gpu_hours": estimate.gpu_hours,
                  "wall_hours": {str(n): estimate.wall_hours(n) for n in args.gpus},
                  "by_dataset": estimate.by_dataset(), "trials": len(estimate.trials)}
    if args.out:
        from pipeline.atomic import write_json_atomic

        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "GPUS",
    "GPU",
    "GridEstimate",
    "TrialEstimate",
    "estimate_gpu_hours",
    "estimate_trial",
    "imagenet_16shot_estimate",
    "image_encoder_gflops",
    "measure",
]
