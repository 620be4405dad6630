"""Real-valued samples of any shape from a ``.npz`` file, such as VAE latents (N, 4, 32, 32).

The ImageNet DiT presets train on such a file today; the latent pipeline (posterior mean and std
resampled per step) builds on it. Files are read with ``allow_pickle=False`` only.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from meanflow.data.checks import (check_batch_args, check_labels, check_numpy_file,
                                  check_real_array, check_scale, check_take_args,
                                  numpy_load_error)
from meanflow.errors import DataError

__all__ = ["ArraySamples", "npz_sample_kind"]

_FILE_HINT = "give the path of a .npz file"


def _npz_file(path: str | os.PathLike[str]) -> Path:
    """The path of an existing file that starts like a zip (.npz); DataError otherwise."""
    file = Path(os.fspath(path))
    if not file.is_file():
        raise DataError(f"data file not found: {file}; {_FILE_HINT}")
    check_numpy_file(file, zipped=True, what="samples", hint=_FILE_HINT)
    return file


def npz_sample_kind(path: str | os.PathLike[str], key: str = "x") -> str:
    """What the ``.npz`` holds under ``key``: "images" (uint8, 3-D or 4-D), "arrays" (real,
    3-D or more) or "points" (anything else: left to :class:`~meanflow.data.PointCloud` to
    check)."""
    file = _npz_file(path)
    try:
        with np.load(file, allow_pickle=False) as archive:
            if key not in archive.files:
                return "points"
            # the header alone gives dtype and shape; no array data is read here
            with zipfile.ZipFile(file) as zf, zf.open(f"{key}.npy") as fh:
                version = np.lib.format.read_magic(fh)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(fh)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise numpy_load_error(file, exc, _FILE_HINT) from None
    if dtype == np.uint8 and len(shape) == 3 and shape[2] in (3, 4) and shape[2] < shape[1]:
        raise DataError(f"{file} key {key!r} has shape {tuple(shape)}: one image (H, W, C), "
                        "not a dataset; save the images as (N, H, W, C)")
    if dtype == np.uint8 and len(shape) in (3, 4):
        if shape[0] < 2:
            raise DataError(f"{file} key {key!r} holds {shape[0]} image(s), shape "
                            f"{tuple(shape)}: a dataset needs at least 2; save more images")
        return "images"
    if dtype == np.uint8 and len(shape) >= 5:
        raise DataError(f"{file} key {key!r} is uint8 of shape {tuple(shape)}: neither images "
                        "(N, H, W[, C]) nor real samples; save images as (N, H, W, C) uint8 or "
                        "samples as float32")
    if len(shape) >= 3:
        return "arrays"
    return "points"


class ArraySamples:
    """N real-valued samples of shape S (any rank), optionally labelled: a finite
    :class:`~meanflow.data.BatchSource` (``take`` gives chosen samples, ``batch`` draws them
    with replacement).

    Args:
        x: (N, *S) finite real values, stored as float32 on the CPU.
        y: optional (N,) non-negative integer labels.
        scale: multiplies every drawn sample (e.g. 0.18215 for SD-VAE latents stored unscaled).
    """

    def __init__(self, x: Tensor, y: Tensor | None = None, scale: float = 1.0) -> None:
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] < 2:
            raise DataError(f"samples must be an (N, ...) tensor with N >= 2, got "
                            f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        scale = check_scale(scale)
        data = x.detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(data).all()):
            raise DataError("samples contain NaN or infinite values; fix or drop them")
        self.data = data
        self.labels = None if y is None else check_labels(y, data.shape[0], "sample")
        self.scale = scale
        self.shape: tuple[int, ...] = tuple(data.shape[1:])
        self.num_classes: int | None = (None if self.labels is None
                                        else int(self.labels.max()) + 1)

    @classmethod
    def from_npz(cls, path: str | os.PathLike[str], key: str = "x", labels_key: str = "y",
                 scale: float = 1.0) -> ArraySamples:
        """Reads samples under ``key`` and, when the file has it, labels under ``labels_key``."""
        file = _npz_file(path)
        try:
            with np.load(file, allow_pickle=False) as archive:
                if key not in archive.files:
                    raise DataError(f"{file} has no array {key!r} (found: "
                                    f"{', '.join(archive.files) or 'none'}); save the samples "
                                    f"under key {key!r}")
                x = check_real_array(archive[key], f"{file} key '{key}'", note=True)
                y = archive[labels_key] if labels_key in archive.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise numpy_load_error(file, exc, _FILE_HINT) from None
        try:
            return cls(torch.from_numpy(np.ascontiguousarray(x)),
                       None if y is None else torch.from_numpy(np.asarray(y)), scale=scale)
        except DataError as exc:
            raise DataError(f"{file}: {exc}") from None

    def __len__(self) -> int:
        return self.data.shape[0]

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """``batch_size`` samples drawn with replacement: (B, *S) float32 and (B,) labels or
        None."""
        check_batch_args(batch_size, generator)
        index = torch.randint(0, self.data.shape[0], (batch_size,), generator=generator)
        return self.take(index, generator)

    def take(self, indices: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """Samples ``indices`` (B,) times ``scale``: (B, *S) float32 and (B,) labels or None.
        Nothing is random here; ``generator`` is taken for the protocol's sake."""
        index = check_take_args(indices, len(self), generator)
        x = self.data[index]
        if self.scale != 1.0:
            x = x * self.scale
        return x, None if self.labels is None else self.labels[index]

    def __repr__(self) -> str:
        return (f"ArraySamples(N={len(self)}, shape={self.shape}, "
                f"num_classes={self.num_classes}, scale={self.scale:g})")
