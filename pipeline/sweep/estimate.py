"""GPU-hours or CPU core-hours of prompt-learning trials and sweeps from the FLOP model: device figures, trial and
grid estimates.

A step's time combines its compute time ``FLOPs / rate`` (pipeline.engine.flops) with a per-step floor
(kernel launches on a GPU, Python and operator dispatch on a CPU) in quadrature; a trial adds a fixed
overhead. With online augmentation (``features.views: online``) our steps also run the image encoder on the
batch's fresh crops, in the trial's precision. The methods and protocols change what a trial runs: a
CoCoOp step encodes images x classes prompts (each image its own prompt set) and so does each of its
evaluations, KgCoOp adds one frozen pass over its hand-crafted prompts, base2new trials train on the base
half of the classes and test on both halves, xd trials also test on their transfer targets. `GPUS` holds GPU figures, fitted to H100 measurements (within
20% of every measured step) or, for other GPUs, assumed; `DEV_CPU` the CPU rate measured on the development
machine, used when a sweep's trials get no GPU (``sweep.gpus_per_trial: 0``). `python bench/costmodel.py`
times real steps on the local accelerator next to the model's FLOPs, to check or recalibrate
(docs/reproduce.md has what we measured). `estimate_sweep` picks the device the params ask for.

A trial may be a bundle (sweep.bundle_size; `sweep_trials` forms them as the sweep does): its members share
each step's batched text pass (pipeline/engine/bundle.py), so on a GPU the per-step floor is paid once per
pass, not per member, and the per-trial overhead once per bundle (`estimate_trial`); on a CPU, where bundles
measured 1.0-1.3x, a bundle costs about its members alone. No bundle has been timed on a GPU: the bundled
GPU figures are the model's, not measurements.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine.flops import (
    OFFICIAL_TOKENS,
    PATHS,
    PromptLayout,
    StepFlops,
    TowerShape,
    image_encoder_gflops,
    packs_tokens,
    prompt_layout,
    step_flops,
    tower_shape,
)
from pipeline.params import ONLINE_VIEWS

if TYPE_CHECKING:
    from pipeline.params import Params

# Class names are tokenised only when the prepared split files are at hand; otherwise the longest class
# name is assumed to be this many BPE tokens, and names this long on average (ImageNet's CLIP class names:
# longest 12 tokens, mean 2.2).
ASSUMED_MAX_NAME_TOKENS = 12
ASSUMED_MEAN_NAME_TOKENS = 2.2
# Online augmentation: CPU seconds to decode one training image and make its crop (load, RandomResizedCrop
# to 224 px bicubic, flip, to tensor, normalise), measured on one core of the development CPU for a
# 500 x 375 JPEG, ImageNet's typical size (0.7 ms decode + 2.0 ms transform).
DECODE_SECONDS_PER_IMAGE = 2.8e-3

# Test images per dataset (CoOp's Table 1), for the evaluations whose cost grows with them (CoCoOp encodes
# every test image's own prompts) when a dataset's test.json is not prepared yet.
DATASET_TEST_IMAGES: dict[str, int] = {
    "ImageNet": 50_000,
    "Caltech101": 2_465,
    "OxfordPets": 3_669,
    "StanfordCars": 8_041,
    "OxfordFlowers": 2_463,
    "Flowers102": 2_463,
    "Food101": 30_300,
    "FGVCAircraft": 3_333,
    "SUN397": 19_850,
    "DTD": 1_692,
    "EuroSAT": 8_100,
    "UCF101": 3_783,
}
# Val images per class of a few-shot split: min(shots, 4) (pipeline.data.fewshot.MAX_VAL_SHOTS, as CoOp's).
MAX_VAL_SHOTS = 4
# CoCoOp evaluates images in chunks of about this many prompts (pipeline.engine.cocoop.EVAL_PROMPTS).
COCOOP_EVAL_PROMPTS = 4096
COOP, COCOOP, KGCOOP = "coop", "cocoop", "kgcoop"  # pipeline.engine.methods' ids (only CoOp bundles)
BASE2NEW, XD = "base2new", "xd"  # pipeline.data.protocols' protocols costed differently from few-shot

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


# Measured on one H100 SXM (80 GB HBM3) with `python bench/costmodel.py` (RN50 and ViT-B/16 text towers,
# 10 / 100 / 1000 classes, fp16 / bf16, our paths CUDA-graphed as train_coop runs them on a GPU, the
# official step eager; table in docs/reproduce.md). The fit is within 20% of every measured step:
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
class CPU:
    """Throughput of CPU cores for CoOp steps: the FLOP rate a core reaches on the text path and on the image
    encoder, a per-step floor, combined in quadrature as for a GPU; a trial's torch threads are its
    sweep.cpus_per_trial cores (sweep/trial.py), and the rate is assumed to scale with them."""

    name: str
    text_gflops_per_core: float  # fp32, CoOp's text path forward + backward
    image_gflops_per_core: float  # fp32, the image encoder's forward (online views)
    bf16_slowdown: float  # how much slower bf16 runs where it is emulated (no AVX-512-BF16 / AMX)
    step_floor_s: float  # per step, whatever its work
    trial_overhead_s: float  # per trial: Ray scheduling, MLflow run and artifacts, evaluation

    def rate(self, gflops_per_core: float, cores: float, precision: str) -> float:
        """FLOP/s of `cores` cores at `precision` (only fp32 and bf16 run on a CPU)."""
        slowdown = self.bf16_slowdown if precision == "bf16" else 1.0
        return gflops_per_core * 1e9 * max(cores, 1.0) / slowdown

    def step_seconds(self, flops: float, cores: float, precision: str = "fp32") -> float:
        return math.hypot(self.step_floor_s, flops / self.rate(self.text_gflops_per_core, cores, precision))


# Measured on the development machine (2 cores of an AMD EPYC, AVX2, fp32; BENCHMARKS.md): the RN50 text path
# (100 classes, M=16, shared prefix + packing) ran 48.8 GFLOP in 476 ms on 2 threads, 51 GFLOP/s per core
# (bench/results/step_cpu_run1.json, "text_path"); the RN50 image encoder (12.2 GFLOPs an image) 10.3 images/s
# on 2 threads, 63 GFLOP/s per core ("features"); bf16 matrix products emulated at 1.3 GFLOP/s against
# 184 in fp32 ("peaks_gflops"). The demo sweep (params.yaml: 135 trials of coop-tiny-rn, 8-20 classes, one
# core each, two at a time) trained 5-7 ms per step, most of it the floor, and spent 121 s of wall time on
# 2 cores for 175 s of training: 0.5 s of core time per trial besides its steps. Checked against those runs:
# the demo's step time per dataset within 10% (84 / 42 / 42 s estimated against 90 / 38 / 47 s trained), its
# wall time 2 min (121 s measured); RN50 steps at 2 cores: end/unified within 5% at 100 and 1000 classes, the
# other five variants at 100 classes 14-51% over (CSC, middle, front), 10 classes half the measured 131 ms.
DEV_CPU = CPU("the development machine's CPU (AMD EPYC, AVX2)", text_gflops_per_core=51.0,
              image_gflops_per_core=63.0, bf16_slowdown=138.0, step_floor_s=0.0055, trial_overhead_s=0.5)

# A bundle pays its device's per-trial overhead (worker, backbone and features in) once and, for each member after
# the first, what a demo trial cost besides its steps on the development CPU (its MLflow run and artifacts, its
# val/test evaluations; Ray's scheduling too, so on the generous side): each member keeps its own run.
BUNDLE_MEMBER_OVERHEAD_S = DEV_CPU.trial_overhead_s


def steps_per_epoch(n_train: int, batch: int) -> int:
    """Optimizer steps per epoch: Dassl drops the last incomplete batch (one batch if N < batch)."""
    return max(1, n_train // min(batch, max(n_train, 1)))


@dataclass
class TrialEstimate:
    """Time of one trial configuration on its device (one GPU, or its CPU cores) and what it was computed from."""

    config: dict[str, Any]
    n_classes: int  # the classes it trains on (base2new: the base half)
    steps: int
    layout: PromptLayout
    path: str
    flops_per_step: float
    seconds: float
    pass_seconds: float = 0.0  # of `seconds`: text passes besides the steps and the overhead (see estimate_trial)
    members: tuple[TrialEstimate, ...] = ()  # a bundle's members, each costed alone; () for one configuration
    passes: int = 1  # text passes a step runs (a bundle: one per group of members, see _estimate_bundle)

    @property
    def configs(self) -> list[dict[str, Any]]:
        """The configurations the trial trains: a bundle's members, or its own."""
        return [m.config for m in self.members] if self.members else [self.config]

    @property
    def gpu_hours(self) -> float:
        """Hours the trial runs (GPU-hours on a GPU; on a CPU, multiply by its cores for core-hours)."""
        return self.seconds / 3600.0


