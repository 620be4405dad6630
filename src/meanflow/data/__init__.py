"""Datasets as *batch sources*: objects that draw batches from an explicit generator.

The training loop seeds a :class:`torch.Generator` per step and asks the dataset for a batch,
so resuming a run reproduces its batches exactly. Finite sources (:class:`FiniteSource`: every
one but the endless 2-D toys) also give chosen samples with ``take``, which the loop uses to
visit them epoch by epoch in the order of :class:`EpochOrder`. :func:`build_dataset` turns a
name (one of :data:`TOY_DATASETS`, ``fashion-mnist``, ``mnist``, ``cifar10``), a folder of
images or a ``.npy``/``.npz``/``.csv`` path into a :class:`BatchSource`. :class:`EDMAugment` is the
EDM-style geometric augmentation whose label the U-Net takes as a condition.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from meanflow.data.augment import EDMAugment
from meanflow.data.arrays import ArraySamples, npz_sample_kind
from meanflow.data.folder import FolderImages, load_image_folder
from meanflow.data.images import FASHION_MNIST_ROOT, ImageArray
from meanflow.data.latents import LatentShards, is_latent_folder
from meanflow.data.points import POINT_FILE_SUFFIXES, PointCloud
from meanflow.data.toy import Checkerboard, EightGaussians, Spirals, TwoMoons
from meanflow.errors import ConfigError

__all__ = [
    "ImageArray", "FASHION_MNIST_ROOT",
    "FolderImages", "load_image_folder", "ArraySamples", "LatentShards",
    "EDMAugment",
    "BatchSource",
    "FiniteSource",
    "EpochOrder",
    "epoch_seed",
    "TOY_DATASETS",
    "build_dataset",
    "EightGaussians",
    "Checkerboard",
    "TwoMoons",
    "Spirals",
    "PointCloud",
]


@runtime_checkable
class BatchSource(Protocol):
    """A dataset the training loop can draw batches from.

    Every source has ``batch``: samples drawn with replacement (or, for the endless toy
    distributions, fresh ones). A *finite* source of N samples also has ``__len__`` and
    ``take(indices, generator)`` (:class:`FiniteSource`), which ``data.order: epochs`` needs.

    Attributes:
        shape: shape of one sample, e.g. ``(2,)``.
        num_classes: number of label classes, or ``None`` when the data has no labels.
    """

    shape: tuple[int, ...]
    num_classes: int | None

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """Draw a batch using only ``generator`` for randomness (same state -> same batch).

        Returns:
            ``x`` of shape ``(B, *shape)`` float32 on CPU, and ``y`` of shape ``(B,)`` int64
            labels in ``[0, num_classes)``, or ``None`` when the data has no labels.
        """
        ...


@runtime_checkable
class FiniteSource(BatchSource, Protocol):
    """A :class:`BatchSource` of ``len(source)`` samples that can give chosen ones.

    ``take(indices, generator)`` returns the samples ``indices`` ((B,) integers in
    ``[0, N)``, repeats allowed) in that order, in the format of ``batch``; ``generator`` is
    the only source of their per-sample randomness (the random horizontal flips of an image
    set with ``hflip``, a latent source's draw from each image's posterior), drawn in the
    order of ``indices``, so the same indices and generator state give a bit-identical batch.
    The built-in finite sources draw ``batch`` as ``take(randint(0, N, (B,)), generator)``
    with the same generator.
    """

    def __len__(self) -> int:
        ...

    def take(self, indices: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        ...


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for the permutation of ``epoch`` under the run seed ``seed``.

    The training loop's per-step seeds with a rank of -1: never the seed of a step of a rank.
    """
    return ((seed * 1_000_003 - 1) * 1_000_000_007 + epoch) % (2 ** 63 - 1)


