"""Exponential moving averages of the parameters, several decays at once.

Kept outside any DDP wrapper and updated from the unwrapped module's parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from meanflow.runs.checkpoint import ema_key

__all__ = ["EMA", "warmup_decay", "WARMUP_OFFSET"]

#: The warm-up's (k - 1)/(k + WARMUP_OFFSET - 1): the k-th update averages roughly the
#: last tenth of the steps so far (docs/method.md, EMA).
WARMUP_OFFSET = 10


def warmup_decay(decay: float, k: int) -> float:
    """The decay of the k-th EMA update (1-based) under the warm-up: min(decay, (k - 1) /
    (k + 9)); 0 at the first update (a copy), ``decay`` once k >= (1 + 9·decay)/(1 - decay),
    e.g. k >= 1 991 for 0.995 and 9 991 for 0.999."""
    return min(decay, (k - 1) / (k + WARMUP_OFFSET - 1))


class EMA:
    """``shadow_d ← d·shadow_d + (1 - d)·θ`` after each optimiser step, for every decay d.

    With ``every`` = N > 1 the averages are updated only after optimiser steps n (1-based)
    with n % N == 0 (:meth:`step`), each time with the decay d**N, which stands for N
    updates with d (the official PyTorch CIFAR-10 code: N = 16); that update is computed in
    float64, ``shadow + (1 - d**N)·(θ - shadow)``, and stored in the shadow's dtype.
    N = 1 takes one fused ``_foreach_lerp_`` per decay instead.

    With ``warmup`` the k-th update (k = n / N, 1-based) uses the decay
    min(d**N, (k - 1)/(k + 9)) (:func:`warmup_decay`): the first update copies the weights,
    so no average keeps the random initialisation, and the short horizon of the early updates
    grows until it reaches d's (docs/method.md, EMA). Without it every update uses d**N, and
    the averages start from the initial weights (the official codes).

    Floating-point parameters are averaged; buffers and integer entries are copied at each
    update.
    """

    def __init__(self, model: nn.Module, decays: list[float], every: int = 1,
                 warmup: bool = False) -> None:
        self.decays = [float(d) for d in decays]
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be a positive integer")
        self.every, self.warmup = every, bool(warmup)
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
        self.update(model, n // self.every)
        return True

    def decay(self, d: float, count: int | None = None) -> float:
        """The decay of the ``count``-th update (1-based) of the average of decay ``d``:
        d**every, or with ``warmup`` :func:`warmup_decay` (None: after the warm-up)."""
        if self.warmup and count is not None:
            return warmup_decay(d ** self.every, count)
        return d ** self.every

    @torch.no_grad()
    def update(self, model: nn.Module, count: int | None = None) -> None:
        """The ``count``-th update (1-based) of every average, with :meth:`decay` (None: the
        decay after the warm-up, d**every)."""
        state = model.state_dict()
        current = [state[k] for k in self._avg_names]
        for d in self.decays:
            shadow = self.shadows[self.key(d)]
            if current and self.every == 1:
                weight = (1.0 - d if not self.warmup or count is None
                          else 1.0 - self.decay(d, count))
                torch._foreach_lerp_([shadow[k] for k in self._avg_names], current, weight)
            elif current:
                # One tensor at a time: float64 copies of a whole large model would not fit.
                weight = 1.0 - self.decay(d, count)       # a Python float: float64
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
