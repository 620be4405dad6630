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
With the option ``channel_norm = {"mean": [mu_1..mu_C], "std": [sigma_1..sigma_C]}`` (the iMF
recipe, docs/imf.md) the folder's scalar scale and shift are replaced by per-channel ones:
``x = (mean + std * e - mu_c) / sigma_c`` for channel c, in raw latent units. Either way a
sample decodes as ``z = x / scale + shift`` (per channel: scale_c = 1 / sigma_c, shift_c = mu_c);
:func:`latent_transform` says which (scale, shift) a run's samples decode with.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from meanflow.data.checks import check_batch_args, check_scale, check_take_args, one_line
from meanflow.errors import ConfigError, DataError

__all__ = ["LatentShards", "LATENT_FORMAT", "LATENT_VERSION", "INDEX_NAME", "shard_name",
           "read_latent_index", "is_latent_folder", "check_channel_norm", "latent_transform",
           "SD_VAE_IMF_CHANNEL_NORM", "Factor"]

LATENT_FORMAT = "meanflow-latents"
LATENT_VERSION = 1
INDEX_NAME = "index.json"
_IN_MEMORY_BYTES = 4 << 30    # mean + std up to this size are read into memory ("auto")
_OPEN_SHARDS = 64             # lazily opened shards kept open at once

#: The per-channel statistics (of raw sd-vae-ft-mse latents of ImageNet 256) with which the iMF
#: recipe normalises its training latents (docs/imf.md): a ``channel_norm`` option.
SD_VAE_IMF_CHANNEL_NORM: dict[str, list[float]] = {
    "mean": [0.86488, -0.27787343, 0.21616915, 0.3738409],
    "std": [4.85503674, 5.31922414, 3.93725398, 3.9870003],
}

#: A latent scale or shift: one number for all channels, or one per channel.
Factor = Union[float, tuple[float, ...], list[float]]


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


