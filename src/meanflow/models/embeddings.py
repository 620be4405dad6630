"""Embeddings of the conditioning inputs shared by the backbones."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from meanflow.models.layers import Linear

__all__ = ["SinusoidalEmbedding", "TimeEmbedder", "LabelEmbedder", "init_embedders"]


class SinusoidalEmbedding(nn.Module):
    """Raw time s in [0, 1] (no ×1000 scaling, docs/method.md §4) -> [sin(ω_i s), cos(ω_i s)].

    The angular frequencies ω_i are geometric from ``min_freq`` to ``max_freq`` (in that order;
    ``min_freq`` may be the larger). ``cos_first`` puts the cosines first. (B,) -> (B, dim).
    """

    def __init__(self, dim: int, max_freq: float = 1000.0, min_freq: float = 1.0,
                 cos_first: bool = False) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)
        self.cos_first = cos_first

    def forward(self, s: Tensor) -> Tensor:
        angles = s.to(self.freqs.dtype)[:, None] * self.freqs[None]      # (B, dim/2)
        parts = [torch.sin(angles), torch.cos(angles)]
        return torch.cat(parts[::-1] if self.cos_first else parts, dim=1)  # (B, dim)


class TimeEmbedder(nn.Module):
    """Sinusoidal features followed by a two-layer SiLU MLP: (B,) -> (B, dim)."""

    def __init__(self, dim: int, freq_dim: int = 128, max_freq: float = 1000.0,
                 min_freq: float = 1.0, cos_first: bool = False) -> None:
        super().__init__()
        self.freq = SinusoidalEmbedding(freq_dim, max_freq, min_freq, cos_first)
        self.mlp = nn.Sequential(Linear(freq_dim, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, s: Tensor) -> Tensor:
        return self.mlp(self.freq(s))


class LabelEmbedder(nn.Module):
    """Class labels in [0, num_classes] -> (B, dim); index ``num_classes`` is the null class used
    by label dropout and classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: Tensor) -> Tensor:
        return self.table(y)


def init_embedders(*embedders: nn.Module | None, std: float = 0.02) -> None:
    """DiT-style start for conditioning embedders: N(0, std²) weights in the time MLPs and the
    label table (biases are left as the caller set them)."""
    for embedder in embedders:
        if isinstance(embedder, TimeEmbedder):
            for layer in embedder.mlp:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=std)
        elif isinstance(embedder, LabelEmbedder):
            nn.init.normal_(embedder.table.weight, std=std)
