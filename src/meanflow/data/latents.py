"""VAE latents in shards, resampled from the stored posterior at every draw (docs/method.md §10).

A *latent folder* is written by ``meanflow prepare-latents`` (:mod:`meanflow.latents`)::

    OUT/index.json                 format "meanflow-latents", version 1 (see below)
    OUT/files.txt                  one line per image, in order: "<label>\\t<path under the source>"
    OUT/shards/shard-00000.safetensors, ...

Shard ``s`` holds images ``s*K .. min((s+1)*K, N) - 1`` (K = ``shard_size``) as tensors
``mean`` and ``std`` (n, C, h, w) -- the VAE posterior N(mean, std²) of each image, unscaled --
``index`` (n,) int64 (global image numbers), ``label`` (n,) int64 (-1 when unlabelled) and, when
reference statistics were asked for, ``features`` (n, D) float32 (the FID extractor's features
of the same cropped image). Its safetensors metadata repeats ``plan_id``, ``shard``, ``start``
and ``count``; a shard is complete when its file exists (written atomically) with the plan's id.

``index.json``: ``format``, ``version``, ``complete`` (true once every shard and the reference
statistics exist), ``plan_id``, ``num_images``, ``shard_size``, ``num_shards``,
``latent_shape`` [C, h, w], ``dtype``, ``scale`` (0.18215 for SD-VAE), ``shift`` (the VAE's
``shift_factor``, 0 for SD-VAE; absent in folders written before it, read as 0), ``vae`` (``spec``: the
path or hub id given, ``sha256`` of its weights file, ``config``), ``resolution``, ``source``,
``class_names`` (null when unlabelled), ``num_classes``, ``fid_ref`` (file name or null),
``fid_extractor``.

:class:`LatentShards` draws ``x = (mean + std * e - shift) * scale``, e ~ N(0, I), at every batch (the
ImageNet recipe draws a new latent from the posterior at every step), with the images' labels.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from meanflow.data.checks import check_batch_args, check_scale, check_take_args, one_line
from meanflow.errors import ConfigError, DataError

__all__ = ["LatentShards", "LATENT_FORMAT", "LATENT_VERSION", "INDEX_NAME", "shard_name",
           "read_latent_index", "is_latent_folder"]

LATENT_FORMAT = "meanflow-latents"
LATENT_VERSION = 1
INDEX_NAME = "index.json"
_IN_MEMORY_BYTES = 4 << 30    # mean + std up to this size are read into memory ("auto")
_OPEN_SHARDS = 64             # lazily opened shards kept open at once


def shard_name(shard: int) -> str:
    """Path of shard ``shard`` relative to the latent folder."""
    return f"shards/shard-{shard:05d}.safetensors"


def _index_path(path: str | os.PathLike[str]) -> Path:
    p = Path(os.fspath(path))
    return p / INDEX_NAME if p.is_dir() else p


def is_latent_folder(path: str | os.PathLike[str]) -> bool:
    """True for a folder holding a latent ``index.json``, or such an index file itself."""
    file = _index_path(path)
    if not file.is_file() or file.suffix != ".json":
        return False
    try:
        return json.loads(file.read_text()).get("format") == LATENT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_latent_index(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``index.json`` of a latent folder (or the index file itself), checked for format."""
    file = _index_path(path)
    try:
        index = json.loads(file.read_text())
    except FileNotFoundError:
        raise DataError(f"{file} not found: make the latents with meanflow prepare-latents"
                        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {file} ({one_line(exc)}); rerun meanflow "
                        "prepare-latents into that folder") from None
    if not isinstance(index, dict) or index.get("format") != LATENT_FORMAT:
        raise DataError(f"{file} is not a latent index (format {LATENT_FORMAT!r}); make one "
                        "with meanflow prepare-latents")
    if index.get("version") != LATENT_VERSION:
        raise DataError(f"{file} has latent format version {index.get('version')!r}; this "
                        f"meanflow reads version {LATENT_VERSION}: prepare the latents again")
    return index


