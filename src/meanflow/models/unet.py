"""U-Net backbone in the EDM / DDPM++ style, as the MeanFlow paper uses it on CIFAR-10 (SPEC §2).

Residual blocks GroupNorm -> SiLU -> conv3x3 -> (+ embedding per channel) -> GroupNorm -> SiLU ->
dropout -> conv3x3 with a 1x1 skip when the width changes and a residual scale of sqrt(1/2);
one self-attention per block at the resolutions in ``attn_resolutions``; residual down-sampling
(2x2 average pool) and up-sampling (nearest) blocks between levels; decoder blocks concatenate the
encoder's skips. t and h have separate embedders whose outputs are concatenated and projected to
``emb_dim`` (SPEC: "concatenated for the U-Net"); the label embedding (null class =
``num_classes``) is added, and so is a bias-free linear map of the augmentation label when
``augment_dim > 0`` (EDM's ``map_augment``; :class:`meanflow.data.EDMAugment` makes the label,
zero = no augmentation, which is what sampling uses). Named sizes: ``unet-cifar10`` (the
paper's) and ``unet-small`` (CPU).

GroupNorm uses at most 32 groups of at least 4 channels (EDM's rule). It has no affine inside
``F.group_norm`` (an affine norm inside a compiled ``torch.func.jvp`` hits an internal assert,
JVP-NOTES); the learned per-channel scale and shift are separate parameters applied afterwards.
The last conv of every residual block, the attention output projections and the output conv
start at zero, so a fresh model outputs 0.

Contract: ``net(z, t, h, y=None, aug=None)`` with z (B, C, H, W), t, h (B,) and aug
(B, augment_dim); output (B, C, H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meanflow.errors import ConfigError
from meanflow.models.attention import Attention
from meanflow.models.checks import check_common
from meanflow.models.embeddings import LabelEmbedder, TimeEmbedder, init_embedders
from meanflow.models.layers import Conv2d, Linear, dropout, group_norm, use_lean

__all__ = ["UNetConfig", "UNet", "UNET_PRESETS"]

# name -> preset values of UNetConfig (in_channels, input_size, num_classes come from the data)
UNET_PRESETS = {
    # The paper's CIFAR-10 U-Net (DDPM++ as in EDM): 55.7M parameters at 32x32x3.
    "unet-cifar10": dict(channels=128, channel_mult=[2, 2, 2], blocks_per_res=4,
                         attn_resolutions=[16], emb_dim=512, dropout=0.2, heads=1),
    # A CPU size for 28x28 Fashion-MNIST (28 -> 14 -> 7) and tests.
    "unet-small": dict(channels=32, channel_mult=[1, 2, 2], blocks_per_res=2,
                       attn_resolutions=[14], emb_dim=128, dropout=0.1, heads=1),
}

_SKIP_SCALE = math.sqrt(0.5)


@dataclass
class UNetConfig:
    in_channels: int = 3            # set from the data
    input_size: int = 32            # square inputs, set from the data
    num_classes: int | None = None
    channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [2, 2, 2])
    blocks_per_res: int = 4
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    emb_dim: int = 512
    dropout: float = 0.2
    heads: int = 1
    attention: str = "auto"         # "auto": fused when possible; "math": always explicit
    augment_dim: int = 0            # width of the augmentation label (EDMAugment: 9); 0 = none

    def __post_init__(self) -> None:
        check_common(self, ("in_channels", "input_size", "channels", "blocks_per_res",
                            "emb_dim", "heads"))
        if isinstance(self.augment_dim, bool) or not isinstance(self.augment_dim, int) \
                or self.augment_dim < 0:
            raise ConfigError(f"model augment_dim={self.augment_dim!r} must be a non-negative "
                              "integer (9 for EDM augmentation labels, 0 for none)")
        for name in ("channel_mult", "attn_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
                raise ConfigError(f"model {name}={value!r} must be a list of positive integers")
            setattr(self, name, list(value))
        if not self.channel_mult:
            raise ConfigError("model channel_mult must name at least one level")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.input_size % factor:
            raise ConfigError(f"input size {self.input_size} is not divisible by {factor} "
                              f"(2^(levels-1) for {len(self.channel_mult)} levels): pad the "
                              "data or use fewer levels")
        resolutions = [self.input_size // 2 ** i for i in range(len(self.channel_mult))]
        for res, mult in zip(resolutions, self.channel_mult):
            width = self.channels * mult
            if res in self.attn_resolutions and width % self.heads:
                raise ConfigError(f"width {width} at resolution {res} must split into "
                                  f"{self.heads} heads")


def _groups(channels: int) -> int:
    """EDM's group count: at most 32 groups of at least 4 channels (the largest such count
    that divides ``channels``; 1 for fewer than 8 channels).

    A group needs several channels: the per-channel embedding is added just before a GroupNorm,
    which would cancel it entirely with one channel per group (a 32-channel level with 32
    groups would ignore t, h, the label and the augmentation label).
    """
    cap = max(1, min(32, channels // 4))
    return max(g for g in range(1, cap + 1) if channels % g == 0)


class GroupNorm(nn.Module):
    """GroupNorm (eps 1e-6) without affine inside the kernel, then a per-channel scale and
    shift (JVP-NOTES: an affine group_norm inside a compiled func.jvp hits an internal assert).
    Without grad or with a forward-mode tangent (and outside autocast) it runs as
    ``layers.group_norm``, whose JVP rule is a few fused passes instead of ~20 kernels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.groups = _groups(channels)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        if use_lean(x) and not torch.is_autocast_enabled(x.device.type):
            # JVP passes and sampling: one autograd.Function with a lean forward-AD rule
            return group_norm(x, self.groups, self.weight, self.bias, 1e-6)
        x = F.group_norm(x, self.groups, eps=1e-6)                     # (B, C, H, W)
        return x * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def _downsample(x: Tensor) -> Tensor:
    B, C, H, W = x.shape                                               # 2x2 average pool
    return x.reshape(B, C, H // 2, 2, W // 2, 2).mean(dim=(3, 5))      # (B, C, H/2, W/2)


def _upsample(x: Tensor) -> Tensor:
    B, C, H, W = x.shape                                               # nearest, x2
    return x[:, :, :, None, :, None].expand(B, C, H, 2, W, 2).reshape(B, C, 2 * H, 2 * W)


class ResBlock(nn.Module):
    """Residual block with an additive per-channel embedding, optional resampling (``"down"``
    or ``"up"``) and an optional self-attention after it."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, attn: bool,
                 heads: int, mode: str, resample: str | None = None) -> None:
        super().__init__()
        self.resample, self.dropout = resample, dropout
        self.norm0 = GroupNorm(cin)
        self.conv0 = Conv2d(cin, cout, 3, padding=1)
        self.emb = Linear(emb_dim, cout)
        self.norm1 = GroupNorm(cout)
        self.conv1 = Conv2d(cout, cout, 3, padding=1)
        self.skip = Conv2d(cin, cout, 1) if cin != cout or resample else None
        self.attn = Attention(cout, heads, mode) if attn else None
        self.norm2 = GroupNorm(cout) if attn else None

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return _downsample(x)
        if self.resample == "up":
            return _upsample(x)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self._resample(F.silu(self.norm0(x)))                      # (B, cin, H', W')
        h = self.conv0(h)                                              # (B, cout, H', W')
        h = h + self.emb(emb)[:, :, None, None]
        h = dropout(F.silu(self.norm1(h)), self.dropout, self.training)
        h = self.conv1(h)
        x = self._resample(x)
        if self.skip is not None:
            x = self.skip(x)
        x = (x + h) * _SKIP_SCALE                                      # (B, cout, H', W')
        if self.attn is not None:
            B, C, H, W = x.shape
            tokens = self.norm2(x).reshape(B, C, H * W).transpose(1, 2)  # (B, H·W, C)
            out = self.attn(tokens).transpose(1, 2).reshape(B, C, H, W)
            x = (x + out) * _SKIP_SCALE
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E, C0 = cfg.emb_dim, cfg.channels
        kw = dict(emb_dim=E, dropout=float(cfg.dropout), heads=cfg.heads, mode=cfg.attention)
        # DiT's frequencies (1 down to 1e-4) on raw t and h in [0, 1] (SPEC §1: no ×1000).
        self.t_embed = TimeEmbedder(E, 256, max_freq=1.0, min_freq=1e-4)
        self.h_embed = TimeEmbedder(E, 256, max_freq=1.0, min_freq=1e-4)
        self.emb_proj = Linear(2 * E, E)                   # concatenated t and h -> emb_dim
        if cfg.num_classes is not None:
            self.y_embed = LabelEmbedder(cfg.num_classes, E)
        if cfg.augment_dim > 0:                            # augmentation label -> emb_dim
            self.aug_embed = Linear(cfg.augment_dim, E, bias=False)

        self.conv_in = Conv2d(cfg.in_channels, C0, 3, padding=1)
        self.encoder = nn.ModuleList()
        skips, cin, res = [C0], C0, cfg.input_size
        for level, mult in enumerate(cfg.channel_mult):
            cout = C0 * mult
            if level > 0:
                res //= 2
                self.encoder.append(ResBlock(cin, cin, attn=False, resample="down", **kw))
                skips.append(cin)
            for _ in range(cfg.blocks_per_res):
                self.encoder.append(ResBlock(cin, cout, attn=res in cfg.attn_resolutions, **kw))
                cin = cout
                skips.append(cin)
        self.middle = nn.ModuleList([ResBlock(cin, cin, attn=True, **kw),
                                     ResBlock(cin, cin, attn=False, **kw)])
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            cout = C0 * mult
            if level < len(cfg.channel_mult) - 1:
                res *= 2
                self.decoder.append(ResBlock(cin, cin, attn=False, resample="up", **kw))
            for _ in range(cfg.blocks_per_res + 1):
                self.decoder.append(ResBlock(cin + skips.pop(), cout,
                                             attn=res in cfg.attn_resolutions, **kw))
                cin = cout
        assert not skips
        self.norm_out = GroupNorm(cin)
        self.conv_out = Conv2d(cin, cfg.in_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        init_embedders(self.t_embed, self.h_embed, getattr(self, "y_embed", None))
        # Every residual branch and attention output starts at zero, and so does the output.
        zero = [self.conv_out]
        for block in self.modules():
            if isinstance(block, ResBlock):
                zero.append(block.conv1)
                if block.attn is not None:
                    zero.append(block.attn.proj)
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z: Tensor, t: Tensor, h: Tensor, y: Tensor | None = None,
                aug: Tensor | None = None) -> Tensor:
        """u(z, r, t) for h = t - r. ``aug`` (B, augment_dim) is the augmentation label;
        ``None`` means no augmentation (zeros), which is what sampling uses."""
        B, C, H, W = z.shape
        if (C, H, W) != (self.cfg.in_channels, self.cfg.input_size, self.cfg.input_size):
            raise ConfigError(f"U-Net built for {self.cfg.in_channels}×{self.cfg.input_size}×"
                              f"{self.cfg.input_size} inputs got {C}×{H}×{W}")
        A = self.cfg.augment_dim
        if aug is not None:
            if A == 0:
                raise ConfigError("this U-Net takes no augmentation label (augment_dim=0): "
                                  "build it with augment_dim=9 for EDM augmentation, or pass "
                                  "aug=None")
            if aug.shape != (B, A):
                raise ConfigError(f"augmentation label has shape {tuple(aug.shape)}, the "
                                  f"U-Net needs ({B}, {A}): one augment_dim-wide row per sample")
        emb = self.emb_proj(torch.cat([self.t_embed(t), self.h_embed(h)], dim=1))  # (B, E)
        if self.cfg.num_classes is not None:
            if y is None:
                y = torch.full((B,), self.cfg.num_classes, device=z.device, dtype=torch.long)
            emb = emb + self.y_embed(y)
        if A > 0 and aug is not None:   # aug = None is the zero label: aug_embed(0) = 0
            emb = emb + self.aug_embed(aug.to(emb.dtype))
        emb = F.silu(emb)                                              # (B, E)
        x = self.conv_in(z)                                            # (B, C0, H, W)
        skips = [x]
        for block in self.encoder:
            x = block(x, emb)
            skips.append(x)
        for block in self.middle:
            x = block(x, emb)                                          # (B, C_L, H/2^L', ·)
        for block in self.decoder:
            if block.resample != "up":
                x = torch.cat([x, skips.pop()], dim=1)                 # (B, C + C_skip, ·, ·)
            x = block(x, emb)
        x = self.conv_out(F.silu(self.norm_out(x)))                    # (B, C, H, W)
        return x
