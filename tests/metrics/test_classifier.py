"""The in-repo Fashion-MNIST feature classifier: committed weights, accuracy, FID sensitivity,
error handling and bit-identical retraining."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from meanflow.data import ImageArray
from meanflow.errors import DataError
from meanflow.metrics import FeatureStats, frechet_distance, kid
from meanflow.metrics.classifier import (
    DEFAULT_WEIGHTS,
    FMNISTClassifier,
    classifier_accuracy,
    fmnist_features,
    fmnist_predict,
    load_classifier,
    read_record,
    train_classifier,
)

FMNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST_TEST.is_file(),
                                  reason="Fashion-MNIST (Debian dataset-fashion-mnist) not installed")


@pytest.fixture(scope="module")
def test_split() -> ImageArray:
    return ImageArray.fashion_mnist(split="test")


@pytest.fixture(scope="module")
def net() -> FMNISTClassifier:
    return load_classifier()


def _fid(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(FeatureStats.from_features(a), FeatureStats.from_features(b))


def _to_float(u8: torch.Tensor) -> torch.Tensor:
    return u8.to(torch.float32) / 127.5 - 1.0


def test_committed_weights_load_and_match_record(net):
    record = read_record()
    digest = hashlib.sha256(DEFAULT_WEIGHTS.read_bytes()).hexdigest()
    assert digest == record["sha256"]
    assert record["parameters"] == sum(p.numel() for p in net.parameters()) < 200_000
    assert DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    assert not net.training
    x = torch.zeros(3, 1, 28, 28)
    assert net.features(x).shape == (3, 128)
    assert net(x).shape == (3, 10)


@needs_fmnist
def test_accuracy_matches_record(net, test_split):
    acc = classifier_accuracy(net, test_split.images[:2000], test_split.labels[:2000])
    assert acc >= read_record()["test_accuracy"] - 0.01
    assert acc >= 0.85


@needs_fmnist
def test_fid_sees_quality(net, test_split):
    x = _to_float(test_split.images[:4000])
    a, b = x[:2000], x[2000:]
    fa = fmnist_features(a, model=net)
    assert fa.shape == (2000, 128) and fa.dtype == np.float64
    fb = fmnist_features(b)  # default model path, cached
    same = _fid(fa, fb)
    gen = torch.Generator().manual_seed(0)
    noisy = (a + 0.5 * torch.randn(a.shape, generator=gen)).clamp(-1, 1)
    blurred = F.avg_pool2d(a, 5, stride=1, padding=2, count_include_pad=False)
    fid_noise = _fid(fa, fmnist_features(noisy, model=net))
    fid_blur = _fid(fa, fmnist_features(blurred, model=net))
    assert same < 0.1 * fid_noise and same < 0.1 * fid_blur, (same, fid_noise, fid_blur)
    k_same, _ = kid(fa, fb, subsets=10, subset_size=1000)
    k_noise, _ = kid(fa, fmnist_features(noisy, model=net), subsets=10, subset_size=1000)
    assert k_same < 0.1 * k_noise
    # diversity: the real images cover all ten classes
    assert torch.bincount(fmnist_predict(a, model=net), minlength=10).min() > 100


def test_corrupt_or_missing_weights_give_data_error(tmp_path):
    path = tmp_path / "c.safetensors"
    shutil.copy(DEFAULT_WEIGHTS, path)
    shutil.copy(DEFAULT_WEIGHTS.with_suffix(".json"), path.with_suffix(".json"))
    load_classifier(path)  # intact copy loads
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256.*python -m meanflow.metrics.classifier --out"):
        load_classifier(path)
    path.write_bytes(b"not a safetensors file")
    record = path.with_suffix(".json").read_text()
    digest = hashlib.sha256(b"not a safetensors file").hexdigest()
    import json
    rec = json.loads(record)
    rec["sha256"] = digest
    path.with_suffix(".json").write_text(json.dumps(rec))
    with pytest.raises(DataError, match="unreadable"):
        load_classifier(path)
    path.with_suffix(".json").unlink()
    with pytest.raises(DataError, match="record"):
        load_classifier(path)
    with pytest.raises(DataError, match="not found.*--out"):
        load_classifier(tmp_path / "missing.safetensors")


def test_retraining_is_bit_identical(tmp_path):
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (96, 1, 28, 28), generator=gen, dtype=torch.uint8)
    data = ImageArray(images, torch.arange(96) % 10)
    kw = dict(epochs=1, batch_size=32, max_steps=2, train_data=data, test_data=data,
              progress=False)
    r1 = train_classifier(tmp_path / "a.safetensors", seed=3, **kw)
    r2 = train_classifier(tmp_path / "b.safetensors", seed=3, **kw)
    assert r1["steps"] == 2
    assert r1["sha256"] == r2["sha256"]
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    r3 = train_classifier(tmp_path / "c.safetensors", seed=4, **kw)
    assert r3["sha256"] != r1["sha256"]
    net = load_classifier(tmp_path / "a.safetensors")
    assert fmnist_features(_to_float(images[:5]), model=net).shape == (5, 128)
