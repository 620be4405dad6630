"""EDM's geometric augmentation, with the label that tells the network what was done.

The MeanFlow CIFAR-10 recipe (docs/method.md §10) uses the "non-leaking" augmentation of EDM
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
App. F.2): each image is randomly flipped and warped by a random affine map, and the network is
conditioned on a label that describes the transform, so that it learns the clean distribution
too and is sampled with the label at zero. :class:`EDMAugment` reproduces that pipeline draw for
draw: after ``torch.manual_seed(s)``, ``EDMAugment(...)(x, torch.default_generator)`` gives the
labels and (to float32 rounding) the images of the reference implementation with the same
settings.

Only EDM's flips and fractional (resampled) geometric transforms exist here; its integer
rotations and translations and its colour transforms are not implemented.

Transforms and label (``(B, label_dim)``; a block is present only when its weight is > 0, in
this order, and is zero for an image the transform was not applied to):

==============  =====  ====================================================================
transform       width  label entries, with z ~ N(0, 1) the transform's own draw
==============  =====  ====================================================================
xflip           1      1 if the image was mirrored left-right, else 0
yflip           1      1 if the image was mirrored top-bottom, else 0
scale           1      z, the zoom being s = 2^(scale_std · z)
rotate_frac     2      cos θ - 1, sin θ, with θ ~ U[-π·rotate_frac_max, π·rotate_frac_max]
aniso           2      z·cos r, z·sin r: stretch by a = 2^(aniso_std · z) along the direction
                       at angle r and by 1/a across it; r ~ U[-π, π] with probability
                       aniso_rotate_prob, else r = 0 (the x axis)
translate_frac  2      z_x, z_y: a shift of translate_frac_std · (z_x·W, z_y·H) pixels
==============  =====  ====================================================================

With all six weights on the label is 9 wide; the default (official MeanFlow CIFAR-10) set has
y-flips and rotations off, so 6. A transform whose weight is > 0 is applied to each image
independently with probability ``min(p · weight, 1)``; a flip, once applied, mirrors with
probability 1/2 (EDM's ``xflip=1e8`` thus mirrors half the images whatever ``p``).

Geometry. Points are centred pixel coordinates ``(x, y)``: x to the right, y *down*, the origin
at the image centre. The flips come first (exact mirrors). Then content at ``p`` moves to

    ``q = K · R · s·p + b``

(scale, then rotation, then stretch, then shift), where ``R = [[cos θ, sin θ], [-sin θ,
cos θ]]`` turns the picture counter-clockwise *on screen* for θ > 0, ``K`` stretches by ``a``
along the unit vector ``(cos r, -sin r)`` (angle r counter-clockwise on screen) and by ``1/a``
across it, and ``b`` is the shift in pixels (right and down). For r ≠ 0 the stretch label
fixes the axis and |z| but not which of the two ways it goes: (z, r) and (-z, r + π) have the
same label (EDM's encoding, kept). Where a zoom-out or turn brings the frame beyond the image,
the border content is mirrored in (reflect padding).

Resampling (EDM's, also its order of operations): every output pixel ``q`` reads the input at
``L·(q - b)`` with ``L = (K·R·s)⁻¹``. The batch is reflect-padded by the margin that the
most displaced output corner needs, plus a guard band for the filters; upsampled 2x with the
12-tap symlet-6 (sym6) wavelet low-pass filter; sampled bilinearly (``F.grid_sample``, zero
padding) on a 2x output grid a few pixels wider than the image; filtered and decimated 2x with
the same filter; and cropped. So whenever any geometric weight is > 0, *every* image of the
batch is resampled, also the ones whose own transform is the identity (zero label), as in the
official training. For those the chain returns the input up to float32 rounding (~1e-5 on
images in [-1, 1]), not bit for bit: their samples fall on the fine grid's pixels, and the
sym6 filter is orthogonal, so filtering down after filtering up is the identity. ``p = 0``
applies no transform but still resamples then; to leave images untouched, do not augment.

Every random number is drawn from the caller's generator, in float32, in EDM's order and
shapes (per enabled transform: flips ``randint`` then ``rand``; scale ``randn`` then the gate;
rotation the angle then the gate; aniso ``randn``, the direction, the gate, the direction's
gate; translation ``randn(2, B)`` then the gate).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from meanflow.data.checks import check_generator
from meanflow.errors import ConfigError

__all__ = ["EDMAugment"]

#: Transform weights, in label order, with the width of each one's label block.
_WIDTHS = {"xflip": 1, "yflip": 1, "scale": 1, "rotate_frac": 2, "aniso": 2, "translate_frac": 2}
_SPREADS = ("scale_std", "rotate_frac_max", "aniso_std", "translate_frac_std")

#: Low-pass (decomposition) filter of Daubechies' symlet with 6 vanishing moments (as listed by
#: PyWavelets as ``Wavelet('sym6').dec_lo``); it sums to √2, so two 1-D passes have gain 2.
_SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057,
         -0.048311742585633, 0.4910559419267466, 0.787641141030194, 0.3379294217276218,
         -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
         0.0017677118642428036, -0.007800708325034148)
#: Border, in image pixels, that a 12-tap filter at half the pixel pitch reaches.
_GUARD = len(_SYM6) // 4
#: EDM takes the filter's centre to be tap 5 (of 0..11), so on the 2x grid a pixel sits half a
#: fine pixel before twice its coarse coordinate (see ``_resample``). The taps' centroid is in
#: fact 5.1: shifts are unaffected, but zoom, rotation and stretch pivot about a point ~0.05
#: pixel off the image centre; kept, as it is part of the reference augmentation.
_FINE_OFFSET = -0.5


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"augment {name}={value!r} must be a finite number")
    return float(value)


class EDMAugment:
    """EDM's flips and affine warps with their label (see the module docstring).

    Args:
        p: base probability in [0, 1] (0.12 in MeanFlow's and EDM's CIFAR-10 runs).
        xflip, yflip, scale, rotate_frac, aniso, translate_frac: non-negative weights; each
            transform is applied with probability ``min(p · weight, 1)``, and one with weight 0
            is off (no random draws, no label columns). The defaults are the official MeanFlow
            CIFAR-10 set; EDM's own CIFAR-10 set adds ``yflip=1, rotate_frac=1``.
        scale_std: std of log2 of the zoom.
        rotate_frac_max: largest rotation as a fraction of π.
        aniso_std: std of log2 of the anisotropic stretch.
        aniso_rotate_prob: probability in [0, 1] that the stretch direction is random rather
            than the x axis.
        translate_frac_std: std of the shift as a fraction of the image width/height.

    Raises:
        ConfigError: for a value out of range; ``TypeError`` for an unknown keyword.
    """

    def __init__(self, p: float = 0.12, xflip: float = 1e8, yflip: float = 0.0,
                 scale: float = 1.0, rotate_frac: float = 0.0, aniso: float = 1.0,
                 translate_frac: float = 1.0, scale_std: float = 0.2,
                 rotate_frac_max: float = 1.0, aniso_std: float = 0.2,
                 aniso_rotate_prob: float = 0.5, translate_frac_std: float = 0.125) -> None:
        self.p = _number("p", p)
        if not 0.0 <= self.p <= 1.0:
            raise ConfigError(f"augment p={p!r} must lie in [0, 1] (EDM uses 0.12 on CIFAR-10; "
                              "0 applies no transform)")
        values = dict(xflip=xflip, yflip=yflip, scale=scale, rotate_frac=rotate_frac,
                      aniso=aniso, translate_frac=translate_frac, scale_std=scale_std,
                      rotate_frac_max=rotate_frac_max, aniso_std=aniso_std,
                      translate_frac_std=translate_frac_std)
        for name, value in values.items():
            number = _number(name, value)
            if number < 0:
                raise ConfigError(f"augment {name}={value!r} must be >= 0 (0 switches it off)")
            setattr(self, name, number)
        self.aniso_rotate_prob = _number("aniso_rotate_prob", aniso_rotate_prob)
        if not 0.0 <= self.aniso_rotate_prob <= 1.0:
            raise ConfigError(f"augment aniso_rotate_prob={aniso_rotate_prob!r} must lie in "
                              "[0, 1] (EDM uses 0.5)")

    @property
    def label_dim(self) -> int:
        """Width of the label returned with each batch (6 for the defaults, 9 with all on)."""
        return sum(width for name, width in _WIDTHS.items() if getattr(self, name) > 0)

    def probabilities(self) -> dict[str, float]:
        """Per-image probability with which each transform is applied (a flip, once applied,
        mirrors with probability 1/2)."""
        return {name: min(self.p * getattr(self, name), 1.0) for name in _WIDTHS}

    def __repr__(self) -> str:
        names = ("p", *_WIDTHS, *_SPREADS, "aniso_rotate_prob")
        return f"EDMAugment({', '.join(f'{n}={getattr(self, n):g}' for n in names)})"

    def __call__(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Augment a batch, drawing every random number from ``generator`` only.

        Args:
            x: ``(B, C, H, W)`` floating-point images, any number of channels, any device.
            generator: the source of randomness; it may live on another device than ``x``
                (numbers are drawn on the generator's device, then moved).

        Returns:
            ``(x_aug, labels)``: the augmented ``(B, C, H, W)`` images, typed like ``x``, and
            the ``(B, label_dim)`` labels in ``x``'s dtype and device.

        Raises:
            ConfigError: if ``x`` is not a 4-D floating tensor or ``generator`` not a
                ``torch.Generator``.
        """
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            what = (f"shape {tuple(x.shape)} dtype {x.dtype}" if isinstance(x, Tensor)
                    else type(x).__name__)
            raise ConfigError(f"augmentation needs a (B, C, H, W) floating tensor, got {what}; "
                              "convert images to float in [-1, 1] first")
        check_generator(generator, cpu_only=False)
        B, _, H, W = x.shape
        flips, sampling, labels = self._draw(B, H, W, generator)
        out = x
        for bits, dim in zip(flips, (3, 2)):     # x-flip mirrors the width, y-flip the height
            if bits is not None:
                mirror = bits.to(x.device).view(B, 1, 1, 1) == 1
                out = torch.where(mirror, out.flip(dim), out)
        if sampling is not None and B > 0:
            linear, shift = (t.to(x.device) for t in sampling)
            work = torch.float64 if x.dtype == torch.float64 else torch.float32
            out = _resample(out.to(work), linear, shift).to(x.dtype)
        return out, labels.to(device=x.device, dtype=x.dtype)

    def _draw(self, B: int, H: int, W: int, generator: torch.Generator
              ) -> tuple[list[Tensor | None], tuple[Tensor, Tensor] | None, Tensor]:
        """All random numbers of one batch, in EDM's order, on the generator's device.

        Returns:
            ``(flips, sampling, labels)``: per flip (x, y) a ``(B,)`` int64 tensor of 0/1 or
            ``None`` when off; ``None`` or the ``(linear (B, 2, 2), shift (B, 2))`` float32
            map of the resampling (``L`` and ``b`` of the module docstring, pixels); and the
            ``(B, label_dim)`` float32 labels.
        """
        dev = generator.device
        opts = dict(generator=generator, device=dev, dtype=torch.float32)

        def gate(weight: float, *shape: int) -> Tensor:
            # compared in float32, as EDM does (weight·p is rounded to float32 for the test)
            return torch.rand(shape, **opts) < weight * self.p

        zero = torch.zeros((), device=dev, dtype=torch.float32)
        columns: list[Tensor] = [torch.zeros(B, 0, device=dev, dtype=torch.float32)]
        flips: list[Tensor | None] = []
        for weight in (self.xflip, self.yflip):
            if weight == 0:
                flips.append(None)
                continue
            bits = torch.randint(2, (B,), generator=generator, device=dev)  # before its gate
            bits = torch.where(gate(weight, B), bits, torch.zeros_like(bits))
            flips.append(bits)
            columns.append(bits[:, None].float())

        linear: Tensor | None = None               # L, the product of the inverse factors

        def then(factor: Tensor) -> None:
            nonlocal linear
            linear = factor if linear is None else linear @ factor

        if self.scale > 0:
            z = torch.randn(B, **opts)
            z = torch.where(gate(self.scale, B), z, zero)
            inv = torch.exp2(-self.scale_std * z)             # 1/s
            then(torch.diag_embed(torch.stack([inv, inv], dim=1)))
            columns.append(z[:, None])
        if self.rotate_frac > 0:
            theta = (2 * torch.rand(B, **opts) - 1) * (math.pi * self.rotate_frac_max)
            theta = torch.where(gate(self.rotate_frac, B), theta, zero)
            cos, sin = theta.cos(), theta.sin()
            then(_rotation(cos, sin))                          # R⁻¹ = R(θ)ᵀ
            columns.append(torch.stack([cos - 1, sin], dim=1))
        if self.aniso > 0:
            z = torch.randn(B, **opts)
            r = (2 * torch.rand(B, **opts) - 1) * math.pi
            z = torch.where(gate(self.aniso, B), z, zero)
            # the direction's own gate ignores p (EDM)
            r = torch.where(torch.rand(B, **opts) < self.aniso_rotate_prob, r, zero)
            a = torch.exp2(self.aniso_std * z)
            cos, sin = r.cos(), r.sin()
            # K⁻¹ = R(-r)·diag(1/a, a)·R(r), R(r) turning the stretch direction onto the x axis
            then(_rotation(cos, -sin) @ torch.diag_embed(torch.stack([1 / a, a], dim=1))
                 @ _rotation(cos, sin))
            columns.append(torch.stack([z * cos, z * sin], dim=1))
        shift: Tensor | None = None
        if self.translate_frac > 0:
            z = torch.randn(2, B, **opts)
            z = torch.where(gate(self.translate_frac, 1, B), z, zero)
            shift = torch.stack([z[0] * (W * self.translate_frac_std),
                                 z[1] * (H * self.translate_frac_std)], dim=1)
            columns.append(z.T)
        labels = torch.cat(columns, dim=1)
        if linear is None and shift is None:
            return flips, None, labels
        if linear is None:
            linear = torch.eye(2, device=dev, dtype=torch.float32).expand(B, 2, 2)
        if shift is None:
            shift = torch.zeros(B, 2, device=dev, dtype=torch.float32)
        return flips, (linear, shift), labels


