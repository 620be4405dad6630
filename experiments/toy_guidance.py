"""Guidance trained into the target, on the class-conditional 8-Gaussian ring.

Trains the same class-conditional MeanFlow MLP without guidance (omega = 1) and with guidance
in the target (docs/method.md, guidance), then samples 1-NFE with the real label and reports,
per setting, the share of samples that land nearest to their own class's mode and within 3 std of it, and the
energy distance of each class's samples to that class's data.

    python experiments/toy_guidance.py [--out runs/toy_guidance] [--steps 2000]
        [--omega 1.0 2.0] [--kappa 0.0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import meanflow
from meanflow.data import build_dataset
from meanflow.metrics import energy_distance
from meanflow.runs import RunConfig
from meanflow.train import train

PER_CLASS = 500


def config(omega: float, kappa: float, steps: int) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"name": "mlp", "options": {"width": 128, "depth": 3, "emb_dim": 64}},
        "data": {"name": "8gaussians", "class_conditional": True},
        "objective": {"p": 0.5, "omega": omega, "kappa": kappa},
        "optim": {"lr": 1e-3, "warmup_steps": 100},
        "train": {"steps": steps, "batch_size": 128, "ema_decays": [0.995],
                  "checkpoint_every": steps, "log_every": 100},
    }).validate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/toy_guidance"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--omega", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--kappa", type=float, default=0.0)
    args = parser.parse_args()

    ds = build_dataset("8gaussians")
    k = ds.num_classes
    labels = torch.arange(k).repeat_interleave(PER_CLASS)
    # Reference data per class: draw a large batch and keep PER_CLASS points of each class.
    x, y = ds.batch(40 * PER_CLASS, torch.Generator().manual_seed(7))
    ref = {c: x[y == c][:PER_CLASS] for c in range(k)}
    results = {}
    for omega in args.omega:
        run = args.out / f"omega{omega:g}_kappa{args.kappa:g}"
        train(config(omega, args.kappa, args.steps), run, resume=True)
        # sample i from seed i with labels[i], in batches of 1024 as the numbers were made
        samples = meanflow.load(run).sample(labels=labels, steps=1, batch_size=1024).samples
        nearest = torch.cdist(samples, ds.centers).min(1)
        own = nearest.indices == labels
        close = own & (nearest.values < 3 * ds.std)
        ed = [energy_distance(samples[labels == c], ref[c]) for c in range(k)]
        results[f"omega={omega:g}, kappa={args.kappa:g}"] = {
            "effective_scale": omega / (1 - args.kappa),
            "own_mode": float(own.double().mean()),
            "own_mode_within_3std": float(close.double().mean()),
            "per_class_energy_distance_mean": sum(ed) / k,
        }
    print(json.dumps(results, indent=2))
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
