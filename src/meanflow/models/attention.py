"""Multi-head self-attention that works under forward-mode AD.

No fused attention kernel has a forward-AD rule (SPEC §4), so the JVP pass needs the explicit
softmax; an ordinary forward with grad still uses the fused ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad

from meanflow.models.layers import Linear

__all__ = ["Attention", "has_tangent"]


def has_tangent(x: Tensor) -> bool:
    """True inside torch.func.jvp (functorch-wrapped) or for a forward-AD dual tensor."""
    return (torch._C._functorch.is_functorch_wrapped_tensor(x)
            or forward_ad.unpack_dual(x).tangent is not None)


class Attention(nn.Module):
    """Self-attention over tokens (B, N, D) with ``heads`` heads.

    mode -- "auto": fused SDPA unless a forward-mode tangent is present (the JVP passes), so
            the grad forward and sampling use the fused kernel; "math": always explicit.
    """

    def __init__(self, width: int, heads: int, mode: str) -> None:
        super().__init__()
        self.heads, self.mode = heads, mode
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                 # 3 × (B, heads, N, d)
        if self.mode == "math" or has_tangent(x) or has_tangent(q):
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, heads, N, N)
            out = scores.softmax(dim=-1) @ v                             # (B, heads, N, d)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))          # (B, N, D)


