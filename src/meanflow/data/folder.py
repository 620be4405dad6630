"""Image folders (PNG / JPEG) read with Pillow into an in-memory :class:`ImageArray`.

Layout rule:

* images directly in the root folder, no sub-folder holding images -> unlabelled data;
* images in sub-folders -> one class per immediate sub-folder (any depth below it), labels
  ``0..K-1`` in the sorted order of the folder names (:attr:`FolderImages.class_names`).
  Sub-folders without images are ignored; images both in the root and in class sub-folders
  are an error. Hidden files and folders (names starting with ``.``) are skipped.

Files ending in ``.png``, ``.jpg`` or ``.jpeg`` (any case) are read, in sorted order of their
path relative to the root; other files are ignored.

With ``resolution`` every image goes through the ADM centre crop (:func:`adm_center_crop`);
without it, all images must already share one size. Pixels are stored as ``uint8``
``(N, C, H, W)``: with ``channels=None`` the data are greyscale (C = 1) when every image is
grey and RGB (C = 3) otherwise (grey images are then repeated to three channels); ``channels=1``
converts colour to luma (ITU-R 601-2, Pillow's ``"L"``), ``channels=3`` converts to RGB.
Alpha is dropped (not composited), palettes are expanded, 16-bit grey is scaled to 8 bits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meanflow.data.checks import one_line
from meanflow.data.images import ImageArray
from meanflow.errors import ConfigError, DataError

__all__ = ["load_image_folder", "FolderImages", "adm_center_crop", "IMAGE_SUFFIXES",
           "scan_image_folder", "read_image", "check_image_args"]

#: File suffixes read as images (compared case-insensitively).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Above this many files a progress bar is shown (on a terminal; tqdm's disable=None).
_PROGRESS_MIN = 1000

# Pillow modes holding one grey channel (16- and 32-bit integer grey included).
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N"}


class FolderImages(ImageArray):
    """An :class:`ImageArray` read from an image folder, knowing its origin.

    Attributes:
        root: the folder the images came from.
        class_names: sorted class sub-folder names (label ``k`` is ``class_names[k]``), or
            ``None`` for unlabelled data.
        files: path of every image relative to ``root``, in the order of ``images``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, hflip: bool,
                 root: Path, class_names: tuple[str, ...] | None,
                 files: tuple[str, ...]) -> None:
        super().__init__(images, labels, hflip=hflip)
        self.root: Path = root
        self.class_names: tuple[str, ...] | None = class_names
        self.files: tuple[str, ...] = files
        if class_names is not None:
            # Every class folder holds an image, so max(label) + 1 == K already; be explicit.
            self.num_classes = len(class_names)

    def __repr__(self) -> str:
        c, h, w = self.shape
        return (f"FolderImages(root={str(self.root)!r}, N={len(self)}, shape=({c}, {h}, {w}), "
                f"num_classes={self.num_classes}, hflip={self.hflip})")


def _import_pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("reading image folders needs Pillow, which is not installed: "
                          "pip install pillow") from None
    return Image


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_below(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder`` (hidden files and folders skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if _is_image(Path(f)))
    return sorted(found)


def scan_image_folder(root: Path) -> tuple[list[Path], list[int] | None, tuple[str, ...] | None]:
    """Lists the images under ``root``: (files, labels or None, class names or None).

    Images directly in ``root`` are unlabelled; images in sub-folders (at any depth) take the
    label of their top sub-folder, classes in sorted name order. Hidden files are skipped."""
    top = sorted(p for p in root.iterdir() if p.is_file() and _is_image(p))
    classes: list[tuple[str, list[Path]]] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _images_below(sub)
        if files:
            classes.append((sub.name, files))
    if not classes:
        return top, None, None
    if top:
        raise DataError(f"{root} holds images both directly ({top[0].name}) and in class "
                        f"sub-folders ({classes[0][0]}/); move every image into a class "
                        "sub-folder, or give a folder of unlabelled images only")
    files, labels = [], []
    for k, (_, members) in enumerate(classes):
        files.extend(members)
        labels.extend([k] * len(members))
    return files, labels, tuple(name for name, _ in classes)


def adm_center_crop(image: Any, resolution: int) -> Any:
    """ADM's centre crop of a Pillow image to ``resolution`` x ``resolution``.

    While the short side is at least ``2 * resolution``, halve both sides (integer division)
    with a box filter; then resize bicubically so that the short side equals ``resolution``
    (the long side rounded to the nearest integer); then cut the central square, the extra
    pixel of an odd margin going to the right / bottom.
    """
    Image = _import_pil()
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    factor = resolution / min(image.size)
    size = (round(image.size[0] * factor), round(image.size[1] * factor))
    image = image.resize(size, resample=Image.BICUBIC)
    left = (image.size[0] - resolution) // 2
    top = (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _to_8bit(image: Any, channels: int | None) -> Any:
    """Converts a Pillow image to mode "L" or "RGB": to ``channels`` when given, otherwise
    grey stays grey and everything else becomes RGB."""
    Image = _import_pil()
    mode = image.mode
    if mode in _GREY_MODES and mode not in ("1", "L", "LA", "La"):
        # 16-bit grey (Pillow opens it as "I;16" or "I"): map 0..65535 to 0..255.
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255)
                                .astype(np.uint8), "L")
        mode = "L"
    if mode in ("P", "PA"):
        image = image.convert("RGBA")  # expands the palette, keeps transparency apart
        mode = "RGBA"
    grey = mode in _GREY_MODES
    target = "L" if channels == 1 or (channels is None and grey) else "RGB"
    return image if image.mode == target else image.convert(target)


