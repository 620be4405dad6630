"""Labelled 2-D toy distributions drawn with an explicit :class:`torch.Generator`.

Each class follows the :class:`meanflow.data.BatchSource` protocol: ``batch(batch_size,
generator)`` returns points ``x`` of shape ``(B, 2)`` (float32, CPU) and labels ``y`` of shape
``(B,)`` (int64) naming the mixture component or part a point was drawn from. All randomness
comes from the given generator, so the same generator state gives a bit-identical batch.
These sources are endless (no ``__len__``, no ``take``): every batch is fresh points, so
``data.order`` does not apply to them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from meanflow.data.checks import check_batch_args
from meanflow.errors import ConfigError

__all__ = ["EightGaussians", "Checkerboard", "TwoMoons", "Spirals"]


def _check_non_negative(name: str, value: float) -> float:
    """Return ``value`` as a float, raising :class:`ConfigError` if it is negative or not finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}; pass e.g. {name}=0.1")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be finite and >= 0, got {value!r}; pass e.g. {name}=0.1")
    return float(value)


class EightGaussians:
    """Eight isotropic Gaussians evenly spaced on a circle; the label is the component index.

    Component ``k`` (``0 <= k < 8``) is centred at ``radius * (cos(2πk/8), sin(2πk/8))`` with
    standard deviation ``std`` in each coordinate; components are equally likely.

    Args:
        radius: distance of the centres from the origin (> 0).
        std: per-coordinate standard deviation of each component (>= 0).
    """

    def __init__(self, radius: float = 4.0, std: float = 0.5) -> None:
        radius = _check_non_negative("radius", radius)
        if radius == 0:
            raise ConfigError("radius must be > 0, got 0; pass e.g. radius=4.0")
        self.radius = radius
        self.std = _check_non_negative("std", std)
        self.shape: tuple[int, ...] = (2,)
        self.num_classes: int | None = 8
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        centers = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
        #: (8, 2) float32 centres of the components, row ``k`` for label ``k``.
        self.centers: Tensor = centers.to(torch.float32)

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw ``batch_size`` points.

        Returns:
            ``x`` of shape ``(B, 2)`` float32 and ``y`` of shape ``(B,)`` int64 in ``[0, 8)``.
        """
        check_batch_args(batch_size, generator)
        y = torch.randint(0, 8, (batch_size,), generator=generator)
        noise = torch.randn(batch_size, 2, generator=generator, dtype=torch.float32)
        x = self.centers[y] + self.std * noise
        return x, y

    def __repr__(self) -> str:
        return f"EightGaussians(radius={self.radius}, std={self.std})"


class Checkerboard:
    """Uniform distribution on the 8 dark squares of a 4x4 board covering ``[-4, 4]^2``.

    Squares have side 2; the square in column ``c`` and row ``r`` (both counted from the
    lower-left corner, ``0..3``) covers ``[-4 + 2c, -2 + 2c) x [-4 + 2r, -2 + 2r)`` and is dark
    when ``r + c`` is even. The label is the index of the dark square in row-major order
    (row 0 first), so label ``k`` is row ``k // 2``. Every dark square is equally likely.
    """

    def __init__(self) -> None:
        self.shape: tuple[int, ...] = (2,)
        self.num_classes: int | None = 8
        corners = [
            (-4.0 + 2.0 * col, -4.0 + 2.0 * row)
            for row in range(4)
            for col in range(4)
            if (row + col) % 2 == 0
        ]
        #: (8, 2) float32 lower-left corners of the dark squares, row ``k`` for label ``k``.
        self.corners: Tensor = torch.tensor(corners, dtype=torch.float32)

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw ``batch_size`` points.

        Returns:
            ``x`` of shape ``(B, 2)`` float32 and ``y`` of shape ``(B,)`` int64 in ``[0, 8)``.
        """
        check_batch_args(batch_size, generator)
        y = torch.randint(0, 8, (batch_size,), generator=generator)
        offset = 2.0 * torch.rand(batch_size, 2, generator=generator, dtype=torch.float32)
        return self.corners[y] + offset, y

    def __repr__(self) -> str:
        return "Checkerboard()"


