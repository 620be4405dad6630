"""A user's own point set, read from a ``.npy``, ``.npz`` or ``.csv`` file.

Points may have any dimension ``D`` and optional integer class labels. Files are read with
numpy only and never unpickled (``np.load(..., allow_pickle=False)``).
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from meanflow.data.checks import (check_batch_args, check_labels, check_numpy_file,
                                  check_real_array, check_take_args, numpy_load_error,
                                  one_line)
from meanflow.errors import ConfigError, DataError

__all__ = ["PointCloud", "POINT_FILE_SUFFIXES", "LABEL_COLUMNS"]

#: File name endings :meth:`PointCloud.from_file` can read.
POINT_FILE_SUFFIXES: tuple[str, ...] = (".npy", ".npz", ".csv")

_FILE_HINT = "give the path of a .npy/.npz/.csv file"
#: Header names (lower case) of a .csv column read as the labels without ``labels=``.
LABEL_COLUMNS = ("label", "labels", "class", "target")


class PointCloud:
    """A fixed set of ``N`` points in ``D`` dimensions, optionally labelled: a finite
    :class:`~meanflow.data.BatchSource` (``take`` gives chosen points, ``batch`` draws them
    with replacement).

    Args:
        x: ``(N, D)`` points, ``N >= 2``, ``D >= 1``, real and finite; stored as float32 on CPU.
        y: optional ``(N,)`` class labels: non-negative integers (an integer tensor, or a float
            tensor holding whole numbers); stored as int64. ``num_classes`` is ``max(y) + 1``.

    Raises:
        DataError: if a shape, value or label is invalid.
    """

    def __init__(self, x: Tensor, y: Tensor | None = None) -> None:
        if not isinstance(x, Tensor):
            raise DataError(f"points must be a torch.Tensor, got {type(x).__name__}; "
                            "convert them with torch.as_tensor")
        if x.dim() != 2:
            raise DataError(f"points must be a 2-D (N, D) array, got shape {tuple(x.shape)}; "
                            "reshape them to one row per point")
        n, d = x.shape
        if n < 2:
            raise DataError(f"points hold {n} row(s), need at least 2; give more points")
        if d < 1:
            raise DataError("points have 0 columns; give at least one coordinate per point")
        if x.is_complex() or x.dtype == torch.bool:
            raise DataError(f"points have dtype {x.dtype}, not real numbers; "
                            "give float or int values")
        data = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not bool(torch.isfinite(data).all()):
            raise DataError("points contain NaN or infinite values (or values beyond float32 "
                            "range); remove or fix those rows")
        labels = None if y is None else check_labels(y, n, "point")
        #: ``(N, D)`` float32 points.
        self.data: Tensor = data
        #: ``(N,)`` int64 labels, or ``None``.
        self.labels: Tensor | None = labels
        #: Shape of one sample, ``(D,)``.
        self.shape: tuple[int, ...] = (d,)
        #: ``max(labels) + 1``, or ``None`` without labels.
        self.num_classes: int | None = None if labels is None else int(labels.max()) + 1

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], labels: str | None = None) -> PointCloud:
        """Read points (and optional labels) from a ``.npy``, ``.npz`` or ``.csv`` file.

        * ``.npy``: one 2-D numeric array ``(N, D)``; no labels.
        * ``.npz``: points under key ``"x"`` (or the only array in the file), ``(N, D)``;
          labels ``(N,)`` under key ``"y"`` if present, or under the key named by ``labels``.
        * ``.csv``: comma-separated numbers, optionally with a header row (detected when the
          first non-comment line is not all numbers). ``labels`` may name a header column or be
          ``"last"``; that column becomes the integer labels and the others the points. Without
          ``labels``, a header column named ``label``, ``labels``, ``class`` or ``target`` (any
          case; :data:`LABEL_COLUMNS`) is taken as the labels, never trained as a coordinate;
          ``labels="none"`` keeps every column as a coordinate. (``y`` is not among these
          names: ``x,y`` is the usual header of 2-D points.)

        Nothing is ever unpickled: object arrays are refused.

        Args:
            path: the file to read.
            labels: which column (``.csv``) or key (``.npz``) holds the labels; ``None`` for
                a label-named header column when there is one (``.csv``) or key ``"y"`` when
                present (``.npz``); ``"none"`` for none (``.csv``).

        Returns:
            A :class:`PointCloud`; ``data`` ``(N, D)`` float32, ``labels`` ``(N,)`` or ``None``.

        Raises:
            DataError: if the file is missing, unreadable or malformed.
            ConfigError: if ``labels`` does not fit the file.
        """
        file = Path(os.fspath(path))
        suffix = file.suffix.lower()
        if suffix not in POINT_FILE_SUFFIXES:
            raise DataError(f"cannot read points from '{file}' (unknown file type); {_FILE_HINT}")
        if not file.is_file():
            raise DataError(f"data file not found: {file}; {_FILE_HINT}")
        if suffix == ".npy":
            x, y = _read_npy(file, labels)
        elif suffix == ".npz":
            x, y = _read_npz(file, labels)
        else:
            x, y = _read_csv(file, labels)
        try:
            return cls(torch.from_numpy(x), None if y is None else torch.from_numpy(y))
        except DataError as exc:
            raise DataError(f"{file}: {exc}") from None

    def __len__(self) -> int:
        """Number of points ``N``."""
        return self.data.shape[0]

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """Draw ``batch_size`` points uniformly with replacement.

        Returns:
            ``x`` of shape ``(B, D)`` float32 and ``y`` of shape ``(B,)`` int64, or ``None``
            when there are no labels.
        """
        check_batch_args(batch_size, generator)
        index = torch.randint(0, self.data.shape[0], (batch_size,), generator=generator)
        return self.take(index, generator)

    def take(self, indices: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """Points ``indices`` (B,): ``x`` (B, D) float32 and ``y`` (B,) int64 or ``None``.
        Nothing is random here; ``generator`` is taken for the protocol's sake."""
        index = check_take_args(indices, len(self), generator)
        y = None if self.labels is None else self.labels[index]
        return self.data[index], y

    def __repr__(self) -> str:
        n, d = self.data.shape
        return f"PointCloud(N={n}, D={d}, num_classes={self.num_classes})"


