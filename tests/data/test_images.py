"""ImageArray: IDX / Fashion-MNIST / .npz reading, validation, and drawing batches."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from meanflow.data import BatchSource
from meanflow.data.images import ImageArray
from meanflow.errors import ConfigError, DataError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    head = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.fixture
def pixels() -> np.ndarray:
    # 5 images 3x4, asymmetric left-right, including 0 and 255.
    x = np.arange(5 * 3 * 4, dtype=np.int64).reshape(5, 3, 4) * 4 % 256
    x[0, 0, 0], x[0, 0, 3] = 0, 255
    return x.astype(np.uint8)


@pytest.fixture
def targets() -> np.ndarray:
    return np.array([3, 0, 9, 1, 3], dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_from_idx_round_trip(tmp_path, pixels, targets, suffix):
    imgs = write(tmp_path / f"img-idx3-ubyte{suffix}", idx_bytes(pixels, 0x803))
    labs = write(tmp_path / f"lab-idx1-ubyte{suffix}", idx_bytes(targets, 0x801))
    data = ImageArray.from_idx(imgs, labs)
    assert isinstance(data, BatchSource)
    assert data.shape == (1, 3, 4) and len(data) == 5 and data.num_classes == 10
    assert data.images.dtype == torch.uint8
    assert torch.equal(data.images[:, 0], torch.from_numpy(pixels))
    assert torch.equal(data.labels, torch.from_numpy(targets).long())
    x, y = data.batch(64, gen(0))
    assert x.dtype == torch.float32 and x.shape == (64, 1, 3, 4)
    assert y.dtype == torch.int64 and y.shape == (64,)
    # each drawn sample matches its label's source image through x / 127.5 - 1
    for xi, yi in zip(x, y):
        rows = np.flatnonzero(targets == int(yi))
        expect = [torch.from_numpy(pixels[r]).float() / 127.5 - 1 for r in rows]
        assert any(torch.equal(xi[0], e) for e in expect)
    full = data.images.float() / 127.5 - 1
    assert full[0, 0, 0, 0] == -1.0 and full[0, 0, 0, 3] == 1.0
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_from_idx_without_labels(tmp_path, pixels):
    data = ImageArray.from_idx(write(tmp_path / "i.gz", idx_bytes(pixels, 0x803)))
    x, y = data.batch(4, gen(1))
    assert y is None and data.num_classes is None and x.shape == (4, 1, 3, 4)


def test_batch_is_deterministic(tmp_path, pixels, targets):
    data = ImageArray.from_idx(write(tmp_path / "i", idx_bytes(pixels, 0x803)),
                               write(tmp_path / "l", idx_bytes(targets, 0x801)), hflip=True)
    x1, y1 = data.batch(32, gen(7))
    x2, y2 = data.batch(32, gen(7))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = data.batch(32, gen(8))
    assert not torch.equal(x1, x3)


def test_hflip_mirrors_some_samples(pixels):
    one = torch.from_numpy(pixels[:1]).unsqueeze(1)  # a single asymmetric image
    plain = ImageArray(one).batch(64, gen(3))[0]
    flipped = ImageArray(one, hflip=True).batch(64, gen(3))[0]
    original, mirror = plain[0], torch.flip(plain[0], dims=[-1])
    assert not torch.equal(original, mirror)
    is_orig = [torch.equal(s, original) for s in flipped]
    is_mirr = [torch.equal(s, mirror) for s in flipped]
    assert all(a or b for a, b in zip(is_orig, is_mirr))
    assert any(is_orig) and any(is_mirr)


def test_bad_magic(tmp_path, pixels, targets):
    labs = write(tmp_path / "lab.gz", idx_bytes(targets, 0x801))
    with pytest.raises(DataError, match="lab.gz"):
        ImageArray.from_idx(labs)  # labels file given as images
    imgs = write(tmp_path / "img.gz", idx_bytes(pixels, 0x803))
    with pytest.raises(DataError, match="img.gz"):
        ImageArray.from_idx(imgs, imgs)


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_truncated(tmp_path, pixels, suffix):
    path = tmp_path / f"short-idx3-ubyte{suffix}"
    full = idx_bytes(pixels, 0x803)
    write(path, full[:-5])
    with pytest.raises(DataError, match="short-idx3-ubyte"):
        ImageArray.from_idx(path)
    if suffix:  # a cut gzip stream
        path.write_bytes(gzip.compress(full)[:-12])
        with pytest.raises(DataError, match="short-idx3-ubyte"):
            ImageArray.from_idx(path)
    write(path, full[:6])
    with pytest.raises(DataError, match="truncated"):
        ImageArray.from_idx(path)


def test_label_count_mismatch(tmp_path, pixels, targets):
    imgs = write(tmp_path / "img", idx_bytes(pixels, 0x803))
    labs = write(tmp_path / "lab4", idx_bytes(targets[:4], 0x801))
    with pytest.raises(DataError, match="lab4"):
        ImageArray.from_idx(imgs, labs)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.gz"):
        ImageArray.from_idx(tmp_path / "nope.gz")


def test_fashion_mnist_missing_root(tmp_path):
    with pytest.raises(DataError, match="Fashion-MNIST not found") as info:
        ImageArray.fashion_mnist(root=tmp_path / "none")
    text = str(info.value)
    assert "\n" not in text and "meanflow data fashion-mnist" in text
    assert "data.options.root=DIR" in text and "train-images-idx3-ubyte.gz" in text
    with pytest.raises(ConfigError, match="split"):
        ImageArray.fashion_mnist(root=tmp_path, split="val")


def test_fashion_mnist_fake_root(tmp_path, pixels, targets):
    write(tmp_path / "t10k-images-idx3-ubyte.gz", idx_bytes(pixels, 0x803))
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(targets, 0x801))
    data = ImageArray.fashion_mnist(root=tmp_path, split="test")
    assert len(data) == 5 and data.shape == (1, 3, 4)
    # labels up to 9: the set's ten classes, named as its README names them
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(targets % 4, 0x801))
    assert ImageArray.fashion_mnist(root=tmp_path, split="test").class_names is None


def test_class_names_are_checked(pixels, targets):
    x = torch.from_numpy(pixels).unsqueeze(1)
    y = torch.from_numpy(targets).long()
    assert ImageArray(x, y, class_names=[str(k) for k in range(10)]).class_names[3] == "3"
    for bad in (["a"] * 9, ["a"] * 9 + [""], ["a"] * 9 + [3]):
        with pytest.raises(DataError, match="one name per class"):
            ImageArray(x, y, class_names=bad)
    with pytest.raises(DataError, match="one name per class"):
        ImageArray(x, None, class_names=["a"])


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    data = ImageArray.fashion_mnist(split="train")
    assert len(data) == 60000 and data.shape == (1, 28, 28) and data.num_classes == 10
    x, y = data.batch(16, gen(0))
    assert x.shape == (16, 1, 28, 28) and y.shape == (16,)


def test_npz_nhwc_and_nchw(tmp_path):
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, size=(6, 3, 5, 7), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "nhwc.npz", x=nchw.transpose(0, 2, 3, 1), y=labels)
    np.savez(tmp_path / "nchw.npz", x=nchw, y=labels)
    for name in ("nhwc.npz", "nchw.npz"):
        data = ImageArray.from_npz(tmp_path / name)
        assert data.shape == (3, 5, 7) and data.num_classes == 3
        assert torch.equal(data.images, torch.from_numpy(nchw))
        assert torch.equal(data.labels, torch.from_numpy(labels))
    np.savez(tmp_path / "gray.npz", images=nchw[:, 0])
    gray = ImageArray.from_npz(tmp_path / "gray.npz", key="images")
    assert gray.shape == (1, 5, 7) and gray.labels is None


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "float.npz", x=np.zeros((2, 4, 4), dtype=np.float32))
    with pytest.raises(DataError, match="uint8") as info:
        ImageArray.from_npz(tmp_path / "float.npz")
    assert "float.npz" in str(info.value)
    np.savez(tmp_path / "odd.npz", x=np.zeros((2, 5, 4, 6), dtype=np.uint8))
    with pytest.raises(DataError, match="odd.npz"):
        ImageArray.from_npz(tmp_path / "odd.npz")
    np.savez(tmp_path / "nokey.npz", z=np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(DataError, match="nokey.npz"):
        ImageArray.from_npz(tmp_path / "nokey.npz")
    np.savez(tmp_path / "badlab.npz", x=np.zeros((2, 4, 4), dtype=np.uint8), y=np.array([0]))
    with pytest.raises(DataError, match="badlab.npz"):
        ImageArray.from_npz(tmp_path / "badlab.npz")
    with pytest.raises(DataError, match="missing.npz"):
        ImageArray.from_npz(tmp_path / "missing.npz")


# --------------------------------------------------------------------------- CIFAR-10 pickles

def _write_cifar(folder, n=3, split_names=None):
    """A cifar-10-batches-py folder in the real format: dicts with bytes keys, (N, 3072)
    uint8 rows (R plane, then G, then B) and a list of labels."""
    import pickle
    folder.mkdir(parents=True, exist_ok=True)
    names = split_names or [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        data = ((np.arange(n * 3072).reshape(n, 3072) + 7 * k) % 256).astype(np.uint8)
        batch = {b"batch_label": name.encode(), b"labels": [(k + i) % 10 for i in range(n)],
                 b"data": data, b"filenames": [b"x.png"] * n}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    return folder


def test_cifar10_reads_the_real_format(tmp_path):
    """Pixels land channel-first exactly as stored; labels and both splits come through."""
    root = _write_cifar(tmp_path / "cifar-10-batches-py")
    train = ImageArray.cifar10(root)
    test = ImageArray.cifar10(root, split="test")
    assert len(train) == 15 and len(test) == 3 and train.shape == (3, 32, 32)
    first = ((np.arange(3072)) % 256).astype(np.uint8).reshape(3, 32, 32)
    assert np.array_equal(train.images[0].numpy(), first)
    assert train.labels[:3].tolist() == [0, 1, 2]
    assert train.class_names is None          # labels 0..7 only: not the set's ten classes
    full = ImageArray.cifar10(_write_cifar(tmp_path / "ten", n=10))
    assert full.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                "horse", "ship", "truck")


def test_cifar10_refuses_code_in_a_pickle(tmp_path):
    """A pickle whose payload calls a global (here os.system) is refused, never executed."""
    import pickle
    root = _write_cifar(tmp_path / "c")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    with open(root / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(DataError, match="data_batch_3"):
        ImageArray.cifar10(root)
    assert not marker.exists()


def test_cifar10_missing_and_malformed(tmp_path):
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        ImageArray.cifar10(tmp_path / "nowhere")
    root = _write_cifar(tmp_path / "c", split_names=["test_batch"])
    (root / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="test_batch"):
        ImageArray.cifar10(root, split="test")
