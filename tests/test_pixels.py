"""The pixel mapping: 0 -> -1 and 255 -> 1 exactly, a round trip through 8 bits is the
identity on uint8, and quantising is clamping plus rounding to the nearest of 256 levels."""

from __future__ import annotations

import torch

from meanflow.pixels import from_uint8, quantize, to_uint8


def test_every_level_round_trips_exactly():
    u = torch.arange(256, dtype=torch.uint8)
    x = from_uint8(u)
    assert x[0] == -1.0 and x[-1] == 1.0 and x.dtype == torch.float32
    assert torch.equal(to_uint8(x), u)
    assert torch.equal(to_uint8(from_uint8(u, torch.float64)), u)


def test_quantize_clamps_and_rounds_to_the_nearest_level():
    x = torch.tensor([-3.0, -1.0, 0.01, 0.3, 1.0, 7.0, 1 / 127.5 - 1 + 0.49 / 127.5])
    q = quantize(x)
    levels = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0
    nearest = levels[(x.clamp(-1, 1)[:, None] - levels[None]).abs().argmin(1)]
    torch.testing.assert_close(q, nearest, rtol=0, atol=0)
    assert q[0] == -1.0 and q[5] == 1.0
    # 0 lies halfway between levels 127 and 128: rounding goes to the even one
    assert to_uint8(torch.zeros(1)).item() == 128
