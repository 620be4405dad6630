"""A small in-repo Fashion-MNIST classifier used as a fast feature extractor for FID / KID.

Inception-v3 features (docs/method.md §12) are slow on a CPU and were never trained on 28x28 grey images.
For Fashion-MNIST (and MNIST-like data) this module provides a ~130K-parameter CNN that the
repository trains reproducibly in a few CPU minutes; its 128-d penultimate activations
(:meth:`FMNISTClassifier.features`) replace Inception pool3 features in
:class:`~meanflow.metrics.FeatureStats`, :func:`~meanflow.metrics.frechet_distance` and
:func:`~meanflow.metrics.kid`. Numbers computed with it are *not* comparable to published
Inception FIDs; they are meant for tracking training runs and for tests.

The trained weights ship in ``meanflow/metrics/weights/fmnist_classifier.safetensors`` with a
JSON record (accuracy, seed, epochs, sha256, torch version). Retrain them with::

    python -m meanflow.metrics.classifier --out src/meanflow/metrics/weights/fmnist_classifier.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from meanflow.data import ImageArray
from meanflow.errors import ConfigError, DataError
from meanflow.fileio import atomic_path, file_sha256

__all__ = [
    "DEFAULT_WEIGHTS",
    "FMNISTClassifier",
    "classifier_accuracy",
    "fmnist_features",
    "fmnist_predict",
    "load_classifier",
    "read_record",
    "train_classifier",
]

#: The committed weights (the JSON record lies next to it with suffix ``.json``).
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "fmnist_classifier.safetensors"
#: Tag stored in the weights' JSON record.
_FORMAT = "meanflow-fmnist-classifier/1"
_RETRAIN = "python -m meanflow.metrics.classifier --out {path}"


class FMNISTClassifier(nn.Module):
    """CNN for ``(N, 1, 28, 28)`` images in ``[-1, 1]``; ``features`` gives 128-d vectors.

    conv 3x3 1→32 → conv 3x3/2 32→64 → conv 3x3 64→64 → conv 3x3/2 64→128 (each followed by
    GroupNorm(8) and SiLU) → global average pool (the 128-d feature) → linear 128→10.
    """

    feature_dim = 128
    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        chans = [(1, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2)]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, stride=s, padding=1) for i, o, s in chans)
        self.norms = nn.ModuleList(nn.GroupNorm(8, o) for _, o, _ in chans)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``(N, 128)`` of images ``x`` ``(N, 1, 28, 28)`` in [-1, 1]."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ConfigError(f"FMNISTClassifier needs (N, 1, H, W) images, got shape "
                              f"{tuple(x.shape)}; add the channel dimension")
        for conv, norm in zip(self.convs, self.norms):
            x = F.silu(norm(conv(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, 10)``."""
        return self.head(self.features(x))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _record_path(path: Path) -> Path:
    return path.with_suffix(".json")


