"""Sample-quality metrics: distances between a generated and a reference point set."""

from __future__ import annotations

from meanflow.metrics.classifier import (FMNISTClassifier, fmnist_features, fmnist_predict,
                                         load_classifier, train_classifier)
from meanflow.metrics.distances import energy_distance, sliced_wasserstein
from meanflow.metrics.frechet import FeatureStats, frechet_distance, kid, precision_recall
from meanflow.metrics.protocols import PROTOCOLS, Protocol, get_protocol, read_reference

__all__ = [
    "FMNISTClassifier",
    "FeatureStats",
    "PROTOCOLS",
    "Protocol",
    "get_protocol",
    "read_reference",
    "fmnist_features",
    "fmnist_predict",
    "load_classifier",
    "train_classifier",
    "energy_distance",
    "frechet_distance",
    "kid",
    "precision_recall",
    "sliced_wasserstein",
]
