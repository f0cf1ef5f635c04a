"""Build the bundled demo dataset data/demo/fashion_mnist from Debian's Fashion-MNIST package (one-off).

The demo lets the whole pipeline (prepare -> features -> sweep) run on real images without downloading
anything: 10 classes x (32 train + 8 val + 20 test) 28x28 grayscale PNGs in the CoOp split-file layout,
read by `pipeline.data.datasets` as dataset ``FashionMNIST`` (folder ``fashion_mnist``) under data root
``data/demo``. Fashion-MNIST is (c) 2017 Zalando SE, MIT licence.

Usage (the generated files are committed; rerun only to change the subset):

    apt-get install -y dataset-fashion-mnist     # idx files in /usr/share/datasets/fashion-mnist
    python data/demo/make_demo.py [--source DIR] [--out data/demo/fashion_mnist]

The subset is drawn with a fixed seed, so rerunning reproduces the same files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import random
import shutil
import struct
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("make_demo")

CLASSNAMES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
N_TRAIN, N_VAL, N_TEST = 32, 8, 20
SEED = 0
LICENSE = """Fashion-MNIST subset (600 images) from https://github.com/zalandoresearch/fashion-mnist,
taken from Debian's dataset-fashion-mnist package.

The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction, including
without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the
following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial
portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT
LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO
EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER
IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE
USE OR OTHER DEALINGS IN THE SOFTWARE.
"""
README = f"""# Fashion-MNIST demo dataset

A class-balanced subset of Fashion-MNIST (MIT licence, see LICENSE) in the CoOp split-file layout:
`images/<class folder>/<source>_<index>.png` (28x28 grayscale) and `split_zhou_FashionMNIST.json`
(`{{"train"|"val"|"test": [[path relative to images/, label, class name], ...]}}`).

Per class: {N_TRAIN} train + {N_VAL} val images (from the Fashion-MNIST training set) and {N_TEST} test
images (from its test set). Classes (label order): {", ".join(CLASSNAMES)}.

Data root `data/demo`, dataset name `FashionMNIST` (or `fashion_mnist`). Built by `data/demo/make_demo.py`.
"""


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte(.gz) file (the MNIST format) as a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    _, dtype, ndim = struct.unpack(">HBB", data[:4])
    if dtype != 0x08:
        raise ValueError(f"{path}: expected unsigned byte data (0x08), got {dtype:#x}.")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def folder_name(classname: str) -> str:
    return classname.replace(" ", "_")


def build(source: Path, out: Path) -> None:
    required = [
        f"{p}-{k}-idx{n}-ubyte.gz" for p in ("train", "t10k") for k, n in (("images", 3), ("labels", 1))
    ]
    missing = [name for name in required if not (source / name).is_file()]
    if missing:
        raise SystemExit(
            f"{source} lacks {missing}; install Debian's package with `apt-get install -y dataset-fashion-mnist` "
            "or pass --source pointing at the Fashion-MNIST idx .gz files."
        )
    rng = random.Random(SEED)
    if out.exists():
        shutil.rmtree(out)
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for prefix, counts in (("train", {"train": N_TRAIN, "val": N_VAL}), ("t10k", {"test": N_TEST})):
        images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
        for label, classname in enumerate(CLASSNAMES):
            candidates = np.flatnonzero(labels == label).tolist()
            chosen = rng.sample(candidates, sum(counts.values()))
            start = 0
            for name, count in counts.items():
                for index in sorted(chosen[start : start + count]):
                    rel = f"{folder_name(classname)}/{prefix}_{index:05d}.png"
                    path = out / "images" / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(images[index], mode="L").save(path, optimize=True)
                    split[name].append([rel, label, classname])
                start += count
    (out / "split_zhou_FashionMNIST.json").write_text(json.dumps(split, indent=1) + "\n", encoding="utf-8")
    (out / "LICENSE").write_text(LICENSE, encoding="utf-8")
    (out / "README.md").write_text(README, encoding="utf-8")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info("wrote %s: %s images, %.0f KiB", out, {k: len(v) for k, v in split.items()}, size / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=Path("/usr/share/datasets/fashion-mnist"),
        help="folder with the Fashion-MNIST idx .gz files (default: Debian's install location)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "fashion_mnist",
        help="dataset folder to (re)create (default: data/demo/fashion_mnist beside this script)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(args.source, args.out)


if __name__ == "__main__":
    main()
