"""Exponential moving averages of the parameters, several decays at once.

Kept outside any DDP wrapper and updated from the unwrapped module's parameters (SPEC §4).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """``shadow_d ← d·shadow_d + (1 - d)·θ`` after each optimiser step, for every decay d.

    Buffers (none in the MLP) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decays: list[float]) -> None:
        self.decays = [float(d) for d in decays]
        self.shadows = {self.key(d): {k: v.detach().clone() for k, v in model.state_dict().items()}
                        for d in self.decays}

    @staticmethod
    def key(decay: float) -> str:
        return f"ema_{decay:g}"

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for d in self.decays:
            shadow = self.shadows[self.key(d)]
            for name, value in model.state_dict().items():
                if name in params and value.is_floating_point():
                    shadow[name].lerp_(value, 1.0 - d)
                else:
                    shadow[name].copy_(value)

    def state_dict(self) -> dict[str, Tensor]:
        """Flat ``{ema_<decay>.<param>: tensor}`` for safetensors."""
        return {f"{k}.{name}": t for k, s in self.shadows.items() for name, t in s.items()}

    def load_state_dict(self, flat: dict[str, Tensor]) -> None:
        for k, shadow in self.shadows.items():
            for name in shadow:
                shadow[name].copy_(flat[f"{k}.{name}"])