class TwoMoons:
    """Two interleaving half circles with Gaussian noise; the label is the moon (0 or 1).

    Before scaling, moon 0 is the upper half of the unit circle, ``(cos t, sin t)``, and moon 1
    is ``(1 - cos t, 1/2 - sin t)``, ``t ~ U[0, π]``. Both are centred by subtracting
    ``(1/2, 1/4)`` and scaled by 2, so the data spans about ``[-3, 3] x [-1.5, 1.5]`` with mean 0.
    Noise with standard deviation ``noise`` is then added in these output coordinates.

    Args:
        noise: standard deviation of the isotropic Gaussian noise (>= 0).
    """

    def __init__(self, noise: float = 0.1) -> None:
        self.noise = _check_non_negative("noise", noise)
        self.shape: tuple[int, ...] = (2,)
        self.num_classes: int | None = 2

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw ``batch_size`` points.

        Returns:
            ``x`` of shape ``(B, 2)`` float32 and ``y`` of shape ``(B,)`` int64 in ``{0, 1}``.
        """
        check_batch_args(batch_size, generator)
        y = torch.randint(0, 2, (batch_size,), generator=generator)
        t = math.pi * torch.rand(batch_size, generator=generator, dtype=torch.float32)
        noise = torch.randn(batch_size, 2, generator=generator, dtype=torch.float32)
        sign = 1.0 - 2.0 * y.to(torch.float32)  # +1 for moon 0, -1 for moon 1
        moon = y.to(torch.float32)
        px = moon + sign * torch.cos(t) - 0.5
        py = 0.5 * moon + sign * torch.sin(t) - 0.25
        x = 2.0 * torch.stack([px, py], dim=1) + self.noise * noise
        return x, y

    def __repr__(self) -> str:
        return f"TwoMoons(noise={self.noise})"


class Spirals:
    """Two interleaved Archimedean spiral arms with Gaussian noise; the label is the arm.

    A point of arm ``k`` (0 or 1) at parameter ``s`` in ``[0, 1]`` lies at radius
    ``max_radius * s`` and angle ``2π * turns * s + πk``; ``s = sqrt(u)``, ``u ~ U[0, 1]``, which
    spreads points about evenly along each arm. Noise with standard deviation ``noise`` is then
    added, so the data lies roughly within ``[-4, 4]^2``.

    Args:
        noise: standard deviation of the isotropic Gaussian noise (>= 0).
        turns: number of revolutions of each arm (> 0).
        max_radius: radius at the outer end of each arm (> 0).
    """

    def __init__(self, noise: float = 0.1, turns: float = 1.5, max_radius: float = 3.5) -> None:
        self.noise = _check_non_negative("noise", noise)
        self.turns = _check_non_negative("turns", turns)
        self.max_radius = _check_non_negative("max_radius", max_radius)
        if self.turns == 0 or self.max_radius == 0:
            raise ConfigError("turns and max_radius must be > 0; pass e.g. turns=1.5")
        self.shape: tuple[int, ...] = (2,)
        self.num_classes: int | None = 2

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw ``batch_size`` points.

        Returns:
            ``x`` of shape ``(B, 2)`` float32 and ``y`` of shape ``(B,)`` int64 in ``{0, 1}``.
        """
        check_batch_args(batch_size, generator)
        y = torch.randint(0, 2, (batch_size,), generator=generator)
        s = torch.rand(batch_size, generator=generator, dtype=torch.float32).sqrt()
        noise = torch.randn(batch_size, 2, generator=generator, dtype=torch.float32)
        angle = (2 * math.pi * self.turns) * s + math.pi * y.to(torch.float32)
        radius = self.max_radius * s
        x = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        return x + self.noise * noise, y

    def __repr__(self) -> str:
        return f"Spirals(noise={self.noise}, turns={self.turns}, max_radius={self.max_radius})"
