"""Exponential moving averages of the parameters, several decays at once.

Kept outside any DDP wrapper and updated from the unwrapped module's parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from meanflow.runs.checkpoint import ema_key

__all__ = ["EMA"]


class EMA:
    """``shadow_d ← d·shadow_d + (1 - d)·θ`` after each optimiser step, for every decay d.

    With ``every`` = N > 1 the averages are updated only after optimiser steps n (1-based)
    with n % N == 0 (:meth:`step`), each time with the decay d**N, which stands for N
    updates with d (the official PyTorch CIFAR-10 code: N = 16); that update is computed in
    float64, ``shadow + (1 - d**N)·(θ - shadow)``, and stored in the shadow's dtype.
    N = 1 takes one fused ``_foreach_lerp_`` per decay instead.

    Floating-point parameters are averaged; buffers and integer entries are copied at each
    update.
    """

    def __init__(self, model: nn.Module, decays: list[float], every: int = 1) -> None:
        self.decays = [float(d) for d in decays]
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be a positive integer")
        self.every = every
        state = model.state_dict()
        params = {name for name, p in model.named_parameters() if p.is_floating_point()}
        self._avg_names = [k for k in state if k in params]
        self._copy_names = [k for k in state if k not in params]
        self.shadows = {self.key(d): {k: v.detach().clone() for k, v in state.items()}
                        for d in self.decays}

    @staticmethod
    def key(decay: float) -> str:
        """The EMA's name in checkpoints, e.g. ``ema_0.9999`` (:func:`ema_key`)."""
        return ema_key(decay)

    def step(self, model: nn.Module, n: int) -> bool:
        """After optimiser step ``n`` (1-based): :meth:`update` when n is a multiple of
        ``every``. Returns whether it updated."""
        if n % self.every:
            return False
        self.update(model)
        return True

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One update of every average, with decay d**every."""
        state = model.state_dict()
        current = [state[k] for k in self._avg_names]
        for d in self.decays:
            shadow = self.shadows[self.key(d)]
            if current and self.every == 1:
                torch._foreach_lerp_([shadow[k] for k in self._avg_names], current, 1.0 - d)
            elif current:
                # One tensor at a time: float64 copies of a whole large model would not fit.
                weight = 1.0 - d ** self.every       # a Python float: float64
                for k, theta in zip(self._avg_names, current):
                    old = shadow[k].double()
                    shadow[k].copy_(old + weight * (theta.double() - old))
            for k in self._copy_names:
                shadow[k].copy_(state[k])

    def state_dict(self) -> dict[str, Tensor]:
        """Flat ``{ema_<decay>.<param>: tensor}`` for safetensors."""
        return {f"{k}.{name}": t for k, s in self.shadows.items() for name, t in s.items()}

    def load_state_dict(self, flat: dict[str, Tensor]) -> None:
        """Loads :meth:`state_dict`'s tensors; raises ValueError for missing or extra keys or
        another shape (``copy_`` alone would broadcast)."""
        expected = {f"{k}.{name}" for k, s in self.shadows.items() for name in s}
        if set(flat) != expected:
            missing, extra = sorted(expected - set(flat)), sorted(set(flat) - expected)
            raise ValueError(f"EMA keys missing: {missing[:3]}, unexpected: {extra[:3]}")
        for k, shadow in self.shadows.items():
            for name, t in shadow.items():
                value = flat[f"{k}.{name}"]
                if value.shape != t.shape:
                    raise ValueError(f"EMA tensor {k}.{name} has shape {tuple(value.shape)}, "
                                     f"the model's {tuple(t.shape)}")
        for k, shadow in self.shadows.items():
            for name in shadow:
                shadow[name].copy_(flat[f"{k}.{name}"])
