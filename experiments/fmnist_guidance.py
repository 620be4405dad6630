"""Fashion-MNIST, class-conditional: guidance trained into the target at several ω
(docs/method.md, guidance).

One run per ω (κ = 0, so the effective scale ω′ = ω; ω = 1 is no guidance) with the
``fmnist-unet`` preset (1 400 steps at batch 64), ``data.class_conditional=true`` and label
dropout 0.1. Each run takes about 35-60 minutes on one CPU thread; the runs are independent, so
they can go in parallel (``--omegas 1``, ``--omegas 3``, ... with their own ``--out``), and a
final call without training scores them all:

    python experiments/fmnist_guidance.py                 # 3 runs x 1400 steps, N = 1000
    python experiments/fmnist_guidance.py --steps 350     # a quarter of the training
    python experiments/fmnist_guidance.py --quick         # smoke test, < 40 s

A run folder that exists with fewer steps is resumed to ``--steps`` (the learning rate is
constant after warm-up and resuming is exact, so this continues the same run); one with
``--steps`` or more is only scored again.

For each run: N one-step samples (EMA weights, sample i from seed i with label i mod 10, so the
classes are balanced), the accuracy of the repo's Fashion-MNIST classifier on them against the
labels they were asked for, and FID / KID (``fmnist`` extractor: its own scale, not comparable
with Inception FIDs) against the first N test images. Writes ``docs/data/fmnist_guidance.json``
and ``docs/fmnist-guidance.png`` (one row per ω, one column per class).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from meanflow.fileio import atomic_path, atomic_write_text

CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Boot")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--omegas", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    p.add_argument("--steps", type=int, default=1400,
                   help="training steps of each run (a shorter earlier run is resumed)")
    p.add_argument("--n", type=int, default=1000, help="samples scored per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="runs/fmnist-guidance", help="folder of the run folders")
    p.add_argument("--out", default="docs/data/fmnist_guidance.json")
    p.add_argument("--figure", default="docs/fmnist-guidance.png")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 4 steps at batch 16, N = 40, two ω values")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.n, args.omegas = 4, 40, args.omegas[:2]

    import meanflow
    from meanflow.data import ImageArray
    from meanflow.metrics import FeatureStats
    from meanflow.metrics.classifier import fmnist_predict
    from meanflow.metrics.extractors import load_extractor
    from meanflow.metrics.fid import score_features
    from meanflow.pixels import from_uint8, quantize
    from meanflow.presets import preset_path
    from meanflow.runs import load_config
    from meanflow.train import train

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    ext = load_extractor("fmnist")
    test = ImageArray.fashion_mnist(split="test")
    ref_images = from_uint8(test.images[:args.n])
    ref = FeatureStats.from_features(ext.features(ref_images), keep=args.n)
    rows, pictures = [], []
    for omega in args.omegas:
        overrides = [f"train.steps={args.steps}", "data.class_conditional=true",
                     f"objective.omega={omega}", "objective.kappa=0.0",
                     "objective.label_drop=0.1", f"train.seed={args.seed}",
                     "train.device=cpu", f"train.checkpoint_every={min(args.steps, 350)}",
                     f"train.sample_every={args.steps}", "train.log_every=50"]
        if args.quick:
            overrides += ["train.batch_size=16", "optim.warmup_steps=0"]
        cfg = load_config(preset_path("fmnist-unet"), overrides)
        run = Path(args.runs) / f"omega{omega:g}"
        t0 = time.perf_counter()
        if not (run / "config.json").is_file():
            train(cfg, run)
        elif meanflow.load(run).step < args.steps:  # a shorter run made before: continue it
            print(f"omega {omega:g}: resuming {run} to step {args.steps}")
            train(cfg, run, resume=True)
        else:                                    # finished before: score it again
            print(f"omega {omega:g}: reusing {run}")
        train_s = time.perf_counter() - t0
        loaded = meanflow.load(run)
        out = loaded.sample(args.n, steps=1, batch_size=500)   # sample i has label i mod 10
        y, x = out.labels, quantize(out.samples)
        pred = fmnist_predict(x)
        per_class = [float((pred[y == k] == k).double().mean()) for k in range(10)]
        scores = score_features(ext.features(x), ref, kid_subset=min(1000, args.n))
        rows.append({"omega": omega, "kappa": 0.0, "effective_scale": omega,
                     "run": str(run), "step": loaded.step, "weights": loaded.weights,
                     "train_seconds": round(train_s, 1),
                     "accuracy": float((pred == y).double().mean()),
                     "accuracy_per_class": per_class, **scores})
        pictures.append((omega, x[:10]))                 # samples 0..9 have labels 0..9
        print(f"omega {omega:g}: accuracy {rows[-1]['accuracy']:.3f}  FID (fmnist) "
              f"{scores['fid']:.3f}  KID×1e3 {scores.get('kid', float('nan')) * 1e3:.2f}")
    record = {"experiment": "fmnist_guidance", "quick": args.quick, "preset": "fmnist-unet",
              "steps": args.steps, "n": args.n, "nfe": 1, "extractor": "fmnist",
              "reference": f"first {args.n} Fashion-MNIST test images",
              "labels": "sample i has label i mod 10, seed i", "rows": rows,
              "seconds": round(time.perf_counter() - t_start, 1),
              "machine": f"{platform.machine()}, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} thread(s)"}
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    if args.figure:
        _figure(pictures, Path(args.figure))
    return record


def _figure(pictures: list[tuple[float, torch.Tensor]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(pictures), 10, figsize=(10, 1.1 * len(pictures) + 0.4),
                             squeeze=False)
    for r, (omega, x) in enumerate(pictures):
        for k in range(10):
            ax = axes[r][k]
            ax.imshow(x[k, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(CLASSES[k], fontsize=8)
            if k == 0:
                ax.set_ylabel(f"ω = {omega:g}", fontsize=9)
    fig.suptitle("MeanFlow, 1 NFE, guidance in the target (κ = 0)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
