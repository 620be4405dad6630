"""``meanflow prepare-latents``: an image folder -> VAE posterior shards + FID reference stats.

Images are read in the sorted order of :func:`meanflow.data.folder` (one class per sub-folder),
ADM-centre-cropped to ``resolution`` (docs/method.md, the paper's recipes), encoded by the VAE
and written ``shard_size`` images per shard (format: :mod:`meanflow.data.latents`). Nothing
holds more than one shard of images in memory. Under torchrun, rank r encodes shards r, r + W,
...; every shard is written atomically, so a killed run resumes by rerunning the same command
(finished shards are kept).
When every shard exists, rank 0 computes the FID reference statistics of the same cropped
images (ADM's reference batches are the training images at the same crop) from the features
stored in the shards, and marks the index complete.

The output folder is prepare-latents' own (docs/design.md, "What meanflow may overwrite"): a
new or empty folder is marked for it (:func:`meanflow.fileio.claim_folder`), a folder of other
files or of another command is refused before any work, and a latent folder made before the
marker is recognised by its ``index.json``. Rank 0 holds :func:`meanflow.fileio.exclusive` on
it while the command runs and first removes the temporaries a killed run left in it. The
sizes (a batch of crops, a shard of latents) are checked against memory before the VAE runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from meanflow.data.folder import check_image_args, read_image, scan_image_folder
from meanflow.data.latents import (INDEX_NAME, LATENT_FORMAT, LATENT_VERSION, shard_name)
from meanflow.errors import ConfigError, DataError
from meanflow.fileio import (atomic_path, atomic_write_text, claim_folder, exclusive,
                             remove_stale_temporaries)
from meanflow.latents.vae import (encode_posterior, latent_shape, load_vae, vae_identity,
                                  vae_shift)
from meanflow.metrics.extractors import load_extractor
from meanflow.metrics.frechet import FeatureStats
from meanflow.pixels import from_uint8
from meanflow.world import check_fits
from meanflow.world import World, resolve_device, setup, teardown

__all__ = ["prepare_latents", "shard_assignment", "read_cropped", "stats_from_shards",
           "FID_REF_NAME", "DTYPES"]

FID_REF_NAME = "fid_ref.npz"
DTYPES = ("float32", "float16", "bfloat16")
COMMAND = "meanflow prepare-latents"     # the owner marked in the output folder


def _is_latent_folder(folder: Path) -> bool:
    """A latent folder written before folders carried an owner marker: its index.json."""
    try:
        return json.loads((folder / INDEX_NAME).read_text()).get("format") == LATENT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def shard_assignment(num_shards: int, rank: int, world_size: int) -> list[int]:
    """Shards rank ``rank`` of ``world_size`` encodes: rank, rank + W, rank + 2W, ..."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in a world of {world_size} process(es)")
    return list(range(rank, num_shards, world_size))


def read_cropped(files: Sequence[Path], resolution: int) -> Tensor:
    """uint8 (n, 3, resolution, resolution) RGB images, ADM-centre-cropped, in file order."""
    out = np.empty((len(files), 3, resolution, resolution), dtype=np.uint8)
    for i, file in enumerate(files):
        out[i] = read_image(file, 3, resolution)
    return torch.from_numpy(out)


