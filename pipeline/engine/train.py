"""CoOp training on frozen image features: CoOp's recipe (SGD, cosine schedule, constant warm-up).

The same loop trains CoOp's successors (CoCoOp, KgCoOp: `methods.train_method`) through the model's hooks:
its loss, its trained parameters, its prediction; `train_coop`'s `build` makes the method's model.

The image encoder is frozen, so each image's features come from the cache; an epoch draws, for every
training image, one of its V cached augmented views. Each step runs the text tower over all class
prompts (the only real cost) and updates the context vectors alone. Online mode (features.views:
online) is the official augmentation instead: every epoch, every training image is cropped afresh and
encoded by the frozen image tower (`online_batches`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field
from itertools import islice

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.engine.backbone import Backbone
from pipeline.engine.inputs import FewShotFeatures, TrainImages
from pipeline.engine.prompt import CoOp, PromptConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; defaults are the official CoOp recipe. epochs=None picks CoOp's per-shot value."""

    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int | None = None
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    batch_size: int = 32
    eval_every: int = 0  # evaluate on val every k epochs; 0: only at the end
    precision: str = "fp32"  # fp32 | bf16 | fp16 | amp | fp16-official (params.PRECISIONS)
    seed: int = 1
    shared_prefix: bool | None = None  # None: the faster exact text path for the device
    pack_tokens: bool | None = None  # None: skip prompts' padding where that is faster on the device
    cuda_graph: bool = True  # on CUDA (not amp): replay the text path as one CUDA graph

    def to_dict(self) -> dict:
        return asdict(self)


def default_epochs(dataset: str, shots: int) -> int:
    """CoOp's max epochs: 50 for ImageNet and for 1 shot, 100 for 2/4 shots, 200 for 8/16 shots."""
    if dataset.lower() == "imagenet" or shots <= 1:
        return 50
    return 100 if shots <= 4 else 200


def lr_at_epoch(epoch: int, cfg: TrainConfig, max_epochs: int) -> float:
    """Dassl's ConstantWarmupScheduler around CosineAnnealingLR(T_max=max_epochs), stepped per epoch."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / max_epochs))


@dataclass
class EpochMetrics:
    epoch: int  # 1-based
    loss: float
    train_acc: float
    lr: float
    seconds: float
    val_acc: float | None = None


@dataclass
class TrainResult:
    model: CoOp
    epochs: list[EpochMetrics] = field(default_factory=list)
    val_acc: float = float("nan")
    test_acc: float = float("nan")
    train_seconds: float = 0.0

    @property
    def ctx(self) -> torch.Tensor:
        return self.model.prompt_learner.ctx.detach().float().cpu()

    @property
    def learned(self) -> dict[str, torch.Tensor]:
        """Everything the model learned (``ctx``; CoCoOp: and ``meta_net.*``), for `context.save_learned`."""
        return self.model.learned_tensors()


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the trial cannot continue."""


