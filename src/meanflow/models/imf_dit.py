"""The in-context DiT of Improved MeanFlow (iMF, docs/imf.md), built as the official JAX code
builds it.

No adaLN: every condition enters as tokens. 20 prefix tokens go before the patch tokens, in
this order: 8 for the class, 4 for the guidance scale ω (embedded as 1 − 1/ω), 2 for t_min, 2
for t_max and 4 for h = t − r; each group is a learned (K, D) matrix plus the embedding of its
value broadcast over the K rows (a learned label vector, or 256 sinusoidal features of the raw
value, cosines first, through a two-layer SiLU MLP). The network does not see t itself, only
h. Positions are a 1-D rotary embedding (RoPE, θ = 10000, adjacent channel pairs) over the whole
sequence of 20 + N tokens.

A block is pre-RMSNorm attention and a SwiGLU MLP (hidden width int(D·8/3)), each branch
multiplied by a per-channel gate that starts at zero, so a fresh block is the identity. The
attention has bias-free q, k, v and output projections (q, k, v as one matrix here), RMSNorm of
q and k per head (one scale of the head width, shared by the heads), then RoPE, then softmax
attention through :class:`meanflow.models.attention.Attention`'s own paths (fused, or its
JVP-pass implementation when a forward-mode tangent is present).

``depth`` blocks make the u-path: ``depth − head_depth`` shared blocks, then ``head_depth``
blocks of the u-head; the v-head (auxiliary, training only; the option ``v_head=false`` builds
the network without it) is another ``head_depth`` blocks on the shared output. Each head ends in RMSNorm and a zero-initialised linear layer read from
the patch tokens only, so a fresh model outputs exactly zero. Sizes: ``imf-dit-b/2`` ...
``imf-dit-xl/2`` (the paper's B, M, L, XL), and ``imf-dit-tiny``/``imf-dit-s`` for tests and CPUs.

Initialisation (the official code's): weights N(0, c²/fan_in) with c = 0.32 in the blocks and
c = 1 in the embedders, zero biases; prefix matrices and the label table N(0, 1/D); the patch
embedding Xavier-uniform; RMSNorm scales one; gates and output layers zero.

Contract: ``net(z, t, h, y=None, *, omega=None, t_min=None, t_max=None, v_head=False)`` with z
(B, C, H, W); t, h, omega, t_min, t_max (B,); y (B,) labels (index ``num_classes`` is the null
class, also what ``y=None`` means). ``omega=None`` is ω = 1, ``t_min=None`` 0 and ``t_max=None``
1. Returns u (B, C, H, W), or (u, v) with ``v_head=True``; without it the v-head is not run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from meanflow.errors import ConfigError
from meanflow.models.attention import Attention
from meanflow.models.checks import check_common
from meanflow.models.embeddings import LabelEmbedder, TimeEmbedder
from meanflow.models.layers import Linear, RMSNorm

__all__ = ["IMFDiTConfig", "IMFDiT", "IMF_DIT_SIZES", "rope_tables", "apply_rope"]

# name -> (depth, head_depth, width, heads): depth counts the u-path (shared + u-head blocks)
IMF_DIT_SIZES = {"tiny": (4, 2, 64, 4), "s": (8, 4, 384, 6), "b": (12, 8, 768, 12),
                 "m": (24, 8, 768, 12), "l": (32, 8, 1024, 16), "xl": (48, 8, 1024, 16)}

_FREQ_DIM = 256          # sinusoidal features per scalar condition
_MAX_PERIOD = 10000.0    # the slowest of them: frequency 1/10000^((n/2-1)/(n/2))


@dataclass
class IMFDiTConfig:
    in_channels: int = 4            # set from the data
    input_size: int = 32            # square inputs, set from the data
    num_classes: int | None = None  # None: the class tokens carry no label
    patch: int = 2
    depth: int = 12                 # blocks on the u-path: shared + u-head
    head_depth: int = 8             # blocks of each head (u and v)
    width: int = 768
    heads: int = 12
    mlp_ratio: float = 8 / 3
    class_tokens: int = 8
    guidance_tokens: int = 4        # for ω
    interval_tokens: int = 2        # for t_min, and as many for t_max
    time_tokens: int = 4            # for h
    v_head: bool = True             # False: no v-head (the "boundary" loss, or inference only)
    rope_theta: float = 10000.0
    block_init: float = 0.32        # c of the blocks' N(0, c²/fan_in) weights
    embed_init: float = 1.0         # c of the embedders' weights
    token_init: float = 1.0         # prefix matrices ~ N(0, token_init²/D)
    attention: str = "auto"         # "auto": fused when possible; "math": always explicit

    def __post_init__(self) -> None:
        check_common(self, ("in_channels", "input_size", "patch", "depth", "width", "heads",
                            "class_tokens", "guidance_tokens", "interval_tokens",
                            "time_tokens"))
        if isinstance(self.head_depth, bool) or not isinstance(self.head_depth, int) \
                or not 0 <= self.head_depth <= self.depth:
            raise ConfigError(f"model head_depth={self.head_depth!r} must be an integer in "
                              f"[0, depth={self.depth}]")
        if self.input_size % self.patch:
            raise ConfigError(f"input size {self.input_size} is not divisible by patch "
                              f"{self.patch}: choose a patch that divides it")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ConfigError(f"width {self.width} must split into {self.heads} heads of even "
                              "size (RoPE rotates channel pairs)")
        if not isinstance(self.v_head, bool):
            raise ConfigError(f"model v_head={self.v_head!r} must be true or false")
        if int(self.width * self.mlp_ratio) < 1:
            raise ConfigError(f"mlp_ratio={self.mlp_ratio!r} leaves no hidden units")

    @property
    def prefix(self) -> int:
        """Conditioning tokens before the patch tokens (20 by default)."""
        return (self.class_tokens + self.guidance_tokens + 2 * self.interval_tokens
                + self.time_tokens)


def rope_tables(head_dim: int, length: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, each (length, head_dim) in float64: position n turns
    channel pair (2i, 2i+1) by n·θ^(-2i/head_dim); both entries of a pair hold the same value."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs[None]   # (L, d/2)
    angles = angles.repeat_interleave(2, dim=1)                                  # (L, d)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates each adjacent channel pair (x₀, x₁) of x (..., N, d) by the angles of its
    position: (x₀ cos − x₁ sin, x₀ sin + x₁ cos). cos, sin: (N, d) broadcast over the front."""
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (−x₁, x₀)
    return x * cos.to(x.dtype) + turned * sin.to(x.dtype)


