"""The EMA warm-up on a short run (docs/method.md, EMA warm-up): the 8-Gaussian ring trained for
300 steps with the default MLP and EMA 0.999, once with ``train.ema_warmup`` (the default) and
once without; the energy distance of one-step samples from the EMA and from the raw weights
to fresh data.

    python experiments/ema_warmup.py [--out runs/ema_warmup] [--steps 300] [--n 4000]

Samples come from seeds 1 000 000 .. 1 000 000 + n − 1, the data points from seed 7.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import meanflow
from meanflow.data import build_dataset
from meanflow.metrics import energy_distance
from meanflow.runs import load_config
from meanflow.train import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/ema_warmup"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--n", type=int, default=4000)
    args = p.parse_args()
    real, _ = build_dataset("8gaussians").batch(args.n, torch.Generator().manual_seed(7))
    for warmup in (True, False):
        run = args.out / ("warmup" if warmup else "no-warmup")
        cfg = load_config(overrides=[
            "data.name=8gaussians", f"train.steps={args.steps}", "train.progress=false",
            "train.sample_count=0", "train.energy_every=0", f"train.ema_warmup={warmup}"])
        train(cfg, run, resume=(run / "config.json").exists())
        for ema in ("auto", None):
            model = meanflow.load(run, ema=ema)
            x = model.sample(args.n, steps=1, seed=1_000_000).samples
            ed = energy_distance(x.double(), real.double())
            print(f"ema_warmup={warmup}, {model.weights} weights: energy distance {ed:.4f}")


if __name__ == "__main__":
    main()
