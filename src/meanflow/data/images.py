"""Image datasets held in memory as ``uint8`` and drawn as float32 batches in ``[-1, 1]``.

:class:`ImageArray` wraps an ``(N, C, H, W)`` ``uint8`` tensor (plus optional labels). It can
be read from MNIST-style IDX files (:meth:`ImageArray.from_idx`, gzipped or not), from the
folders of ``meanflow data`` or the Debian package (:meth:`ImageArray.fashion_mnist`,
:meth:`ImageArray.mnist`) or from a ``.npz`` file
(:meth:`ImageArray.from_npz`), or from CIFAR-10's ``cifar-10-batches-py`` pickles
(:meth:`ImageArray.cifar10`), which a restricted unpickler reads: it rebuilds numpy arrays and
plain containers and refuses every other global, so a crafted file cannot run code.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from meanflow.data.checks import check_batch_args, check_labels, check_take_args, one_line
from meanflow.data.idx_sets import IDX_SETS, find_idx_set
from meanflow.errors import ConfigError, DataError
from meanflow.pixels import from_uint8

__all__ = ["ImageArray", "FASHION_MNIST_ROOT", "CIFAR10_TRAIN", "CIFAR10_TEST"]

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)
# the labels' names as the CIFAR-10 page gives them, label 0 first
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")

# The only globals a CIFAR-10 batch pickle needs: numpy's array reconstruction, and the codec
# call with which protocol-2 pickles written by Python 3 carry raw bytes. None runs code.
_SAFE_GLOBALS = {("_codecs", "encode"), ("numpy.core.multiarray", "_reconstruct"),
                 ("numpy._core.multiarray", "_reconstruct"),
                 ("numpy", "ndarray"), ("numpy", "dtype")}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201 (pickle's own signature)
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

#: Where the Debian package ``dataset-fashion-mnist`` installs the Fashion-MNIST files.
FASHION_MNIST_ROOT = str(IDX_SETS["fashion-mnist"].system_root)

_IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions (N, H, W)
_IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dimension (N,)
_GZIP_MAGIC = b"\x1f\x8b"
_CHANNELS = (1, 3, 4)


class ImageArray:
    """``N`` images of shape ``(C, H, W)``, optionally labelled: a finite
    :class:`~meanflow.data.BatchSource` (``take`` gives chosen images, ``batch`` draws them
    uniformly with replacement).

    Images are stored as ``uint8`` and mapped per batch to float32 in ``[-1, 1]`` by
    :func:`meanflow.pixels.from_uint8` (``x / 127.5 - 1``: ``0 -> -1`` and ``255 -> 1``).

    Args:
        images: ``(N, C, H, W)`` ``uint8`` tensor, ``N >= 1``.
        labels: optional ``(N,)`` non-negative class labels (an integer tensor, or a float
            tensor holding whole numbers); stored as int64. ``num_classes`` is
            ``max(labels) + 1``.
        hflip: if true, each drawn image is mirrored left-right with probability 1/2 (drawn
            from the generator given to ``batch`` or ``take``).
        class_names: optional name of each class, label k first (``num_classes`` of them);
            a run records them, and ``meanflow sample --label`` accepts them.

    Raises:
        DataError: if a shape, dtype or label is invalid.
        ConfigError: if ``hflip`` is not a bool.
    """

    def __init__(self, images: Tensor, labels: Tensor | None = None, hflip: bool = False,
                 class_names: Sequence[str] | None = None) -> None:
        if not isinstance(images, Tensor):
            raise DataError(f"images must be a torch.Tensor, got {type(images).__name__}; "
                            "convert them with torch.as_tensor")
        if images.dtype != torch.uint8:
            raise DataError(f"images have dtype {images.dtype}, need uint8; "
                            "convert pixel values in [0, 255] with .to(torch.uint8)")
        if images.dim() != 4:
            raise DataError(f"images must be 4-D (N, C, H, W), got shape {tuple(images.shape)}; "
                            "reshape them to (N, C, H, W)")
        n, c, h, w = images.shape
        if n < 1 or c < 1 or h < 1 or w < 1:
            raise DataError(f"images have an empty dimension, shape {tuple(images.shape)}; "
                            "give at least one image of at least 1x1 pixels")
        if not isinstance(hflip, bool):
            raise ConfigError(f"hflip must be True or False, got {hflip!r}; pass hflip=True")
        #: ``(N, C, H, W)`` uint8 images.
        self.images: Tensor = images.detach().cpu().contiguous()
        #: ``(N,)`` int64 labels, or ``None``.
        self.labels: Tensor | None = None if labels is None else check_labels(labels, n, "image")
        #: Whether batches are randomly mirrored left-right.
        self.hflip: bool = hflip
        #: Shape of one sample, ``(C, H, W)``.
        self.shape: tuple[int, ...] = (c, h, w)
        #: ``max(labels) + 1``, or ``None`` without labels.
        self.num_classes: int | None = (
            None if self.labels is None else int(self.labels.max()) + 1
        )
        if class_names is not None and (
                self.num_classes is None or len(class_names) != self.num_classes
                or not all(isinstance(name, str) and name for name in class_names)):
            raise DataError(f"class_names must name each of the {self.num_classes} classes of "
                            f"the labels with a non-empty string, got {len(class_names)}; "
                            "give one name per class, label 0 first")
        #: The name of class k, or ``None`` where the data name no classes.
        self.class_names: tuple[str, ...] | None = (
            None if class_names is None else tuple(class_names))

    def named(self, class_names: Sequence[str] | None) -> ImageArray:
        """Itself, its classes named ``class_names`` where the labels hold exactly that many
        classes (a standard set's names; a cut-down copy of the set keeps its classes unnamed,
        since label k may then not be the set's class k)."""
        if class_names is not None and self.num_classes == len(class_names):
            self.class_names = tuple(class_names)
        return self

    def __len__(self) -> int:
        """Number of images ``N``."""
        return self.images.shape[0]

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """Draw ``batch_size`` images uniformly with replacement, using only ``generator``.

        Returns:
            ``x`` of shape ``(B, C, H, W)`` float32 in ``[-1, 1]`` and ``y`` of shape ``(B,)``
            int64, or ``None`` when there are no labels.
        """
        check_batch_args(batch_size, generator)
        index = torch.randint(0, self.images.shape[0], (batch_size,), generator=generator)
        return self.take(index, generator)

    def take(self, indices: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """The images ``indices`` (B,) in that order, each mirrored with probability 1/2 when
        ``hflip`` (the flips drawn from ``generator``).

        Returns:
            ``x`` of shape ``(B, C, H, W)`` float32 in ``[-1, 1]`` and ``y`` of shape ``(B,)``
            int64, or ``None`` when there are no labels.
        """
        index = check_take_args(indices, len(self), generator)
        x = self.images[index]
        if self.hflip:
            flip = torch.randint(0, 2, (index.shape[0],), generator=generator).bool()
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = None if self.labels is None else self.labels[index]
        return from_uint8(x), y

    def __repr__(self) -> str:
        c, h, w = self.shape
        return (f"ImageArray(N={len(self)}, shape=({c}, {h}, {w}), "
                f"num_classes={self.num_classes}, hflip={self.hflip})")

    @classmethod
    def from_idx(cls, images_path: str | os.PathLike[str],
                 labels_path: str | os.PathLike[str] | None = None,
                 hflip: bool = False,
                 class_names: Sequence[str] | None = None) -> ImageArray:
        """Read MNIST-style IDX files (gzipped or not; detected from the content).

        Args:
            images_path: IDX file of ``uint8`` images ``(N, H, W)`` (magic ``0x00000803``).
            labels_path: optional IDX file of ``uint8`` labels ``(N,)`` (magic ``0x00000801``).
            hflip, class_names: see :class:`ImageArray` (names need the labels).

        Returns:
            An :class:`ImageArray` with shape ``(1, H, W)``.

        Raises:
            DataError: if a file is missing, truncated, has a wrong magic number, or the label
                count differs from the image count.
        """
        image_file = Path(os.fspath(images_path))
        images = _read_idx(image_file, _IDX_IMAGES_MAGIC, "images")
        labels = None
        if labels_path is not None:
            label_file = Path(os.fspath(labels_path))
            labels = _read_idx(label_file, _IDX_LABELS_MAGIC, "labels")
            if labels.shape[0] != images.shape[0]:
                raise DataError(f"{label_file} holds {labels.shape[0]} labels but {image_file} "
                                f"holds {images.shape[0]} images; give the matching labels file")
        x = torch.from_numpy(images).unsqueeze(1)
        y = None if labels is None else torch.from_numpy(labels).to(torch.int64)
        return cls(x, y, hflip=hflip, class_names=None if y is None else class_names)

    @classmethod
    def fashion_mnist(cls, root: str | os.PathLike[str] | None = None,
                      split: str = "train", hflip: bool = False) -> ImageArray:
        """Load Fashion-MNIST (60000 train or 10000 test images, ``(1, 28, 28)``, 10 classes).

        Args:
            root: folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``; by default
                the folder ``meanflow data fashion-mnist`` fills, then the one the Debian
                package ``dataset-fashion-mnist`` installs
                (:func:`meanflow.data.idx_sets.idx_set_folders`).
            split: ``"train"`` or ``"test"``.
            hflip: see :class:`ImageArray`.

        Raises:
            ConfigError: for an unknown ``split``.
            DataError: if the files are missing (the message names them and
                ``meanflow data fashion-mnist``) or malformed.
        """
        return cls._idx_set("fashion-mnist", root, split, hflip)

    @classmethod
    def mnist(cls, root: str | os.PathLike[str] | None = None, split: str = "train",
              hflip: bool = False) -> ImageArray:
        """Load MNIST (60000 train or 10000 test digits, ``(1, 28, 28)``, 10 classes); as
        :meth:`fashion_mnist`, from the folder ``meanflow data mnist`` fills by default."""
        return cls._idx_set("mnist", root, split, hflip)

    @classmethod
    def _idx_set(cls, name: str, root: str | os.PathLike[str] | None, split: str,
                 hflip: bool) -> ImageArray:
        prefixes = {"train": "train", "test": "t10k"}
        if split not in prefixes:
            raise ConfigError(f"unknown {name} split {split!r}; "
                              "set data.options.split to train or test")
        prefix = prefixes[split]
        files = (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
        folder = find_idx_set(name, root, files)
        data = cls.from_idx(folder / files[0], folder / files[1], hflip=hflip)
        return data.named(IDX_SETS[name].class_names)

    @classmethod
    def cifar10(cls, root: str | os.PathLike[str], split: str = "train",
                hflip: bool = False) -> ImageArray:
        """CIFAR-10 from its ``cifar-10-batches-py`` folder: (3, 32, 32) images, 10 classes.

        ``split`` is "train" (the five data batches, 50 000 images) or "test" (10 000).
        The batches are read with a restricted unpickler (see the module docstring).
        """
        if split not in ("train", "test"):
            raise ConfigError(f"unknown CIFAR-10 split {split!r}: choose 'train' or 'test'")
        folder = Path(os.fspath(root))
        names = CIFAR10_TRAIN if split == "train" else CIFAR10_TEST
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise DataError(f"CIFAR-10 not found in {folder} (missing {', '.join(missing)}): "
                            "download and unpack cifar-10-python.tar.gz, then pass the "
                            "cifar-10-batches-py folder")
        images, labels = [], []
        for name in names:
            file = folder / name
            try:
                with open(file, "rb") as fh:
                    batch = _RestrictedUnpickler(fh, encoding="bytes").load()
                data = np.asarray(batch[b"data"])
                y = np.asarray(batch[b"labels"], dtype=np.int64)
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError,
                    AttributeError, IndexError) as exc:
                raise DataError(f"{file} is not a CIFAR-10 batch ({one_line(exc)}); "
                                "re-download cifar-10-python.tar.gz") from None
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 \
                    or y.shape != (data.shape[0],):
                raise DataError(f"{file} holds data {data.shape} {data.dtype} and "
                                f"{y.shape} labels, not (N, 3072) uint8 with N labels; "
                                "re-download cifar-10-python.tar.gz")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(y)
        data = cls(torch.from_numpy(np.concatenate(images)),
                   torch.from_numpy(np.concatenate(labels)), hflip=hflip)
        return data.named(CIFAR10_CLASSES)

    @classmethod
    def from_npz(cls, path: str | os.PathLike[str], key: str = "x",
                 labels_key: str | None = "y", hflip: bool = False) -> ImageArray:
        """Read ``uint8`` images (and optional labels) from a ``.npz`` file.

        Layout rule for the images array under ``key``:

        * 3-D ``(N, H, W)``: one channel.
        * 4-D: ``(N, H, W, C)`` when the last dimension is 1, 3 or 4 and dimension 1 is not;
          otherwise ``(N, C, H, W)`` with ``C`` (dimension 1) in 1, 3 or 4.

        Only ``uint8`` pixels are accepted. Labels are read from ``labels_key`` when the file
        has it (``labels_key=None`` reads none); they must be non-negative integers ``(N,)``.

        Raises:
            DataError: if the file is missing or unreadable, a key is missing, or an array has
                the wrong dtype or shape.
        """
        file = Path(os.fspath(path))
        if not file.is_file():
            raise DataError(f"image file not found: {file}; give the path of a .npz file")
        try:
            loaded = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read {file}: {one_line(exc)}; "
                            "save the images with np.savez") from None
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{file} is a single .npy array, not a .npz archive; "
                            f"save it with np.savez(path, {key}=images)")
        with loaded as archive:
            keys = list(archive.files)
            if key not in keys:
                raise DataError(f"{file} has no array {key!r} (keys: {', '.join(keys) or 'none'});"
                                f" save the images under {key!r} or pass key=")
            if labels_key is not None and labels_key not in keys and labels_key != "y":
                raise DataError(f"{file} has no array {labels_key!r} (keys: {', '.join(keys)}); "
                                "pass the labels key, or labels_key=None for no labels")
            try:
                x = archive[key]
                y = archive[labels_key] if labels_key in keys else None
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                raise DataError(f"cannot read {file}: {one_line(exc)}; "
                                "save plain numeric arrays with np.savez") from None
        if x.dtype != np.uint8:
            raise DataError(f"{file}: images {key!r} have dtype {x.dtype}, need uint8; "
                            "save np.round((x + 1) * 127.5).astype(np.uint8) for [-1, 1] data "
                            "or (x * 255).round().astype(np.uint8) for [0, 1] data")
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4:
            if x.shape[3] in _CHANNELS and x.shape[1] not in _CHANNELS:
                x = x.transpose(0, 3, 1, 2)
            elif x.shape[1] not in _CHANNELS:
                raise DataError(f"{file}: images {key!r} have shape {x.shape}, with no channel "
                                "dimension of size 1, 3 or 4; save (N, H, W, C) or (N, C, H, W)")
        else:
            raise DataError(f"{file}: images {key!r} have shape {x.shape}; "
                            "save (N, H, W), (N, H, W, C) or (N, C, H, W)")
        labels = None
        if y is not None:
            if y.dtype.kind not in "iu":
                raise DataError(f"{file}: labels {labels_key!r} have dtype {y.dtype}; "
                                "save non-negative integer labels")
            labels = torch.from_numpy(np.ascontiguousarray(y)).to(torch.int64)
        images = torch.from_numpy(np.ascontiguousarray(x))
        try:
            return cls(images, labels, hflip=hflip)
        except DataError as exc:
            raise DataError(f"{file}: {exc}") from None


