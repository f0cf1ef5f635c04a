"""Fused trial bundles: B CoOp configurations trained in one step on one frozen backbone, each exactly as alone.

A CoOp step's cost is the frozen text tower over the class prompts; one configuration at 100 classes leaves
a GPU mostly idle. A bundle runs every member's prompts through the tower in one batched pass (one pass per
group of members sharing a prefix length, one packed pass for the rest) and then gives each member its own
logits, cross-entropy, gradient, SGD state, lr schedule and data order. The members' contexts are
disjoint and the tower's work is row-wise per prompt (attention within a prompt), so the summed loss's
gradient with respect to member b's context is member b's own gradient: a member's training equals
`train.train_coop` on its own up to float rounding (tests/test_engine_bundle.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.engine.backbone import Backbone
from pipeline.engine.inputs import FewShotFeatures
from pipeline.engine.methods import COOP, MethodConfig
from pipeline.engine.prompt import CoOp, PromptConfig, compute_dtype, prefers_packing, prefers_shared_prefix
from pipeline.engine.text import TextTower
from pipeline.engine.train import (
    EpochMetrics,
    NonFiniteLossError,
    TrainConfig,
    TrainResult,
    TrainStep,
    _cached_epochs,
    _prepare,
    evaluate,
    lr_at_epoch,
)

log = logging.getLogger(__name__)


# On the CPU a pass encodes at most this many prompts (more members: more passes, still one step). The CPU step is
# compute-bound, so bundling saves only per-call overheads, and one pass over 64 members of 100 classes (6,400
# prompts) ran at 0.77x the members one at a time (its activations leave the caches and are fresh allocations
# every step), passes of 100-1,600 prompts at 1.1-1.16x (bench/bundle.py, coop-tiny, 1 thread; BENCHMARKS.md).
CPU_MAX_PASS_PROMPTS = 400


@dataclass
class BundleMember:
    """One configuration of a bundle: what `train_coop(backbone, data, prompt, cfg, epochs)` would train."""

    data: FewShotFeatures
    prompt: PromptConfig
    cfg: TrainConfig
    epochs: int | None = None  # None: cfg.epochs
    method: MethodConfig = field(default_factory=MethodConfig)  # CoOp only (others are refused)


@dataclass
class BundleOutcome:
    """How a member ended: `result` (completed, or stopped early by `on_epoch`) or the `error` that ended it."""

    result: TrainResult | None = None
    error: Exception | None = None
    stopped: bool = False  # on_epoch returned False before its last epoch: no test accuracy (NaN)


@dataclass(frozen=True)
class _Pass:
    """One batched text-tower call: the members it encodes (positions in the active list) and how."""

    members: tuple[int, ...]
    shared_len: int  # P > 1: shared-prefix pass over P positions per member; 0: truncated pass
    pack: bool  # run only the real tokens (text.Packing)


class BundleStep:
    """One step of CoOp's recipe for every active member at once: one batched text pass, then per member its
    cross-entropy and its own SGD update (each member's `TrainStep` optimiser and loss scaler).

    Members share the backbone, the class list (C classes), the batch size (n) and the precision.
    """

    def __init__(self, backbone: Backbone, models: Sequence[CoOp], cfgs: Sequence[TrainConfig]) -> None:
        if not models or len(models) != len(cfgs):
            raise ValueError(f"a bundle step needs one config per model (got {len(models)} models, {len(cfgs)} configs)")
        for i, (model, cfg) in enumerate(zip(models, cfgs, strict=True)):
            if cfg.precision != cfgs[0].precision or model.prompt_learner.n_cls != models[0].prompt_learner.n_cls:
                raise ValueError(f"bundled models must share the precision and the number of classes: model {i} has "
                                 f"{cfg.precision}, {model.prompt_learner.n_cls} classes; model 0 "
                                 f"{cfgs[0].precision}, {models[0].prompt_learner.n_cls}")
        self.backbone = backbone
        self.models = list(models)
        self.cfgs = list(cfgs)
        self.precision = cfgs[0].precision
        self.device = backbone.device
        self.dtype = compute_dtype(self.precision, self.device)
        self.n_cls = models[0].prompt_learner.n_cls
        self.logit_scale = backbone.logit_scale
        self.use_amp = self.precision == "amp"
        # The members' optimisers and loss scalers, built exactly as a trial alone builds them.
        self.updates = [TrainStep(model, cfg) for model, cfg in zip(models, cfgs, strict=True)]
        # One copy of the frozen tower per packing setting (bf16/fp16 copies would otherwise be one per member).
        self.towers: dict[bool, TextTower] = {}
        for model in self.models:
            model.text = self.towers.setdefault(model.text.pack, model.text)
        self.use_graph = (self.device.type == "cuda" and self.precision != "amp"
                          and all(cfg.cuda_graph for cfg in cfgs))
        self.active: list[int] = list(range(len(models)))  # members still training, in member order
        self.passes: list[_Pass] = []
        self._graphed: Callable[..., torch.Tensor] | None = None
        self._planned = False  # passes (and graph) match `active`

    def set_lr(self, member: int, lr: float) -> None:
        self.updates[member].set_lr(lr)

    def drop(self, member: int) -> None:
        """Stop training `member` (failed or stopped): later steps leave it out."""
        self.active.remove(member)
        self._planned = False

    def _tower(self, pack: bool) -> TextTower:
        if pack not in self.towers:
            self.towers[pack] = TextTower(self.backbone, self.dtype, pack)
        return self.towers[pack]

    def _plan(self) -> None:
        """Group the active members into passes (`pass_groups`); packing by the device rule on each pass's token
        counts, unless every member of it turns packing off."""
        device_type = self.device.type
        passes = pass_groups([self.models[m].prompt_learner.shared_len for m in self.active],
                             [self.cfgs[m].shared_prefix for m in self.active], self.n_cls, device_type,
                             self.precision)
        self.passes = []
        for members, prefix_len in passes:
            learners = [self.models[self.active[p]].prompt_learner for p in members]
            skipped = prefix_len
            width = max(learner.length for learner in learners) - skipped
            real = sum(sum(learner.lengths) - learner.n_cls * skipped for learner in learners)
            padded = len(learners) * self.n_cls * width
            pack_off = all(self.cfgs[self.active[p]].pack_tokens is False for p in members)
            pack = not pack_off and prefers_packing(device_type, self.precision, padded, real)
            self.passes.append(_Pass(members, prefix_len, pack))
        self._graphed = None
        self._planned = True
        if self.use_graph and self.active:
            self._capture()

    def _capture(self) -> None:
        """Record the bundled text path (forward and backward) as one CUDA graph, as `CoOp.capture_cuda_graph`
        does for one model; recaptured whenever the active members change."""
        samples = tuple(self.models[m].prompt_learner.ctx.detach().clone().requires_grad_(True) for m in self.active)
        self._graphed = torch.cuda.make_graphed_callables(self._encode, samples)

    def _encode(self, *ctxs: torch.Tensor) -> torch.Tensor:
        """The active members' contexts (in `active` order) -> their class text features (A, C, E),
        L2-normalised, fp32."""
        per_member: list[torch.Tensor | None] = [None] * len(ctxs)
        for p in self.passes:
            learners = [self.models[self.active[i]].prompt_learner for i in p.members]
            prompts = [learner(ctxs[i]) for learner, i in zip(learners, p.members, strict=True)]  # (C, L_b, D) each
            tower = self._tower(p.pack)
            if p.shared_len:
                prefix_len = p.shared_len
                prefix = torch.stack([x[0, :prefix_len] for x in prompts])  # (G, P, D): one prefix per member
                width = max(x.shape[1] for x in prompts) - prefix_len
                suffix = _cat([_pad_positions(x[:, prefix_len:], width) for x in prompts])  # (G * C, S, D)
                lengths = [n - prefix_len for learner in learners for n in learner.lengths]
                features = tower.forward_shared(prefix, suffix, lengths)  # (G * C, E)
            else:
                width = max(x.shape[1] for x in prompts)
                padded = _cat([_pad_positions(x, width) for x in prompts])  # (G * C, T, D)
                features = tower(padded, [n for learner in learners for n in learner.lengths])  # (G * C, E)
            for i, chunk in zip(p.members, F.normalize(features, dim=-1).split(self.n_cls), strict=True):
                per_member[i] = chunk
        return torch.stack(per_member)  # type: ignore[arg-type]

    def text_features(self) -> torch.Tensor:
        """(A, C, E): every active member's class text features, L2-normalised, fp32."""
        if not self._planned:
            self._plan()
        ctxs = [self.models[m].prompt_learner.ctx for m in self.active]
        encode = self._graphed if self._graphed is not None else self._encode
        return encode(*ctxs)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[int]]:
        """Image features (A, n, E) and labels (A, n) of the active members, in `active` order -> each one's loss
        and number of correct predictions, after updating every member whose loss is finite. A member with a
        non-finite loss is left as it was (its loss tells the caller, who drops it)."""
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            text = self.text_features()  # (A, C, E)
            logits = self.logit_scale * x @ text.transpose(1, 2)  # (A, n, C), as CoOp.forward per member
        per_sample = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")  # (A * n,)
        losses = per_sample.view(y.shape).mean(dim=1)  # (A,): each member's mean over its batch
        correct = (logits.argmax(dim=-1) == y).sum(dim=1)  # (A,)
        values = torch.stack([losses.detach(), correct.to(losses.dtype)]).tolist()  # one host sync per step
        loss_values, correct_counts = values[0], [int(c) for c in values[1]]
        finite = [i for i, v in enumerate(loss_values) if math.isfinite(v)]
        updates = [self.updates[self.active[i]] for i in finite]
        for update in updates:
            update.optimizer.zero_grad(set_to_none=True)
        if finite:
            # Contexts are disjoint: d(sum of losses)/d(ctx_b) is member b's own gradient (scaled by its scaler).
            total = sum(update.scaler.scale(losses[i]) for i, update in zip(finite, updates, strict=True))
            total.backward()  # type: ignore[union-attr]
            for update in updates:
                update.scaler.step(update.optimizer)
                update.scaler.update()
        return loss_values, correct_counts


