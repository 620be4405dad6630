"""The one mapping between 8-bit pixels and the model's floats in [-1, 1].

Image data is stored as uint8 and trained on as ``u / 127.5 - 1`` (0 -> -1, 255 -> 1).
Generated images go back by clamping to [-1, 1], scaling by 127.5 and rounding to the nearest
level, which is also how they are scored (a saved picture holds 8 bits).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["from_uint8", "to_uint8", "quantize"]


def from_uint8(u: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 pixels (any shape) -> floats in [-1, 1] of ``dtype``: ``u / 127.5 - 1``."""
    return u.to(dtype) / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """Floats (any shape, nominally in [-1, 1]) -> uint8 of the same shape and device:
    clamped to [-1, 1], ``(x + 1) * 127.5`` rounded (half to even)."""
    return ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def quantize(x: Tensor) -> Tensor:
    """``x`` as an 8-bit image stores it, back in [-1, 1] (float32, same shape and device)."""
    return from_uint8(to_uint8(x))