@torch.no_grad()
def evaluate(model: CoOp, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (%) of normalised features (N, E) (`model.predict`: CoOp computes text features once)."""
    if len(labels) == 0:
        return float("nan")
    return 100.0 * int((model.predict(features) == labels).sum()) / len(labels)


def build_model(
    backbone: Backbone,
    classnames: list[str],
    prompt_cfg: PromptConfig,
    cfg: TrainConfig,
    generator: torch.Generator | None = None,
) -> CoOp:
    """The CoOp model a training config runs: its precision and exact text path, CUDA-graphed where set."""
    model = CoOp(backbone, classnames, prompt_cfg, cfg.precision, cfg.shared_prefix, generator, cfg.pack_tokens)
    return graph_model(model, cfg)


def graph_model(model: CoOp, cfg: TrainConfig) -> CoOp:
    """`model`, its text path replayed as a CUDA graph where the config sets it and the model allows."""
    on_cuda = model.prompt_learner.ctx.device.type == "cuda"
    if cfg.cuda_graph and on_cuda and cfg.precision != "amp" and model.graphable:
        model.capture_cuda_graph()
    return model


# Builds the model train_coop trains: (backbone, class names, prompt config, train config, generator) -> model.
ModelBuilder = Callable[[Backbone, list[str], PromptConfig, TrainConfig, torch.Generator], CoOp]


class TrainStep:
    """One step of CoOp's recipe on a batch of cached features: forward, backward, SGD update of the context
    (and whatever else the method trains: `model.trained_parameters()`)."""

    def __init__(self, model: CoOp, cfg: TrainConfig) -> None:
        self.model = model
        self.use_amp = cfg.precision == "amp"
        self.device_type = model.prompt_learner.ctx.device.type
        self.optimizer = torch.optim.SGD(model.trained_parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        # Loss scaling guards our fp16 (fp32 master context); the official fp16 runs plain SGD without it.
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision in ("fp16", "amp"))

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image features (B, E), labels (B,) -> (loss, logits (B, C)), after updating the context."""
        with torch.autocast(self.device_type, dtype=torch.float16, enabled=self.use_amp):
            loss, logits = self.model.loss(x, y)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss became {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, logits


def _prepare(data: FewShotFeatures, device: torch.device) -> dict[str, torch.Tensor]:
    def norm(t: torch.Tensor) -> torch.Tensor:
        return F.normalize(t.to(device=device, dtype=torch.float32), dim=-1)

    return {
        # Online mode trains on fresh crops, never on the cached train tensor.
        **({"train": norm(data.train)} if data.train_images is None else {}),
        "train_labels": data.train_labels.to(device),
        "val": norm(data.val),
        "val_labels": data.val_labels.to(device),
        "test": norm(data.test),
        "test_labels": data.test_labels.to(device),
    }


Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]  # one epoch: (image features (B, E), labels (B,)) per step


def _cached_epochs(train_x: torch.Tensor, train_y: torch.Tensor, generator: torch.Generator, batch: int,
                   steps: int) -> Iterator[Batches]:
    """Per epoch, in shuffled order: each image's features in one of its V cached views, drawn at random."""
    n_train, n_views = train_x.shape[0], train_x.shape[1]
    while True:
        order = torch.randperm(n_train, generator=generator).to(train_x.device)
        views = torch.randint(n_views, (n_train,), generator=generator).to(train_x.device)
        yield ((train_x[idx, views[idx]], train_y[idx]) for idx in order[: steps * batch].split(batch))


class EpochOrder:
    """Batches of (sample index, epoch) for `epochs` epochs: each epoch a fresh shuffle (randperm on
    `generator`) cut into `steps` batches of `batch` (Dassl drops the last incomplete one)."""

    def __init__(self, n_train: int, epochs: int, batch: int, steps: int, generator: torch.Generator) -> None:
        self.n_train, self.epochs, self.batch, self.steps = n_train, epochs, batch, steps
        self.generator = generator

    def __len__(self) -> int:
        return self.epochs * self.steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch in range(self.epochs):
            order = torch.randperm(self.n_train, generator=self.generator).tolist()
            for step in range(self.steps):
                yield [(i, epoch) for i in order[step * self.batch : (step + 1) * self.batch]]


def image_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Online mode's image-tower dtype: fp32 as the feature cache runs it, but on a GPU the trial's half
    precision, as the official PREC fp16 runs all of CLIP (fp32 gets a fraction of a GPU's fp16 peak)."""
    if device.type != "cuda" or precision == "fp32":
        return torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float16


def online_batches(backbone: Backbone, images: TrainImages, trial_seed: int,
                   batches: Iterable[list[tuple[int, int]]],
                   dtype: torch.dtype = torch.float32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fresh crops through the frozen image tower: per batch of (sample index, epoch), yields the crops'
    L2-normalised features (B, E) on the backbone's device and the sample indices (B,).

    Crops are CoOp's train transform seeded per sample (`pipeline.data.images.crop_seed`), decoded by a
    DataLoader with `images.num_workers` processes ahead of the tower; the tower runs as it does for the
    feature cache (`Backbone.encode_images`: no grad, channels-last, fp32 features), autocast to `dtype`.
    """
    if backbone.model.visual.training:
        raise RuntimeError("the image tower is in training mode (batch-norm statistics would change); call "
                           "backbone.model.eval()")
    loader = DataLoader(
        images.crops(trial_seed), batch_sampler=batches, num_workers=images.num_workers,
        pin_memory=backbone.device.type == "cuda",
        generator=torch.Generator().manual_seed(trial_seed),  # workers' base seed; leaves the global RNG alone
    )
    half = dtype != torch.float32
    for pixels, indices in loader:
        with torch.autocast(backbone.device.type, dtype=dtype, enabled=half):
            features = backbone.encode_images(pixels)
        yield F.normalize(features, dim=-1), indices


def _online_epochs(backbone: Backbone, images: TrainImages, train_y: torch.Tensor, cfg: TrainConfig,
                   generator: torch.Generator, epochs: int, batch: int, steps: int) -> Iterator[Batches]:
    """Per epoch, in shuffled order: features of fresh crops of every image, seeded by the trial's seed (the
    loader runs ahead across epochs; closing this generator stops its workers)."""
    order = EpochOrder(len(train_y), epochs, batch, steps, generator)
    dtype = image_dtype(cfg.precision, backbone.device)
    with closing(online_batches(backbone, images, cfg.seed, order, dtype)) as stream:
        for _ in range(epochs):
            yield ((x, train_y[idx.to(train_y.device)]) for x, idx in islice(stream, steps))


def train_coop(
    backbone: Backbone,
    data: FewShotFeatures,
    prompt_cfg: PromptConfig,
    cfg: TrainConfig,
    epochs: int | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    progress: bool = True,
    build: ModelBuilder = build_model,
) -> TrainResult:
    """Train a CoOp context; returns the model, per-epoch curves and accuracies.

    Trains on the cached views of `data.train`, or, when `data.train_images` is set (online mode), on fresh
    crops of those images every epoch, seeded by `cfg.seed`. `epochs` defaults to `cfg.epochs`; one of them
    must be set (CoOp's schedule: `default_epochs`). `build` makes the model (another method's: then the
    loss curve is that method's whole objective, e.g. KgCoOp's cross-entropy + lambda * L_kg).
    """
    epochs = epochs if epochs is not None else cfg.epochs
    if epochs is None:
        raise ValueError("epochs is not set: pass epochs or TrainConfig.epochs (CoOp's: default_epochs(dataset, shots))")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1 (got {epochs})")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {cfg.batch_size})")
    device = backbone.device
    n_cls = len(data.classnames)
    if len(data.train_labels) == 0:
        raise ValueError("the few-shot training split is empty")
    if int(data.train_labels.max()) >= n_cls or int(data.train_labels.min()) < 0:
        raise ValueError(f"training labels fall outside 0..{n_cls - 1} ({n_cls} class names)")

    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = build(backbone, data.classnames, prompt_cfg, cfg, generator)
    train_step = TrainStep(model, cfg)
    tensors = _prepare(data, device)
    train_y = tensors["train_labels"]
    n_train = len(train_y)
    # Dassl drops the last incomplete batch when there is at least one full batch.
    batch = min(cfg.batch_size, n_train)
    steps = n_train // batch
    if data.train_images is not None:
        if len(data.train_images.paths) != n_train:
            raise ValueError(f"{len(data.train_images.paths)} training images for {n_train} training labels")
        data.train_images.check()
        epoch_batches = _online_epochs(backbone, data.train_images, train_y, cfg, generator, epochs, batch, steps)
    else:
        epoch_batches = _cached_epochs(tensors["train"], train_y, generator, batch, steps)

    result = TrainResult(model)
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"{type(model).__name__} epochs", disable=not progress, leave=False)
    with closing(epoch_batches):
        for epoch in bar:
            lr = lr_at_epoch(epoch, cfg, epochs)
            train_step.set_lr(lr)
            t0 = time.perf_counter()
            loss_sum, correct = 0.0, 0
            for step, (x, y) in enumerate(next(epoch_batches)):
                try:
                    loss, logits = train_step(x, y)
                except NonFiniteLossError as e:
                    raise NonFiniteLossError(f"{e} at epoch {epoch + 1}, step {step + 1}") from None
                loss_sum += loss.item() * len(y)
                correct += int((logits.argmax(dim=-1) == y).sum())
            seen = steps * batch
            metrics = EpochMetrics(epoch + 1, loss_sum / seen, 100.0 * correct / seen, lr, time.perf_counter() - t0)
            last = epoch + 1 == epochs
            if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                metrics.val_acc = evaluate(model, tensors["val"], tensors["val_labels"])
            result.epochs.append(metrics)
            bar.set_postfix(loss=f"{metrics.loss:.3f}", acc=f"{metrics.train_acc:.1f}")
            if on_epoch is not None:
                on_epoch(metrics)
    result.train_seconds = time.perf_counter() - start
    result.val_acc = result.epochs[-1].val_acc  # type: ignore[assignment]
    result.test_acc = evaluate(model, tensors["test"], tensors["test_labels"])
    return result
