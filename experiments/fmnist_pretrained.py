"""The shipped ``fmnist-pretrained`` model: score a finished run and write it into the package.

The run is class-conditional Fashion-MNIST with the ``fmnist-unet`` preset (unet-tiny,
1 400 steps at batch 64), guidance trained into the target at ω = 2 and the EMA warm-up:

    meanflow train --preset fmnist-unet --class-conditional --set objective.omega=2.0 \\
        --set train.ema_warmup=true --out runs/fmnist-pretrained
    python experiments/fmnist_pretrained.py [runs/fmnist-pretrained] [--n 10000]

Scores, from the first EMA (0.995) on sample seeds 0..N-1 with labels i mod 10: FID and KID
with the repo's Fashion-MNIST classifier features (their own scale, not comparable with
Inception FIDs) against the first N test images, at 1 and 2 steps, and that classifier's
accuracy on the 1-step samples against the classes they were asked for (the test images' own
accuracy beside it). Then ``meanflow export --format meanflow`` of the run, with the command
above and the scores in its ``state.json``, replaces ``src/meanflow/pretrained/fmnist``, and
``docs/fmnist-pretrained.png`` is drawn with ``meanflow sample fmnist-pretrained --n 100``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import torch

import meanflow
from meanflow.cli import main as meanflow_cli
from meanflow.data import ImageArray
from meanflow.metrics import FeatureStats, frechet_distance, kid
from meanflow.metrics.classifier import fmnist_features, fmnist_predict
from meanflow.pixels import from_uint8, quantize
from meanflow.pretrained import pretrained_folder
from meanflow.runs.release import export_release

COMMAND = ("meanflow train --preset fmnist-unet --class-conditional --set objective.omega=2.0 "
           "--set train.ema_warmup=true --out runs/fmnist-pretrained")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", default="runs/fmnist-pretrained")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--figure", default="docs/fmnist-pretrained.png")
    args = p.parse_args()
    t0 = time.perf_counter()
    model = meanflow.load(args.run)
    test = ImageArray.fashion_mnist(split="test")
    n = min(args.n, len(test))
    real_x = from_uint8(test.images[:n])
    real_feats = fmnist_features(real_x)
    ref = FeatureStats.from_features(real_feats)
    scores: dict = {"n": n, "extractor": "fmnist classifier (in-repo)",
                    "reference": f"first {n} Fashion-MNIST test images",
                    "seeds": f"0..{n - 1}", "labels": "i mod 10",
                    "weights": model.weights, "step": model.step}
    for steps in (1, 2):
        drawn = model.sample(n, steps=steps, progress=True)
        x = quantize(drawn.samples)
        feats = fmnist_features(x)
        k, k_se = kid(feats, real_feats)
        scores[f"fid_nfe{steps}"] = round(frechet_distance(FeatureStats.from_features(feats),
                                                           ref), 4)
        scores[f"kid_nfe{steps}"] = [round(k, 6), round(k_se, 6)]
        if steps == 1:
            hit = fmnist_predict(x) == drawn.labels
            scores["class_accuracy_nfe1"] = round(float(hit.double().mean()), 4)
        print(f"{steps} step(s): FID {scores[f'fid_nfe{steps}']}", flush=True)
    real_hit = fmnist_predict(real_x) == test.labels[:n]
    scores["class_accuracy_test_images"] = round(float(real_hit.double().mean()), 4)
    scores["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(scores, indent=2))

    dest = pretrained_folder("fmnist-pretrained")
    staged = dest.with_name(dest.name + ".new")
    shutil.rmtree(staged, ignore_errors=True)
    export_release(args.run, staged, notes={"command": COMMAND, "scores": scores})
    shutil.rmtree(dest, ignore_errors=True)
    staged.rename(dest)
    print(f"wrote {dest}")
    if args.figure:
        code = meanflow_cli(["sample", "fmnist-pretrained", "--n", "100", "--png",
                             args.figure, "--overwrite"])
        if code:
            raise SystemExit(code)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