def read_record(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The JSON record (accuracy, seed, epochs, sha256, ...) stored next to the weights."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    rec = _record_path(path)
    fix = "retrain with `" + _RETRAIN.format(path=path) + "`"
    try:
        record = json.loads(rec.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise ValueError
    except (OSError, ValueError):
        raise DataError(f"classifier record {rec} is missing or unreadable; {fix}") from None
    return record


def load_classifier(path: str | os.PathLike | None = None,
                    device: torch.device | str = "cpu") -> FMNISTClassifier:
    """Load trained weights (default: the committed ones) after checking their sha256.

    Raises:
        DataError: if the weights or their JSON record are missing, the checksum does not
            match, or the file is not a valid classifier state; the message says how to retrain.
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    fix = "retrain with `" + _RETRAIN.format(path=path) + "`"
    if not path.is_file():
        raise DataError(f"classifier weights {path} not found; {fix}")
    record = read_record(path)
    if file_sha256(path) != record["sha256"]:
        raise DataError(f"classifier weights {path} do not match the sha256 in "
                        f"{_record_path(path).name} (corrupt or replaced); {fix}")
    net = FMNISTClassifier()
    try:
        state = load_file(str(path))
        net.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors raises its own error types, torch RuntimeError
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"classifier weights {path} are unreadable ({msg}); {fix}") from None
    return net.to(device).eval()


_CACHE: dict[tuple[str, str], FMNISTClassifier] = {}


def _default_model(device: torch.device | str = "cpu") -> FMNISTClassifier:
    key = (str(DEFAULT_WEIGHTS), str(device))
    if key not in _CACHE:
        _CACHE[key] = load_classifier(device=device)
    return _CACHE[key]


def _check_images(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor):
        raise ConfigError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ConfigError(f"images must have shape (N, 1, 28, 28), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        raise ConfigError("images are uint8; map them to [-1, 1] with x / 127.5 - 1 first")
    return images


@torch.no_grad()
def _batched(images: Tensor, fn: Any, batch_size: int, model: FMNISTClassifier | None,
             device: torch.device | str) -> list[Tensor]:
    """``fn(net, x)`` on CPU, batch by batch, for images clamped to [-1, 1]."""
    images = _check_images(images)
    net = model if model is not None else _default_model(device)
    dev = next(net.parameters()).device
    return [fn(net, images[start:start + batch_size].to(dev, torch.float32).clamp(-1.0, 1.0))
            .cpu() for start in range(0, images.shape[0], batch_size)]


def fmnist_features(images: Tensor, batch_size: int = 1000,
                    model: FMNISTClassifier | None = None,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """128-d classifier features ``(N, 128)`` float64 of images ``(N, 1, 28, 28)`` in [-1, 1].

    ``model`` defaults to the committed weights (loaded once per process). Images are clamped
    to [-1, 1] first, as a sampler's output would be when saved as an image.
    """
    out = _batched(images, lambda net, x: net.features(x).double(), batch_size, model, device)
    if not out:
        return np.zeros((0, FMNISTClassifier.feature_dim))
    return torch.cat(out).numpy()


def fmnist_predict(images: Tensor, batch_size: int = 1000,
                   model: FMNISTClassifier | None = None,
                   device: torch.device | str = "cpu") -> Tensor:
    """Predicted class ``(N,)`` int64 of images ``(N, 1, 28, 28)`` in [-1, 1]."""
    out = _batched(images, lambda net, x: net(x).argmax(1), batch_size, model, device)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def classifier_accuracy(model: FMNISTClassifier, images_u8: Tensor, labels: Tensor,
                        batch_size: int = 1000) -> float:
    """Top-1 accuracy on ``uint8`` images ``(N, 1, 28, 28)`` with ``labels`` ``(N,)``."""
    was_training = model.training
    model.eval()
    pred = fmnist_predict(images_u8.to(torch.float32) / 127.5 - 1.0, batch_size, model=model)
    model.train(was_training)
    return float((pred == labels.to(torch.int64)).to(torch.float64).mean())


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random left-right flip and a random shift of up to 2 pixels (zero = -1 padding)."""
    b = x.shape[0]
    flip = torch.randint(0, 2, (b,), generator=gen).bool()
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()  # one shift per batch: cheap
    return pad[:, :, dy:dy + 28, dx:dx + 28]


def _save_atomic(state: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def train_classifier(out_path: str | os.PathLike, seed: int = 0, epochs: int = 3,
                     batch_size: int = 128, lr: float = 3e-3, weight_decay: float = 1e-4,
                     augment: bool = False, train_data: Any = None, test_data: Any = None,
                     max_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train :class:`FMNISTClassifier` deterministically on the CPU and save it.

    Writes ``out_path`` (safetensors) and ``out_path.with_suffix('.json')`` (the record:
    accuracy, seed, epochs, steps, sha256, torch version, ...), and returns the record.

    ``train_data`` / ``test_data`` are :class:`~meanflow.data.ImageArray` objects with labels
    (default: the Fashion-MNIST train / test splits). ``max_steps`` stops early (for tests).
    AdamW with a one-cycle (warm-up then cosine) learning rate. With the same seed, data and
    thread count the saved weights are bit-identical.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    out_path = Path(out_path)
    train = train_data if train_data is not None else ImageArray.fashion_mnist(split="train")
    test = test_data if test_data is not None else ImageArray.fashion_mnist(split="test")
    if train.labels is None or test.labels is None:
        raise DataError("the classifier needs labelled train and test images")

    det_before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        net = FMNISTClassifier()
        gen = torch.Generator().manual_seed(seed)
        n = len(train)
        per_epoch = (n + batch_size - 1) // batch_size
        total = epochs * per_epoch if max_steps is None else min(max_steps, epochs * per_epoch)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1),
                                                    pct_start=0.15)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc="classifier", file=sys.stderr)
        t0 = time.perf_counter()
        net.train()
        step = 0
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, batch_size):
                if step >= total:
                    break
                idx = perm[start:start + batch_size]
                x = train.images[idx].to(torch.float32) / 127.5 - 1.0
                if augment:
                    x = _augment(x, gen)
                loss = F.cross_entropy(net(x), train.labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if bar is not None:
                    bar.update(1)
                    if step % 50 == 0:
                        bar.set_postfix(loss=f"{loss.item():.3f}")
        if bar is not None:
            bar.close()
        train_s = time.perf_counter() - t0
        net.eval()
        acc = classifier_accuracy(net, test.images, test.labels)
    finally:
        torch.use_deterministic_algorithms(det_before)

    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    # one metadata key only: safetensors writes a multi-key metadata map in hash order
    _save_atomic(state, out_path, {"format": _FORMAT})
    record = {
        "format": _FORMAT,
        "test_accuracy": round(acc, 6),
        "test_images": len(test),
        "train_images": n,
        "seed": seed,
        "epochs": epochs,
        "steps": step,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "augment": augment,
        "parameters": sum(p.numel() for p in net.parameters()),
        "train_seconds": round(train_s, 1),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "sha256": file_sha256(out_path),
        "command": _RETRAIN.format(path=out_path) + f" --seed {seed} --epochs {epochs}"
                   + (" --augment" if augment else ""),
    }
    _record_path(out_path).write_text(json.dumps(record, indent=2) + "\n")
    if progress:
        print(f"test accuracy {acc:.4f} after {step} steps ({train_s:.0f} s); "
              f"wrote {out_path}", file=sys.stderr)
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meanflow.metrics.classifier",
                                description="Train the in-repo Fashion-MNIST feature classifier.")
    p.add_argument("--out", default=str(DEFAULT_WEIGHTS),
                   help="weights file (.safetensors); the record is written next to it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--augment", action="store_true",
                   help="random flips and 2-pixel shifts (off: 3 epochs underfit with them)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        record = train_classifier(args.out, seed=args.seed, epochs=args.epochs,
                                  batch_size=args.batch_size, lr=args.lr,
                                  augment=args.augment)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
