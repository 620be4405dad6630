"""Fashion-MNIST, class-conditional: MeanFlow against improved MeanFlow (iMF) against flow
matching, on the same U-Net, budget and seeds (docs/imf.md, docs/results.md).

Three runs of the ``fmnist-unet`` preset with ``unet-tiny`` (769,185 parameters for MeanFlow
and flow matching; iMF adds its guidance inputs and v-head), class-conditional, batch 64,
seed 0, EMA 0.995 with warm-up, for ``--steps`` steps each:

- ``mf``:  MeanFlow with guidance trained into the target at ω = 2 (as ``fmnist-pretrained``);
- ``imf``: ``--objective imf`` with ``model.options.guidance_cond`` and ``v_head`` (ω drawn per
  sample on [1, 8], chosen again when sampling);
- ``fm``:  flow matching (label dropout 0.1, sampled without guidance).

Each run logs the classifier-feature FID of 2 000 one-step samples (Euler for flow matching)
every 500 steps (``train.fid_every``; iMF's at ω = 1), which gives FID against training steps.

    OMP_NUM_THREADS=1 python experiments/fmnist_imf.py train --only mf    # one run per thread
    OMP_NUM_THREADS=1 python experiments/fmnist_imf.py train --only imf
    OMP_NUM_THREADS=1 python experiments/fmnist_imf.py train --only fm
    OMP_NUM_THREADS=1 python experiments/fmnist_imf.py score [--n 5000] [--step 2000]
    OMP_NUM_THREADS=1 python experiments/fmnist_imf.py figure [--step 2000]   # pictures only

``train`` resumes a run that exists (exactly, with the same thread count) up to ``--steps``.
``score`` samples N images per row (seed i, label i mod 10, 8-bit): MeanFlow at 1 and 2 NFE,
iMF at 1 and 2 NFE for each ω of ``--omegas`` (one trained model) and at
the official ImageNet B/2 setting (ω 8 on [0.4, 0.65]), flow matching at 1, 2, 10
and 50 Euler steps; FID and KID with the repo's classifier features against the first N test
images, and the classifier's accuracy on the class asked for. It writes
``docs/data/fmnist_imf.json``, ``docs/fmnist-imf.png`` (samples) and
``docs/fmnist-imf-curve.png`` (FID against steps).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

import meanflow
from meanflow.cli import main as meanflow_cli
from meanflow.data import ImageArray
from meanflow.fileio import atomic_path, atomic_write_text
from meanflow.metrics import FeatureStats
from meanflow.metrics.classifier import fmnist_features, fmnist_predict
from meanflow.metrics.fid import score_features
from meanflow.pixels import from_uint8, quantize
from meanflow.runs.load import Model

COMMON = ["--preset", "fmnist-unet", "--class-conditional", "--model", "unet-tiny",
          "--set", "train.ema_warmup=true", "--set", "train.progress=false",
          "--set", "train.fid_every=500", "--set", "train.fid_n=2000"]
RUNS = {
    "mf": ["--set", "objective.omega=2.0"],
    "imf": ["--objective", "imf", "--set", "model.options.guidance_cond=true",
            "--set", "model.options.v_head=true"],
    "fm": ["--objective", "flow_matching"],
}


def train(args: argparse.Namespace) -> None:
    ref = args.out / "fmnist-test-ref.npz"
    if not ref.is_file():
        _cli(["fid", "ref", "fashion-mnist", "--split", "test", "-o", ref])
    for name in args.only or list(RUNS):
        run = args.out / name
        if (run / "config.json").is_file():
            _cli(["train", "--resume", "--out", run, "--steps", args.steps])
        else:
            _cli(["train", *COMMON, *RUNS[name], "--set", f"train.fid_ref={ref}",
                  "--steps", args.steps, "--out", run])


@torch.no_grad()
def score(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    pictures_only = args.phase == "figure"
    if not pictures_only:   # the reference features: only scores need them
        test = ImageArray.fashion_mnist(split="test")
        n = min(args.n, len(test))
        ref = FeatureStats.from_features(fmnist_features(from_uint8(test.images[:n])), keep=n)
    rows, pictures = [], []

    def row(name: str, model, steps: int, picture: bool = True, **guidance) -> None:
        if pictures_only:
            if picture:
                pictures.append((name, quantize(model.sample(10, steps=steps, **guidance)
                                                .samples)))
            return
        drawn = model.sample(n, steps=steps, progress=True, **guidance)
        x = quantize(drawn.samples)
        acc = float((fmnist_predict(x) == drawn.labels).double().mean())
        rows.append({"name": name, "steps": steps, "train_step": model.step,
                     "guidance": drawn.guidance, **score_features(fmnist_features(x), ref),
                     "class_accuracy": acc})
        if picture:
            pictures.append((name, x[:10]))
        print(f"{name}: FID {rows[-1]['fid']:.3f}, accuracy {acc:.3f}", flush=True)

    def load(name: str) -> Model:
        run = args.out / name
        return meanflow.load(run if args.step is None else
                             run / "checkpoints" / f"step_{args.step:07d}")

    mf = load("mf")
    for steps in (1, 2):
        row(f"MeanFlow ω=2 (trained), {steps} NFE", mf, steps)
    imf = load("imf")
    for omega in args.omegas:
        for steps in (1, 2):
            row(f"iMF ω={omega:g}, {steps} NFE", imf, steps, guidance=omega,
                interval=args.interval, picture=steps == 1 and omega in (1, 2, 4, 8))
    for steps in (1, 2):   # the official B/2 1-NFE setting (ImageNet), for comparison
        row(f"iMF ω=8 on [0.4, 0.65], {steps} NFE", imf, steps, guidance=8.0,
            interval=(0.4, 0.65), picture=steps == 1)
    fm = load("fm")
    for steps in (1, 2, 10, 50):
        row(f"flow matching, {steps} NFE", fm, steps, picture=steps != 2)
    curves = {name: [json.loads(line) for line in
                     (args.out / name / "metrics.jsonl").read_text().splitlines()
                     if '"eval": "fid"' in line] for name in RUNS}
    if args.step is not None:
        curves = {k: [c for c in v if c["step"] <= args.step] for k, v in curves.items()}
    if pictures_only:
        _figures(pictures, {k: [(c["step"], c.get("fid_nfe1")) for c in v]
                            for k, v in curves.items()})
        return
    record = {"n": n, "seeds": f"0..{n - 1}", "labels": "i mod 10",
              "reference": f"first {n} Fashion-MNIST test images",
              "extractor": "fmnist classifier (in-repo), 8-bit samples",
              "interval": args.interval, "rows": rows,
              "fid_against_steps": {k: [(c["step"], c.get("fid_nfe1")) for c in v]
                                    for k, v in curves.items()},
              "seconds": round(time.perf_counter() - t0, 1)}
    out = Path("docs/data/fmnist_imf.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    _figures(pictures, record["fid_against_steps"])
    print("| samples | FID | KID ×10³ | class accuracy |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['fid']:.3f} | {1e3 * r['kid']:.2f} ± {1e3 * r['kid_se']:.2f}"
              f" | {r['class_accuracy']:.3f} |")


def _figures(pictures: list, curves: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meanflow.viz import image_grid
    fig, axes = plt.subplots(len(pictures), 1, figsize=(6.4, 0.62 * len(pictures) + 0.2))
    for ax, (name, x) in zip(axes, pictures):
        ax.imshow(image_grid(x, nrow=10), cmap="gray", vmin=0, vmax=255)
        ax.set_ylabel(re.sub(r", (?=\d+ NFE)", "\n", name), rotation=0, ha="right",
                      va="center", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(h_pad=0.2)
    fig.subplots_adjust(left=0.24)
    with atomic_path(Path("docs/fmnist-imf.png")) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    labels = {"mf": "MeanFlow (ω=2 trained in)", "imf": "iMF (ω=1 at sampling)",
              "fm": "flow matching, 1 Euler step"}
    for name, points in curves.items():
        ax.plot([s for s, _ in points], [f for _, f in points], marker="o", label=labels[name])
    ax.set_xlabel("training step")
    ax.set_ylabel("1-NFE FID (classifier features, N=2000)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(Path("docs/fmnist-imf-curve.png")) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _cli(args: list) -> None:
    code = meanflow_cli([str(a) for a in args])
    if code:
        raise SystemExit(f"meanflow {' '.join(map(str, args))} exited with {code}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=("train", "score", "figure"), help="figure: only the "
                   "two pictures of score, from 10 samples per row")
    p.add_argument("--out", type=Path, default=Path("runs/fmnist-imf"))
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--only", nargs="+", choices=list(RUNS))
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--step", type=int, help="score the checkpoint of this step (default: "
                   "each run's newest)")
    p.add_argument("--omegas", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0])
    p.add_argument("--interval", type=float, nargs=2, default=[0.0, 1.0])
    args = p.parse_args()
    (train if args.phase == "train" else score)(args)   # score also draws the figure


if __name__ == "__main__":
    main()