@dataclass
class GridEstimate:
    """Time of a set of trials on one device model: one GPU per trial, or `cores` CPU cores per trial."""

    device: GPU | CPU
    trials: list[TrialEstimate]
    assumptions: list[str] = field(default_factory=list)
    cores: float = 1.0  # CPU cores per trial (sweep.cpus_per_trial); ignored for a GPU
    resources: str = ""  # what the params ask for, said in the summary's first line
    slots: tuple[int, ...] = (1, 8, 32)  # trials at a time (GPUs, or CPU trial slots) the summary gives wall times for

    @property
    def on_cpu(self) -> bool:
        return isinstance(self.device, CPU)

    @property
    def unit(self) -> str:
        return "CPU core-hours" if self.on_cpu else "GPU-hours"

    @property
    def hours(self) -> float:
        """GPU-hours, or CPU core-hours (trial hours x cores per trial)."""
        return sum(t.seconds for t in self.trials) / 3600.0 * (self.cores if self.on_cpu else 1.0)

    @property
    def gpu_hours(self) -> float:
        """GPU-hours of a GPU estimate (`hours`; for a CPU estimate, see `unit`)."""
        return self.hours

    @property
    def configurations(self) -> int:
        """Configurations the trials train (a bundle trains several)."""
        return sum(len(t.configs) for t in self.trials)

    def count(self) -> str:
        """'990 trials', or with bundles '990 configurations in 140 trials (140 bundles of 2-18)'."""
        sizes = [len(t.members) for t in self.trials if t.members]
        if not sizes:
            return f"{len(self.trials)} trials"
        said = f"{min(sizes)}-{max(sizes)}" if min(sizes) < max(sizes) else str(sizes[0])
        return (f"{self.configurations} configurations in {len(self.trials)} trials ({len(sizes)} "
                f"bundle{'s' if len(sizes) > 1 else ''} of {said})")

    def brief(self, slots: Sequence[int] | None = None) -> str:
        """One line: the count, the total and the wall times (the comparison line of a dry run)."""
        slots = self.slots if slots is None else slots
        word = "trial" if self.on_cpu else "GPU"
        walls = ", ".join(f"{n} {word}{'s' if n > 1 else ''}{' at a time' if self.on_cpu else ''} "
                          f"{_wall(self.wall_hours(n))}" for n in slots)
        return f"{self.count()}, {self.hours:.3g} {self.unit}; wall time: {walls}"

    def wall_hours(self, slots: int) -> float:
        """Wall time with `slots` trials at a time (GPUs, or CPU trial slots; greedy longest-first packing)."""
        if slots < 1:
            raise ValueError("slots must be >= 1")
        loads = [0.0] * slots
        for seconds in sorted((t.seconds for t in self.trials), reverse=True):
            loads[loads.index(min(loads))] += seconds
        return max(loads) / 3600.0

    def by_dataset(self) -> dict[str, float]:
        """`hours` per dataset."""
        scale = self.cores if self.on_cpu else 1.0
        hours: dict[str, float] = {}
        for t in self.trials:
            dataset = t.configs[0]["dataset"]  # a bundle's members share it
            hours[dataset] = hours.get(dataset, 0.0) + t.seconds / 3600.0 * scale
        return hours

    def by_method(self) -> dict[str, float]:
        """`hours` per method and protocol ("cocoop base2new"); a config without them is CoOp's few-shot trial."""
        scale = self.cores if self.on_cpu else 1.0
        hours: dict[str, float] = {}
        for t in self.trials:
            first = t.configs[0]  # a bundle's members share them
            key = f"{first.get('method') or 'coop'} {first.get('protocol') or 'fewshot'}"
            hours[key] = hours.get(key, 0.0) + t.seconds / 3600.0 * scale
        return hours

    def summary(self, slots: Sequence[int] | None = None) -> str:
        """A few lines for a --dry-run printout: the total and what it is for, wall times, datasets, assumptions."""
        slots = self.slots if slots is None else slots
        said = f"; {self.resources}" if self.resources else ""
        if self.on_cpu:
            head = (f"cost model: {self.count()}, {self.hours:.3g} CPU core-hours ({self.cores:g} core(s) "
                    f"per trial{said}) at the rate measured on {self.device.name}")
            walls = [f"{n} trial{'s' if n > 1 else ''} at a time {_wall(self.wall_hours(n))}" for n in slots]
        else:
            head = f"cost model: {self.count()}, {self.hours:.3g} GPU-hours on {self.device.name} (one GPU per trial{said})"
            walls = [f"{n} GPU{'s' if n > 1 else ''} {_wall(self.wall_hours(n))}" for n in slots]
        lines = [head, "  wall time: " + ", ".join(walls)]
        by_dataset = sorted(self.by_dataset().items(), key=lambda kv: -kv[1])
        width = max((len(d) for d, _ in by_dataset), default=0)
        short = "core-h" if self.on_cpu else "GPU-h"
        lines += [f"  {dataset:<{width}} {hours:9.3g} {short}" for dataset, hours in by_dataset]
        by_method = self.by_method()
        if set(by_method) != {"coop fewshot"}:
            width = max(len(k) for k in by_method)
            lines += [f"  {key:<{width}} {hours:9.3g} {short}" for key, hours in sorted(by_method.items())]
        lines += [f"  assumption: {a}" for a in self.assumptions]
        return "\n".join(lines)


