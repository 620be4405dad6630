"""The U-Net of the MeanFlow CIFAR-10 experiments: EDM's DDPM++ network as the official
PyTorch code configures it (docs/fidelity.md lists the settings and the parameter counts).

Layout (``unet-cifar10``: 128 channels, multipliers [2, 2, 2], 4 blocks per level, attention
at 16x16, 55,932,419 parameters with the 6-wide augmentation label):

- **Mapping network.** t and h = t - r each give ``channels * time_mult`` parameter-free
  sinusoidal features (frequencies 10000^(-j/(n/2-1)), j = 0 .. n/2-1, on the raw times in
  [0, 1]; sines first, then cosines). The two are concatenated; the augmentation label
  (``map_augment``, bias-free) and, for a class-conditional net, a learned label vector
  (``map_label``, ours: the official network is unconditional) are added; then two SiLU linear
  layers give the embedding of width ``channels * emb_mult``.
- **Encoder.** A 3x3 input convolution, then per level a down-sampling block (not at the
  first level) and ``blocks_per_res`` blocks; every output is kept as a skip. Self-attention
  follows every encoder block at the resolutions in ``attn_resolutions``.
- **Decoder.** At the lowest level two blocks without skips (the first with attention,
  always), otherwise an up-sampling block; then ``blocks_per_res + 1`` blocks that each take
  one skip, with attention only in the last of them at the ``attn_resolutions``.
- **Output.** GroupNorm, SiLU, 3x3 convolution.

A block is GroupNorm -> SiLU -> (resample) -> conv3x3 -> + linear(embedding) per channel ->
GroupNorm -> SiLU -> dropout -> conv3x3, added to the (resampled, 1x1-projected when the
width or size changes) input and scaled by sqrt(1/2); attention (one qkv projection, softmax,
output projection) is added the same way. Resampling is the [1, 3, 3, 1] FIR filter: a
depthwise stride-2 convolution down, its transpose (times 4) up.

Initialisation (EDM's): Xavier-uniform weights and zero biases everywhere, the qkv weights
times sqrt(0.2), and the last convolution of every block, every attention output projection
and the output convolution times 1e-5 (near zero, not exactly zero), so a fresh network
outputs almost 0. GroupNorm (eps 1e-6) uses min(32, C // 4) groups (the largest count up to
that which divides C where it does not); its affine scale and shift are applied outside
``F.group_norm``, and without grad or with a forward-mode tangent it runs as
``layers.group_norm``, whose forward-AD rule is a few fused passes.

Contract: ``net(z, t, h, y=None, aug=None)`` with z (B, C, H, W), t and h (B,), y (B,)
labels (index ``num_classes`` is the null class) and aug (B, augment_dim); output
(B, C, H, W). ``aug=None`` is the zero label, "not augmented", which is what sampling uses.

iMF options (docs/imf.md; both off by default, leaving the network above unchanged):
``guidance_cond`` adds the keywords ``omega``, ``t_min``, ``t_max`` ((B,); None: ω = 1 and the
interval [0, 1]): the same sinusoidal features of 1 − 1/ω, t_min and t_max, concatenated and
mapped by a bias-free linear layer (``map_guidance``), are added where the label is, before
the two mapping layers. ``v_head`` adds a second output (``norm_out_v``, ``conv_out_v``, a copy
of the output layers on the last decoder features) returned by ``v_head=True`` as (u, v).
Unlike the iMF DiT (models/imf_dit.py), the U-Net keeps t as an input: the MeanFlow
comparison shares the network.
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
from meanflow.models.forward_mode import use_lean
from meanflow.models.layers import Conv2d, Linear, conv2d, dropout, group_norm

__all__ = ["UNetConfig", "UNet", "UNET_PRESETS", "ResBlock", "fir_filter"]

# name -> preset values of UNetConfig (in_channels, input_size, num_classes come from the data)
UNET_PRESETS = {
    # The official CIFAR-10 network: 55,929,347 parameters at 32x32x3 (+ 6 x 512 = 3,072 for
    # the 6-wide augmentation label of the official recipe).
    "unet-cifar10": dict(channels=128, channel_mult=[2, 2, 2], blocks_per_res=4,
                         attn_resolutions=[16], emb_mult=4, time_mult=2, dropout=0.2),
    # The same network at a CPU size, e.g. 28x28 Fashion-MNIST (28 -> 14 -> 7), and tests.
    "unet-small": dict(channels=32, channel_mult=[1, 2, 2], blocks_per_res=2,
                       attn_resolutions=[14], emb_mult=4, time_mult=2, dropout=0.1),
}

_SKIP_SCALE = math.sqrt(0.5)
_QKV_GAIN = math.sqrt(0.2)     # EDM's initial scale of the attention's qkv weights
_NEAR_ZERO = 1e-5              # EDM's initial scale of the layers that end a residual branch
_MAX_PERIOD = 10000.0          # slowest sinusoid: frequency 1 / 10000


@dataclass
class UNetConfig:
    in_channels: int = 3            # set from the data
    input_size: int = 32            # square inputs, set from the data
    num_classes: int | None = None  # adds map_label (null class = num_classes)
    channels: int = 128             # width of the first level
    channel_mult: list[int] = field(default_factory=lambda: [2, 2, 2])  # width per level
    blocks_per_res: int = 4         # encoder blocks per level (the decoder has one more)
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    emb_mult: int = 4               # embedding width = channels * emb_mult
    time_mult: int = 2              # sinusoidal features per time = channels * time_mult
    dropout: float = 0.2
    heads: int = 1
    resample_filter: list[int] = field(default_factory=lambda: [1, 3, 3, 1])
    attention: str = "auto"         # "auto": fused when possible; "math": always explicit
    augment_dim: int = 0            # width of the augmentation label (EDMAugment.label_dim)
    guidance_cond: bool = False     # iMF: also embed 1 − 1/ω, t_min, t_max
    v_head: bool = False            # iMF: a second output layer for v

    def __post_init__(self) -> None:
        check_common(self, ("in_channels", "input_size", "channels", "blocks_per_res",
                            "emb_mult", "time_mult", "heads"))
        if isinstance(self.augment_dim, bool) or not isinstance(self.augment_dim, int) \
                or self.augment_dim < 0:
            raise ConfigError(f"model augment_dim={self.augment_dim!r} must be a non-negative "
                              "integer (the augmentation's label_dim, 6 for the official "
                              "recipe; 0 for none)")
        for name in ("guidance_cond", "v_head"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model {name}={getattr(self, name)!r} must be true or false")
        for name in ("channel_mult", "attn_resolutions", "resample_filter"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
                raise ConfigError(f"model {name}={value!r} must be a list of positive integers")
            setattr(self, name, list(value))
        if not self.channel_mult:
            raise ConfigError("model channel_mult must name at least one level")
        if len(self.resample_filter) not in (2, 4):
            raise ConfigError(f"model resample_filter={self.resample_filter!r} must have 2 "
                              "or 4 taps, e.g. [1, 3, 3, 1] (official) or [1, 1]")
        if (self.channels * self.time_mult) % 2:
            raise ConfigError(f"channels * time_mult = {self.channels * self.time_mult} must "
                              "be even (sines and cosines)")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.input_size % factor:
            raise ConfigError(f"input size {self.input_size} is not divisible by {factor} "
                              f"(2^(levels-1) for {len(self.channel_mult)} levels): pad the "
                              "data or use fewer levels")
        low = len(self.channel_mult) - 1
        for level, mult in enumerate(self.channel_mult):
            res, width = self.input_size >> level, self.channels * mult
            if (res in self.attn_resolutions or level == low) and width % self.heads:
                raise ConfigError(f"width {width} at resolution {res} must split into "
                                  f"{self.heads} heads")


def _groups(channels: int) -> int:
    """EDM's group count min(32, C // 4): at most 32 groups of at least 4 channels (a group
    needs several channels, or the per-channel embedding added just before the norm would be
    cancelled). Where that count does not divide C, the largest one below it that does
    (EDM's network fails there); 1 for fewer than 8 channels."""
    cap = max(1, min(32, channels // 4))
    return max(g for g in range(1, cap + 1) if channels % g == 0)


def fir_filter(taps: list[int]) -> Tensor:
    """The separable 2-D resampling filter f fᵀ / (Σf)² of 1-D taps f, shape (k, k), float32."""
    f = torch.tensor(taps, dtype=torch.float32)
    return torch.outer(f, f) / f.sum() ** 2


class GroupNorm(nn.Module):
    """GroupNorm (eps 1e-6) without affine inside the kernel, then a per-channel scale and
    shift (an affine group_norm inside a compiled ``torch.func.jvp`` hits an internal assert in
    PyTorch 2.x). Without grad or with a forward-mode tangent (and outside autocast) it runs as
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


def _downsample(x: Tensor, fir: Tensor) -> Tensor:
    """Depthwise FIR filter, stride 2: (B, C, H, W) -> (B, C, H/2, W/2)."""
    C, k = x.shape[1], fir.shape[-1]
    w = fir.to(x.dtype).expand(C, 1, k, k)
    pad = (k - 1) // 2
    if use_lean(x):     # a convolution whose forward-AD rule skips the filter's zero tangent
        return conv2d(x, w, None, 2, pad, 1, C)
    return F.conv2d(x, w, stride=2, padding=pad, groups=C)


def _upsample(x: Tensor, fir: Tensor) -> Tensor:
    """Transposed depthwise FIR filter (times 4, so a constant stays constant), stride 2:
    (B, C, H, W) -> (B, C, 2H, 2W)."""
    C, k = x.shape[1], fir.shape[-1]
    w = (4 * fir).to(x.dtype).expand(C, 1, k, k)
    return F.conv_transpose2d(x, w, stride=2, padding=(k - 1) // 2, groups=C)


class ResBlock(nn.Module):
    """Residual block with an additive per-channel embedding, optional resampling (``"down"``
    or ``"up"``, with a 1x1 projection of the resampled skip) and an optional self-attention
    after it. ``takes_skip``: the decoder concatenates an encoder output to its input; ``res``:
    the side of the block's output."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, attn: bool,
                 heads: int, mode: str, resample: str | None = None,
                 takes_skip: bool = False, res: int = 0) -> None:
        super().__init__()
        self.cin, self.cout, self.res = cin, cout, res   # res: the output's height and width
        self.resample, self.dropout, self.takes_skip = resample, dropout, takes_skip
        self.norm0 = GroupNorm(cin)
        self.conv0 = Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = Linear(emb_dim, cout)
        self.norm1 = GroupNorm(cout)
        self.conv1 = Conv2d(cout, cout, 3, padding=1)
        self.skip = Conv2d(cin, cout, 1) if cin != cout or resample else None
        self.norm2 = GroupNorm(cout) if attn else None
        self.attn = Attention(cout, heads, mode) if attn else None

    def _resample(self, x: Tensor, fir: Tensor) -> Tensor:
        if self.resample == "down":
            return _downsample(x, fir)
        if self.resample == "up":
            return _upsample(x, fir)
        return x

    def forward(self, x: Tensor, emb: Tensor, fir: Tensor) -> Tensor:
        h = self.conv0(self._resample(F.silu(self.norm0(x)), fir))    # (B, cout, H', W')
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = dropout(F.silu(self.norm1(h)), self.dropout, self.training)
        h = self.conv1(h)
        x = self._resample(x, fir)
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
    """The DDPM++ U-Net (module docstring). Blocks are kept in the order the network runs
    them: ``encoder`` (after ``conv_in``), then ``decoder`` (its first two blocks are the
    bottleneck), then ``norm_out`` and ``conv_out``."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C0 = cfg.channels
        emb_dim, time_dim = C0 * cfg.emb_mult, C0 * cfg.time_mult
        kw = dict(emb_dim=emb_dim, dropout=float(cfg.dropout), heads=cfg.heads,
                  mode=cfg.attention)
        half = time_dim // 2
        # float32 frequencies (also in a float64 net), as the official network computes them
        freqs = (1.0 / _MAX_PERIOD) ** (torch.arange(half, dtype=torch.float32)
                                        / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)
        self.register_buffer("fir", fir_filter(cfg.resample_filter), persistent=False)

        if cfg.num_classes is not None:                    # null class = num_classes
            self.map_label = nn.Embedding(cfg.num_classes + 1, 2 * time_dim)
        if cfg.augment_dim > 0:
            self.map_augment = Linear(cfg.augment_dim, 2 * time_dim, bias=False)
        self.takes_guidance, self.has_v_head = cfg.guidance_cond, cfg.v_head
        if cfg.guidance_cond:
            self.map_guidance = Linear(3 * time_dim, 2 * time_dim, bias=False)
        self.map_layer0 = Linear(2 * time_dim, emb_dim)
        self.map_layer1 = Linear(emb_dim, emb_dim)

        self.conv_in = Conv2d(cfg.in_channels, C0, 3, padding=1)
        self.encoder = nn.ModuleList()
        skips, cout = [C0], C0
        for level, mult in enumerate(cfg.channel_mult):
            res = cfg.input_size >> level
            if level > 0:
                self.encoder.append(ResBlock(cout, cout, attn=False, resample="down", res=res,
                                             **kw))
                skips.append(cout)
            for _ in range(cfg.blocks_per_res):
                cin, cout = cout, C0 * mult
                self.encoder.append(ResBlock(cin, cout, attn=res in cfg.attn_resolutions,
                                             res=res, **kw))
                skips.append(cout)
        self.decoder = nn.ModuleList()
        low = len(cfg.channel_mult) - 1
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            res = cfg.input_size >> level
            if level == low:                               # the bottleneck
                self.decoder.append(ResBlock(cout, cout, attn=True, res=res, **kw))
                self.decoder.append(ResBlock(cout, cout, attn=False, res=res, **kw))
            else:
                self.decoder.append(ResBlock(cout, cout, attn=False, resample="up", res=res,
                                             **kw))
            for index in range(cfg.blocks_per_res + 1):
                cin, cout = cout + skips.pop(), C0 * mult
                attn = index == cfg.blocks_per_res and res in cfg.attn_resolutions
                self.decoder.append(ResBlock(cin, cout, attn=attn, takes_skip=True, res=res,
                                             **kw))
        assert not skips
        self.norm_out = GroupNorm(cout)
        self.conv_out = Conv2d(cout, cfg.in_channels, 3, padding=1)
        if cfg.v_head:
            self.norm_out_v = GroupNorm(cout)
            self.conv_out_v = Conv2d(cout, cfg.in_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.cfg.num_classes is not None:
            # EDM's scale for a label map: a Xavier-uniform (classes -> width) map applied to
            # a one-hot label times sqrt(classes)
            classes, width = self.map_label.weight.shape
            bound = math.sqrt(6.0 / (classes + width)) * math.sqrt(classes)
            nn.init.uniform_(self.map_label.weight, -bound, bound)
        with torch.no_grad():
            near_zero = [self.conv_out] + ([self.conv_out_v] if self.cfg.v_head else [])
            for block in self.modules():
                if isinstance(block, ResBlock):
                    near_zero.append(block.conv1)
                    if block.attn is not None:
                        block.attn.qkv.weight.mul_(_QKV_GAIN)
                        near_zero.append(block.attn.proj)
            for layer in near_zero:
                layer.weight.mul_(_NEAR_ZERO)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by part: ``mapping`` (the ``map_*`` layers), ``conv_in``, ``encoder RxR``
        and ``decoder RxR`` (blocks by the side of their output), ``output``."""
        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())
        parts = {"mapping": sum(count(m) for n, m in self.named_children()
                                if n.startswith("map_")), "conv_in": count(self.conv_in)}
        for side, blocks in (("encoder", self.encoder), ("decoder", self.decoder)):
            for block in blocks:
                key = f"{side} {block.res}x{block.res}"
                parts[key] = parts.get(key, 0) + count(block)
        parts["output"] = count(self.norm_out) + count(self.conv_out)
        if self.cfg.v_head:
            parts["v output"] = count(self.norm_out_v) + count(self.conv_out_v)
        return parts

    def time_features(self, s: Tensor) -> Tensor:
        """Sinusoidal features of raw times s (B,) -> (B, channels * time_mult): sines, then
        cosines, at frequencies 10000^(-j/(n/2-1))."""
        angles = s[:, None] * self.freqs.to(s.dtype)[None]            # (B, n/2)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    def embed(self, t: Tensor, h: Tensor, y: Tensor | None, aug: Tensor | None,
              guidance: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """The mapping network: (t, h, y, aug) and, with ``guidance_cond``, (ω, t_min, t_max)
        -> the blocks' embedding (B, channels*emb_mult)."""
        emb = torch.cat([self.time_features(t), self.time_features(h)], dim=1)  # (B, 2n)
        if guidance is not None:
            omega, t_min, t_max = guidance
            feats = torch.cat([self.time_features((1 - 1 / omega).to(emb.dtype)),
                               self.time_features(t_min.to(emb.dtype)),
                               self.time_features(t_max.to(emb.dtype))], dim=1)  # (B, 3n)
            emb = emb + self.map_guidance(feats)
        if self.cfg.num_classes is not None:
            if y is None:
                y = torch.full((t.shape[0],), self.cfg.num_classes, device=t.device,
                               dtype=torch.long)
            emb = emb + self.map_label(y).to(emb.dtype)
        if aug is not None:          # None is the zero label: map_augment(0) = 0
            emb = emb + self.map_augment(aug.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))                             # (B, E)
        return F.silu(self.map_layer1(emb))                            # (B, E)

    def forward(self, z: Tensor, t: Tensor, h: Tensor, y: Tensor | None = None,
                aug: Tensor | None = None, *, omega: Tensor | None = None,
                t_min: Tensor | None = None, t_max: Tensor | None = None,
                v_head: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """u(z, r, t) for h = t - r. ``aug`` (B, augment_dim) is the augmentation label;
        ``None`` means no augmentation (zeros), which is what sampling uses. ``omega``,
        ``t_min``, ``t_max`` need ``guidance_cond`` and ``v_head=True`` (returns (u, v)) needs
        ``v_head`` in the config (module docstring)."""
        B, C, H, W = z.shape
        if (C, H, W) != (self.cfg.in_channels, self.cfg.input_size, self.cfg.input_size):
            raise ConfigError(f"U-Net built for {self.cfg.in_channels}×{self.cfg.input_size}×"
                              f"{self.cfg.input_size} inputs got {C}×{H}×{W}")
        A = self.cfg.augment_dim
        if aug is not None:
            if A == 0:
                raise ConfigError("this U-Net takes no augmentation label (augment_dim=0): "
                                  "build it with augment_dim=EDMAugment(...).label_dim, or "
                                  "pass aug=None")
            if aug.shape != (B, A):
                raise ConfigError(f"augmentation label has shape {tuple(aug.shape)}, the "
                                  f"U-Net needs ({B}, {A}): one augment_dim-wide row per sample")
        guidance = None
        if self.cfg.guidance_cond:
            ones = torch.ones_like(t)
            guidance = (ones if omega is None else omega,
                        torch.zeros_like(t) if t_min is None else t_min,
                        ones if t_max is None else t_max)
        elif omega is not None or t_min is not None or t_max is not None:
            raise ConfigError("this U-Net takes no guidance conditions (omega, t_min, t_max): "
                              "build it with guidance_cond=true")
        if v_head and not self.cfg.v_head:
            raise ConfigError("this U-Net has no v-head: build it with v_head=true")
        emb = self.embed(t, h, y, aug, guidance)                       # (B, E)
        x = self.conv_in(z)                                            # (B, C0, H, W)
        skips = [x]
        for block in self.encoder:
            x = block(x, emb, self.fir)
            skips.append(x)
        for block in self.decoder:
            if block.takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)                 # (B, C + C_skip, ·, ·)
            x = block(x, emb, self.fir)
        u = self.conv_out(F.silu(self.norm_out(x)))                    # (B, C, H, W)
        if not v_head:
            return u
        return u, self.conv_out_v(F.silu(self.norm_out_v(x)))
