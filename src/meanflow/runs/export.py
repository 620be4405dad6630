"""Samples to files, the way ``meanflow sample`` writes them.

:func:`write_samples` takes a run loaded by :func:`meanflow.runs.load.load` and what its
:meth:`~meanflow.runs.load.Model.sample` gave, and writes any of:

- ``.npz``: ``seeds`` (N,), ``labels`` (N,) (empty for an unconditional run), ``meta`` (the
  record below as JSON text), and the samples: ``samples`` (N, *shape) in model space, plus
  ``images`` (N, H, W, C) uint8 for an image run; for a latent run decoded by its VAE,
  ``images`` (the decoded pictures, what ``meanflow fid calc`` scores) and ``latents``, with no
  ``samples`` key;
- ``.png``: an image grid (images) or a scatter plot (2-D points), see :mod:`meanflow.viz`;
- ``.json``: the record, indented: checkpoint, step, weights, method, steps, schedule, seed,
  n, vae, scale, guidance (an iMF model's scale and interval chosen at sampling, else null); beside the .npz (``s.json``), or for a PNG alone under the PNG's name
  (``p.png.json``, :func:`record_path`).

Every file is written atomically (:mod:`meanflow.fileio`), and none that exists is replaced
unless ``overwrite`` is given. Samples holding NaN or infinite values are refused, nothing
written: they come from diverged weights, and a file of them would pass for samples. Under
torchrun every rank holds all samples; one process (rank 0) writes them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meanflow.errors import CheckpointError, ConfigError, MeanFlowError
from meanflow.fileio import atomic_path, atomic_write_text, refuse_existing
from meanflow.runs.load import Model, Samples
from meanflow.viz import save_samples_png

__all__ = ["can_draw", "record_path", "sample_record", "write_npz", "write_png",
           "write_samples", "check_finite", "check_vae"]

# a grid of a class-conditional image run gets one column per class up to this many classes
MAX_CLASS_COLUMNS = 16


def can_draw(shape: tuple[int, ...]) -> bool:
    """Whether samples of this shape make a PNG: images (C, H, W) or 2-D points."""
    return len(shape) == 3 or math.prod(shape) == 2


def record_path(npz: str | os.PathLike[str] | None,
                png: str | os.PathLike[str] | None) -> Path:
    """Where the JSON record goes: beside the .npz (``s.npz`` -> ``s.json``), else beside the
    PNG under the PNG's full name (``p.png`` -> ``p.png.json``), so that a PNG-only call
    never takes the record name of a later ``--out p.npz``."""
    if npz is None and png is None:
        raise ConfigError("nothing to write: give an .npz or a .png path")
    if npz is not None:
        return Path(npz).with_suffix(".json")
    png = Path(png)
    return png.with_name(png.name + ".json")


def sample_record(model: Model, samples: Samples) -> dict[str, Any]:
    """What the files record of how ``samples`` were made. ``seed`` is the first seed when
    sample i came from seed + i (else None: the .npz keeps every seed)."""
    seeds = samples.seeds
    contiguous = seeds == list(range(seeds[0], seeds[0] + len(seeds)))
    return {"checkpoint": str(model.checkpoint), "step": model.step,
            "weights": model.weights, "method": samples.method, "steps": samples.steps,
            "schedule": samples.schedule, "seed": seeds[0] if contiguous else None,
            "n": len(samples),
            "vae": None if model.vae is None else model.vae["spec"],
            "scale": None if model.vae is None else model.vae["scale"],
            "guidance": samples.guidance}


def check_vae(model: Model) -> None:
    """Before sampling: the run's VAE (``--vae``) decodes its samples, or a one-line
    ConfigError. A VAE given to a model of points or pixels, or one whose latent channels
    differ from the run's, would fail deep inside the decoder; one latent is decoded to know
    (the VAE is loaded then, as it would be by the first batch)."""
    if model.vae is None:
        return
    if len(model.shape) != 3:
        raise ConfigError(f"--vae decodes latents (C, h, w); this run's samples have shape "
                          f"{model.shape}: drop --vae")
    try:
        model.decode(torch.zeros(1, *model.shape))
    except MeanFlowError:
        raise
    except (RuntimeError, ValueError) as exc:
        first = " ".join(str(exc).split())[:120].rsplit(" ", 1)[0]
        raise ConfigError(f"the VAE {model.vae['spec']} does not decode this run's samples of "
                          f"shape {model.shape} ({first} ...): give the VAE its latents were "
                          "made with, or --vae none") from None


def check_finite(model: Model, samples: Samples) -> None:
    """CheckpointError unless every sample is finite (a diverged checkpoint's are not)."""
    bad = int((~torch.isfinite(samples.samples.reshape(len(samples), -1))).any(1).sum())
    if bad:
        raise CheckpointError(f"{bad} of {len(samples)} samples of {model.checkpoint} hold NaN "
                              "or infinite values (its weights diverged): nothing written; "
                              "sample an earlier checkpoint")


def _check_drawable(model: Model) -> None:
    if not can_draw(model.shape):
        raise ConfigError(f"a PNG draws images or 2-D points; this model's samples have shape "
                          f"{model.shape}: write an .npz instead")


def write_npz(path: str | os.PathLike[str], samples: Samples, record: dict[str, Any]) -> Path:
    """The .npz of ``samples`` (keys in the module docstring), written atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ConfigError(f"{path} must end in .npz")
    if samples.decoded:   # 'images' are what `fid calc` scores: no 'samples' key
        extra = {"images": samples.images.numpy(), "latents": samples.samples.numpy()}
    elif samples.images is not None:                                    # (N, H, W, C) uint8
        extra = {"images": samples.images.numpy(), "samples": samples.samples.numpy()}
    else:
        extra = {"samples": samples.samples.numpy()}
    labels = [] if samples.labels is None else samples.labels.numpy()
    with atomic_path(path) as tmp:
        np.savez(tmp, seeds=np.asarray(samples.seeds), labels=np.asarray(labels),
                 meta=json.dumps(record), **extra)
    return path


def write_png(path: str | os.PathLike[str], model: Model, samples: Samples,
              nrow: int | None = None) -> Path:
    """An image grid or a scatter plot of ``samples``. ``nrow``: images per row (default:
    one column per class for a class-conditional image run of at most 16 classes)."""
    _check_drawable(model)
    title = f"{samples.method}, {samples.steps} step(s), {model.weights}, step {model.step}"
    if (nrow is None and len(model.shape) == 3 and samples.labels is not None
            and model.num_classes <= MAX_CLASS_COLUMNS):
        nrow = model.num_classes  # one class per column
    shown = samples.samples if samples.images is None else samples.images.permute(0, 3, 1, 2)
    return save_samples_png(shown, path, labels=samples.labels, title=title, nrow=nrow)


def write_samples(model: Model, samples: Samples, *, npz: str | os.PathLike[str] | None = None,
                  png: str | os.PathLike[str] | None = None, nrow: int | None = None,
                  overwrite: bool = False) -> dict[str, Any]:
    """Writes ``samples`` of ``model`` as ``meanflow sample`` does: the .npz (if ``npz``), the
    PNG (if ``png``), then the JSON record beside the first of them; missing folders are
    made. Returns the record."""
    npz = None if npz is None else Path(npz)
    png = None if png is None else Path(png)
    sidecar = record_path(npz, png)
    for path in (npz, sidecar, png):
        refuse_existing(path, overwrite, "overwrite=True")
    check_finite(model, samples)
    if png is not None:
        _check_drawable(model)  # before any file is written
    record = sample_record(model, samples)
    for path in (npz, png):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if npz is not None:
        write_npz(npz, samples, record)
    if png is not None:
        write_png(png, model, samples, nrow)
    atomic_write_text(sidecar, json.dumps(record, indent=2) + "\n")
    return record
