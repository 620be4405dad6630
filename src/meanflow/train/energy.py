"""A quality number for point data while it trains: the energy distance between samples of
the first EMA and data the run does not train on, every ``train.energy_every`` steps, into
``metrics.jsonl`` and the progress bar (docs/design.md, One training step, Reports).

The loss alone cannot tell whether a point run is learning: with ``objective.p`` = 1 the
weighted loss stays near 1 by design, and the raw error ``mse`` of the average velocity may
rise while the samples improve (README, "What the logged numbers mean"). The energy distance
(:func:`meanflow.metrics.distances.energy_distance`, 0 for equal distributions) of one-step
samples from fixed seeds 0..N-1 is comparable from one evaluation to the next.

The reference is drawn once, at the first evaluation, with a generator of its own
(``REFERENCE_SEED`` + ``train.seed``): for the endless toy distributions these are fresh
points, held out from every training batch; for a point file they are a draw (with
replacement) from the file's points, which the run trains on too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from meanflow.metrics.distances import energy_distance
from meanflow.runs.config import RunConfig
from meanflow.sampling import generate, sampling_method
from meanflow.train.ema import EMA
from meanflow.world import World

__all__ = ["EnergyMonitor", "REFERENCE_SEED"]

#: Offset of the reference draw's seed from train.seed (training batches use the seeds of
#: train.schedule.step_seed, a hash of (seed, rank, step)).
REFERENCE_SEED = 2 ** 62 + 12345


class EnergyMonitor:
    """Energy distance of ``train.energy_n`` one-step samples of the first EMA (seeds 0..N-1,
    labels balanced over the classes) to ``train.energy_n`` data points drawn once."""

    def __init__(self, cfg: RunConfig, ds: Any, shape: tuple[int, ...],
                 num_classes: int | None) -> None:
        self.cfg, self.ds, self.shape, self.n = cfg, ds, shape, cfg.train.energy_n
        self.reference: torch.Tensor | None = None        # drawn at the first evaluation
        self.labels = None if num_classes is None else torch.arange(self.n) % num_classes

    def _reference(self) -> torch.Tensor:
        if self.reference is None:
            seed = (REFERENCE_SEED + self.cfg.train.seed) % 2 ** 63
            ref, _ = self.ds.batch(self.n, torch.Generator().manual_seed(seed))
            self.reference = ref.detach().float().reshape(self.n, -1).cpu()
        return self.reference

    def __call__(self, sampler_net: nn.Module, ema: EMA, step: int, device: torch.device,
                 world: World = World()) -> dict[str, Any] | None:
        """The record for metrics.jsonl (rank 0; None on the others). Every rank samples its
        share of the seeds (a collective)."""
        key = EMA.key(ema.decays[0])
        sampler_net.load_state_dict(ema.shadows[key])
        x, _ = generate(sampler_net, range(self.n), self.shape, labels=self.labels, steps=1,
                        method=sampling_method(self.cfg.objective.kind), batch_size=1000,
                        device=device, world=world)
        if not world.is_main:
            return None
        x = x.float().reshape(self.n, -1)
        value = energy_distance(x, self._reference()) if torch.isfinite(x).all() else None
        return {"step": step, "eval": "energy", "energy_nfe1": value, "energy_n": self.n,
                "energy_weights": key}
