"""Exponential moving averages of the parameters, several decays at once.

Kept outside any DDP wrapper and updated from the unwrapped module's parameters (SPEC §4).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """``shadow_d ← d·shadow_d + (1 - d)·θ`` after each optimiser step, for every decay d.

    Floating-point parameters are averaged (one fused ``_foreach_lerp_`` per decay); buffers
    and integer entries are copied.
    """

    def __init__(self, model: nn.Module, decays: list[float]) -> None:
        self.decays = [float(d) for d in decays]
        state = model.state_dict()
        params = {name for name, p in model.named_parameters() if p.is_floating_point()}
        self._avg_names = [k for k in state if k in params]
        self._copy_names = [k for k in state if k not in params]
        self.shadows = {self.key(d): {k: v.detach().clone() for k, v in state.items()}
                        for d in self.decays}

    @staticmethod
    def key(decay: float) -> str:
        return f"ema_{decay:g}"

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        state = model.state_dict()
        current = [state[k] for k in self._avg_names]
        for d in self.decays:
            shadow = self.shadows[self.key(d)]
            if current:
                torch._foreach_lerp_([shadow[k] for k in self._avg_names], current, 1.0 - d)
            for k in self._copy_names:
                shadow[k].copy_(state[k])

    def state_dict(self) -> dict[str, Tensor]:
        """Flat ``{ema_<decay>.<param>: tensor}`` for safetensors."""
        return {f"{k}.{name}": t for k, s in self.shadows.items() for name, t in s.items()}

    def load_state_dict(self, flat: dict[str, Tensor]) -> None:
        for k, shadow in self.shadows.items():
            for name in shadow:
                shadow[name].copy_(flat[f"{k}.{name}"])
