"""Sample-quality metrics: distances between a generated and a reference point set."""

from __future__ import annotations

from meanflow.metrics.distances import energy_distance, sliced_wasserstein

__all__ = ["energy_distance", "sliced_wasserstein"]