class LatentShards:
    """Labelled VAE latents from a latent folder; a :class:`~meanflow.data.BatchSource`.

    Args:
        path: the folder written by ``meanflow prepare-latents``, or its ``index.json``.
        sample_posterior: draw ``mean + std * e`` (True, the ImageNet recipe) or use ``mean`` only.
        scale: multiplies every draw; default the folder's ``scale`` (0.18215 for SD-VAE).
        in_memory: read every shard's mean and std into memory (True), read the drawn rows
            from the memory-mapped shards (False), or decide by size (None: up to 4 GiB).

    Attributes:
        shape: one latent's shape (C, h, w); ``num_classes``: classes, None if unlabelled;
        ``labels``: (N,) int64 or None; ``index``: the parsed ``index.json``;
        ``vae``: the VAE the latents came from (its ``spec`` and checksum).
    """

    def __init__(self, path: str | os.PathLike[str], sample_posterior: bool = True,
                 scale: float | None = None, in_memory: bool | None = None) -> None:
        if not isinstance(sample_posterior, bool):
            raise ConfigError(f"sample_posterior={sample_posterior!r} must be true or false")
        if in_memory is not None and not isinstance(in_memory, bool):
            raise ConfigError(f"in_memory={in_memory!r} must be true, false or null (auto)")
        self.root = _index_path(path).parent
        self.index = read_latent_index(path)
        if not self.index.get("complete"):
            raise DataError(f"the latents in {self.root} are incomplete (a preparation was "
                            "stopped): rerun the same meanflow prepare-latents command to finish")
        self.scale = check_scale(self.index["scale"] if scale is None else scale)
        shift = self.index.get("shift") or 0.0
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) \
                or not math.isfinite(shift):
            raise DataError(f"{self.root}/{INDEX_NAME} has shift {shift!r}, not a finite "
                            "number; prepare the latents again")
        #: Subtracted from every draw before scaling: the VAE's ``shift_factor`` (SD3, FLUX).
        self.shift = float(shift)
        self.sample_posterior = sample_posterior
        self.shape: tuple[int, ...] = tuple(int(n) for n in self.index["latent_shape"])
        self.vae: dict[str, Any] = dict(self.index.get("vae") or {})
        self._files = [self.root / shard_name(s) for s in range(int(self.index["num_shards"]))]
        self._open: OrderedDict[int, Any] = OrderedDict()
        labels, counts = [], []
        for s, file in enumerate(self._files):
            with self._safe_open(file) as f:
                meta = f.metadata() or {}
                if meta.get("plan_id") != self.index["plan_id"]:
                    raise DataError(f"{file} belongs to another preparation than {self.root}/"
                                    f"{INDEX_NAME}: rerun meanflow prepare-latents")
                labels.append(f.get_tensor("label").to(torch.int64))
                counts.append(labels[-1].shape[0])
        self._starts = torch.tensor([0] + counts).cumsum(0)     # (S + 1,) first image of shard
        n = int(self._starts[-1])
        if n != int(self.index["num_images"]) or n < 1:
            raise DataError(f"{self.root} holds {n} latents, its index says "
                            f"{self.index['num_images']}: rerun meanflow prepare-latents")
        all_labels = torch.cat(labels)
        self.num_classes: int | None = self.index.get("num_classes")
        self.labels: Tensor | None = None if self.num_classes is None else all_labels
        per_image = 2 * torch.finfo(getattr(torch, self.index["dtype"])).bits // 8
        size = n * per_image * int(torch.tensor(self.shape).prod())
        self.in_memory = size <= _IN_MEMORY_BYTES if in_memory is None else in_memory
        self._mean = self._std = None
        if self.in_memory:
            parts = [self._read(s, None) for s in range(len(self._files))]
            self._mean = torch.cat([m for m, _ in parts])
            self._std = torch.cat([s for _, s in parts])

    @staticmethod
    def _safe_open(file: Path) -> Any:
        from safetensors import safe_open
        if not file.is_file():
            raise DataError(f"latent shard {file} is missing: rerun meanflow prepare-latents "
                            "to write it")
        try:
            return safe_open(str(file), framework="pt")
        except Exception as exc:  # SafetensorError and OSError
            raise DataError(f"cannot read latent shard {file} ({one_line(exc)}); "
                            "delete it and rerun meanflow prepare-latents") from None

    def _handle(self, shard: int) -> Any:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        if len(self._open) >= _OPEN_SHARDS:
            _, old = self._open.popitem(last=False)
            old.__exit__(None, None, None)
        handle = self._safe_open(self._files[shard]).__enter__()
        self._open[shard] = handle
        return handle

    def _read(self, shard: int, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        """(mean, std) float32 of ``rows`` of a shard (all rows when None)."""
        f = self._handle(shard)
        if rows is None:
            return (f.get_tensor("mean").float(), f.get_tensor("std").float())
        mean, std = f.get_slice("mean"), f.get_slice("std")
        return (torch.cat([mean[int(i):int(i) + 1] for i in rows]).float(),
                torch.cat([std[int(i):int(i) + 1] for i in rows]).float())

    def posterior(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Stored (mean, std), each (B, C, h, w) float32 unscaled, of images ``index`` (B,)."""
        if self._mean is not None:
            return self._mean[index], self._std[index]
        shard = torch.searchsorted(self._starts, index, right=True) - 1
        mean = torch.empty((index.shape[0], *self.shape))
        std = torch.empty_like(mean)
        for s in shard.unique().tolist():
            where = (shard == s).nonzero().flatten()
            mean[where], std[where] = self._read(s, index[where] - self._starts[s])
        return mean, std

    def __len__(self) -> int:
        return int(self._starts[-1])

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """``(mean + std * e - shift) * scale`` of ``batch_size`` images drawn with replacement, e
        drawn from ``generator`` too; (B, C, h, w) float32 and (B,) labels or None."""
        check_batch_args(batch_size, generator)
        index = torch.randint(0, len(self), (batch_size,), generator=generator)
        return self.take(index, generator)

    def take(self, indices: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """``(mean + std * e - shift) * scale`` of images ``indices`` (B,), e drawn from ``generator``
        (also without ``sample_posterior``, which then uses ``mean``); (B, C, h, w) float32
        and (B,) labels or None."""
        index = check_take_args(indices, len(self), generator)
        noise = torch.randn((index.shape[0], *self.shape), generator=generator)
        mean, std = self.posterior(index)
        x = mean + std * noise if self.sample_posterior else mean
        if self.shift:
            x = x - self.shift
        return x * self.scale, None if self.labels is None else self.labels[index]

    def __repr__(self) -> str:
        return (f"LatentShards(root={str(self.root)!r}, N={len(self)}, shape={self.shape}, "
                f"num_classes={self.num_classes}, scale={self.scale:g}, shift={self.shift:g}, "
                f"in_memory={self.in_memory})")
