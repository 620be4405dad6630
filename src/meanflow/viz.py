"""Pictures of samples: image grids (PNG) and 2-D scatter plots.

Images come as uint8 pixels or in the training range [-1, 1] (mapped to 8 bits by
:func:`meanflow.pixels.to_uint8`), are laid out row-major with a 2-pixel border, and written with
matplotlib (which writes PNG through Pillow). Nothing here touches the network. matplotlib is
imported where a picture is drawn: it picks its non-interactive backend ("Agg") first.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from meanflow.errors import ConfigError
from meanflow.fileio import atomic_path
from meanflow.pixels import to_uint8

__all__ = ["grid_columns", "image_grid", "save_image_grid", "save_scatter", "save_samples_png"]


def image_grid(x: Tensor, nrow: int | None = None, border: int = 2) -> np.ndarray:
    """Lays N images out in rows of ``nrow`` (default: a square-ish grid).

    Args:
        x: (N, C, H, W) with C in 1, 3 or 4: uint8 pixels, or floats in [-1, 1].
        nrow: images per row.
        border: pixels of white between images.

    Returns:
        uint8 array (rows·(H+border)+border, nrow·(W+border)+border) for one channel, else with a
        trailing channel axis.
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4) or x.shape[0] < 1:
        raise ConfigError(f"an image grid needs (N, C, H, W) images with C in 1, 3, 4; got "
                          f"shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    pixels = x if x.dtype == torch.uint8 else to_uint8(x)
    img = pixels.cpu().permute(0, 2, 3, 1).numpy()                       # (N, H, W, C)
    grid = np.full((rows * (h + border) + border, nrow * (w + border) + border, c), 255,
                   dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = border + r * (h + border), border + col * (w + border)
        grid[top:top + h, left:left + w] = img[i]
    return grid[..., 0] if c == 1 else grid


def grid_columns(n: int, num_classes: int | None = None) -> int:
    """Images per row of a square-ish grid of ``n``: about sqrt(n), and for samples of
    ``num_classes`` classes drawn in turn (label i % num_classes) a multiple of the class count
    near it, so that each column holds one class (one column per class when there are more
    classes than sqrt(n))."""
    side = max(1, math.ceil(math.sqrt(n)))
    if not num_classes or num_classes < 1:
        return side
    return num_classes * max(1, round(side / num_classes))


def _check_png(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"{path} must end in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_image_grid(x: Tensor, path: str | os.PathLike[str], nrow: int | None = None,
                    scale: int = 1) -> Path:
    """Writes :func:`image_grid` of ``x`` to ``path`` (PNG), each pixel ``scale`` × ``scale``.

    Written through :func:`meanflow.fileio.atomic_path`: never left half-written.
    """
    path = _check_png(path)
    grid = image_grid(x, nrow)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    with atomic_path(path) as tmp:
        if grid.ndim == 2:
            mpimg.imsave(tmp, grid, cmap="gray", vmin=0, vmax=255)
        else:
            mpimg.imsave(tmp, grid)
    return path


def save_scatter(x: Tensor, path: str | os.PathLike[str], labels: Tensor | None = None,
                 title: str = "") -> Path:
    """A scatter plot of (N, 2) points, coloured by ``labels`` when given."""
    path = _check_png(path)
    pts = x.detach().float().cpu().reshape(x.shape[0], -1)
    if pts.shape[1] != 2:
        raise ConfigError(f"a scatter plot needs 2-D points; got shape {tuple(x.shape)}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 5))
    colour = {} if labels is None else {"c": labels.cpu().numpy(), "cmap": "tab10"}
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, linewidths=0, **colour)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def save_samples_png(x: Tensor, path: str | os.PathLike[str], labels: Tensor | None = None,
                     title: str = "", nrow: int | None = None) -> Path:
    """An image grid for (N, C, H, W) samples (uint8, or floats in [-1, 1]), a scatter plot
    for 2-D points."""
    if x.ndim == 4:
        return save_image_grid(x, path, nrow=nrow, scale=2 if x.shape[-1] <= 32 else 1)
    if x[0].numel() == 2:
        return save_scatter(x, path, labels, title)
    raise ConfigError(f"samples of shape {tuple(x.shape[1:])} are neither images (C, H, W) nor "
                      "2-D points: write an .npz instead of a PNG")
