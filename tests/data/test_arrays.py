"""Real-valued sample arrays of any shape (latents) from .npz files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meanflow.data.arrays import ArraySamples, npz_sample_kind
from meanflow.errors import ConfigError, DataError


def test_reads_latents_and_labels_and_draws_exact_rows(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 4, 8, 8)).astype(np.float32)
    y = rng.integers(0, 5, 20)
    np.savez(tmp_path / "lat.npz", x=x, y=y)
    ds = ArraySamples.from_npz(tmp_path / "lat.npz", scale=0.5)
    assert ds.shape == (4, 8, 8) and len(ds) == 20 and ds.num_classes == int(y.max()) + 1
    xb, yb = ds.batch(64, torch.Generator().manual_seed(1))
    assert xb.shape == (64, 4, 8, 8) and yb.shape == (64,)
    # every drawn sample is a stored row times the scale, with its own label
    for i in range(64):
        rows = [j for j in range(20) if torch.equal(xb[i], torch.from_numpy(x[j]) * 0.5)]
        assert rows and int(yb[i]) in {int(y[j]) for j in rows}
    again = ds.batch(64, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], xb) and torch.equal(again[1], yb)


def test_sample_kind_sorts_images_arrays_and_points(tmp_path):
    np.savez(tmp_path / "img.npz", x=np.zeros((3, 8, 8), np.uint8))
    np.savez(tmp_path / "lat.npz", x=np.zeros((3, 4, 8, 8), np.float32))
    np.savez(tmp_path / "pts.npz", x=np.zeros((3, 2), np.float32))
    assert npz_sample_kind(tmp_path / "img.npz") == "images"
    assert npz_sample_kind(tmp_path / "lat.npz") == "arrays"
    assert npz_sample_kind(tmp_path / "pts.npz") == "points"


def test_bad_files_and_values_are_refused(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ArraySamples.from_npz(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"\x80\x04junk")
    with pytest.raises(DataError, match="pickle"):
        ArraySamples.from_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "nan.npz", x=np.full((3, 2, 2), np.nan, np.float32))
    with pytest.raises(DataError, match="NaN"):
        ArraySamples.from_npz(tmp_path / "nan.npz")
    np.savez(tmp_path / "other.npz", z=np.zeros((3, 2, 2), np.float32))
    with pytest.raises(DataError, match="no array 'x'"):
        ArraySamples.from_npz(tmp_path / "other.npz")
    with pytest.raises(ConfigError, match="scale"):
        ArraySamples(torch.zeros(3, 2, 2), scale=0)


def test_one_image_few_images_and_uint8_of_five_dimensions_are_refused(tmp_path):
    """A single picture (H, W, C), one image alone, and a uint8 5-D array (which would be read
    as numbers 0..255) are refused in one line, not taken as datasets."""
    cases = {"one.npz": (np.zeros((28, 28, 3), np.uint8), r"one image \(H, W, C\), not a "
                         "dataset"),
             "single.npz": (np.zeros((1, 8, 8), np.uint8), "a dataset needs at least 2"),
             "five.npz": (np.zeros((4, 2, 3, 8, 8), np.uint8), r"uint8 of shape "
                          r"\(4, 2, 3, 8, 8\): neither images")}
    for name, (x, message) in cases.items():
        np.savez(tmp_path / name, x=x)
        with pytest.raises(DataError, match=message):
            npz_sample_kind(tmp_path / name)
    np.savez(tmp_path / "grey.npz", x=np.zeros((5, 8, 8), np.uint8))   # (N, H, W): images
    assert npz_sample_kind(tmp_path / "grey.npz") == "images"


def test_float64_and_integer_samples_are_read_with_one_warning(tmp_path, capsys):
    np.savez(tmp_path / "f64.npz", x=np.ones((3, 2, 4, 4)))
    np.savez(tmp_path / "i32.npz", x=np.ones((3, 2, 4, 4), np.int32))
    for name, kind in (("f64.npz", "float64 numbers"), ("i32.npz", "int32 integers")):
        for _ in range(2):                                     # said once per file
            assert ArraySamples.from_npz(tmp_path / name).data.dtype == torch.float32
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("warning: ") and kind in err
    np.savez(tmp_path / "f32.npz", x=np.ones((3, 2, 4, 4), np.float32))
    ArraySamples.from_npz(tmp_path / "f32.npz")
    assert capsys.readouterr().err == ""