def _read_npy(file: Path, labels: str | None) -> tuple[np.ndarray, None]:
    """Read the ``(N, D)`` array of a ``.npy`` file."""
    if labels is not None:
        raise ConfigError(f"labels={labels!r} cannot apply to a .npy file ({file}); "
                          "save points and labels as keys 'x' and 'y' of a .npz file")
    check_numpy_file(file, zipped=False, what="points", hint=_FILE_HINT)
    try:
        array = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise numpy_load_error(file, exc, _FILE_HINT) from None
    if array.ndim != 2:
        raise DataError(f"{file}: points must be a 2-D (N, D) array, got shape {array.shape}; "
                        "reshape them to one row per point")
    return check_real_array(array, f"{file}", note=True), None


def _read_npz(file: Path, labels: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read points (key ``"x"`` or the only array) and labels (``"y"`` or ``labels``)."""
    check_numpy_file(file, zipped=True, what="points", hint=_FILE_HINT)
    try:
        loaded = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise numpy_load_error(file, exc, _FILE_HINT) from None
    with loaded as archive:
        keys = list(archive.files)
        if "x" in keys:
            x_key = "x"
        elif len(keys) == 1:
            x_key = keys[0]
        else:
            found = ", ".join(keys) if keys else "no arrays"
            raise DataError(f"{file} has no array 'x' (found: {found}); "
                            "save the points under key 'x'")
        if labels is not None and labels not in keys:
            raise ConfigError(f"labels={labels!r} is not a key of {file} "
                              f"(keys: {', '.join(keys)}); name the key holding the labels")
        default = "y" if "y" in keys and x_key != "y" else None
        y_key = labels if labels is not None else default
        if y_key == x_key:
            raise ConfigError(f"labels={labels!r} is the points key of {file}; "
                              "name a different key for the labels")
        try:
            x = archive[x_key]
            y = None if y_key is None else archive[y_key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise numpy_load_error(file, exc, _FILE_HINT) from None
    x = check_real_array(x, f"{file} key '{x_key}'", note=True)
    if x.ndim != 2:
        raise DataError(f"{file}: points '{x_key}' must be 2-D (N, D), got shape {x.shape}; "
                        "reshape them to one row per point")
    if y is not None:
        y = check_real_array(y, f"{file} key '{y_key}'")
    return x, y


def _first_data_line(file: Path) -> tuple[int, str | None]:
    """Return the index and text of the first line that is neither blank nor a ``#`` comment."""
    with file.open(encoding="utf-8-sig") as handle:
        for index, line in enumerate(handle):
            text = line.strip()
            if text and not text.startswith("#"):
                return index, text
    return -1, None


def _is_number(text: str) -> bool:
    """Whether ``text`` parses as a float."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv(file: Path, labels: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a comma-separated numeric table with an optional header row."""
    try:
        first_index, first = _first_data_line(file)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {file}: {one_line(exc)}; {_FILE_HINT} in UTF-8") from None
    if first is None:
        raise DataError(f"{file} is empty; give a .csv file with one point per row")
    fields = [field.strip() for field in first.split(",")]
    header = None if all(_is_number(f) for f in fields) else fields
    try:
        with warnings.catch_warnings():  # "input contained no data" is reported below
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(file, delimiter=",", dtype=np.float64, ndmin=2,
                               skiprows=first_index + 1 if header else 0, encoding="utf-8-sig")
    except (OSError, ValueError) as exc:
        raise DataError(f"{file} is not a numeric table: {one_line(exc)}; "
                        "give comma-separated numbers with an optional header row") from None
    if table.shape[0] == 0:
        raise DataError(f"{file} has a header but no rows; add one point per row")
    columns = table.shape[1]
    if header is not None and len(header) != columns:
        raise DataError(f"{file}: header has {len(header)} names but rows have {columns} values; "
                        "give one name per column")
    if labels is None and header is not None:
        named = [f for f in header if f.lower() in LABEL_COLUMNS]
        if len(named) > 1:
            raise ConfigError(f"{file} has several label-like columns ({', '.join(named)}); "
                              "name one with data.options.labels=COLUMN, or "
                              "data.options.labels=none to train on every column")
        labels = named[0] if named else None
    if labels is None or labels == "none":
        return table, None
    if labels == "last":
        column = columns - 1
    elif header is None:
        raise ConfigError(f"labels={labels!r} names a column but {file} has no header row; "
                          "use labels='last' or add a header")
    elif header.count(labels) != 1:
        where = "appears more than once in" if labels in header else "is not a column of"
        raise ConfigError(f"labels={labels!r} {where} {file} (columns: {', '.join(header)}); "
                          "name exactly one header column or use labels='last'")
    else:
        column = header.index(labels)
    if columns < 2:
        raise DataError(f"{file} has only the label column; add at least one coordinate column")
    x = np.delete(table, column, axis=1)
    return x, table[:, column]