class EpochOrder:
    """The order in which ``data.order: epochs`` visits a finite source of ``size`` samples.

    Global batches of ``batch_size`` (B) samples are taken without replacement: an epoch is
    S = size // B steps, and step k (0-based, counted over the whole run) takes the samples
    ``perm_e[(k % S) * B : (k % S + 1) * B]`` of epoch e = k // S, where ``perm_e`` is a
    permutation of ``range(size)`` drawn from a generator seeded by (``seed``, e) only. The
    last ``size - S * B`` samples of each permutation are dropped, a different tail each epoch
    (as a distributed sampler with shuffling and a loader that drops the last batch). The
    order is thus a function of (seed, size, B, k): the number of processes and where a run
    was resumed change nothing; each process takes its contiguous slice of the global batch.

    Raises:
        ConfigError: when ``size < batch_size`` (not one whole batch per epoch).
    """

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        if batch_size < 1 or size < batch_size:
            raise ConfigError(f"an epoch of {size} samples holds no whole batch of "
                              f"{batch_size}: lower the batch size, or draw with replacement "
                              "(data.order=random)")
        self.size, self.batch_size, self.seed = int(size), int(batch_size), int(seed)
        #: Global batches per epoch, ``size // batch_size``.
        self.steps_per_epoch: int = self.size // self.batch_size
        self._cached: tuple[int, Tensor] | None = None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of 0-based step ``step``."""
        return divmod(int(step), self.steps_per_epoch)

    def permutation(self, epoch: int) -> Tensor:
        """The (size,) int64 permutation of epoch ``epoch`` (kept until another is asked)."""
        if self._cached is None or self._cached[0] != epoch:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._cached = (epoch, torch.randperm(self.size, generator=gen))
        return self._cached[1]

    def indices(self, step: int, start: int = 0, stop: int | None = None) -> Tensor:
        """Sample indices ``[start, stop)`` of the global batch of step ``step``: (stop - start,)
        int64 (the whole global batch of B by default)."""
        stop = self.batch_size if stop is None else stop
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"slice [{start}, {stop}) of a batch of {self.batch_size}")
        epoch, i = self.position(step)
        offset = i * self.batch_size
        return self.permutation(epoch)[offset + start:offset + stop]

    def __repr__(self) -> str:
        return (f"EpochOrder(size={self.size}, batch_size={self.batch_size}, seed={self.seed}, "
                f"steps_per_epoch={self.steps_per_epoch})")


_TOY_REGISTRY: dict[str, type] = {
    "8gaussians": EightGaussians,
    "checkerboard": Checkerboard,
    "moons": TwoMoons,
    "spirals": Spirals,
}

#: Names of the built-in 2-D toy datasets accepted by :func:`build_dataset`.
TOY_DATASETS: tuple[str, ...] = tuple(_TOY_REGISTRY)

# Every name build_dataset accepts (for error messages).
_NAMES: tuple[str, ...] = (*TOY_DATASETS, "fashion-mnist", "mnist", "cifar10")


def build_dataset(name_or_path: str | os.PathLike[str], **kwargs: Any) -> BatchSource:
    """Build a batch source from a dataset name, an image folder or a point file path.

    Args:
        name_or_path: one of :data:`TOY_DATASETS` (case-insensitive), ``fashion-mnist`` or
            ``mnist`` (their IDX files, from ``root=`` or where ``meanflow data NAME`` puts
            them, or for Fashion-MNIST the Debian package dataset-fashion-mnist), ``cifar10`` (with
            ``root=`` its cifar-10-batches-py folder), the path of an existing folder of
            .png/.jpg/.jpeg images (read by :func:`load_image_folder`; class sub-folders give
            labels), or a path ending in ``.npy``, ``.npz`` or ``.csv``. A ``.npz`` whose
            ``x`` is uint8 (N, H, W[, C]) is read as images (:meth:`ImageArray.from_npz`), one
            whose ``x`` is real with 3 or more dimensions as samples of that shape, e.g.
            latents (:class:`ArraySamples`); anything else as points
            (:meth:`PointCloud.from_file`). A folder written by ``meanflow prepare-latents``
            (or its ``index.json``) gives VAE latents drawn from their posterior
            (:class:`LatentShards`). Names are matched before paths: write ``./moons``
            for a folder called ``moons``.
        **kwargs: constructor options of the toy class (e.g. ``std=0.3`` for ``8gaussians``),
            ``labels=...`` for a point file, ``resolution``, ``channels`` and ``hflip``
            for an image folder, or for a latent folder ``sample_posterior``, ``in_memory``
            and ``scale`` or ``channel_norm`` (per-channel ``{mean: [...], std: [...]}``
            replacing the folder's scale and shift, :class:`LatentShards`).

    Returns:
        The dataset, following :class:`BatchSource`.

    Raises:
        ConfigError: for an unknown name or option.
        DataError: for a missing or malformed file.
    """
    text = os.fspath(name_or_path) if isinstance(name_or_path, os.PathLike) else name_or_path
    if not isinstance(text, str):
        raise ConfigError(f"dataset must be a name or path string, got {text!r}: "
                          f"choose one of {', '.join(_NAMES)}, or give an image folder or a "
                          ".npy/.npz/.csv path")
    key = text.strip().lower()
    if key in _TOY_REGISTRY:
        cls = _TOY_REGISTRY[key]
        _check_options(key, cls, kwargs)
        return cls(**kwargs)
    if key == "cifar10":
        if "root" not in kwargs:
            raise ConfigError("cifar10 needs its folder: set data.options.root to the "
                              "cifar-10-batches-py folder")
        _check_options(key, ImageArray.cifar10, kwargs)
        return ImageArray.cifar10(**kwargs)
    if key in ("fashion-mnist", "mnist"):   # `meanflow data NAME` puts their files in place
        loader = ImageArray.fashion_mnist if key == "fashion-mnist" else ImageArray.mnist
        _check_options(key, loader, kwargs)
        return loader(**kwargs)
    if is_latent_folder(text):   # `meanflow prepare-latents` output (folder or index.json)
        _check_options(text, LatentShards, kwargs)
        return LatentShards(text, **kwargs)
    if os.path.isdir(text):
        _check_options(text, load_image_folder, kwargs)
        return load_image_folder(text, **kwargs)
    if key.endswith(".npz") and os.path.isfile(text):
        kind = npz_sample_kind(text)
        if kind == "images":     # uint8 (N, H, W[, C]) pictures -> [-1, 1]
            _check_options(text, ImageArray.from_npz, kwargs)
            return ImageArray.from_npz(text, **kwargs)
        if kind == "arrays":     # real (N, C, H, W, ...) samples such as latents, as stored
            _check_options(text, ArraySamples.from_npz, kwargs)
            return ArraySamples.from_npz(text, **kwargs)
    if key.endswith(POINT_FILE_SUFFIXES):
        _check_options(text, PointCloud.from_file, kwargs)
        return PointCloud.from_file(text, **kwargs)
    raise ConfigError(f"unknown dataset {text!r}: choose one of {', '.join(_NAMES)}, "
                      "or give an existing image folder or a .npy/.npz/.csv path")


def _check_options(name: str, target: Any, kwargs: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` if ``target`` does not take all keyword options ``kwargs``."""
    accepted = [p for p in inspect.signature(target).parameters if p not in ("self", "path")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        choices = ", ".join(accepted) if accepted else "none"
        raise ConfigError(f"dataset {name!r} does not take option(s) {', '.join(unknown)}; "
                          f"accepted options: {choices}")
