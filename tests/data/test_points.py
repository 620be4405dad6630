"""PointCloud: reading .npy/.npz/.csv files, validation, and drawing batches."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from meanflow.data import BatchSource, PointCloud, build_dataset
from meanflow.errors import ConfigError, DataError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def points() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(50, 3))


@pytest.fixture
def labels() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 4, size=50)


def assert_points(cloud: PointCloud, x: np.ndarray, y: np.ndarray | None) -> None:
    assert isinstance(cloud, BatchSource)
    assert cloud.shape == (x.shape[1],) and len(cloud) == x.shape[0]
    assert cloud.data.dtype == torch.float32
    np.testing.assert_allclose(cloud.data.numpy(), x.astype(np.float32), rtol=1e-6, atol=1e-6)
    if y is None:
        assert cloud.labels is None and cloud.num_classes is None
    else:
        assert cloud.labels is not None and cloud.labels.dtype == torch.int64
        np.testing.assert_array_equal(cloud.labels.numpy(), y)
        assert cloud.num_classes == int(y.max()) + 1


def test_npy_round_trip(tmp_path: Path, points: np.ndarray) -> None:
    path = tmp_path / "p.npy"
    np.save(path, points)
    assert_points(PointCloud.from_file(path), points, None)
    assert_points(build_dataset(str(path)), points, None)
    with pytest.raises(ConfigError, match=r"\.npy file.*\.npz file"):
        build_dataset(str(path), labels="last")


def test_npz_round_trip(tmp_path: Path, points: np.ndarray, labels: np.ndarray) -> None:
    np.savez(tmp_path / "xy.npz", x=points, y=labels)
    assert_points(PointCloud.from_file(tmp_path / "xy.npz"), points, labels)
    np.savez(tmp_path / "only.npz", pts=points)  # the only array is the points
    assert_points(PointCloud.from_file(tmp_path / "only.npz"), points, None)
    np.savez(tmp_path / "named.npz", x=points, cls=labels)
    assert_points(PointCloud.from_file(tmp_path / "named.npz", labels="cls"), points, labels)
    assert_points(build_dataset(str(tmp_path / "named.npz"), labels="cls"), points, labels)


def write_csv(path: Path, table: np.ndarray, header: str | None, fmt: str = "%.9g") -> None:
    np.savetxt(path, table, delimiter=",", fmt=fmt, header=header or "", comments="")


def test_csv_round_trips(tmp_path: Path, points: np.ndarray, labels: np.ndarray) -> None:
    path = tmp_path / "plain.csv"
    write_csv(path, points, None)
    assert_points(PointCloud.from_file(path), points, None)
    write_csv(path, points, "a,b,c")
    assert_points(PointCloud.from_file(path), points, None)
    table = np.column_stack([points[:, :1], labels, points[:, 1:]])
    write_csv(path, table, "a, label ,c,d")
    assert_points(PointCloud.from_file(path, labels="label"), points, labels)
    write_csv(path, np.column_stack([points, labels]), None)
    assert_points(PointCloud.from_file(path, labels="last"), points, labels)
    assert_points(PointCloud.from_file(path), np.column_stack([points, labels]), None)


def test_csv_with_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("# my points\n\nx,y,k\n0.5,1,0\n# skipped\n-2,3e-1,2\n")
    cloud = PointCloud.from_file(path, labels="k")
    assert_points(cloud, np.array([[0.5, 1.0], [-2.0, 0.3]]), np.array([0, 2]))


def test_batch_draws_rows_with_replacement_reproducibly(points: np.ndarray,
                                                        labels: np.ndarray) -> None:
    cloud = PointCloud(torch.from_numpy(points), torch.from_numpy(labels))
    x1, y1 = cloud.batch(4000, gen(0))
    x2, y2 = cloud.batch(4000, gen(0))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = cloud.batch(4000, gen(1))
    assert not torch.equal(x1, x3)
    # every drawn (x, y) is a row of the data with its own label
    index = torch.cdist(x1, cloud.data).argmin(1)
    assert torch.equal(cloud.data[index], x1) and torch.equal(cloud.labels[index], y1)
    counts = torch.bincount(index, minlength=50).float()
    assert counts.min() > 40 and counts.max() < 125  # uniform: 80 expected per row
    unlabelled = PointCloud(torch.from_numpy(points))
    x, y = unlabelled.batch(3, gen(0))
    assert x.shape == (3, 3) and y is None


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.npy"
    with pytest.raises(DataError, match="not found: .*nowhere.npy; give the path"):
        PointCloud.from_file(path)
    with pytest.raises(DataError, match="nowhere.npy"):
        build_dataset(str(path))


@pytest.mark.parametrize(
    ("array", "problem"),
    [
        (np.zeros(10), "2-D"),
        (np.zeros((2, 3, 4)), "2-D"),
        (np.zeros((1, 3)), "at least 2"),
        (np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]), "NaN or infinite"),
        (np.array([[0.0, 1.0], [np.inf, 2.0]]), "NaN or infinite"),
        (np.array([[0.0, 1e300], [1.0, 2.0]]), "float32"),
        (np.array([["a", "b"], ["c", "d"]]), "not real numbers"),
        (np.zeros((3, 2), dtype=complex), "not real numbers"),
    ],
)
def test_bad_npy_arrays(tmp_path: Path, array: np.ndarray, problem: str) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(DataError, match=problem) as info:
        PointCloud.from_file(path)
    assert "bad.npy" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("y", "problem"),
    [
        (np.array([0, 1, -1, 2]), "negative"),
        (np.array([0.0, 1.5, 1.0, 2.0]), "whole numbers"),
        (np.array([0, 1, 2]), "3 labels for 4 points"),
        (np.array([[0, 1, 1, 0]]), "1-D"),
        (np.array([0.0, np.nan, 1.0, 2.0]), "whole numbers"),
    ],
)
def test_bad_npz_labels(tmp_path: Path, y: np.ndarray, problem: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((4, 2)), y=y)
    with pytest.raises(DataError, match=problem) as info:
        PointCloud.from_file(path)
    assert "bad.npz" in str(info.value)


def test_npz_without_points_key(tmp_path: Path) -> None:
    path = tmp_path / "two.npz"
    np.savez(path, a=np.zeros((3, 2)), b=np.zeros((3, 2)))
    with pytest.raises(DataError, match="no array 'x'.*a, b"):
        PointCloud.from_file(path)
    np.savez(path, x=np.zeros((3, 2)), b=np.zeros(3))
    with pytest.raises(ConfigError, match="not a key.*keys: x, b"):
        PointCloud.from_file(path, labels="y")


def test_pickled_npy_is_refused_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "objects.npy"
    np.save(path, np.array([[1.0, {"evil": True}], [2.0, 3.0]], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="pickled"):
        PointCloud.from_file(path)
    raw = tmp_path / "raw.npy"  # a bare pickle stream with a .npy name
    raw.write_bytes(pickle.dumps([[1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(DataError, match="pickle, which is never loaded"):
        PointCloud.from_file(raw)


def test_pickled_npz_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([[1.0, None], [2.0, 3.0]], dtype=object))
    with pytest.raises(DataError, match="pickled"):
        PointCloud.from_file(path)


def test_corrupt_and_empty_files(tmp_path: Path) -> None:
    for name in ("junk.npy", "junk.npz"):
        (tmp_path / name).write_bytes(b"definitely not numpy")
        with pytest.raises(DataError, match=f"{name} is not a numpy"):
            PointCloud.from_file(tmp_path / name)
    (tmp_path / "cut.npy").write_bytes(b"\x93NUMPY\x01\x00")  # truncated header
    with pytest.raises(DataError, match="cannot read .*cut.npy"):
        PointCloud.from_file(tmp_path / "cut.npy")
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="cannot read .*cut.npz"):
        PointCloud.from_file(tmp_path / "cut.npz")
    empty = tmp_path / "empty.csv"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        PointCloud.from_file(empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text("x,y\n")
    with pytest.raises(DataError, match="no rows"):
        PointCloud.from_file(header_only)


@pytest.mark.parametrize(
    ("text", "labels", "error", "problem"),
    [
        ("1,2\n3,oops\n", None, DataError, "not a numeric table"),
        ("1,2\n3,4,5\n", None, DataError, "not a numeric table"),
        ("a,b,c\n1,2\n3,4\n", None, DataError, "header has 3 names"),
        ("1,2\nnan,4\n", None, DataError, "NaN or infinite"),
        ("1,2\n", None, DataError, "at least 2"),
        ("1,0\n2,-1\n", "last", DataError, "negative"),
        ("1,0.5\n2,1\n", "last", DataError, "whole numbers"),
        ("1\n2\n", "last", DataError, "only the label column"),
        ("1,2\n3,4\n", "k", ConfigError, "no header row"),
        ("a,b\n1,2\n3,4\n", "k", ConfigError, "not a column.*columns: a, b"),
    ],
)
def test_bad_csv(tmp_path: Path, text: str, labels: str | None, error: type,
                 problem: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(error, match=problem) as info:
        PointCloud.from_file(path, labels=labels)
    assert "bad.csv" in str(info.value) and "\n" not in str(info.value)


def test_constructor_validation() -> None:
    with pytest.raises(DataError, match="2-D"):
        PointCloud(torch.zeros(5))
    with pytest.raises(DataError, match="2 labels for 3 points"):
        PointCloud(torch.zeros(3, 2), torch.tensor([0, 1]))
    cloud = PointCloud(torch.zeros(3, 2, dtype=torch.float64), torch.tensor([0.0, 4.0, 2.0]))
    assert cloud.num_classes == 5 and cloud.labels.dtype == torch.int64
    with pytest.raises(DataError, match="unknown file type"):
        PointCloud.from_file("points.txt")