def _plan_id(listing: str, settings: dict[str, Any]) -> str:
    digest = hashlib.sha256(listing.encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _shard_done(file: Path, plan_id: str, count: int) -> bool:
    """A shard file of this plan with ``count`` images (a foreign or unreadable one is not)."""
    if not file.is_file():
        return False
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a damaged file is encoded again
        return False
    return meta.get("plan_id") == plan_id and meta.get("count") == str(count)


def stats_from_shards(files: Sequence[Path], keep: int, meta: dict[str, Any]) -> FeatureStats:
    """:class:`~meanflow.metrics.frechet.FeatureStats` of the ``features`` of every shard, read
    one shard at a time (two passes: mean, then centred scatter, in float64), keeping the first
    ``keep`` rows for KID. Equals ``FeatureStats.from_features`` of all rows at once."""
    def rows() -> Any:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                yield f.get_tensor("features").to(torch.float64)

    n, total = 0, None
    for x in rows():
        n += x.shape[0]
        total = x.sum(0) if total is None else total + x.sum(0)
    if total is None or n < 2:
        raise DataError(f"reference statistics need at least 2 images, got {n}")
    mu = total / n
    scatter = torch.zeros(mu.shape[0], mu.shape[0], dtype=torch.float64)
    kept: list[Tensor] = []
    for x in rows():
        xc = x - mu
        scatter += xc.T @ xc
        if sum(k.shape[0] for k in kept) < keep:
            kept.append(x.float())
    sigma = scatter / (n - 1)
    sigma = 0.5 * (sigma + sigma.T)
    features = torch.cat(kept)[:keep].numpy() if keep > 0 and min(n, keep) >= 2 else None
    return FeatureStats(mu=mu.numpy(), sigma=sigma.numpy(), n=n, meta=meta, features=features)


def prepare_latents(image_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                    vae: str, resolution: int = 256, shard_size: int = 1000,
                    batch_size: int = 64, device: str = "auto", fid_extractor: str = "inception",
                    fid_keep: int = 5000, scale: float | None = None, dtype: str = "float32",
                    progress: bool = True) -> dict[str, Any]:
    """Encodes every image under ``image_dir`` into ``out_dir`` (resumable; see module doc).

    Args:
        image_dir: an image folder, one sub-folder per class (ImageNet's train layout).
        out_dir: the latent folder to write (or to finish).
        vae: local ``AutoencoderKL`` folder, or a hub id where a network exists.
        resolution: side of the ADM centre crop (256 for the paper's ImageNet 256).
        shard_size: images per shard (the unit of work and of resuming).
        batch_size: images per VAE / extractor call.
        device: auto, cpu, cuda or cuda:N (under torchrun each rank takes cuda:LOCAL_RANK).
        fid_extractor: "inception", "fmnist", an extractor file, or "none" for no statistics.
        fid_keep: feature rows kept in the statistics for KID.
        scale: the latent scale recorded for training; default the VAE's ``scaling_factor``
            (0.18215 for SD-VAE).
        dtype: how mean and std are stored: float32, float16 or bfloat16.

    Returns:
        The final ``index.json`` content (on every rank).
    """

    check_image_args(resolution, None)
    if resolution is None:
        raise ConfigError("resolution is required: the side of the ADM centre crop, e.g. 256")
    for name, value, low in (("shard_size", shard_size, 1), ("batch_size", batch_size, 1),
                             ("fid_keep", fid_keep, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}={value!r} must be an integer >= {low}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)
                                  and scale > 0):
        raise ConfigError(f"scale={scale!r} must be a positive finite number, e.g. 0.18215")
    root, out = Path(os.fspath(image_dir)), Path(os.fspath(out_dir))
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}; give a folder with one sub-folder "
                        "of images per class")
    claim_folder(out, COMMAND, _is_latent_folder, write=False)   # before any work
    # a batch of crops as uint8, then float32 in [-1, 1] (on the CPU)
    check_fits(5 * 3 * resolution ** 2 * batch_size, f"a batch of {batch_size} crops of "
               f"{resolution}²", "lower --batch-size or --resolution")
    files, labels, class_names = scan_image_folder(root)
    if not files:
        raise DataError(f"no .png/.jpg/.jpeg images found in {root}")
    use_fid = fid_extractor != "none"
    with contextlib.ExitStack() as stack:
        world, dev, owned = setup(resolve_device(device))
        stack.callback(teardown, owned)
        return _prepare(root, out, files, labels, class_names, world, dev, vae, resolution,
                        shard_size, batch_size, fid_extractor if use_fid else None, fid_keep,
                        scale, dtype, progress, stack)


def _hold(out: Path, world: World, stack: contextlib.ExitStack) -> None:
    """Rank 0 takes the folder (the one writer of its index, marker and temporaries) until
    ``stack`` closes, then removes what a killed run left in it."""
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        stack.enter_context(exclusive(out, COMMAND))
        claim_folder(out, COMMAND, _is_latent_folder)
        remove_stale_temporaries(out)
        remove_stale_temporaries((out / shard_name(0)).parent)


