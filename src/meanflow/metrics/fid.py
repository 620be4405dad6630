"""``meanflow fid``: reference statistics of a dataset, and the FID of samples or a checkpoint.

Features come from an *extractor*. Today that is ``fmnist``, the repo's own Fashion-MNIST
classifier (``meanflow.metrics.classifier``; 128-d, CPU speed, its own scale: not comparable
with Inception FIDs). The standard Inception network is the next extractor (issue 4). Every
result records the extractor, N, NFE, guidance, checkpoint and seed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from meanflow.errors import ConfigError, DataError
from meanflow.metrics.frechet import FeatureStats, frechet_distance

__all__ = ["EXTRACTORS", "extract_features", "reference_stats", "fid_of"]

EXTRACTORS = ("fmnist",)


def extract_features(images: Tensor, extractor: str = "fmnist") -> np.ndarray:
    """(N, D) float64 features of images (N, C, H, W) in [-1, 1]."""
    if extractor not in EXTRACTORS:
        raise ConfigError(f"unknown extractor {extractor!r}: choose one of "
                          f"{', '.join(EXTRACTORS)} (Inception comes with issue 4)")
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ConfigError(f"the fmnist extractor takes 1×28×28 images; got samples of shape "
                          f"{tuple(images.shape[1:])}")
    from meanflow.metrics.classifier import fmnist_features
    return fmnist_features(images)


def _dataset_images(data: str, options: dict[str, Any], n: int | None) -> Tensor:
    from meanflow.data import build_dataset
    ds = build_dataset(data, **options)
    images = getattr(ds, "images", None)
    if images is None:
        raise ConfigError(f"{data!r} holds no images (samples of shape {tuple(ds.shape)}): "
                          "give an image dataset, folder or .npz")
    images = images[:n] if n is not None else images
    return images.to(torch.float32) / 127.5 - 1.0                       # uint8 -> [-1, 1]


def reference_stats(data: str, out: str | os.PathLike[str], options: dict[str, Any] | None = None,
                    n: int | None = None, extractor: str = "fmnist") -> FeatureStats:
    """Feature statistics of the first ``n`` images (all by default) of a dataset, saved."""
    images = _dataset_images(data, options or {}, n)
    stats = FeatureStats.from_features(
        extract_features(images, extractor),
        meta={"extractor": extractor, "data": str(data), "options": options or {},
              "n": int(images.shape[0])})
    stats.save(out)
    return stats


def _load_samples(path: Path, n: int | None) -> tuple[Tensor, dict[str, Any]]:
    """Samples in [-1, 1] from a ``meanflow sample`` .npz (``samples``, or uint8 ``images``)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "samples" in f.files:
                x = torch.from_numpy(np.asarray(f["samples"], dtype=np.float32))
            elif "images" in f.files:                                   # (N, H, W, C) uint8
                x = torch.from_numpy(f["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            else:
                raise DataError(f"{path} has neither 'samples' nor 'images': write it with "
                                "meanflow sample --out")
            meta = json.loads(str(f["meta"])) if "meta" in f.files else {}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read samples from {path} ({' '.join(str(exc).split())}); "
                        "write them with meanflow sample --out FILE.npz") from None
    return (x[:n] if n is not None else x), meta


def fid_of(source: str | os.PathLike[str], ref: str | os.PathLike[str], n: int | None = 10000,
           steps: int = 1, seed: int = 0, ema: float | str | None = "auto",
           batch_size: int = 500, device: str = "auto") -> dict[str, Any]:
    """FID of a samples .npz, or of N fresh samples of a run folder / checkpoint (sample i
    from seed SEED+i, labels balanced over classes), against a reference stats file."""
    ref_stats = FeatureStats.load(ref)
    extractor = ref_stats.meta.get("extractor", "fmnist")
    source = Path(source)
    record: dict[str, Any] = {"extractor": extractor, "ref": str(ref)}
    if source.suffix == ".npz":
        x, meta = _load_samples(source, n)
        record.update(samples=str(source), checkpoint=meta.get("checkpoint"),
                      steps=meta.get("steps"), seed=meta.get("seed"))
    else:
        from meanflow.sampling import sample_seeded
        from meanflow.train.loop import load_model, resolve_device
        dev = resolve_device(device)
        loaded = load_model(source, ema=ema, device=dev)
        count = 10000 if n is None else n
        y = (None if loaded.num_classes is None
             else torch.arange(count) % loaded.num_classes)
        method = "euler" if loaded.config.objective.kind == "flow_matching" else "meanflow"
        x = sample_seeded(loaded.net, range(seed, seed + count), loaded.shape, steps=steps,
                          y=y, method=method, batch_size=batch_size, device=dev, progress=True)
        o = loaded.config.objective
        record.update(checkpoint=str(loaded.checkpoint), step=loaded.step,
                      weights=loaded.weights, method=method, steps=steps, seed=seed,
                      guidance={"omega": o.omega, "kappa": o.kappa,
                                "t_interval": list(o.t_interval)})
    feats = extract_features(x, extractor)
    stats = FeatureStats.from_features(feats)
    record.update(n=int(x.shape[0]), fid=frechet_distance(stats, ref_stats))
    return record
