"""DiT backbone (Peebles & Xie 2023) as the MeanFlow paper uses it (docs/method.md §10).

adaLN-Zero blocks, MLP ratio 4, tanh-GELU, LayerNorm without affine (eps 1e-6), fixed 2-D
sin-cos positions, zero-initialised modulation and output layers, and separate t and h
embedders summed with the label embedding (null class = ``num_classes``). Named sizes follow
the DiT paper and the MeanFlow paper's Tab. 2: ``dit-s/2`` ... ``dit-xl/8``.

Contract: ``net(z, t, h, y=None)`` with z (B, C, H, W) and t, h (B,); output (B, C, H, W).

Attention runs through the fused ``scaled_dot_product_attention`` in an ordinary forward, and
through its JVP-pass implementation (``math`` by default, ``chunked`` or ``triton``) when a
forward-mode tangent is present: no fused kernel has a JVP rule (see
:mod:`meanflow.models.forward_mode`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meanflow.errors import ConfigError
from meanflow.models.attention import Attention
from meanflow.models.checks import check_common
from meanflow.models.embeddings import LabelEmbedder, TimeEmbedder, init_embedders
from meanflow.models.forward_mode import use_lean
from meanflow.models.layers import Linear, layer_norm

__all__ = ["DiTConfig", "DiT", "DIT_SIZES", "sincos_2d"]

# name -> (depth, width, heads): the DiT paper and the MeanFlow paper's Tab. 2
DIT_SIZES = {"s": (12, 384, 6), "b": (12, 768, 12), "m": (16, 1024, 16),
             "l": (24, 1024, 16), "xl": (28, 1152, 16)}


@dataclass
class DiTConfig:
    in_channels: int = 4            # set from the data
    input_size: int = 32            # square inputs, set from the data
    num_classes: int | None = None
    patch: int = 2
    depth: int = 12
    width: int = 768
    heads: int = 12
    mlp_ratio: float = 4.0
    attention: str = "auto"         # "auto": fused when possible; "math": always explicit

    def __post_init__(self) -> None:
        check_common(self, ("in_channels", "input_size", "patch", "depth", "width", "heads"))
        if self.input_size % self.patch:
            raise ConfigError(f"input size {self.input_size} is not divisible by patch "
                              f"{self.patch}: choose a patch that divides it")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ConfigError(f"width {self.width} must split into {self.heads} heads of even "
                              "size")
        if self.width % 4:
            raise ConfigError(f"width {self.width} must be divisible by 4 (2-D sin-cos)")


def sincos_2d(width: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding, (grid², width): half the channels encode the row,
    half the column, each with frequencies 1/10000^(i/(width/4))."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p: Tensor) -> Tensor:
        angles = p.reshape(-1, 1) * omega[None]                       # (grid², width/4)
        return torch.cat([torch.sin(angles), torch.cos(angles)], 1)   # (grid², width/2)

    return torch.cat([encode(rows), encode(cols)], 1).float()         # (grid², width)


def _layer_norm(x: Tensor) -> Tensor:
    # No affine parameters (the paper's DiT); also the form a compiled JVP accepts
    # (docs/design.md, backbones). JVP passes and sampling (outside autocast) take the lean
    # forward-AD rule of layers.layer_norm.
    if use_lean(x) and not torch.is_autocast_enabled(x.device.type):
        return layer_norm(x, 1e-6)
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class Block(nn.Module):
    """adaLN-Zero transformer block: shift, scale and gate of both branches from c."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, mode: str) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.attn = Attention(width, heads, mode)
        self.fc1, self.fc2 = Linear(width, hidden), Linear(hidden, width)
        self.modulation = Linear(width, 6 * width)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        mod = self.modulation(F.silu(c))[:, None]                     # (B, 1, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x = x + gate1 * self.attn(_layer_norm(x) * (1 + scale1) + shift1)
        hidden = F.gelu(self.fc1(_layer_norm(x) * (1 + scale2) + shift2), approximate="tanh")
        return x + gate2 * self.fc2(hidden)                           # (B, N, D)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, p = cfg.width, cfg.patch
        self.grid = cfg.input_size // p
        self.patch_embed = Linear(cfg.in_channels * p * p, D)      # = a stride-p conv
        self.register_buffer("pos", sincos_2d(D, self.grid)[None], persistent=False)
        # DiT's frequencies (1 down to 1e-4) on raw t and h in [0, 1] (docs/method.md §4: no ×1000).
        self.t_embed = TimeEmbedder(D, 256, max_freq=1.0, min_freq=1e-4)
        self.h_embed = TimeEmbedder(D, 256, max_freq=1.0, min_freq=1e-4)
        if cfg.num_classes is not None:
            self.y_embed = LabelEmbedder(cfg.num_classes, D)
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.attention)
                                    for _ in range(cfg.depth))
        self.final_modulation = Linear(D, 2 * D)
        self.final = Linear(D, p * p * cfg.in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        init_embedders(self.t_embed, self.h_embed, getattr(self, "y_embed", None))
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        for layer in (self.final_modulation, self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z: Tensor, t: Tensor, h: Tensor, y: Tensor | None = None) -> Tensor:
        B, C, H, W = z.shape
        p, g = self.cfg.patch, self.grid
        if (C, H, W) != (self.cfg.in_channels, self.cfg.input_size, self.cfg.input_size):
            raise ConfigError(f"DiT built for {self.cfg.in_channels}×{self.cfg.input_size}×"
                              f"{self.cfg.input_size} inputs got {C}×{H}×{W}")
        x = z.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5)     # (B, g, g, C, p, p)
        x = self.patch_embed(x.reshape(B, g * g, C * p * p)) + self.pos  # (B, N, D)
        c = self.t_embed(t) + self.h_embed(h)                          # (B, D)
        if self.cfg.num_classes is not None:
            if y is None:
                y = torch.full((B,), self.cfg.num_classes, device=z.device, dtype=torch.long)
            c = c + self.y_embed(y)
        for block in self.blocks:
            x = block(x, c)                                            # (B, N, D)
        shift, scale = self.final_modulation(F.silu(c))[:, None].chunk(2, dim=-1)
        x = self.final(_layer_norm(x) * (1 + scale) + shift)           # (B, N, C·p·p)
        x = x.reshape(B, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5)      # (B, C, g, p, g, p)
        return x.reshape(B, C, H, W)
