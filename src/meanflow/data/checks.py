"""The checks every data source shares: its call arguments, its labels, its numpy files.

Each check raises a one-line :class:`~meanflow.errors.ConfigError` (a bad argument) or
:class:`~meanflow.errors.DataError` (bad data) that says what to give instead, so that every
source words the same mistake the same way. The sources (:mod:`meanflow.data.toy`,
:mod:`~meanflow.data.points`, :mod:`~meanflow.data.arrays`, :mod:`~meanflow.data.images`,
:mod:`~meanflow.data.folder`, :mod:`~meanflow.data.latents`) and :class:`EDMAugment
<meanflow.data.augment.EDMAugment>` take them from here only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from meanflow.errors import ConfigError, DataError

__all__ = ["check_batch_args", "check_take_args", "check_generator", "check_labels",
           "check_scale", "check_real_array", "check_numpy_file", "numpy_load_error",
           "one_line", "note_cast", "MAX_CLASSES"]


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` squeezed onto one line (its type name when it has none)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# --------------------------------------------------------------------------- call arguments

def check_generator(generator: torch.Generator, cpu_only: bool = True) -> None:
    """Raise :class:`ConfigError` unless ``generator`` is a :class:`torch.Generator`, and
    (``cpu_only``, as every batch source needs) a CPU one."""
    if not isinstance(generator, torch.Generator):
        raise ConfigError(
            f"generator must be a torch.Generator, got {type(generator).__name__}; "
            "pass torch.Generator().manual_seed(seed)"
        )
    if cpu_only and generator.device.type != "cpu":
        raise ConfigError(
            f"generator is on {generator.device}, batches are drawn on the CPU; "
            "pass a CPU generator: torch.Generator().manual_seed(seed)"
        )


def check_batch_args(batch_size: int, generator: torch.Generator) -> None:
    """The arguments of a source's ``batch``: raise :class:`ConfigError` unless ``batch_size``
    is an int >= 1 and ``generator`` a CPU :class:`torch.Generator`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}; pass e.g. 256")
    check_generator(generator)


