"""CPU-speed FID / KID of a trained Fashion-MNIST MeanFlow run, with the in-repo classifier.

Samples N images (seeds 0..N-1) at 1 and 2 steps, embeds them with the committed
:mod:`meanflow.metrics.classifier` (128-d features), and compares them with the N first
Fashion-MNIST test images. The "floor" row compares N train images with the same test images:
what a perfect generator would score at this sample size. Also reports the classifier's class
histogram of the 1-step samples (a mode-collapse check) and of the test images.

These numbers are *not* comparable with Inception FIDs from the literature.

    python experiments/fmnist_fid.py [runs/fmnist-unet] [--n 10000] [--steps 1 2]
        [--out runs/fmnist-unet/fid_classifier.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import meanflow
from meanflow.data import ImageArray
from meanflow.metrics import FeatureStats
from meanflow.metrics.classifier import (
    DEFAULT_WEIGHTS,
    fmnist_features,
    fmnist_predict,
    load_classifier,
    read_record,
)
from meanflow.metrics.fid import score_features
from meanflow.pixels import from_uint8

CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Boot"]


def score(real_stats: FeatureStats, feats: np.ndarray) -> dict[str, float]:
    out = score_features(feats, real_stats)
    return {"fid": out["fid"], "kid": out["kid"], "kid_se": out["kid_se"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", default="runs/fmnist-unet")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", default=None, help="JSON path (default RUN/fid_classifier.json)")
    args = p.parse_args()
    out = Path(args.out) if args.out else Path(args.run) / "fid_classifier.json"
    t_start = time.perf_counter()

    clf = load_classifier()
    test = ImageArray.fashion_mnist(split="test")
    train = ImageArray.fashion_mnist(split="train")
    n = min(args.n, len(test))
    real_x = from_uint8(test.images[:n])
    real = fmnist_features(real_x, model=clf)
    real_stats = FeatureStats.from_features(real, keep=n)

    rows: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train), generator=gen)[:n]
    floor_x = from_uint8(train.images[idx])
    rows.append({"name": f"floor: {n} train vs {n} test", "steps": None,
                 **score(real_stats, fmnist_features(floor_x, model=clf)), "seconds": 0.0})

    loaded = meanflow.load(args.run)
    hist = None
    for steps in args.steps:
        t0 = time.perf_counter()
        x = loaded.sample(args.n, steps=steps, batch_size=args.batch_size).samples
        secs = time.perf_counter() - t0
        feats = fmnist_features(x, model=clf)
        rows.append({"name": f"{steps}-step samples", "steps": steps,
                     **score(real_stats, feats), "seconds": round(secs, 1)})
        if hist is None:
            hist = torch.bincount(fmnist_predict(x, model=clf), minlength=10).tolist()
    test_hist = torch.bincount(fmnist_predict(real_x, model=clf), minlength=10).tolist()

    record = read_record()
    result = {
        "run": str(args.run), "checkpoint": str(loaded.checkpoint), "weights": loaded.weights,
        "train_step": loaded.step, "n": args.n, "sample_seeds": f"0..{args.n - 1}",
        "reference": f"first {n} Fashion-MNIST test images",
        "extractor": {"path": str(DEFAULT_WEIGHTS.name), "sha256": record["sha256"],
                      "test_accuracy": record["test_accuracy"], "dim": 128},
        "rows": rows,
        "class_histogram_1step": dict(zip(CLASSES, hist or [])),
        "class_histogram_test": dict(zip(CLASSES, test_hist)),
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"run {args.run} (step {loaded.step}, {loaded.weights}), N={args.n}, "
          f"in-repo classifier features (acc {record['test_accuracy']:.4f})\n")
    print("| set | FID (clf) | KID (clf) x1e3 | sampling s |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['fid']:.3f} | {1e3 * r['kid']:.3f} ± {1e3 * r['kid_se']:.3f} "
              f"| {r['seconds']} |")
    if hist is not None:
        print("\nclass histogram (classifier argmax), 1-step samples vs test:\n")
        print("| class | " + " | ".join(CLASSES) + " |")
        print("|---|" + "---:|" * 10)
        print("| 1-step | " + " | ".join(map(str, hist)) + " |")
        print("| test | " + " | ".join(map(str, test_hist)) + " |")
    print(f"\nwrote {out} ({result['seconds_total']} s)")


if __name__ == "__main__":
    main()