def _read_idx(file: Path, magic: int, what: str) -> np.ndarray:
    """Read an IDX file of ``uint8`` data with the given magic number; return its array."""
    if not file.is_file():
        raise DataError(f"IDX {what} file not found: {file}; give the path of an "
                        f"MNIST-style {what} file (.gz or raw)")
    try:
        raw = file.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {file}: {one_line(exc)} (truncated or corrupt?); "
                        "download the file again") from None
    ndim = 3 if magic == _IDX_IMAGES_MAGIC else 1
    header = 4 + 4 * ndim
    if len(raw) < 4:
        raise DataError(f"{file} is truncated ({len(raw)} bytes, no IDX header); "
                        "download the file again")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{file} has IDX magic 0x{found:08x}, expected 0x{magic:08x} "
                        f"(uint8 {what}); give the {what} file (e.g. *-{what}-idx{ndim}-ubyte)")
    if len(raw) < header:
        raise DataError(f"{file} is truncated ({len(raw)} bytes, header needs {header}); "
                        "download the file again")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    body = len(raw) - header
    if body < expected:
        raise DataError(f"{file} is truncated: {body} data bytes for shape {dims}, expected "
                        f"{expected}; download the file again")
    if body > expected:
        raise DataError(f"{file} has {body - expected} bytes beyond shape {dims}; "
                        "it is corrupt, download the file again")
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(dims).copy()
