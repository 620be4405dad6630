"""A residual MLP backbone for low-dimensional data (toy 2-D sets, a user's point clouds).

Contract (all backbones): ``net(z, t, h, y=None) -> tensor shaped like z`` with t, h = t - r of
shape (B,). The backbone knows nothing of MeanFlow; t and h get separate embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from meanflow.errors import ConfigError
from meanflow.models.checks import check_common
from meanflow.models.embeddings import LabelEmbedder, TimeEmbedder
from meanflow.models.layers import Linear

__all__ = ["MLPConfig", "MLP"]


@dataclass
class MLPConfig:
    dim: int = 2                   # flattened size of one sample
    width: int = 256               # hidden width of the residual blocks
    depth: int = 4                 # number of residual blocks
    emb_dim: int = 128             # size of each of the t, h (and label) embeddings
    num_classes: int | None = None  # None: unconditional; else labels in [0, num_classes]
    dropout: float = 0.0
    time_max_freq: float = 10.0     # highest angular frequency of the t and h features

    def __post_init__(self) -> None:
        check_common(self, ("dim", "width", "depth", "emb_dim"))
        if self.emb_dim % 2:
            raise ConfigError(f"model emb_dim={self.emb_dim} must be even (sin and cos halves)")
        if isinstance(self.time_max_freq, bool) \
                or not isinstance(self.time_max_freq, (int, float)) \
                or not math.isfinite(self.time_max_freq) or self.time_max_freq < 1:
            raise ConfigError(f"model time_max_freq={self.time_max_freq!r} must be a number "
                              ">= 1 (the top angular frequency of the time features)")


class _Block(nn.Module):
    """x + W2·drop(SiLU(W1·SiLU(x) + A·c)): the condition c enters every block."""

    def __init__(self, width: int, cond_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = Linear(width, width)
        self.cond = Linear(cond_dim, width)
        self.fc2 = Linear(width, width)
        self.drop = nn.Dropout(dropout)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        hidden = self.act(self.fc1(self.act(x)) + self.cond(c))
        return x + self.fc2(self.drop(hidden))


class MLP(nn.Module):
    """Residual MLP: z (B, *S) with prod(S) = dim -> output (B, *S)."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # du/dt differentiates through these features: very high frequencies make ∂u/∂t, and
        # so the target, huge at initialisation and destabilise training.
        self.t_embed = TimeEmbedder(cfg.emb_dim, cfg.emb_dim, cfg.time_max_freq)
        self.h_embed = TimeEmbedder(cfg.emb_dim, cfg.emb_dim, cfg.time_max_freq)
        n_cond = 2
        if cfg.num_classes is not None:
            self.y_embed = LabelEmbedder(cfg.num_classes, cfg.emb_dim)
            n_cond = 3
        cond_dim = n_cond * cfg.emb_dim
        self.inp = Linear(cfg.dim, cfg.width)
        self.blocks = nn.ModuleList(_Block(cfg.width, cond_dim, cfg.dropout)
                                    for _ in range(cfg.depth))
        self.out = Linear(cfg.width, cfg.dim)
        self.act = nn.SiLU()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Scale the residual branches down with depth so the initial map stays well conditioned.
        for block in self.blocks:
            nn.init.normal_(block.fc2.weight, std=0.5 / math.sqrt(self.cfg.width * self.cfg.depth))
            nn.init.zeros_(block.fc2.bias)

    def forward(self, z: Tensor, t: Tensor, h: Tensor, y: Tensor | None = None) -> Tensor:
        shape = z.shape
        x = z.reshape(shape[0], -1)                                  # (B, D)
        cond = [self.t_embed(t), self.h_embed(h)]                    # 2 × (B, E)
        if self.cfg.num_classes is not None:
            if y is None:  # an unlabelled call means "no class": the null class
                y = torch.full((shape[0],), self.cfg.num_classes, device=z.device,
                               dtype=torch.long)
            cond.append(self.y_embed(y))                             # (B, E)
        c = torch.cat(cond, dim=1)                                   # (B, n·E)
        x = self.inp(x)                                              # (B, W)
        for block in self.blocks:
            x = block(x, c)                                          # (B, W)
        return self.out(self.act(x)).reshape(shape)                  # (B, *S)
