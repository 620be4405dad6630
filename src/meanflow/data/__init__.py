"""Datasets as *batch sources*: objects that draw batches from an explicit generator.

The training loop seeds a :class:`torch.Generator` per step and asks the dataset for a batch,
so resuming a run reproduces its batches exactly. :func:`build_dataset` turns a name (one of
:data:`TOY_DATASETS`, ``fashion-mnist``, ``cifar10``), a folder of images or a
``.npy``/``.npz``/``.csv`` path into a :class:`BatchSource`. :class:`EDMAugment` is the
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


_TOY_REGISTRY: dict[str, type] = {
    "8gaussians": EightGaussians,
    "checkerboard": Checkerboard,
    "moons": TwoMoons,
    "spirals": Spirals,
}

#: Names of the built-in 2-D toy datasets accepted by :func:`build_dataset`.
TOY_DATASETS: tuple[str, ...] = tuple(_TOY_REGISTRY)

# Every name build_dataset accepts (for error messages).
_NAMES: tuple[str, ...] = (*TOY_DATASETS, "fashion-mnist", "cifar10")


def build_dataset(name_or_path: str | os.PathLike[str], **kwargs: Any) -> BatchSource:
    """Build a batch source from a dataset name, an image folder or a point file path.

    Args:
        name_or_path: one of :data:`TOY_DATASETS` (case-insensitive), ``fashion-mnist``
            (IDX files of the Debian package dataset-fashion-mnist), ``cifar10`` (with
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
            ``labels=...`` for a point file, or ``resolution``, ``channels`` and ``hflip``
            for an image folder.

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
    if key == "fashion-mnist":
        _check_options(key, ImageArray.fashion_mnist, kwargs)
        return ImageArray.fashion_mnist(**kwargs)
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
