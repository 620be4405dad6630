"""Fashion-MNIST: one-step MeanFlow against multi-step flow matching, same backbone and budget.

Both runs come from the ``fmnist-unet`` preset (unet-small, 1 400 steps at batch 64, seed 0);
the flow-matching one only changes ``--objective flow_matching``:

    meanflow train --preset fmnist-unet --out runs/fmnist-unet
    meanflow train --preset fmnist-unet --objective flow_matching --out runs/fmnist-unet-fm
    python experiments/fmnist_mf_vs_fm.py [--n 5000] [--extractor fmnist|inception]

Each row samples N images (sample i from seed i, EMA weights, quantised to 8 bits), embeds them
and compares them with the first N Fashion-MNIST test images: FID, KID (± its standard error)
and k-NN precision / recall (k = 3). The "floor" row scores N train images the same way: what
a perfect generator would get at this N. Writes a JSON record, a markdown table and a figure
of the first samples of every row.

With ``--extractor fmnist`` (the repo's classifier) the numbers are on their own scale, not
comparable with Inception FIDs; ``--extractor inception`` runs at ~3 images/s on 2 CPU cores,
so use a small N there (KID is unbiased at small N, FID is not).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import meanflow
from meanflow.data import ImageArray
from meanflow.fileio import atomic_write_text
from meanflow.metrics import FeatureStats
from meanflow.metrics.extractors import load_extractor
from meanflow.metrics.fid import score_features
from meanflow.pixels import from_uint8, quantize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mf", default="runs/fmnist-unet", help="MeanFlow run folder")
    p.add_argument("--fm", default="runs/fmnist-unet-fm", help="flow-matching run folder")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--mf-steps", type=int, nargs="+", default=[1, 2])
    p.add_argument("--fm-steps", type=int, nargs="+", default=[1, 2, 10, 50])
    p.add_argument("--extractor", default="fmnist")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", default=None,
                   help="JSON path (default docs/data/fmnist_mf_vs_fm_<extractor>.json)")
    p.add_argument("--figure", default="docs/fmnist-mf-vs-fm.png",
                   help="grid of the first 10 samples of every row ('' for none)")
    args = p.parse_args()
    out = Path(args.out or f"docs/data/fmnist_mf_vs_fm_{Path(args.extractor).stem}.json")
    t_start = time.perf_counter()

    ext = load_extractor(args.extractor)
    test = ImageArray.fashion_mnist(split="test")
    train = ImageArray.fashion_mnist(split="train")
    n = min(args.n, len(test))
    real_x = from_uint8(test.images[:n])
    real = ext.features(real_x, progress=True)
    ref = FeatureStats.from_features(real, keep=n)

    rows: list[dict] = []
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
    floor_x = from_uint8(train.images[idx])
    rows.append({"name": f"floor: {n} train images", "method": "data", "steps": None,
                 **score_features(ext.features(floor_x, progress=True), ref, pr=True),
                 "sample_seconds": 0.0})

    pictures: list[tuple[str, torch.Tensor]] = []
    runs = {}
    for kind, run, steps_list in (("meanflow", args.mf, args.mf_steps),
                                  ("euler", args.fm, args.fm_steps)):
        loaded = meanflow.load(run)     # flow matching samples with Euler steps
        runs[kind] = {"run": run, "checkpoint": str(loaded.checkpoint),
                      "weights": loaded.weights, "train_step": loaded.step,
                      "objective": loaded.config.objective.kind}
        for steps in steps_list:
            t0 = time.perf_counter()
            drawn = loaded.sample(n, steps=steps, batch_size=args.batch_size, progress=True)
            secs = time.perf_counter() - t0
            x = quantize(drawn.samples)
            name = f"{'MeanFlow' if kind == 'meanflow' else 'flow matching'}, {steps} NFE"
            rows.append({"name": name, "method": drawn.method, "steps": steps,
                         **score_features(ext.features(x, progress=True), ref, pr=True),
                         "sample_seconds": round(secs, 1)})
            pictures.append((name, x[:10]))
            print(f"{name}: FID {rows[-1]['fid']:.4f}", flush=True)
            _write(out, _record(n, ext, runs, rows, t_start))   # every row kept as it comes

    result = _record(n, ext, runs, rows, t_start)
    _write(out, result)

    if args.figure:
        _figure(pictures, Path(args.figure))
    print(f"\nN={n}, {ext.name} features, reference: first {n} test images\n")
    print("| samples | FID | KID ×1e3 | precision | recall | sampling s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['fid']:.3f} | {1e3 * r['kid']:.2f} ± {1e3 * r['kid_se']:.2f}"
              f" | {r['precision']:.3f} | {r['recall']:.3f} | {r['sample_seconds']} |")
    print(f"\nwrote {out} ({result['seconds_total']} s)")


def _record(n: int, ext, runs: dict, rows: list[dict], t_start: float) -> dict:
    return {
        "n": n, "sample_seeds": f"0..{n - 1}", "reference": f"first {n} Fashion-MNIST test "
        "images", "floor": f"{n} train images drawn with torch.randperm seed 0",
        "extractor": ext.identity, "runs": runs, "rows": rows,
        "kid": "unbiased MMD² (cubic kernel), 100 subsets of min(1000, N)",
        "precision_recall": "k-NN manifolds, k = 3",
        "torch": torch.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")


def _figure(pictures: list[tuple[str, torch.Tensor]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meanflow.fileio import atomic_path
    from meanflow.viz import image_grid
    fig, axes = plt.subplots(len(pictures), 1, figsize=(6.4, 0.85 * len(pictures) + 0.3))
    for ax, (name, x) in zip(np.atleast_1d(axes), pictures):
        ax.imshow(image_grid(x, nrow=10), cmap="gray", vmin=0, vmax=255)
        ax.set_ylabel(name.replace(", ", "\n"), rotation=0, ha="right", va="center",
                      fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Fashion-MNIST, same seeds per column", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