def check_take_args(indices: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """The arguments of a finite source's ``take``, returning ``indices`` as a ``(B,)`` int64
    CPU tensor. :class:`ConfigError` unless they are a non-empty 1-D integer tensor with
    values in ``[0, size)`` and ``generator`` is a CPU :class:`torch.Generator`."""
    if (not isinstance(indices, Tensor) or indices.dim() != 1 or indices.numel() < 1
            or indices.is_floating_point() or indices.is_complex()
            or indices.dtype == torch.bool):
        shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
        raise ConfigError(f"indices must be a non-empty 1-D integer tensor, got {shape}; "
                          "pass e.g. torch.arange(16)")
    check_generator(generator)
    index = indices.to("cpu", torch.int64)
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= size:
        raise ConfigError(f"indices {low}..{high} fall outside the {size} samples: pass "
                          f"indices in [0, {size})")
    return index


def check_scale(scale: float) -> float:
    """``scale`` (the factor a source multiplies its samples by) as a float; :class:`ConfigError`
    unless it is a positive number."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ConfigError(f"scale={scale!r} must be a positive number, e.g. 0.18215")
    return float(scale)


# --------------------------------------------------------------------------- labels

#: The most classes a dataset may have: each is a row of the network's class embedding.
MAX_CLASSES = 1_000_000


def check_labels(y: Tensor, n: int, what: str = "point") -> Tensor:
    """The class labels of ``n`` samples (``what``: "point", "image", ..., one sample in the
    messages) as an ``(n,)`` int64 CPU tensor.

    Labels are an integer tensor, or a float tensor of whole numbers (as a ``.csv`` file gives
    them), all >= 0. :class:`DataError` otherwise, or when their shape is not ``(n,)``.
    """
    if not isinstance(y, Tensor):
        raise DataError(f"labels must be a torch.Tensor, got {type(y).__name__}; "
                        "convert them with torch.as_tensor")
    if y.dim() != 1:
        raise DataError(f"labels must be 1-D (N,), got shape {tuple(y.shape)}; "
                        f"give one integer label per {what}")
    if y.shape[0] != n:
        raise DataError(f"got {y.shape[0]} labels for {n} {what}s; "
                        f"give exactly one label per {what}")
    if y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"labels have dtype {y.dtype}; give non-negative integer labels")
    y = y.detach().cpu()
    if y.is_floating_point():
        y64 = y.to(torch.float64)
        if not bool(torch.isfinite(y64).all()) or not bool((y64 == y64.round()).all()):
            raise DataError("labels are not whole numbers; give non-negative integer labels")
        if bool((y64.abs() > 2**53).any()):
            raise DataError("labels are too large; give labels in [0, number of classes)")
        y = y64
    labels = y.to(torch.int64)
    if bool((labels < 0).any()):
        raise DataError(f"labels contain negative values (min {int(labels.min())}); "
                        "give labels in [0, number of classes)")
    if labels.numel() and int(labels.max()) >= MAX_CLASSES:
        # the class embedding has one row per class up to the largest label
        raise DataError(f"label {int(labels.max())} would make {int(labels.max()) + 1:,} "
                        f"classes (at most {MAX_CLASSES:,}); number the classes 0, 1, ... "
                        "(e.g. with numpy.unique(labels, return_inverse=True))")
    return labels.contiguous()


# --------------------------------------------------------------------------- numpy files

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


#: The cast notes already printed: the data may be read twice (a check, then training).
_NOTED: set[str] = set()


def note_cast(array: np.ndarray, what: str) -> None:
    """One warning line on stderr (once per process and file) when the samples in ``array``
    are stored as anything but float32 and will be read as float32: float64 loses precision,
    integers become real numbers."""
    if array.dtype == np.float32:
        return
    kind = "integers" if array.dtype.kind in "iu" else "numbers"
    line = (f"warning: {what} holds {array.dtype} {kind}, read as float32 (save float32 to "
            "silence this)")
    if line not in _NOTED:
        _NOTED.add(line)
        print(line, file=sys.stderr)


def check_real_array(array: np.ndarray, what: str, note: bool = False) -> np.ndarray:
    """``array`` unchanged if its dtype is real numeric (int, uint or float); otherwise a
    :class:`DataError` naming ``what`` (e.g. the file and key it came from)."""
    if array.dtype.kind not in "iuf":
        raise DataError(
            f"{what} has dtype {array.dtype}, not real numbers; save a float or int array"
        )
    if note:
        note_cast(array, what)
    return array


def check_numpy_file(file: Path, zipped: bool, what: str, hint: str) -> None:
    """Raise :class:`DataError` unless ``file`` starts like a ``.npy`` file (or, ``zipped``, a
    zip: ``.npz``). numpy would take any other content for a pickle; looking first gives a
    truthful message. ``what`` names the data ("points", "samples"), ``hint`` says what to
    give when the file cannot be read at all."""
    try:
        with file.open("rb") as handle:
            head = handle.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise DataError(f"cannot read {file}: {one_line(exc)}; {hint}") from None
    kind, save = (".npz", "np.savez") if zipped else (".npy", "np.save")
    if head.startswith(_ZIP_MAGICS if zipped else (_NPY_MAGIC,)):
        return
    if head[:1] == b"\x80":
        raise DataError(f"{file} looks like a Python pickle, which is never loaded; "
                        f"save a plain numeric array with {save}")
    raise DataError(f"{file} is not a numpy {kind} file; save the {what} with {save}")


def numpy_load_error(file: Path, exc: BaseException, hint: str) -> DataError:
    """The :class:`DataError` for a ``.npy``/``.npz`` file numpy failed to load with ``exc``
    (``allow_pickle=False``): pickled objects are named as such, anything else ends in
    ``hint``."""
    message = one_line(exc)
    if "pickle" in message.lower():
        return DataError(f"{file} holds pickled Python objects, which are never loaded; "
                         "save plain numeric arrays (np.save / np.savez)")
    return DataError(f"cannot read {file}: {message}; {hint} saved by numpy")
