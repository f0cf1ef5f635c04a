"""CoOp training-step benchmark: the official-style step against ours, measured side by side in one run.

Official-style step (as the CoOp code trains): encode the batch's images with the image encoder, run all
77 tokens of every class prompt through the text transformer, backward to the context. Ours: cached image
features, truncated / shared-prefix text path. Also: cost against the number of classes, achieved FLOP/s
of our text path against this machine's measured matrix-product peak, and feature-extraction throughput.

    python bench/step.py                    # CPU, RN50 text tower, 100 classes, 16 context words, batch 32
    python bench/step.py --device cuda      # the same on a GPU (official in fp16, as CoOp trains)
    python bench/step.py --quick            # fewer repeats and configurations, for a smoke run

Absolute times on a shared machine drift; the ratios are measured in the same run, interleaved.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.engine.backbone import Backbone, load_backbone  # noqa: E402
from pipeline.engine.prompt import PromptConfig, native_cpu_bf16  # noqa: E402
from pipeline.engine.reference import official_train_step  # noqa: E402
from pipeline.engine.train import TrainConfig, TrainStep, build_model  # noqa: E402

log = logging.getLogger("bench.step")

# CIFAR-100's class names: real words of realistic token lengths.
CLASSNAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard "
    "lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear "
    "pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal "
    "shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank "
    "telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()


def classnames(n: int) -> list[str]:
    """n distinct class names: CIFAR-100's, then numbered variants of them."""
    return [CLASSNAMES[i % 100] + (f" type {i // 100}" if i >= 100 else "") for i in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def our_step(bb: Backbone, names: list[str], batch: int, n_ctx: int, csc: bool, position: str,
             precision: str, graph: bool = False) -> tuple[Callable[[], None], Callable[[], None]]:
    """(training step on cached features, text path alone) for our CoOp model, optionally CUDA-graphed."""
    cfg = TrainConfig(precision=precision, cuda_graph=graph)
    model = build_model(bb, names, PromptConfig(n_ctx, "", csc, position), cfg)
    train_step = TrainStep(model, cfg)
    features = F.normalize(torch.randn(batch, bb.embed_dim, device=bb.device), dim=-1)
    labels = torch.randint(len(names), (batch,), device=bb.device)

    def step() -> None:
        train_step(features, labels)

    def text_only() -> None:
        model.text_features().sum().backward()
        model.prompt_learner.ctx.grad = None

    return step, text_only


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of a large square matrix product on this device."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / timed(lambda: a @ b, device, repeats)


def feature_throughput(bb: Backbone, n_images: int, tmp: Path) -> dict:
    """Images/s of the features stage's cache update against a plain open_clip preprocess+encode loop."""
    import numpy as np
    from PIL import Image

    from pipeline.data.images import build_transforms
    from pipeline.features.cache import FeatureConfig, update_feature_cache

    root = tmp / "images"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)).save(root / f"{i}.jpg")
        paths.append(f"images/{i}.jpg")
    _, test_transform = build_transforms(bb.image_size, bb.mean, bb.std)
    plain_model = open_clip.create_model(bb.arch, device=bb.device).eval()  # as open_clip builds it

    @torch.no_grad()
    def plain() -> None:
        for start in range(0, n_images, 64):
            batch = torch.stack([test_transform(Image.open(tmp / p).convert("RGB")) for p in paths[start:start + 64]])
            plain_model.encode_image(batch.to(bb.device))

    config = FeatureConfig.from_backbone(bb, views=1, dtype="fp16")
    run = [0]

    def stage() -> None:
        run[0] += 1
        update_feature_cache(tmp / f"cache{run[0]}", tmp, set(), set(paths), bb, config, 64, 0, False)

    t_plain = timed(plain, bb.device, 1)
    t_stage = timed(stage, bb.device, 1)
    return {"images": n_images, "plain_img_s": n_images / t_plain, "stage_img_s": n_images / t_stage}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    parser.add_argument("--arch", default="RN50", help="open_clip architecture; random weights cost the same")
    parser.add_argument("--classes", type=int, default=100, help="classes in the main comparison (default 100)")
    parser.add_argument("--n-ctx", type=int, default=16, help="context words M (default 16)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement; median reported")
    parser.add_argument("--scaling", default="10,100,1000", help="class counts for the scaling table")
    parser.add_argument("--feature-images", type=int, default=128, help="images for the feature throughput test")
    parser.add_argument("--quick", action="store_true", help="end position only, 1 repeat: a smoke run")
    parser.add_argument("--out", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(message)s")  # quiets open_clip's random-weights notice
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    repeats = 1 if args.quick else args.repeats
    bb = load_backbone(args.arch, None, device)
    on_gpu = device.type == "cuda"
    precisions = ["fp32", "bf16"] + (["fp16"] if on_gpu else [])
    if not on_gpu and not native_cpu_bf16():
        log.info("This CPU (%s) has no native bf16: bf16 is emulated, so only fp32 is measured.",
                 torch.backends.cpu.get_cpu_capability())
        precisions = ["fp32"]
    official_dtype = torch.float16 if on_gpu else torch.float32  # the official trainer runs CLIP in fp16 on GPUs
    results: dict = {"device": str(torch.cuda.get_device_name() if on_gpu else torch.backends.cpu.get_cpu_capability()),
                     "threads": torch.get_num_threads(), "arch": args.arch, "steps": [], "scaling": []}

    names = classnames(args.classes)
    positions = ["end"] if args.quick else ["end", "middle", "front"]
    log.info("\n== step: %s, %d classes, M=%d, batch %d, %s ==", args.arch, args.classes, args.n_ctx, args.batch,
             results["device"])
    log.info("%-8s %-8s %-6s %12s %12s %8s%s", "position", "context", "prec", "official ms", "ours ms", "ratio",
             f" {'graph ms':>12s} {'ratio':>8s}" if on_gpu else "")
    for position in positions:
        for csc in (False, True):
            official, _ = official_train_step(bb, names, args.n_ctx, csc, position, args.batch, official_dtype)
            for precision in precisions:
                ours, _ = our_step(bb, names, args.batch, args.n_ctx, csc, position, precision)
                t_official = timed(official, device, repeats)
                t_ours = timed(ours, device, repeats)
                row = {"position": position, "csc": csc, "precision": precision,
                       "official_ms": 1e3 * t_official, "ours_ms": 1e3 * t_ours, "ratio": t_official / t_ours}
                graph_cols = ""
                if on_gpu:
                    graphed, _ = our_step(bb, names, args.batch, args.n_ctx, csc, position, precision, graph=True)
                    t_graph = timed(graphed, device, repeats)
                    row.update(graph_ms=1e3 * t_graph, graph_ratio=t_official / t_graph)
                    graph_cols = f" {1e3 * t_graph:12.1f} {t_official / t_graph:7.1f}x"
                results["steps"].append(row)
                log.info("%-8s %-8s %-6s %12.1f %12.1f %7.1fx%s", position, "csc" if csc else "unified", precision,
                         row["official_ms"], row["ours_ms"], row["ratio"], graph_cols)

    log.info("\n== scaling with classes (end, unified, fp32%s) ==", ", ours CUDA-graphed" if on_gpu else "")
    log.info("%8s %12s %12s %8s", "classes", "official ms", "ours ms", "ratio")
    per_class_official = None
    for n in [int(c) for c in args.scaling.split(",")]:
        ours, _ = our_step(bb, classnames(n), args.batch, args.n_ctx, False, "end", "fp32", graph=on_gpu)
        t_ours = timed(ours, device, repeats)
        if n <= 100 or on_gpu:
            official, _ = official_train_step(bb, classnames(n), args.n_ctx, False, "end", args.batch,
                                              official_dtype)
            t_official = timed(official, device, repeats)
            per_class_official = t_official / n
            note = ""
        else:  # 77k tokens of activations do not fit 24 GiB of RAM: the official text cost is linear in classes
            t_official = per_class_official * n if per_class_official else float("nan")
            note = " (official extrapolated linearly from the previous row)"
        results["scaling"].append({"classes": n, "official_ms": 1e3 * t_official, "ours_ms": 1e3 * t_ours,
                                   "ratio": t_official / t_ours, "official_extrapolated": bool(note)})
        log.info("%8d %12.1f %12.1f %7.1fx%s", n, 1e3 * t_official, 1e3 * t_ours, t_official / t_ours, note)

    log.info("\n== achieved FLOP/s of our text path (%d classes, end, unified) ==", args.classes)
    peaks = {"fp32": matmul_peak(device, torch.float32)}
    if on_gpu or native_cpu_bf16():
        peaks["bf16"] = matmul_peak(device, torch.bfloat16)
    else:
        peaks["bf16 (emulated)"] = matmul_peak(device, torch.bfloat16, size=512, repeats=1)
    for name, peak in peaks.items():
        log.info("matrix-product peak %-16s %10.1f GFLOP/s", name, peak / 1e9)
    results["peaks_gflops"] = {k: v / 1e9 for k, v in peaks.items()}
    results["text_path"] = []
    for precision in [p for p in precisions if p in ("fp32", "bf16")]:
        _, text_only = our_step(bb, names, args.batch, args.n_ctx, False, "end", precision)
        if on_gpu:  # FLOPs are counted on the eager path; the graph replays the same kernels
            _, graphed = our_step(bb, names, args.batch, args.n_ctx, False, "end", precision, graph=True)
        flops = count_flops(text_only)
        seconds = timed(graphed if on_gpu else text_only, device, repeats)
        achieved = flops / seconds
        peak = peaks[precision]
        results["text_path"].append({"precision": precision, "gflop": flops / 1e9, "ms": 1e3 * seconds,
                                     "gflops": achieved / 1e9, "of_peak": achieved / peak})
        log.info("text path %-5s %8.2f GFLOP in %8.1f ms = %8.1f GFLOP/s = %5.1f%% of the %s peak", precision,
                 flops / 1e9, 1e3 * seconds, achieved / 1e9, 100 * achieved / peak, precision)

    if not args.quick and args.feature_images > 0:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            throughput = feature_throughput(bb, args.feature_images, Path(tmp))
        results["features"] = throughput
        log.info("\n== feature extraction, %d images, %s ==", throughput["images"], args.arch)
        log.info("plain open_clip loop %8.1f img/s; features stage %8.1f img/s (%.2fx)", throughput["plain_img_s"],
                 throughput["stage_img_s"], throughput["stage_img_s"] / throughput["plain_img_s"])
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