def _wall(hours: float) -> str:
    """'3.2 h', '14 min', '< 1 min'."""
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{hours * 60:.0f} min" if hours * 60 >= 1 else "< 1 min"


@dataclass(frozen=True)
class DatasetStats:
    """What a trial's cost needs to know of a dataset."""

    name: str
    classes: int
    max_name_tokens: int
    mean_name_tokens: float
    test_images: int | None  # None: unknown (not prepared, not in DATASET_TEST_IMAGES)


def _prepared_stats(splits_dir: str | Path | None, dataset: str) -> DatasetStats | None:
    """Classes, class-name tokens and test images from the prepare stage's test.json, if it exists."""
    if splits_dir is None:
        return None
    from pipeline.data.datasets import resolve_name

    info = resolve_name(dataset)
    path = Path(splits_dir) / (info.name if info else dataset) / "test.json"
    if not path.is_file():
        return None
    from pipeline.engine.backbone import count_tokens

    listed = json.loads(path.read_text(encoding="utf-8"))
    names = listed["classnames"]
    tokens = [count_tokens(str(n).replace("_", " ")) for n in names]
    return DatasetStats(dataset, len(names), max(tokens), sum(tokens) / len(tokens), len(listed.get("test", [])))


def dataset_stats(dataset: str, splits_dir: str | Path | None = None, classes: dict[str, int] | None = None,
                  test_images: dict[str, int] | None = None) -> DatasetStats:
    """The prepared test.json's figures, else CoOp's statistics (`classes` and `test_images` add or override
    class counts and test-set sizes) with assumed class-name lengths; ValueError when the class count is unknown."""
    found = _prepared_stats(splits_dir, dataset)
    if found is not None:
        return found
    table = {**DATASET_CLASSES, **(classes or {})}
    if dataset not in table:
        raise ValueError(
            f"no class count for dataset {dataset!r}: prepare it first (so test.json exists) or pass "
            f"classes={{{dataset!r}: N}}"
        )
    return DatasetStats(dataset, table[dataset], ASSUMED_MAX_NAME_TOKENS, ASSUMED_MEAN_NAME_TOKENS,
                        {**DATASET_TEST_IMAGES, **(test_images or {})}.get(dataset))


def validations(epochs: int, eval_every: int) -> int:
    """How often a trial evaluates on val: every `eval_every` epochs and after the last (0: only after the last)."""
    if eval_every <= 0:
        return 1
    return epochs // eval_every + (1 if epochs % eval_every else 0)


def forward_flops(step: StepFlops) -> float:
    """FLOPs of a text pass without its backward: step_flops counts a linear layer's backward as much as its
    forward and attention's as twice (slightly under for a shared prefix, whose last layer has no backward)."""
    return step.dense / 2 + step.attention / 3 + step.head / 2


