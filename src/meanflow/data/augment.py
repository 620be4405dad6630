"""EDM-style geometric augmentation whose parameters are returned as a label (SPEC §2).

The MeanFlow CIFAR-10 recipe follows EDM: every training image goes through random flips and a
random affine map with probability ``p = 0.12`` per transform (times the transform's weight),
and the network is told what was done through a 9-dimensional *augmentation label*, so that it
can learn the clean distribution and be sampled with the label at zero (identity).

Label layout (``(B, 9)``, every entry zero when its transform was not applied, so a zero label
means the image is unchanged):

====  =====================  ==============================================================
dim   name                   meaning
====  =====================  ==============================================================
0     xflip                  1 if the image was mirrored left-right, else 0
1     yflip                  1 if the image was mirrored top-bottom, else 0
2     scale                  log2 s of the isotropic zoom s
3     rotate cos             cos θ - 1 of the rotation angle θ
4     rotate sin             sin θ
5     aniso cos              w·cos 2φ  } stretch by 2^w along direction φ and by 2^-w across
6     aniso sin              w·sin 2φ  } it; [[l5, l6], [l6, -l5]] is the matrix's log2
7     translate x            t_x, the shift right as a fraction of the image width
8     translate y            t_y, the shift down as a fraction of the image height
====  =====================  ==============================================================

Geometry. Points are centred pixel coordinates ``q = (x, y)`` with x to the right, y *down*
and the origin at the image centre. After the flips (exact, integer mirrors), image content at
``p`` moves to ``q = A·p + b`` with ``A = s · R(θ) · M`` and ``b = (t_x·W, t_y·H)``, where
``R(θ) = [[cos θ, -sin θ], [sin θ, cos θ]]`` (clockwise on screen for θ > 0, since y points
down) and ``M = expm(ln 2 · [[l5, l6], [l6, -l5]])`` (the anisotropic stretch). So the output is
``out(q) = in(A⁻¹(q - b))``, sampled bilinearly with reflection at the borders
(``F.grid_sample``, ``align_corners=False``). Images to which no geometric transform applies are
passed through untouched (bit-exact), and so are flip-only images up to the mirror itself.

Distributions (EDM's): a flip, when applied, mirrors with probability 1/2; log2 s ~ N(0,
scale_std²); θ ~ U[-π·rotate_frac_max, π·rotate_frac_max]; w ~ N(0, aniso_std²) and φ ~
U[0, π); t_x, t_y ~ N(0, translate_std²). Transform k is applied to each image independently
with probability ``min(p · weight_k, 1)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from meanflow.errors import ConfigError

__all__ = ["EDMAugment", "AUGMENT_LABEL_DIM"]

#: Width of the augmentation label.
AUGMENT_LABEL_DIM = 9

_WEIGHTS = ("xflip", "yflip", "scale", "rotate_frac", "aniso", "translate_frac")
_STDS = ("scale_std", "rotate_frac_max", "aniso_std", "translate_std")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"augment {name}={value!r} must be a finite number")
    return float(value)


class EDMAugment:
    """EDM's geometric augmentation with its 9-dimensional label (see the module docstring).

    Args:
        p: base probability in [0, 1]; ``0`` disables every transform.
        xflip, yflip, scale, rotate_frac, aniso, translate_frac: non-negative weights; each
            transform is applied with probability ``min(p · weight, 1)``. EDM's CIFAR-10 values
            are the defaults (``xflip=1e8`` makes the left-right flip decision always drawn).
        scale_std: std of log2 of the zoom.
        rotate_frac_max: largest rotation as a fraction of π.
        aniso_std: std of log2 of the anisotropic stretch.
        translate_std: std of the shift as a fraction of the image size.

    Raises:
        ConfigError: for a value out of range.
    """

    #: Width of the label returned with each batch.
    label_dim: int = AUGMENT_LABEL_DIM

    def __init__(self, p: float = 0.12, xflip: float = 1e8, yflip: float = 1.0,
                 scale: float = 1.0, rotate_frac: float = 1.0, aniso: float = 1.0,
                 translate_frac: float = 1.0, scale_std: float = 0.2,
                 rotate_frac_max: float = 1.0, aniso_std: float = 0.2,
                 translate_std: float = 0.125) -> None:
        self.p = _number("p", p)
        if not 0.0 <= self.p <= 1.0:
            raise ConfigError(f"augment p={p!r} must lie in [0, 1] (EDM uses 0.12 on CIFAR-10; "
                              "0 disables augmentation)")
        values = dict(xflip=xflip, yflip=yflip, scale=scale, rotate_frac=rotate_frac,
                      aniso=aniso, translate_frac=translate_frac, scale_std=scale_std,
                      rotate_frac_max=rotate_frac_max, aniso_std=aniso_std,
                      translate_std=translate_std)
        for name, value in values.items():
            number = _number(name, value)
            if number < 0:
                raise ConfigError(f"augment {name}={value!r} must be >= 0 (0 switches it off)")
            setattr(self, name, number)

    def probabilities(self) -> dict[str, float]:
        """Per-image probability with which each transform is applied (a flip, once applied,
        mirrors with probability 1/2)."""
        return {name: min(self.p * getattr(self, name), 1.0) for name in _WEIGHTS}

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={getattr(self, n):g}" for n in ("p", *_WEIGHTS, *_STDS))
        return f"EDMAugment({args})"

    def __call__(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Augment a batch, drawing every random number from ``generator`` only.

        Args:
            x: ``(B, C, H, W)`` floating-point images (any device).
            generator: the source of randomness; it may live on another device than ``x``
                (numbers are drawn on the generator's device, then moved).

        Returns:
            ``(x_aug, labels)``: the augmented images, shaped and typed like ``x``, and the
            ``(B, 9)`` labels in ``x``'s dtype and device.

        Raises:
            ConfigError: if ``x`` is not a 4-D floating tensor or ``generator`` not a
                ``torch.Generator``.
        """
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            what = (f"shape {tuple(x.shape)} dtype {x.dtype}" if isinstance(x, Tensor)
                    else type(x).__name__)
            raise ConfigError(f"augmentation needs a (B, C, H, W) floating tensor, got {what}; "
                              "convert images to float in [-1, 1] first")
        if not isinstance(generator, torch.Generator):
            raise ConfigError(f"generator must be a torch.Generator, got "
                              f"{type(generator).__name__}; pass torch.Generator().manual_seed(s)")
        B, _, H, W = x.shape
        probs = self.probabilities()
        # Every draw, in a fixed order and amount whatever the settings, on the generator.
        kw = dict(generator=generator, device=generator.device, dtype=torch.float64)
        gates = torch.rand(B, 6, **kw)                         # apply transform k?
        bits = torch.randint(0, 2, (B, 2), generator=generator, device=generator.device)
        normal = torch.randn(B, 4, **kw)                       # log2 s, w, t_x, t_y
        uniform = torch.rand(B, 2, **kw)                       # θ, φ
        limit = torch.tensor([probs[n] for n in _WEIGHTS], dtype=torch.float64,
                             device=generator.device)
        on = gates < limit                                     # (B, 6) bool
        zero = torch.zeros((), dtype=torch.float64, device=generator.device)

        flip = on[:, :2] & (bits == 1)                         # (B, 2) bool
        log_s = torch.where(on[:, 2], normal[:, 0] * self.scale_std, zero)
        theta = torch.where(on[:, 3], (2 * uniform[:, 0] - 1) * math.pi * self.rotate_frac_max,
                            zero)
        w = torch.where(on[:, 4], normal[:, 1] * self.aniso_std, zero)
        phi = uniform[:, 1] * math.pi
        shift = torch.where(on[:, 5, None], normal[:, 2:] * self.translate_std, zero)  # (B, 2)
        labels = torch.stack([
            flip[:, 0].double(), flip[:, 1].double(), log_s,
            -2 * torch.sin(theta / 2) ** 2, torch.sin(theta),  # cos θ - 1 without cancellation
            w * torch.cos(2 * phi), w * torch.sin(2 * phi),
            shift[:, 0], shift[:, 1]], dim=1)                  # (B, 9) float64

        fx = flip[:, 0].to(x.device)[:, None, None, None]
        fy = flip[:, 1].to(x.device)[:, None, None, None]
        out = torch.where(fx, x.flip(3), x)
        out = torch.where(fy, out.flip(2), out)
        if B and any(probs[n] > 0 for n in _WEIGHTS[2:]):
            geometric = on[:, 2:].any(dim=1).to(x.device)[:, None, None, None]
            theta_n = _sampling_matrix(labels, H, W).to(device=x.device, dtype=x.dtype)
            grid = F.affine_grid(theta_n, list(out.shape), align_corners=False)
            warped = F.grid_sample(out, grid, mode="bilinear", padding_mode="reflection",
                                   align_corners=False)
            out = torch.where(geometric, warped, out)
        return out, labels.to(device=x.device, dtype=x.dtype)