def _prepare(root: Path, out: Path, files: list[Path], labels: list[int] | None,
             class_names: Sequence[str] | None, world: World, dev: torch.device, vae: str,
             resolution: int, shard_size: int, batch_size: int, fid_extractor: str | None,
             fid_keep: int, scale: float | None, dtype: str, progress: bool,
             stack: contextlib.ExitStack) -> dict[str, Any]:
    """prepare_latents once the arguments are checked and the world joined: the VAE and the
    extractor are loaded and the sizes checked before the folder is taken (``stack`` holds
    its lock)."""
    model = load_vae(vae, dev)
    ident = vae_identity(vae, model)
    ext = None
    if fid_extractor is not None:
        ext = load_extractor(fid_extractor, dev)
    scale = float(model.config.scaling_factor) if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"the VAE's scaling_factor {scale!r} must be a positive finite "
                          "number: pass --scale, e.g. 0.18215")
    shape = latent_shape(model, resolution)
    # a shard's mean and std (float32 while it is built) are held until it is written
    check_fits(2 * 4 * math.prod(shape) * min(shard_size, len(files)), f"a shard of "
               f"{shard_size} latents of shape {shape}", "lower --shard-size")
    _hold(out, world, stack)
    listing = "".join(f"{-1 if labels is None else labels[i]}\t"
                      f"{f.relative_to(root).as_posix()}\n" for i, f in enumerate(files))
    settings = {"resolution": resolution, "shard_size": shard_size, "dtype": dtype,
                "vae": ident.get("sha256", ident["spec"]),
                "fid": None if ext is None else ext.identity}
    plan_id = _plan_id(listing, settings)
    n = len(files)
    num_shards = -(-n // shard_size)
    index: dict[str, Any] = {
        "format": LATENT_FORMAT, "version": LATENT_VERSION, "complete": False,
        "plan_id": plan_id, "num_images": n, "shard_size": shard_size,
        "num_shards": num_shards, "latent_shape": list(shape), "dtype": dtype,
        "scale": scale, "shift": vae_shift(model), "vae": ident, "resolution": resolution, "crop": "ADM centre crop",
        "source": str(root.resolve()), "class_names": None if class_names is None
        else list(class_names), "num_classes": None if class_names is None
        else len(class_names), "fid_ref": None,
        "fid_extractor": None if ext is None else ext.identity}
    index_file = out / INDEX_NAME
    if index_file.is_file():
        try:
            old = json.loads(index_file.read_text()).get("plan_id")
        except (OSError, ValueError, AttributeError):
            old = None
        if old != plan_id:
            raise ConfigError(f"{out} holds latents of other images or settings (VAE, "
                              "resolution, shard size, dtype, extractor): choose another "
                              "folder, or delete it to start again")
    _barrier(world)   # every rank has checked the old index before rank 0 rewrites it
    if world.is_main:
        atomic_write_text(out / "files.txt", listing)
        atomic_write_text(index_file, json.dumps(index, indent=2) + "\n")
    _barrier(world)

    mine = shard_assignment(num_shards, world.rank, world.size)
    todo = [s for s in mine if not _shard_done(
        out / shard_name(s), plan_id, min(shard_size, n - s * shard_size))]
    bar = tqdm(total=sum(min(shard_size, n - s * shard_size) for s in todo),
               desc=f"encoding (rank {world.rank})" if world.enabled else "encoding",
               unit="img", disable=None if progress else True)
    for s in todo:
        start = s * shard_size
        stop = min(start + shard_size, n)
        means, stds, feats = [], [], []
        for b in range(start, stop, batch_size):
            u8 = read_cropped(files[b:min(b + batch_size, stop)], resolution)
            x = from_uint8(u8)                                            # [-1, 1]
            mean, std = encode_posterior(model, x)
            means.append(mean)
            stds.append(std)
            if ext is not None:
                feats.append(torch.from_numpy(ext.features(x)).float())
            bar.update(u8.shape[0])
        tensors = {"mean": torch.cat(means).to(getattr(torch, dtype)).contiguous(),
                   "std": torch.cat(stds).to(getattr(torch, dtype)).contiguous(),
                   "index": torch.arange(start, stop, dtype=torch.int64),
                   "label": (torch.full((stop - start,), -1, dtype=torch.int64)
                             if labels is None else
                             torch.tensor(labels[start:stop], dtype=torch.int64))}
        if feats:
            tensors["features"] = torch.cat(feats).contiguous()
        meta = {"plan_id": plan_id, "shard": str(s), "start": str(start),
                "count": str(stop - start)}
        with atomic_path(out / shard_name(s)) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    bar.close()
    _barrier(world)

    if world.is_main:
        shard_files = [out / shard_name(s) for s in range(num_shards)]
        missing = [s for s in range(num_shards) if not _shard_done(
            shard_files[s], plan_id, min(shard_size, n - s * shard_size))]
        if missing:
            raise DataError(f"{len(missing)} shard(s) of {out} are missing (first: "
                            f"{missing[0]}): rerun the same command to finish them")
        if ext is not None:
            meta = {**ext.identity, "data": str(root.resolve()), "n": n,
                    "options": {"resolution": resolution, "crop": "ADM centre crop"}}
            stats = stats_from_shards(shard_files, fid_keep, meta)
            stats.save(out / FID_REF_NAME)
            index["fid_ref"] = FID_REF_NAME
        index["complete"] = True
        atomic_write_text(index_file, json.dumps(index, indent=2) + "\n")
    _barrier(world)
    return json.loads(index_file.read_text())


def _barrier(world: World) -> None:
    if world.enabled:
        dist.barrier()