@dataclass(frozen=True)
class _Device:
    """Seconds of one piece of text-tower work on the trial's device: its FLOPs with the per-step floor."""

    device: GPU | CPU
    cores: float
    precision: str

    @property
    def type(self) -> str:
        return "cpu" if isinstance(self.device, CPU) else "cuda"

    def seconds(self, flops: float, path: str) -> float:
        if isinstance(self.device, CPU):
            return self.device.step_seconds(flops, self.cores, self.precision)
        return self.device.step_seconds(flops, path, self.precision)


def _text_path(device_type: str, precision: str, n_classes: int, layout: PromptLayout, shared_prefix: bool | None,
               pack_tokens: bool | None) -> tuple[str, bool]:
    """The text path (shared | truncated) and packing the engine picks for `n_classes` prompts on the device."""
    from pipeline.engine.prompt import prefers_shared_prefix

    if shared_prefix is None:
        shared_prefix = prefers_shared_prefix(device_type, precision, n_classes, layout.prefix)
    path = "shared" if layout.prefix > 0 and shared_prefix else "truncated"
    packed = packs_tokens(n_classes, layout, path, precision, device_type) if pack_tokens is None else pack_tokens
    return path, packed


def cocoop_eval_seconds(dev: _Device, shape: TowerShape, n_classes: int, images: int, layout: PromptLayout, path: str,
                        packed: bool) -> float:
    """Seconds of CoCoOp classifying `images` images among `n_classes`: a forward pass over each image's own
    prompts, in chunks of about COCOOP_EVAL_PROMPTS prompts (CoCoOp.predict)."""
    if images <= 0:
        return 0.0
    per_image = forward_flops(step_flops(shape, n_classes, layout, path, 1, 0.0, packed and path != "official"))
    chunk = max(1, COCOOP_EVAL_PROMPTS // n_classes)
    full, rest = divmod(images, chunk)
    seconds = full * dev.seconds(chunk * per_image, path)
    return seconds + (dev.seconds(rest * per_image, path) if rest else 0.0)


def estimate_trial(
    config: dict[str, Any],
    arch: str,
    device: GPU | CPU,
    batch: int = 32,
    path: str | None = None,
    splits_dir: str | Path | None = None,
    classes: dict[str, int] | None = None,
    shared_prefix: bool | None = None,
    pack_tokens: bool | None = None,
    online: bool = False,
    loader_workers: int = 0,
    cores: float = 1.0,
    transfer_targets: Sequence[str] = (),
    eval_every: int = 0,
    test_images: dict[str, int] | None = None,
) -> TrialEstimate:
    """Seconds of one trial configuration (keys as in the sweep: dataset, protocol, shots, method, n_ctx, csc,
    batch_size, ...) on one GPU, or on `cores` cores of a CPU (sweep.cpus_per_trial).

    `batch` (train.batch_size) applies where the config's batch_size is null or absent; a config without
    method or protocol is CoOp's few-shot trial. CoOp's steps run the text tower over the C class prompts
    once, whatever the batch; a CoCoOp step over images x C prompts (each image's context shifted by the
    meta-network; the shared prefix once per image), so an epoch encodes N_train x C prompts at any batch
    size, in N_train / batch steps that each pay the per-step floor (CoCoOp runs eagerly, not as a CUDA graph;
    the floors fitted to our graphed steps are reused). KgCoOp adds one frozen forward of its hand-crafted
    prompts (77 tokens, as CLIP's encode_text) and otherwise costs CoOp's. A base2new trial trains on the
    ceil(C/2) base classes and their images and tests on the base and the new classes; an xd trial also
    tests on each of `transfer_targets` but its own dataset (`classes` and `test_images`: figures of datasets
    not prepared, as `dataset_stats`). Evaluating a context costs one pass over the
    class prompts (CoOp's and KgCoOp's first test is in the per-trial overhead), a CoCoOp model a forward
    over every evaluated image's own prompts: each val evaluation (`eval_every`, train.eval_every) and test.

    `online` (features.views: online): our paths also encode every step's training images (a fresh crop
    of each image every epoch) with the image encoder, at the official path's utilisation, and a step
    takes at least the CPU time of decoding its images on `loader_workers` processes (0: in the trial's
    own process, before the GPU work).

    `path` None picks what our engine runs on the device: the shared-prefix path for unified contexts where
    `shared_prefix` (train.shared_prefix) allows it (None: where the engine's own rule prefers it),
    the truncated path otherwise. `pack_tokens` (train.pack_tokens) likewise: None follows the engine's
    rule for running only each prompt's real tokens.

    A bundle ({"bundle": [configurations]}, pipeline.sweep.plan.form_bundles) costs its shared steps at the
    bundled step's time, its members' other evaluations and the per-trial overhead once (`_estimate_bundle`).
    """
    from pipeline.engine.backbone import count_tokens
    from pipeline.engine.train import default_epochs
    from pipeline.sweep.plan import BUNDLE

    if BUNDLE in config:
        def alone(member: dict[str, Any]) -> TrialEstimate:
            return estimate_trial(member, arch, device, batch, path, splits_dir, classes, shared_prefix, pack_tokens,
                                  online, loader_workers, cores, transfer_targets, eval_every, test_images)

        return _estimate_bundle(config, alone, arch, device, batch, path, shared_prefix, pack_tokens, online, cores)

    dataset, shots = str(config["dataset"]), int(config["shots"])
    method = str(config.get("method") or "coop")
    protocol = str(config.get("protocol") or "fewshot")
    batch = int(config.get("batch_size") or batch)
    stats = dataset_stats(dataset, splits_dir, classes, test_images)
    # base2new: the first ceil(C/2) classes are base (data.protocols.base_new_labels), the rest new.
    n_classes = math.ceil(stats.classes / 2) if protocol == BASE2NEW else stats.classes
    n_train = shots * n_classes
    init = str(config.get("ctx_init") or "").strip()
    n_ctx = count_tokens(init) if init else int(config.get("n_ctx", 16))
    csc = bool(config.get("csc", False))
    position = str(config.get("class_token_position", "end"))

    def layout_of(data: DatasetStats) -> PromptLayout:
        return prompt_layout(n_ctx, data.max_name_tokens, csc, position, data.mean_name_tokens)

    layout = layout_of(stats)
    device_type = "cpu" if isinstance(device, CPU) else "cuda"
    precision = _precision(config, device)
    dev = _Device(device, cores, precision)
    if path is None:
        path, packed = _text_path(device_type, precision, n_classes, layout, shared_prefix, pack_tokens)
    else:
        packed = packs_tokens(n_classes, layout, path, precision, device_type) if pack_tokens is None else pack_tokens
    epochs = int(config.get("epochs") or default_epochs(dataset, shots))
    steps = epochs * steps_per_epoch(n_train, batch)
    shape = tower_shape(arch)
    image = image_encoder_gflops(arch) if path == "official" else 0.0
    if method == COCOOP:
        # Each of the step's images runs its own C prompts (and, officially, its own image encoding).
        step_images = min(batch, max(n_train, 1))
        flops = step_images * step_flops(shape, n_classes, layout, path, 1, image, packed and path != "official").total
    else:
        flops = step_flops(shape, n_classes, layout, path, batch, image, packed and path != "official").total
    step_seconds = dev.seconds(flops, path)
    if online and path != "official":
        # The engine encodes the crops in a forward of its own (train.image_dtype: the trial's precision).
        images = min(batch, n_train)
        image_flops = images * image_encoder_gflops(arch) * 1e9
        if isinstance(device, CPU):
            step_seconds += image_flops / device.rate(device.image_gflops_per_core, cores, precision)
        else:
            step_seconds += online_image_seconds(device, image_flops, precision)
        decode_seconds = images * DECODE_SECONDS_PER_IMAGE
        if loader_workers > 0:
            step_seconds = max(step_seconds, decode_seconds / loader_workers)  # workers decode ahead
        else:
            step_seconds += decode_seconds
        flops += image_flops

    # Evaluations, each (images, classes, dataset): val (every eval_every epochs and after the last) and test,
    # which a context's trial overhead covers (one pass over C prompts), then base2new's new classes and xd's
    # targets; CoCoOp pays for every one by its images.
    base_test = stats.test_images
    if protocol == BASE2NEW and stats.test_images is not None:
        base_test = round(stats.test_images * n_classes / stats.classes)  # the base classes' share of the images
    usual = [(min(shots, MAX_VAL_SHOTS) * n_classes, n_classes, stats)] * validations(epochs, eval_every)
    usual.append((base_test, n_classes, stats))
    extra: list[tuple[int | None, int, DatasetStats]] = []
    if protocol == BASE2NEW:
        extra.append((None if base_test is None else stats.test_images - base_test, stats.classes - n_classes, stats))
    if protocol == XD:
        extra += [(t.test_images, t.classes, t) for t in (dataset_stats(name, splits_dir, classes, test_images)
                                                          for name in transfer_targets if name != dataset)]
    pass_seconds = 0.0
    for images, n_eval, data in (usual + extra if method == COCOOP else extra):
        eval_layout = layout_of(data)
        eval_path, eval_packed = (path, packed) if path == "official" else _text_path(
            device_type, precision, n_eval, eval_layout, shared_prefix, pack_tokens)
        if method != COCOOP:
            pass_flops = forward_flops(step_flops(shape, n_eval, eval_layout, eval_path, 0, 0.0, eval_packed))
            pass_seconds += dev.seconds(pass_flops, eval_path)
        elif images is None:
            raise ValueError(f"no test-set size for dataset {data.name!r}: a CoCoOp trial's evaluation encodes "
                             "every test image's own prompts; prepare the dataset first (so test.json exists)")
        else:
            pass_seconds += cocoop_eval_seconds(dev, shape, n_eval, images, eval_layout, eval_path, eval_packed)
    if method == KGCOOP:
        # The frozen CLIP's features of the hand-crafted prompts "a photo of a {class}." (77 tokens), once.
        anchors = step_flops(shape, n_classes, prompt_layout(0, stats.max_name_tokens, True, "end"), "official", 0)
        pass_seconds += dev.seconds(forward_flops(anchors), path)
    seconds = steps * step_seconds + pass_seconds + device.trial_overhead_s
    return TrialEstimate(dict(config), n_classes, steps, layout, path, flops, seconds, pass_seconds)


def _precision(config: dict[str, Any], device: GPU | CPU) -> str:
    """The configuration's precision (null: fp32 on a CPU, fp16 on a GPU)."""
    return str(config.get("precision") or ("fp32" if isinstance(device, CPU) else "fp16"))


def _estimate_bundle(config: dict[str, Any], alone: Callable[[dict[str, Any]], TrialEstimate], arch: str,
                     device: GPU | CPU, batch: int, path: str | None, shared_prefix: bool | None,
                     pack_tokens: bool | None, online: bool, cores: float) -> TrialEstimate:
    """A bundle's time: its steps x the bundled step, each member's evaluations beyond val/test as alone, the
    device's per-trial overhead once and BUNDLE_MEMBER_OVERHEAD_S for each further member.

    The bundled step runs the passes pipeline.engine.bundle.BundleStep plans (`pass_groups`). A pass costs
    the FLOPs of its members' steps, padded to its longest prompt (packed by the engine's rule on the whole pass), at the rate fitted to
    one configuration's step, with the per-step floor once per pass on a GPU and once per member on a CPU.
    """
    from pipeline.engine.bundle import pass_groups
    from pipeline.engine.prompt import prefers_packing
    from pipeline.sweep.plan import BUNDLE

    configs = list(config[BUNDLE])
    if not configs:
        raise ValueError(f"an empty bundle: {BUNDLE!r} must list at least one configuration")
    if path == "official":
        raise ValueError("the official CoOp code trains one configuration at a time: cost a bundle's members alone")
    for i, member in enumerate(configs):
        if str(member.get("method") or COOP) != COOP or online:
            raise ValueError(f"bundle member {i} trains {member.get('method') or COOP!r}"
                             f"{' on online crops' if online else ''}: bundles train CoOp on cached features only "
                             "(pipeline.sweep.plan.form_bundles leaves the others alone)")
    members = [alone(member) for member in configs]
    first = members[0]
    precision = _precision(first.config, device)
    for i, m in enumerate(members[1:], start=1):
        if (m.n_classes, m.steps, _precision(m.config, device)) != (first.n_classes, first.steps, precision):
            raise ValueError(f"bundle member {i} has {m.n_classes} classes, {m.steps} steps, "
                             f"{_precision(m.config, device)}; member 0 {first.n_classes}, {first.steps}, {precision}: "
                             "bundle members share the class list, steps and precision")
    n_cls = first.n_classes
    device_type = "cpu" if isinstance(device, CPU) else "cuda"
    # The passes the engine's BundleStep plans, with train.shared_prefix (and a forced `path`) for every member.
    force = False if path == "truncated" or shared_prefix is False else (path == "shared" or shared_prefix or None)
    groups = [("shared" if prefix_len else "truncated", [members[i] for i in positions])
              for positions, prefix_len in pass_groups([m.layout.prefix for m in members], [force] * len(members),
                                                       n_cls, device_type, precision)]
    shape = tower_shape(arch)
    dev = _Device(device, cores, precision)
    flops, step_seconds = 0.0, 0.0
    for pass_path, group in groups:
        skipped = group[0].layout.prefix if pass_path == "shared" else 0
        length = max(m.layout.length for m in group)  # the pass pads every prompt to its longest
        padded = len(group) * n_cls * (length - skipped)
        real = round(sum(n_cls * (m.layout.real_length - skipped) for m in group))
        packed = pack_tokens is not False and prefers_packing(device_type, precision, padded, real)
        pass_flops = sum(step_flops(shape, n_cls, PromptLayout(length, m.layout.prefix, m.layout.real_length),
                                    pass_path, int(m.config.get("batch_size") or batch), 0.0, packed).total
                         for m in group)
        flops += pass_flops
        # The floor: once per pass on a GPU (the pass's kernels, one CUDA graph); per member on a CPU, where it is
        # mostly each member's own loss, backward and update dispatch (bundled CPU steps ran 1.0-1.3x the members
        # one at a time, BENCHMARKS.md): n floors with the pass's compute = n steps of its mean FLOPs.
        floors = len(group) if device_type == "cpu" else 1
        step_seconds += floors * dev.seconds(pass_flops / floors, pass_path)
    pass_seconds = sum(m.pass_seconds for m in members)
    seconds = (first.steps * step_seconds + pass_seconds + device.trial_overhead_s
               + (len(members) - 1) * BUNDLE_MEMBER_OVERHEAD_S)
    paths = "+".join(sorted({p for p, _ in groups}))
    return TrialEstimate(dict(config), n_cls, first.steps, first.layout, paths, flops, seconds, pass_seconds,
                         tuple(members), len(groups))


def online_image_seconds(gpu: GPU, image_flops: float, precision: str = "fp16") -> float:
    """Seconds of one online step's image forward: the precision's peak at the official step's utilisation."""
    peak = gpu.peak_tflops_fp32 if precision == "fp32" else gpu.peak_tflops
    return image_flops / (peak * 1e12 * gpu.utilisation["official"])


def _online_assumption(device: GPU | CPU, arch: str, batch: int, workers: int) -> str:
    where = f"{workers} loader worker(s) per trial" if workers else "the trial's own process (0 loader workers)"
    rate = (f"at {device.image_gflops_per_core:g} GFLOP/s per core" if isinstance(device, CPU)
            else f"at {device.utilisation['official']:.0%} of its peak")
    return (
        f"features.views = online: every step also encodes its {batch} freshly cropped training images with the "
        f"{arch} image encoder ({image_encoder_gflops(arch):.1f} GFLOPs each; every training image once per epoch) "
        f"in the trial's precision {rate}, after decoding and cropping them "
        f"({DECODE_SECONDS_PER_IMAGE * 1e3:g} ms of CPU per image) on {where} (features.online_workers, "
        "default sweep.cpus_per_trial - 1)"
    )


def _assumptions(device: GPU | CPU, splits_dir: str | Path | None) -> list[str]:
    if isinstance(device, CPU):
        own = [
            f"{device.name}: {device.text_gflops_per_core:g} GFLOP/s per core on CoOp's text path and "
            f"{device.image_gflops_per_core:g} on the image encoder in fp32 (bf16 {device.bf16_slowdown:g}x slower: "
            "emulated there), proportional to the trial's cores (its torch threads); another CPU differs "
            "(bench/step.py measures one)",
            f"per-step floor {device.step_floor_s * 1e3:g} ms, {device.trial_overhead_s:g} s per trial besides its "
            "steps; Ray's start-up (10-15 s, bench/sweep.py) is not included",
        ]
    else:
        own = [
            f"{device.name}: {device.peak_tflops:g} TFLOP/s fp16/bf16 dense peak ({device.peak_tflops_fp32:g} fp32), "
            "utilisation " + ", ".join(f"{v:.0%} ({k})" for k, v in device.utilisation.items()),
            "per-step floor " + ", ".join(f"{v * 1e3:g} ms ({k})" for k, v in device.launch_s.items())
            + f" (CUDA-graphed ours, eager official), {device.trial_overhead_s:g} s per trial",
        ]
    return own + [
        "class counts and name lengths from "
        + (f"{splits_dir}/<dataset>/test.json where prepared, else " if splits_dir else "")
        + f"CoOp's dataset statistics with class names of {ASSUMED_MEAN_NAME_TOKENS:g} tokens on average, "
        f"{ASSUMED_MAX_NAME_TOKENS} at most",
        "packed steps (only real tokens) reach the rate fitted on padded ones",
        "feature caching (the features stage: one pass over the images, views x train + test) is not included",
    ]


def _estimate(params: Params, trials: Iterable[dict[str, Any]] | None, device: GPU | CPU, path: str | None,
              cores: float = 1.0) -> GridEstimate:
    """Every trial of `trials` (None: the params' grid or first num_samples) on `device` (`cores` per CPU trial)."""
    from pipeline.sweep.cluster import online_workers
    from pipeline.sweep.plan import BUNDLE, members_of

    if trials is None:
        from pipeline.sweep.space import build_space

        configs = build_space(params).enumerate()
        if params.sweep.search != "grid":
            configs = configs[: params.sweep.num_samples]
    else:
        configs = list(trials)
    members = [m for c in configs for m in members_of(c)]
    if path == "official":  # the official code trains one configuration at a time
        configs = members
    splits_dir = params.data.splits_dir
    online = params.features.views == ONLINE_VIEWS and path != "official"
    workers = online_workers(params)
    targets = transfer_targets(params) if any(c.get("protocol") == XD for c in members) else []
    estimates = [
        estimate_trial(c, params.backbone.arch, device, params.train.batch_size, path, splits_dir,
                       shared_prefix=params.train.shared_prefix, pack_tokens=params.train.pack_tokens, online=online,
                       loader_workers=workers, cores=cores, transfer_targets=targets,
                       eval_every=params.train.eval_every)
        for c in configs
    ]
    assumptions = _assumptions(device, splits_dir) + _method_assumptions(members)
    if any(BUNDLE in c for c in configs):
        assumptions.append(_bundle_assumption(device))
    if online:
        assumptions.insert(0, _online_assumption(device, params.backbone.arch, params.train.batch_size, workers))
    return GridEstimate(device, estimates, assumptions, cores=cores)


def _bundle_assumption(device: GPU | CPU) -> str:
    from pipeline.engine.bundle import CPU_MAX_PASS_PROMPTS

    where = ("" if isinstance(device, CPU) else
             "; NOT MEASURED on a GPU: the bundled figures are the model's (bench/bundle.py --device cuda times them)")
    return (
        "bundles (sweep.bundle_size, pipeline/engine/bundle.py): a bundled step runs its members' class prompts in "
        "one batched text pass per group (members sharing a prefix length, where the shared-prefix rule picks it; "
        "the rest one truncated pass; on CPUs passes of at most "
        f"{CPU_MAX_PASS_PROMPTS} prompts), each pass as efficient as one "
        "configuration's step of as many prompts; the per-step floor once per pass on a GPU (its CUDA graph), "
        "once per member on CPUs (mostly each member's own loss, backward and update dispatch: bundled CPU steps "
        "measured 1.0-1.3x the members one at a time, BENCHMARKS.md); on a GPU "
        "the members' own losses and SGD updates (eager, after the graph) add their FLOPs only; a bundle pays the per-trial overhead once and "
        f"{BUNDLE_MEMBER_OVERHEAD_S:g} s for each further member (its MLflow run, artifacts and evaluations)" + where
    )


def sweep_trials(params: Params, configs: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The Ray trials a sweep forms from `configs` (None: the params' grid, or its first num_samples
    configurations): bundles by sweep.bundle_size as pipeline.sweep.tuner.plan_trials forms them (none for
    optuna), with class counts (base2new: the base half) and training-set sizes (shots x classes) from
    `dataset_stats` rather than the feature caches, so nothing is loaded."""
    from pipeline.sweep.plan import bundle_rule, sweep_bundles

    if configs is None:
        from pipeline.sweep.space import build_space

        configs = build_space(params).enumerate()
        if params.sweep.search != "grid":
            configs = configs[: params.sweep.num_samples]
    stats: dict[str, DatasetStats] = {}

    def n_classes(config: dict[str, Any]) -> int:
        dataset = config["dataset"]
        if dataset not in stats:
            stats[dataset] = dataset_stats(dataset, params.data.splits_dir)
        total = stats[dataset].classes
        return math.ceil(total / 2) if config.get("protocol") == BASE2NEW else total

    rule = bundle_rule(params, n_classes, lambda c: int(c["shots"]) * n_classes(c))
    return sweep_bundles(params.sweep.search, configs, rule)


def transfer_targets(params: Params) -> list[str]:
    """The datasets an xd trial is tested on besides its own: transfer.targets, else every trainable dataset of
    data.datasets (as pipeline.sweep.inputs chooses them; test-only ones by test.json or the registry)."""
    from pipeline.data.fewshot import is_test_only

    if params.transfer.targets is not None:
        return list(params.transfer.targets)
    return [d for d in params.data.datasets if not is_test_only(params.data.splits_dir, d)]


def _method_assumptions(configs: Sequence[dict[str, Any]]) -> list[str]:
    """What the estimate assumes of the methods and protocols the trials use."""
    methods = {c.get("method") for c in configs}
    protocols = {c.get("protocol") for c in configs}
    said = []
    if COCOOP in methods:
        said.append(
            "CoCoOp: a step encodes batch images x classes prompts (one prompt set per image, its shared prefix "
            "once per image; N_train x C prompts per epoch at any batch size), eagerly but at the per-step floor "
            "fitted to CoOp's graphed steps; every val and test evaluation encodes each image's own prompts in "
            f"chunks of {COCOOP_EVAL_PROMPTS} prompts (test-set sizes from test.json, else CoOp's statistics); "
            "the meta-network's FLOPs are left out (under 0.1% of a step)")
    if KGCOOP in methods:
        said.append("KgCoOp: CoOp's steps plus one frozen 77-token forward over its hand-crafted class prompts")
    if BASE2NEW in protocols:
        said.append("base2new: trained on the ceil(C/2) base classes and their images; tested on the base and the "
                    "new classes, each with its share of the test images")
    if XD in protocols:
        said.append("xd: also tested on each transfer target's test set with its classes")
    return said


def estimate_gpu_hours(
    params: Params,
    trials: Iterable[dict[str, Any]] | None = None,
    gpu: str | GPU = "H100",
    path: str | None = None,
) -> GridEstimate:
    """GPU-hours of a sweep: each trial config (the sweep's canonical dicts, or bundles of them: `sweep_trials`) on
    one `gpu`.

    `trials` None enumerates params' grid (or the first sweep.num_samples configurations of a random or
    Optuna search). `path` None models our engine (with features.views: online, its image encoding
    too); "official" models the official CoOp code on the same trials. Call `.summary()` for a printout,
    `.gpu_hours` / `.wall_hours(n)` for numbers.
    """
    return _estimate(params, trials, GPUS[gpu] if isinstance(gpu, str) else gpu, path)


def estimate_cpu_hours(params: Params, trials: Iterable[dict[str, Any]] | None = None, cpu: CPU = DEV_CPU,
                       path: str | None = None) -> GridEstimate:
    """CPU core-hours of a sweep whose trials run on sweep.cpus_per_trial cores each, at `cpu`'s measured rate
    (arguments as `estimate_gpu_hours`; `.hours` in core-hours)."""
    return _estimate(params, trials, cpu, path, cores=params.sweep.cpus_per_trial)


def estimate_sweep(params: Params, trials: Iterable[dict[str, Any]] | None = None, gpu: str | GPU | None = None,
                   path: str | None = None) -> GridEstimate:
    """The cost of a sweep on the resources its params ask for, saying which: GPU-hours on an assumed `gpu`
    (default H100) when sweep.gpus_per_trial > 0, else CPU core-hours at sweep.cpus_per_trial cores per trial.
    A `gpu` given for a CPU sweep costs it on that GPU instead (and says the params ask for CPUs)."""
    sweep = params.sweep
    if sweep.gpus_per_trial > 0 or gpu is not None:
        estimate = estimate_gpu_hours(params, trials, gpu or "H100", path)
        if sweep.gpus_per_trial == 0:
            estimate.resources = "the params ask for CPU trials (sweep.gpus_per_trial = 0)"
        elif sweep.gpus_per_trial < 1:
            estimate.resources = (f"sweep.gpus_per_trial = {sweep.gpus_per_trial:g}: trials share a GPU, each costed as "
                                  "if it had one")
        else:
            estimate.resources = f"sweep.gpus_per_trial = {sweep.gpus_per_trial:g}"
        estimate.slots = tuple(sorted({1, sweep.max_concurrent, 8, 32}))
        return estimate
    estimate = estimate_cpu_hours(params, trials, path=path)
    estimate.resources = f"as the params ask: sweep.gpus_per_trial = 0, sweep.cpus_per_trial = {sweep.cpus_per_trial:g}"
    estimate.slots = tuple(sorted({1, sweep.max_concurrent}))
    return estimate


def imagenet_16shot_estimate(gpu: str | GPU = "H100", arch: str = "RN50") -> dict[str, Any]:
    """Cost of one 16-shot ImageNet CoOp trial (1000 classes, 50 epochs, M=16, end, unified), ours vs official.

    Returns hours on `gpu` for our shared-prefix path, our truncated path and the official 77-token path
    (with its per-step image encoding), and their FLOPs per step.
    """
    spec = GPUS[gpu] if isinstance(gpu, str) else gpu
    config = {"dataset": "ImageNet", "shots": 16, "seed": 1, "n_ctx": 16, "ctx_init": "", "csc": False,
              "class_token_position": "end", "epochs": 50, "precision": "fp16"}
    names = _imagenet_name_tokens()
    result: dict[str, Any] = {"gpu": spec.name, "arch": arch, "classes": 1000, "epochs": 50, "batch": 32,
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
        result["paths"][path] = {"tflops_per_step": estimate.flops_per_step / 1e12, "hours": estimate.gpu_hours,
                                 "tokens_per_prompt": OFFICIAL_TOKENS if path == "official" else estimate.layout.length,
                                 "mean_tokens_per_prompt": OFFICIAL_TOKENS if path == "official"
                                 else estimate.layout.real_length}
    result["speedup_vs_official"] = result["paths"]["official"]["hours"] / result["paths"]["shared"]["hours"]
    return result


def _imagenet_name_tokens() -> tuple[int, float] | None:
    """(longest, mean) ImageNet class name in CLIP tokens, from open_clip's class list."""
    try:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        from pipeline.engine.backbone import count_tokens
    except ImportError:
        return None
    tokens = [count_tokens(n) for n in IMAGENET_CLASSNAMES]
    return max(tokens), sum(tokens) / len(tokens)