def _sampling_matrix(labels: Tensor, H: int, W: int) -> Tensor:
    """The ``(B, 2, 3)`` matrix for ``F.affine_grid``: output -> input in normalised coords.

    ``p = A⁻¹(q - b)`` in centred pixel coordinates becomes, with ``D = diag(W/2, H/2)``,
    ``p_n = D⁻¹A⁻¹D·q_n - D⁻¹A⁻¹b``.
    """
    s = torch.exp2(labels[:, 2])
    cos, sin = labels[:, 3] + 1, labels[:, 4]
    a, b_ = labels[:, 5], labels[:, 6]
    w = torch.sqrt(a * a + b_ * b_)                            # |log2 stretch|
    ch, sh = torch.cosh(w * math.log(2)), torch.sinh(w * math.log(2))
    k_a = torch.where(w > 0, a / w.clamp_min(1e-300), torch.zeros_like(w))
    k_b = torch.where(w > 0, b_ / w.clamp_min(1e-300), torch.zeros_like(w))
    # M⁻¹ = cosh·I - sinh·K with K = [[k_a, k_b], [k_b, -k_a]] (K² = I); R⁻¹ = Rᵀ.
    m_inv = torch.stack([torch.stack([ch - sh * k_a, -sh * k_b], -1),
                         torch.stack([-sh * k_b, ch + sh * k_a], -1)], -2)      # (B, 2, 2)
    r_inv = torch.stack([torch.stack([cos, sin], -1),
                         torch.stack([-sin, cos], -1)], -2)                     # (B, 2, 2)
    a_inv = m_inv @ r_inv / s[:, None, None]                                    # (B, 2, 2)
    d = labels.new_tensor([W / 2, H / 2])
    linear = a_inv * d[None, None, :] / d[None, :, None]                        # D⁻¹ A⁻¹ D
    shift = labels[:, 7:9] * labels.new_tensor([W, H])                          # b, pixels
    offset = -(a_inv @ shift[:, :, None])[:, :, 0] / d                          # -D⁻¹ A⁻¹ b
    return torch.cat([linear, offset[:, :, None]], dim=2)                       # (B, 2, 3)