def read_image(file: str | os.PathLike[str], channels: int | None = None,
               resolution: int | None = None) -> np.ndarray:
    """One image file as uint8 (C, H, W): converted like :func:`load_image_folder` (grey or
    RGB, see ``channels``) and ADM-centre-cropped when ``resolution`` is given. A file that
    cannot be read is a one-line DataError naming it."""
    Image = _import_pil()
    try:
        with Image.open(file) as opened:
            opened.load()
            image = _to_8bit(opened, channels)
            if resolution is not None:
                image = adm_center_crop(image, resolution)
            pixels = np.asarray(image, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{file} is too large to read safely ({one_line(exc)}); shrink it "
                        "or remove it from the folder") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {file} ({one_line(exc)}): it is corrupt or not "
                        "an image; replace or remove it") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


#: The largest crop side: one 16384² RGB image is 768 MiB as uint8, 3 GiB as float32.
MAX_RESOLUTION = 16384


def check_image_args(resolution: Any, channels: Any) -> None:
    """One-line ConfigErrors for a bad ``resolution`` (positive int or None) or ``channels``
    (1, 3 or None)."""
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                   or resolution < 1):
        raise ConfigError(f"resolution={resolution!r} must be a positive integer (the side of "
                          "the square crop) or None to keep the images' own size")
    if resolution is not None and resolution > MAX_RESOLUTION:
        raise ConfigError(f"resolution={resolution} is above {MAX_RESOLUTION} (one RGB image "
                          f"would take {3 * resolution ** 2 / 2 ** 30:.0f} GiB): crop smaller, "
                          "e.g. 256")
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ConfigError(f"channels={channels!r} must be 1 (grey), 3 (RGB) or None (grey when "
                          "every image is grey, else RGB)")


def load_image_folder(path: str | os.PathLike[str], resolution: int | None = None,
                      channels: int | None = None, hflip: bool = False) -> FolderImages:
    """Read every PNG / JPEG image under a folder into memory (see the module docstring).

    Args:
        path: the folder: images directly in it (unlabelled) or in one sub-folder per class.
        resolution: if given, ADM-centre-crop every image to ``resolution`` x ``resolution``
            (:func:`adm_center_crop`); if ``None``, every image must have the same size.
        channels: ``None`` (grey if every image is grey, else RGB), ``1`` or ``3``.
        hflip: see :class:`ImageArray`.

    Returns:
        A :class:`FolderImages` (an :class:`ImageArray`) of ``uint8`` ``(N, C, H, W)`` images,
        labelled when the folder has class sub-folders.

    Raises:
        ConfigError: for a bad ``resolution`` or ``channels``, or if Pillow is missing.
        DataError: if the folder is missing or holds no image, an image cannot be read, images
            differ in size without ``resolution``, or images sit both in the root and in class
            sub-folders.
    """
    check_image_args(resolution, channels)
    root = Path(os.fspath(path))
    if not root.exists():
        raise DataError(f"image folder not found: {root}; give an existing folder of "
                        ".png/.jpg/.jpeg images")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; give a folder of .png/.jpg/.jpeg images "
                        "(directly in it, or in one sub-folder per class)")
    _import_pil()
    files, labels, class_names = scan_image_folder(root)
    if not files:
        raise DataError(f"no .png/.jpg/.jpeg images found in {root}; put the images directly in "
                        "it (unlabelled) or in one sub-folder per class")

    from tqdm.auto import tqdm

    n = len(files)
    buffer: np.ndarray | None = None  # (N, C, H, W) uint8, C grows from 1 to 3 if needed
    first: Path = files[0]
    bar = tqdm(files, desc=f"reading {root.name or root}", unit="img",
               disable=None if n > _PROGRESS_MIN else True)
    for i, file in enumerate(bar):
        pixels = read_image(file, channels, resolution)
        if buffer is None:
            buffer = np.empty((n, *pixels.shape), dtype=np.uint8)
        elif pixels.shape[1:] != buffer.shape[2:]:
            raise DataError(f"images differ in size: {first} is {buffer.shape[3]}x"
                            f"{buffer.shape[2]} but {file} is {pixels.shape[2]}x"
                            f"{pixels.shape[1]}; pass resolution= to centre-crop them all "
                            "to one square size")
        if pixels.shape[0] != buffer.shape[1]:
            if pixels.shape[0] == 3:  # the first colour image: grey so far becomes RGB
                buffer = np.repeat(buffer, 3, axis=1)
            else:
                pixels = np.repeat(pixels, 3, axis=0)
        buffer[i] = pixels
    bar.close()
    assert buffer is not None
    y = None if labels is None else torch.tensor(labels, dtype=torch.int64)
    relative = tuple(f.relative_to(root).as_posix() for f in files)
    return FolderImages(torch.from_numpy(buffer), y, hflip, root, class_names, relative)
