"""Samples of a latent model as images: seeded 1-/few-step sampling, then the VAE decoder.

Sample i is drawn from seed ``seed + i`` with label ``i mod K`` (balanced over classes), so
images and FIDs do not depend on the batch size. Decoding is deterministic: ``x =
vae.decode(z / scale)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from meanflow.errors import ConfigError

__all__ = ["resolve_vae", "run_config", "sample_images", "fid_of_latent_model"]


def run_config(source: str | os.PathLike[str]) -> Any:
    """The :class:`~meanflow.train.config.RunConfig` of a run folder or checkpoint folder."""
    import json

    from meanflow.errors import CheckpointError
    from meanflow.train.checkpoint import find_checkpoint
    from meanflow.train.config import RunConfig
    ckpt = find_checkpoint(Path(source))
    try:
        return RunConfig.from_dict(json.loads((ckpt / "state.json").read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{ckpt / 'state.json'} holds no run config: use another "
                              "checkpoint") from None


def resolve_vae(spec: str | None, config: Any) -> dict[str, Any] | None:
    """Which VAE decodes a run's samples: ``{"spec", "scale", "auto"}``, or None for none.

    ``spec`` "none" -> None; None or "auto" -> the VAE recorded in the run's latent folder
    (``config.data.name``) when it trained on one, else None; a path or hub id -> that VAE.
    The scale is the latent folder's when known, else the SD-VAE 0.18215.
    """
    from meanflow.data.latents import is_latent_folder, read_latent_index
    from meanflow.latents.vae import SD_VAE_SCALE
    if spec == "none":
        return None
    data = getattr(getattr(config, "data", None), "name", None)
    index = (read_latent_index(data) if isinstance(data, str) and is_latent_folder(data)
             else None)
    scale = float(index["scale"]) if index is not None else SD_VAE_SCALE
    if spec in (None, "auto"):
        if index is None or not (index.get("vae") or {}).get("spec"):
            return None
        return {"spec": index["vae"]["spec"], "scale": scale, "auto": True}
    return {"spec": os.fspath(spec), "scale": scale, "auto": False}


def _load(vae: dict[str, Any], device: torch.device) -> Any:
    from meanflow.errors import DataError
    from meanflow.latents.vae import load_vae
    try:
        return load_vae(vae["spec"], device)
    except DataError as exc:
        if not vae["auto"]:
            raise
        raise DataError(f"{exc} [it is the VAE recorded with the run's latents: pass --vae "
                        "PATH where it is now, or --vae none to keep the latents]") from None


def sample_images(loaded: Any, vae: dict[str, Any], seeds: Sequence[int],
                  y: Tensor | None = None, steps: int = 1,
                  schedule: Sequence[float] | None = None, batch_size: int = 256,
                  device: torch.device | str = "cpu", progress: bool = False
                  ) -> Iterator[tuple[Tensor, Tensor]]:
    """Yields ``(latents, images)`` chunk by chunk (``batch_size`` seeds each): latents
    (b, C, h, w) in model space, images (b, 3, H, W) in [-1, 1], both on the CPU."""
    from meanflow.latents.vae import decode_latents
    from meanflow.sampling import sample_seeded
    device = torch.device(device)
    model = _load(vae, device)
    method = "euler" if loaded.config.objective.kind == "flow_matching" else "meanflow"
    seeds = list(seeds)
    starts = range(0, len(seeds), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=f"sampling + decoding {len(seeds)}", unit="batch",
                      disable=None)
    for i in starts:
        yi = None if y is None else y[i:i + batch_size]
        z = sample_seeded(loaded.net, seeds[i:i + batch_size], loaded.shape, steps=steps, y=yi,
                          schedule=schedule, method=method, batch_size=batch_size,
                          device=device)
        yield z, decode_latents(model, z, vae["scale"], batch_size=batch_size)


def fid_of_latent_model(source: str | os.PathLike[str], ref: str | os.PathLike[str],
                        vae: str | None = "auto", n: int = 50000, steps: int = 1,
                        seed: int = 0, ema: float | str | None = "auto",
                        batch_size: int = 256, device: str = "auto",
                        extractor: str | None = None, pr: bool = False,
                        progress: bool = True, world: Any = None) -> dict[str, Any]:
    """FID (and KID) of ``n`` decoded samples of a latent run folder / checkpoint against
    reference statistics (e.g. the ``fid_ref.npz`` of ``meanflow prepare-latents``). Images are
    featurised batch by batch (never all held at once), quantised to 8 bits first. Under
    torchrun (``world``) rank r samples, decodes and featurises samples r, r + W, ... and the
    features are gathered in sample order: the result does not depend on the process count."""
    from meanflow.metrics.fid import gather_features, load_reference, quantize, score_features
    from meanflow.sampling import sharded_indices
    from meanflow.train.loop import load_model, resolve_device
    if n < 2:
        raise ConfigError(f"FID needs at least 2 samples, got n={n}")
    dev = resolve_device(device)
    ref_stats, ext = load_reference(ref, dev, extractor)
    loaded = load_model(Path(source), ema=ema, device=dev)
    chosen = resolve_vae(vae, loaded.config)
    if chosen is None:
        raise ConfigError(f"{source} did not train on a latent folder with a recorded VAE: "
                          "pass --vae PATH")
    mine = sharded_indices(n, world)
    y = None if loaded.num_classes is None else (torch.arange(n) % loaded.num_classes)[mine]
    feats = [ext.features(quantize(images)) for _, images in sample_images(
        loaded, chosen, [seed + i for i in mine], y, steps=steps, batch_size=batch_size,
        device=dev, progress=progress and (world is None or world.is_main))]
    feats = gather_features(np.concatenate(feats), n, world, dev)
    o = loaded.config.objective
    record: dict[str, Any] = {
        "extractor": ext.identity, "ref": str(ref), "ref_n": ref_stats.n,
        "checkpoint": str(loaded.checkpoint), "step": loaded.step, "weights": loaded.weights,
        "steps": steps, "seed": seed, "vae": chosen["spec"], "scale": chosen["scale"],
        "guidance": {"omega": o.omega, "kappa": o.kappa, "t_interval": list(o.t_interval)},
        "labels": "balanced" if y is not None else None}
    record.update(n=n, quantized=True, **score_features(feats, ref_stats, pr=pr))
    if world is not None and world.enabled:
        record["processes"] = world.size
    return record
