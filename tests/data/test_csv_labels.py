"""A .csv column named like labels (label, class, target) is read as the labels without
data.options.labels, never trained as a coordinate; labels=none keeps it as a coordinate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from meanflow.data import build_dataset
from meanflow.data.points import PointCloud
from meanflow.errors import ConfigError


def _write(path: Path, header: str, rows: list[list[float]]) -> Path:
    path.write_text(header + "\n" + "".join(",".join(f"{v:g}" for v in r) + "\n" for r in rows))
    return path


ROWS = [[0.5, 1.0, 2], [-1.0, 0.25, 0], [3.0, -2.0, 1], [0.0, 0.0, 2]]


@pytest.mark.parametrize("name", ["label", "Class", "TARGET", "labels"])
def test_a_label_named_column_is_the_labels(tmp_path, name):
    path = _write(tmp_path / "p.csv", f"x0,x1,{name}", ROWS)
    cloud = build_dataset(str(path))
    assert cloud.shape == (2,) and cloud.num_classes == 3
    np.testing.assert_array_equal(cloud.data.numpy(), np.array(ROWS)[:, :2])
    np.testing.assert_array_equal(cloud.labels.numpy(), [2, 0, 1, 2])


def test_labels_none_keeps_every_column_and_y_stays_a_coordinate(tmp_path):
    path = _write(tmp_path / "p.csv", "x0,x1,label", ROWS)
    cloud = PointCloud.from_file(path, labels="none")
    assert cloud.shape == (3,) and cloud.labels is None
    xy = _write(tmp_path / "xy.csv", "x,y", [r[:2] for r in ROWS])
    assert PointCloud.from_file(xy).shape == (2,)      # "x,y": 2-D points, no labels


def test_two_label_like_columns_are_refused_naming_the_option(tmp_path):
    path = _write(tmp_path / "p.csv", "x0,label,class", ROWS)
    with pytest.raises(ConfigError, match=r"several label-like columns \(label, class\).*"
                       r"data\.options\.labels=COLUMN") as info:
        PointCloud.from_file(path)
    assert "\n" not in str(info.value)
    assert PointCloud.from_file(path, labels="class").num_classes == 3