class QKNormRoPE(nn.Module):
    """The projection in front of :class:`RoPEAttention`'s softmax: bias-free q, k, v, then
    RMSNorm of q and k per head and RoPE on both. Returns (B, N, 3·D) laid out as
    ``Attention.forward`` splits it (q, k, v; heads; head channels)."""

    def __init__(self, width: int, heads: int, length: int, theta: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.proj = Linear(width, 3 * width, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        cos, sin = rope_tables(self.head_dim, length, theta)
        # (L, 1, d) float32 tables, broadcast over the heads
        self.register_buffer("cos", cos[:, None].float(), persistent=False)
        self.register_buffer("sin", sin[:, None].float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.proj(x).reshape(B, N, 3, self.heads, self.head_dim).unbind(2)
        cos, sin = self.cos[:N], self.sin[:N]
        q = apply_rope(self.q_norm(q), cos, sin)                       # (B, N, heads, d)
        k = apply_rope(self.k_norm(k), cos, sin)
        return torch.stack([q, k, v], dim=2).reshape(B, N, 3 * D)


class RoPEAttention(Attention):
    """:class:`Attention` (its fused and JVP-pass paths, its ``jvp_impl``) with the iMF
    projections: :class:`QKNormRoPE` in, a bias-free linear layer out."""

    def __init__(self, width: int, heads: int, mode: str, length: int, theta: float) -> None:
        super().__init__(width, heads, mode)
        self.qkv = QKNormRoPE(width, heads, length, theta)
        self.proj = Linear(width, width, bias=False)


class SwiGLU(nn.Module):
    """w₂(silu(w₁x) ⊙ w₃x), bias-free; w₁ and w₃ as one (2·hidden, D) matrix."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc_in = Linear(width, 2 * hidden, bias=False)
        self.fc_out = Linear(hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.fc_in(x).chunk(2, dim=-1)
        return self.fc_out(F.silu(gate) * up)


class Block(nn.Module):
    """x + g₁ ⊙ attn(norm₁ x), then + g₂ ⊙ mlp(norm₂ x); the gates g start at zero."""

    def __init__(self, cfg: IMFDiTConfig, length: int) -> None:
        super().__init__()
        D = cfg.width
        self.norm1, self.norm2 = RMSNorm(D), RMSNorm(D)
        self.attn = RoPEAttention(D, cfg.heads, cfg.attention, length, cfg.rope_theta)
        self.mlp = SwiGLU(D, int(D * cfg.mlp_ratio))
        self.attn_gate = nn.Parameter(torch.zeros(D))
        self.mlp_gate = nn.Parameter(torch.zeros(D))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x)) * self.attn_gate
        return x + self.mlp(self.norm2(x)) * self.mlp_gate              # (B, L, D)


class FinalLayer(nn.Module):
    """RMSNorm, then a linear layer to the patch values; the linear layer starts at zero."""

    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.norm = RMSNorm(width)
        self.linear = Linear(width, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(x))


def _time_embedder(width: int) -> TimeEmbedder:
    # the official features: cosines first, frequencies 1 down to 10000^(-(n/2-1)/(n/2))
    half = _FREQ_DIM // 2
    return TimeEmbedder(width, _FREQ_DIM, max_freq=_MAX_PERIOD ** (-(half - 1) / half),
                        min_freq=1.0, cos_first=True)


class IMFDiT(nn.Module):
    """The iMF in-context DiT (module docstring). ``takes_guidance``: it reads ω, t_min and
    t_max; ``has_v_head``: it can return the auxiliary v (``cfg.v_head``)."""

    takes_guidance = True

    def __init__(self, cfg: IMFDiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, p = cfg.width, cfg.patch
        self.grid = cfg.input_size // p
        length = cfg.prefix + self.grid ** 2
        self.patch_embed = Linear(p * p * cfg.in_channels, D)         # = a stride-p conv
        self.h_embed = _time_embedder(D)
        self.omega_embed = _time_embedder(D)
        self.t_min_embed = _time_embedder(D)
        self.t_max_embed = _time_embedder(D)
        if cfg.num_classes is not None:
            self.y_embed = LabelEmbedder(cfg.num_classes, D)
        self.class_tokens = nn.Parameter(torch.empty(cfg.class_tokens, D))
        self.omega_tokens = nn.Parameter(torch.empty(cfg.guidance_tokens, D))
        self.t_min_tokens = nn.Parameter(torch.empty(cfg.interval_tokens, D))
        self.t_max_tokens = nn.Parameter(torch.empty(cfg.interval_tokens, D))
        self.time_tokens = nn.Parameter(torch.empty(cfg.time_tokens, D))
        shared = cfg.depth - cfg.head_depth
        self.shared_blocks = nn.ModuleList(Block(cfg, length) for _ in range(shared))
        self.u_blocks = nn.ModuleList(Block(cfg, length) for _ in range(cfg.head_depth))
        self.u_final = FinalLayer(D, p * p * cfg.in_channels)
        self.has_v_head = cfg.v_head
        if cfg.v_head:
            self.v_blocks = nn.ModuleList(Block(cfg, length) for _ in range(cfg.head_depth))
            self.v_final = FinalLayer(D, p * p * cfg.in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        cfg, D = self.cfg, self.cfg.width

        def scaled(module: nn.Module, c: float) -> None:
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=c / layer.in_features ** 0.5)
                    if layer.bias is not None:
                        nn.init.zeros_(layer.bias)

        heads = [self.u_final] + ([self.v_final] if self.has_v_head else [])
        for block in (*self.shared_blocks, *self.u_blocks, *getattr(self, "v_blocks", ())):
            scaled(block, cfg.block_init)      # gates and RMSNorm scales keep their 0 and 1
        for embedder in (self.h_embed, self.omega_embed, self.t_min_embed, self.t_max_embed):
            scaled(embedder, cfg.embed_init)
        if cfg.num_classes is not None:
            nn.init.normal_(self.y_embed.table.weight, std=cfg.embed_init / D ** 0.5)
        for tokens in (self.class_tokens, self.omega_tokens, self.t_min_tokens,
                       self.t_max_tokens, self.time_tokens):
            nn.init.normal_(tokens, std=cfg.token_init / D ** 0.5)
        nn.init.xavier_uniform_(self.patch_embed.weight)
        nn.init.zeros_(self.patch_embed.bias)
        for final in heads:
            nn.init.zeros_(final.linear.weight)
            nn.init.zeros_(final.linear.bias)

    def inference_parameters(self) -> int:
        """Parameters that ``v_head=False`` uses: all but the v-head's blocks and output layer
        (the count the paper quotes)."""
        v_parts = (self.v_blocks, self.v_final) if self.has_v_head else ()
        skip = {id(p) for m in v_parts for p in m.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def tokens(self, z: Tensor, h: Tensor, y: Tensor | None, omega: Tensor | None,
               t_min: Tensor | None, t_max: Tensor | None) -> Tensor:
        """The input sequence (B, prefix + N, D): class, ω, t_min, t_max and h tokens, then the
        patch tokens."""
        B, C, H, W = z.shape
        p, g = self.cfg.patch, self.grid
        x = z.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1)     # (B, g, g, p, p, C)
        x = self.patch_embed(x.reshape(B, g * g, p * p * C))           # (B, N, D)
        ref = self.class_tokens
        ones = torch.ones(B, device=z.device, dtype=ref.dtype)
        omega = ones if omega is None else omega
        t_min = torch.zeros_like(ones) if t_min is None else t_min
        t_max = ones if t_max is None else t_max
        cls = self.class_tokens.expand(B, -1, -1)
        if self.cfg.num_classes is not None:
            if y is None:
                y = torch.full((B,), self.cfg.num_classes, device=z.device, dtype=torch.long)
            cls = cls + self.y_embed(y)[:, None]
        prefix = [cls,
                  self.omega_tokens + self.omega_embed(1 - 1 / omega)[:, None],
                  self.t_min_tokens + self.t_min_embed(t_min)[:, None],
                  self.t_max_tokens + self.t_max_embed(t_max)[:, None],
                  self.time_tokens + self.h_embed(h)[:, None]]
        # one dtype for the residual stream: under autocast the patch tokens come out in low
        # precision, the prefix in the parameters' (as in a plain DiT, the sum is the wider)
        dtype = torch.promote_types(x.dtype, prefix[0].dtype)
        return torch.cat([part.to(dtype) for part in (*prefix, x)], dim=1)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, prefix + N, D) after a head's final layer -> (B, C, H, W) from the patch tokens."""
        B, C, p, g = x.shape[0], self.cfg.in_channels, self.cfg.patch, self.grid
        x = x[:, self.cfg.prefix:].reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, g * p, g * p)                           # (B, C, H, W)

    def forward(self, z: Tensor, t: Tensor, h: Tensor, y: Tensor | None = None, *,
                omega: Tensor | None = None, t_min: Tensor | None = None,
                t_max: Tensor | None = None, v_head: bool = False) -> Tensor | tuple:
        """u(z, r, t) for h = t − r (t itself is not an input of this network); with
        ``v_head=True`` the pair (u, v)."""
        B, C, H, W = z.shape
        if (C, H, W) != (self.cfg.in_channels, self.cfg.input_size, self.cfg.input_size):
            raise ConfigError(f"iMF DiT built for {self.cfg.in_channels}×{self.cfg.input_size}×"
                              f"{self.cfg.input_size} inputs got {C}×{H}×{W}")
        x = self.tokens(z, h, y, omega, t_min, t_max)                  # (B, L, D)
        for block in self.shared_blocks:
            x = block(x)
        u = x
        for block in self.u_blocks:
            u = block(u)
        u = self.unpatchify(self.u_final(u))
        if not v_head:
            return u
        if not self.has_v_head:
            raise ConfigError("this iMF DiT was built without a v-head (v_head=false)")
        v = x
        for block in self.v_blocks:
            v = block(v)
        return u, self.unpatchify(self.v_final(v))