def _rotation(cos: Tensor, sin: Tensor) -> Tensor:
    """``(B, 2, 2)`` matrices ``[[cos, -sin], [sin, cos]]`` (in x-right, y-down coordinates a
    clockwise turn on screen for sin > 0)."""
    return torch.stack([torch.stack([cos, -sin], dim=-1),
                        torch.stack([sin, cos], dim=-1)], dim=-2)


def _filter_pass(x: Tensor, taps: Tensor, dim: int, up: bool) -> Tensor:
    """One separable pass of the sym6 filter along ``dim`` (2: height, 3: width) of
    ``(B, C, h, w)``: ``up`` doubles the size (zero insertion + filtering, written as a
    transposed convolution), otherwise it filters and keeps every second sample."""
    C = x.shape[1]
    shape = (len(taps), 1) if dim == 2 else (1, len(taps))
    kernel = taps.view(1, 1, *shape).expand(C, 1, *shape)     # depthwise: one per channel
    stride = (2, 1) if dim == 2 else (1, 2)
    if up:   # output n = Σ_k taps[k]·in[(n + 5 - k)/2] over the integer indices: size 2h
        pad = (len(taps) // 2 - 1, 0) if dim == 2 else (0, len(taps) // 2 - 1)
        return F.conv_transpose2d(x, kernel, stride=stride, padding=pad, groups=C)
    # output n = Σ_k taps[k]·in[2n + k - 5]: size h/2 for even h
    pad = ((len(taps) - 1) // 2, 0) if dim == 2 else (0, (len(taps) - 1) // 2)
    return F.conv2d(x, kernel, stride=stride, padding=pad, groups=C)


def _resample(x: Tensor, linear: Tensor, shift: Tensor) -> Tensor:
    """Warp ``(B, C, H, W)`` images so that output pixel ``q`` shows input ``linear·(q - shift)``
    (centred pixel coordinates; ``linear (B, 2, 2)``, ``shift (B, 2)``), through EDM's 2x
    oversampled, sym6-filtered bilinear resampling (module docstring)."""
    B, C, H, W = x.shape
    half = linear.new_tensor([(W - 1) / 2, (H - 1) / 2])        # centre of the corner pixels
    signs = linear.new_tensor([[-1.0, 1.0, 1.0, -1.0], [-1.0, -1.0, 1.0, 1.0]])
    corners = linear @ (half[:, None] * signs - shift[:, :, None])  # (B, 2, 4) input positions
    # How far (pixels) the samples reach beyond each side, plus what the filters see around
    # them: the upsampling filter around a sample and the guard band of the output grid.
    beyond = torch.cat([(-corners).amax(dim=(0, 2)), corners.amax(dim=(0, 2))])  # (4,)
    beyond = beyond + torch.cat([2 * _GUARD - half, 2 * _GUARD - half])
    # Reflection cannot pad by more than size - 1; a sample still beyond that (extreme draws
    # on small images only) reads grid_sample's zeros, as in the reference.
    limit = linear.new_tensor([W - 1, H - 1, W - 1, H - 1])
    left, top, right, bottom = beyond.clamp_min(0).minimum(limit).ceil().int().tolist()
    x = F.pad(x, (left, right, top, bottom), mode="reflect")
    Hp, Wp = x.shape[2:]

    taps = torch.tensor(_SYM6, dtype=x.dtype, device=x.device)
    x = _filter_pass(_filter_pass(x, taps, 3, up=True), taps, 2, up=True)  # (B, C, 2Hp, 2Wp)

    # Sampling grid: the image plus _GUARD pixels per side, at twice the resolution. A coarse
    # coordinate c sits at 2c + _FINE_OFFSET on a fine grid (centred coordinates), and the
    # padding moved the input's centre by ((left - right)/2, (top - bottom)/2). In the
    # normalised coordinates of affine_grid (align_corners=False) a fine centred coordinate u
    # of a grid of n fine pixels is 2u/n, hence for output q_n -> input p_n per axis i:
    #   p_n = (2/n_in)·(2·(L·((q_n·n_out/2 - off)/2 - b) + pad) + off).
    lin = linear.double()
    n_in = lin.new_tensor([2 * Wp, 2 * Hp])
    n_out = lin.new_tensor([2 * (W + 2 * _GUARD), 2 * (H + 2 * _GUARD)])
    pad_shift = lin.new_tensor([(left - right) / 2, (top - bottom) / 2])
    theta_lin = lin * n_out[None, None, :] / n_in[None, :, None]
    inner = (lin @ (-_FINE_OFFSET / 2 - shift.double())[:, :, None])[:, :, 0]  # (B, 2)
    theta_off = 2 / n_in * (2 * (inner + pad_shift) + _FINE_OFFSET)
    theta = torch.cat([theta_lin, theta_off[:, :, None]], dim=2).to(x.dtype)
    size = [B, C, 2 * (H + 2 * _GUARD), 2 * (W + 2 * _GUARD)]
    grid = F.affine_grid(theta, size, align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    x = _filter_pass(_filter_pass(x, taps, 3, up=False), taps, 2, up=False)
    return x[:, :, _GUARD:_GUARD + H, _GUARD:_GUARD + W]