def pass_groups(prefixes: Sequence[int], forced: Sequence[bool | None], n_cls: int, device_type: str,
                precision: str) -> list[tuple[tuple[int, ...], int]]:
    """The text passes of a bundled step: (member positions, shared prefix length P; 0 for a truncated pass).

    `prefixes[i]`: the positions member i's prompts share (P > 1: a unified context before the class name);
    `forced[i]`: its train.shared_prefix (None: the device rule decides). Members sharing a P > 1 form one
    shared-prefix pass where the rule prefers it for the whole group (or a member forces it), everyone else
    one truncated pass; on the CPU, passes of at most CPU_MAX_PASS_PROMPTS prompts. The cost model plans
    bundles with it too (pipeline.sweep.estimate)."""
    by_prefix: dict[int, list[int]] = {}
    truncated: list[int] = []
    for pos, (prefix_len, force) in enumerate(zip(prefixes, forced, strict=True)):
        if prefix_len > 1 and force is not False:
            by_prefix.setdefault(prefix_len, []).append(pos)
        else:
            truncated.append(pos)
    passes = []
    for prefix_len, group in by_prefix.items():
        # (G * (C - 1) + 1) classes save G * (C - 1) * (P - 1) tokens, as G members of C classes do.
        group_cls = len(group) * (n_cls - 1) + 1
        if any(forced[p] for p in group) or prefers_shared_prefix(device_type, precision, group_cls, prefix_len):
            passes.append((tuple(group), prefix_len))
        else:
            truncated.extend(group)
    if truncated:
        passes.append((tuple(sorted(truncated)), 0))
    if device_type == "cpu":  # large passes run slower there than small ones (CPU_MAX_PASS_PROMPTS)
        chunk = max(1, CPU_MAX_PASS_PROMPTS // n_cls)
        passes = [(members[i : i + chunk], prefix_len) for members, prefix_len in passes
                  for i in range(0, len(members), chunk)]
    return passes


def _pad_positions(x: torch.Tensor, width: int) -> torch.Tensor:
    """(C, L, D) -> (C, width, D), zeros after position L (after every EOS: causal attention never reads them)."""
    return x if x.shape[1] == width else F.pad(x, (0, 0, 0, width - x.shape[1]))


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _bundle_shape(members: Sequence[BundleMember]) -> tuple[int, int, int]:
    """(epochs, batch, steps per epoch) the members share; ValueError naming what a member gets wrong or does
    not share with member 0."""
    if not members:
        raise ValueError("a bundle needs at least one member")
    shapes = []
    for i, m in enumerate(members):
        if m.method.name != COOP:
            raise ValueError(f"bundle member {i} trains method {m.method.name!r}: bundles train CoOp only; train it "
                             "alone (methods.train_method)")
        if m.data.train_images is not None:
            raise ValueError(f"bundle member {i} trains on online crops (features.views: online): bundles train "
                             "on cached features only; train it alone (train.train_coop)")
        epochs = m.epochs if m.epochs is not None else m.cfg.epochs
        if epochs is None:
            raise ValueError(f"bundle member {i}: epochs is not set: set BundleMember.epochs or TrainConfig.epochs")
        if epochs < 1:
            raise ValueError(f"bundle member {i}: epochs must be >= 1 (got {epochs})")
        if m.cfg.batch_size < 1:
            raise ValueError(f"bundle member {i}: batch_size must be >= 1 (got {m.cfg.batch_size})")
        n_cls, labels = len(m.data.classnames), m.data.train_labels
        if len(labels) == 0:
            raise ValueError(f"bundle member {i}: the few-shot training split is empty")
        if int(labels.max()) >= n_cls or int(labels.min()) < 0:
            raise ValueError(f"bundle member {i}: training labels fall outside 0..{n_cls - 1} ({n_cls} class names)")
        batch = min(m.cfg.batch_size, len(labels))  # Dassl drops the last incomplete batch, as train_coop
        shapes.append({
            "dataset": m.data.dataset,
            "class names": list(m.data.classnames),
            "precision": m.cfg.precision,
            "epochs": epochs,
            "batch size": batch,
            "steps per epoch": f"{len(labels) // batch} ({len(labels)} training images / batch {batch})",
        })
    for i, shape in enumerate(shapes[1:], start=1):
        for key, value in shape.items():
            if value != shapes[0][key]:
                raise ValueError(f"bundle members must share the {key}: member 0 has {shapes[0][key]!r}, member {i} "
                                 f"has {value!r}; train them in separate bundles")
    first = shapes[0]
    n_train = len(members[0].data.train_labels)
    return first["epochs"], first["batch size"], n_train // first["batch size"]


def train_bundle(
    backbone: Backbone,
    members: Sequence[BundleMember],
    on_epoch: Callable[[int, EpochMetrics], bool | None] | None = None,
    progress: bool = True,
    after_epoch: Callable[[int], None] | None = None,
) -> list[BundleOutcome]:
    """Train every member's CoOp context together; returns one outcome per member, in order.

    Each member is what `train_coop(backbone, m.data, m.prompt, m.cfg, m.epochs)` trains: its model built
    after the same seeding (so the same initial context), its own data order and cached views (its
    generator), SGD state and lr schedule, validation every `cfg.eval_every` epochs and at the end, test at
    the end. Members share the backbone, dataset, class list, precision, batch size, steps per epoch and
    epochs (ValueError naming the difference). `on_epoch(member, metrics)` returning False stops that member
    after the epoch (its result keeps its curves, no test accuracy); an error it raises, or a NaN/infinite
    loss, ends that member alone (its outcome's `error`); the others go on. `after_epoch(epoch)` runs once every
    member's `on_epoch` of that epoch has (a sweep reports the whole bundle there). The global torch RNG is
    left seeded by the last member.
    """
    epochs, batch, steps = _bundle_shape(members)
    device = backbone.device
    models, tensors, streams = [], [], []
    for i, m in enumerate(members):
        # Exactly train_coop's seeding and build: the generator's draws decide the context, then the data order.
        torch.manual_seed(m.cfg.seed)
        generator = torch.Generator().manual_seed(m.cfg.seed)
        try:
            model = CoOp(backbone, m.data.classnames, m.prompt, m.cfg.precision, m.cfg.shared_prefix, generator,
                         m.cfg.pack_tokens)
        except ValueError as e:
            raise ValueError(f"bundle member {i}: {e}") from None
        member_tensors = _prepare(m.data, device)
        models.append(model)
        tensors.append(member_tensors)
        streams.append(_cached_epochs(member_tensors["train"], member_tensors["train_labels"], generator, batch, steps))
    bundle = BundleStep(backbone, models, [m.cfg for m in members])
    results = [TrainResult(model) for model in models]
    outcomes = [BundleOutcome() for _ in members]
    start = time.perf_counter()

    def end(member: int, error: Exception | None = None, stopped: bool = False) -> None:
        bundle.drop(member)
        results[member].train_seconds = time.perf_counter() - start
        outcomes[member] = BundleOutcome(None if error else results[member], error, stopped)

    bar = tqdm(range(epochs), desc=f"CoOp bundle of {len(members)}", disable=not progress, leave=False)
    with ExitStack() as stack:
        for stream in streams:
            stack.enter_context(closing(stream))
        for epoch in bar:
            if not bundle.active:
                break
            lrs = {m: lr_at_epoch(epoch, members[m].cfg, epochs) for m in bundle.active}
            for m, lr in lrs.items():
                bundle.set_lr(m, lr)
            t0 = time.perf_counter()
            batches = {m: next(streams[m]) for m in bundle.active}
            loss_sums = dict.fromkeys(bundle.active, 0.0)
            correct = dict.fromkeys(bundle.active, 0)
            for step in range(steps):
                if not bundle.active:  # every member failed this epoch
                    break
                drawn = [next(batches[m]) for m in bundle.active]  # (x (n, E), y (n,)) per active member
                x = torch.stack([d[0] for d in drawn])  # (A, n, E)
                y = torch.stack([d[1] for d in drawn])  # (A, n)
                members_now = list(bundle.active)
                losses, corrects = bundle(x, y)
                for m, loss, right, (_, y_m) in zip(members_now, losses, corrects, drawn, strict=True):
                    if not math.isfinite(loss):
                        end(m, NonFiniteLossError(f"loss became {loss} at epoch {epoch + 1}, step {step + 1}"))
                        continue
                    loss_sums[m] += loss * len(y_m)
                    correct[m] += right
            seconds = time.perf_counter() - t0
            last = epoch + 1 == epochs
            seen = steps * batch
            for m in list(bundle.active):
                cfg = members[m].cfg
                metrics = EpochMetrics(epoch + 1, loss_sums[m] / seen, 100.0 * correct[m] / seen, lrs[m], seconds)
                if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                    metrics.val_acc = evaluate(models[m], tensors[m]["val"], tensors[m]["val_labels"])
                results[m].epochs.append(metrics)
                if on_epoch is None:
                    continue
                try:
                    keep_going = on_epoch(m, metrics)
                except Exception as e:  # the member's own reporting failed: it alone ends
                    log.warning("bundle member %d ended: on_epoch raised %s: %s", m, type(e).__name__, e)
                    end(m, e)
                    continue
                if keep_going is False and not last:
                    end(m, stopped=True)
                    r = results[m]
                    r.val_acc = metrics.val_acc if metrics.val_acc is not None else float("nan")
            if after_epoch is not None:
                after_epoch(epoch + 1)
            bar.set_postfix(active=len(bundle.active))
    for m in list(bundle.active):
        end(m)
        r = results[m]
        r.val_acc = r.epochs[-1].val_acc  # type: ignore[assignment]
        r.test_acc = evaluate(models[m], tensors[m]["test"], tensors[m]["test_labels"])
    return outcomes