def check_channel_norm(value: Any, channels: int | None = None
                       ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std), each a tuple of C floats, of a ``channel_norm`` option ``{"mean": [...],
    "std": [...]}`` (lists, tuples or 1-D tensors); the one place it is checked. A one-line
    :class:`ConfigError` unless both hold ``channels`` (when given; else as many as each other,
    at least one) finite numbers and every std is positive."""
    if not isinstance(value, Mapping) or set(value) != {"mean", "std"}:
        raise ConfigError(f"channel_norm={value!r} must be a mapping {{mean: [...], std: "
                          "[...]}} with one value per latent channel in each")
    out = []
    for key in ("mean", "std"):
        seq = value[key]
        seq = seq.tolist() if hasattr(seq, "tolist") else seq
        if (not isinstance(seq, (list, tuple)) or not seq
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seq)):
            raise ConfigError(f"channel_norm.{key}={seq!r} must be a non-empty list of numbers, "
                              "one per latent channel")
        nums = tuple(float(v) for v in seq)
        want = len(out[0]) if channels is None and out else channels
        if want is not None and len(nums) != want:
            raise ConfigError(f"channel_norm.{key} has {len(nums)} value(s) and the latents "
                              f"have {want} channel(s): give one per channel")
        if not all(math.isfinite(v) for v in nums):
            raise ConfigError(f"channel_norm.{key}={list(nums)} must hold finite numbers")
        out.append(nums)
    mean, std = out
    if not all(v > 0 for v in std):
        raise ConfigError(f"channel_norm.std={list(std)} must be positive: each channel is "
                          "divided by its std")
    return mean, std


def _refuse_both(scale: Any, channel_norm: Any) -> None:
    if scale is not None and channel_norm is not None:
        raise ConfigError("give scale or channel_norm, not both: channel_norm replaces the "
                          "folder's scale and shift with per-channel ones")


def latent_transform(index: Mapping[str, Any] | None, options: Mapping[str, Any] | None = None
                     ) -> tuple[Factor | None, Factor | None]:
    """(scale, shift) with which the samples of a run on a latent folder decode,
    ``z = x / scale + shift``, given the folder's ``index.json`` (None when unknown) and the
    run's ``data.options`` (the keyword arguments of :class:`LatentShards`).

    With ``channel_norm`` both are lists of C floats, scale_c = 1 / std_c and shift_c = mean_c
    (checked against the index's channels when it is known); else the option ``scale`` or the
    index's scale, and the index's shift (0.0 when it has none), as floats. None where it is
    unknown (no index): the caller's default (0.18215, the VAE's own ``shift_factor``)."""
    options = dict(options or {})
    norm, scale = options.get("channel_norm"), options.get("scale")
    _refuse_both(scale, norm)
    if norm is not None:
        channels = None if index is None else int(index["latent_shape"][0])
        mean, std = check_channel_norm(norm, channels)
        return [1.0 / s for s in std], list(mean)
    if scale is not None:
        scale = check_scale(scale)
    elif index is not None:
        scale = float(index["scale"])
    shift = None if index is None else float(index.get("shift") or 0.0)
    return scale, shift


class LatentShards:
    """Labelled VAE latents from a latent folder; a :class:`~meanflow.data.BatchSource`.

    Args:
        path: the folder written by ``meanflow prepare-latents``, or its ``index.json``.
        sample_posterior: draw ``mean + std * e`` (True, the ImageNet recipe) or use ``mean`` only.
        scale: multiplies every draw; default the folder's ``scale`` (0.18215 for SD-VAE).
        in_memory: read every shard's mean and std into memory (True), read the drawn rows
            from the memory-mapped shards (False), or decide by size (None: up to 4 GiB).
        channel_norm: ``{"mean": [C numbers], "std": [C numbers]}``: draw
            ``(mean + std * e - mu_c) / sigma_c`` instead, per channel c, in place of the
            folder's scale and shift (not with ``scale``); checked by
            :func:`check_channel_norm`. :data:`SD_VAE_IMF_CHANNEL_NORM` is the iMF recipe's.

    Attributes:
        shape: one latent's shape (C, h, w); ``num_classes``: classes, None if unlabelled;
        ``scale``, ``shift``: the draw's ``x = (z - shift) * scale``, floats, or with
        ``channel_norm`` tuples of C (1 / sigma_c and mu_c); ``channel_norm``: (mu, sigma)
        tuples, or None;
        ``labels``: (N,) int64 or None; ``index``: the parsed ``index.json``;
        ``vae``: the VAE the latents came from (its ``spec`` and checksum).
    """

    def __init__(self, path: str | os.PathLike[str], sample_posterior: bool = True,
                 scale: float | None = None, in_memory: bool | None = None,
                 channel_norm: Mapping[str, Any] | None = None) -> None:
        _refuse_both(scale, channel_norm)
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
        self.shift: float | tuple[float, ...] = float(shift)
        self.sample_posterior = sample_posterior
        self.shape: tuple[int, ...] = tuple(int(n) for n in self.index["latent_shape"])
        self.channel_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        if channel_norm is not None:
            mu, sigma = check_channel_norm(channel_norm, self.shape[0])
            self.channel_norm = (mu, sigma)
            self.scale, self.shift = tuple(1.0 / s for s in sigma), mu
            view = (-1,) + (1,) * (len(self.shape) - 1)       # (C, 1, 1): broadcast per channel
            self._mu = torch.tensor(mu, dtype=torch.float32).view(view)
            self._sigma = torch.tensor(sigma, dtype=torch.float32).view(view)
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
        """``(mean + std * e - shift) * scale`` (with ``channel_norm``: ``(mean + std * e - mu_c)
        / sigma_c``) of ``batch_size`` images drawn with replacement, e
        drawn from ``generator`` too; (B, C, h, w) float32 and (B,) labels or None."""
        check_batch_args(batch_size, generator)
        index = torch.randint(0, len(self), (batch_size,), generator=generator)
        return self.take(index, generator)

    def take(self, indices: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """``(mean + std * e - shift) * scale`` (with ``channel_norm``: ``(mean + std * e - mu_c)
        / sigma_c``) of images ``indices`` (B,), e drawn from ``generator`` (also without
        ``sample_posterior``, which then uses ``mean``); (B, C, h, w) float32 and (B,) labels
        or None."""
        index = check_take_args(indices, len(self), generator)
        noise = torch.randn((index.shape[0], *self.shape), generator=generator)
        mean, std = self.posterior(index)
        x = mean + std * noise if self.sample_posterior else mean
        labels = None if self.labels is None else self.labels[index]
        if self.channel_norm is not None:
            return (x - self._mu) / self._sigma, labels
        if self.shift:
            x = x - self.shift
        return x * self.scale, labels

    def __repr__(self) -> str:
        norm = (f"channel_norm=(mean={list(self.channel_norm[0])}, "
                f"std={list(self.channel_norm[1])})" if self.channel_norm is not None
                else f"scale={self.scale:g}, shift={self.shift:g}")
        return (f"LatentShards(root={str(self.root)!r}, N={len(self)}, shape={self.shape}, "
                f"num_classes={self.num_classes}, {norm}, in_memory={self.in_memory})")
