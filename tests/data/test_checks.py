"""The shared checks of meanflow.data.checks, and that the sources take them from there only."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import meanflow.data as data_pkg
from meanflow.data import ArraySamples, EDMAugment, ImageArray, PointCloud
from meanflow.data.checks import (check_batch_args, check_generator, check_labels,
                                  check_numpy_file, check_real_array, check_scale,
                                  MAX_CLASSES, check_take_args, numpy_load_error, one_line)
from meanflow.errors import ConfigError, DataError
from meanflow.pixels import from_uint8

DATA_DIR = Path(data_pkg.__file__).parent


def test_no_data_module_imports_a_private_name_of_another():
    offenders = []
    for file in sorted(DATA_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("meanflow"):
                offenders += [f"{file.name}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def test_batch_and_take_arguments():
    g = torch.Generator().manual_seed(0)
    check_batch_args(4, g)
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ConfigError, match="batch_size must be a positive int"):
            check_batch_args(bad, g)
    index = check_take_args(torch.tensor([2, 0, 2], dtype=torch.int32), 3, g)
    assert index.dtype == torch.int64 and index.tolist() == [2, 0, 2]
    for bad in (torch.tensor([3]), torch.tensor([-1]), torch.tensor([0.0]),
                torch.tensor([True]), torch.zeros(0, dtype=torch.int64), [0]):
        with pytest.raises(ConfigError, match="indices"):
            check_take_args(bad, 3, g)


def test_generator_cpu_only_unless_asked():
    with pytest.raises(ConfigError, match="generator must be a torch.Generator"):
        check_generator(None)
    with pytest.raises(ConfigError, match="generator must be a torch.Generator"):
        EDMAugment()(torch.zeros(1, 1, 4, 4), 0)
    if torch.cuda.is_available():
        cuda = torch.Generator("cuda")
        with pytest.raises(ConfigError, match="CPU generator"):
            check_generator(cuda)
        check_generator(cuda, cpu_only=False)


def test_scale():
    assert check_scale(2) == 2.0 and isinstance(check_scale(2), float)
    for bad in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ConfigError, match="scale="):
            check_scale(bad)


def test_labels_one_rule_for_every_source():
    assert check_labels(torch.tensor([1.0, 0.0, 2.0]), 3).tolist() == [1, 0, 2]
    with pytest.raises(DataError, match="2 labels for 3 images; give exactly one label per image"):
        check_labels(torch.tensor([0, 1]), 3, "image")
    for bad, message in ((torch.tensor([0.5, 1.0]), "whole numbers"),
                         (torch.tensor([-1, 0]), "negative"),
                         (torch.tensor([True, False]), "dtype"),
                         (torch.zeros(2, 1, dtype=torch.int64), "1-D"),
                         ([0, 1], "torch.Tensor")):
        with pytest.raises(DataError, match=message):
            check_labels(bad, 2)
    # the same labels give the same int64 tensor in every labelled source
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    images = ImageArray(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), y)
    points = PointCloud(torch.zeros(4, 2), y)
    arrays = ArraySamples(torch.zeros(4, 2, 2), y)
    for source in (images, points, arrays):
        assert source.labels.dtype == torch.int64 and source.labels.tolist() == [1, 0, 1, 0]
        assert source.num_classes == 2


def test_numpy_file_checks(tmp_path):
    check_real_array(np.zeros(2, np.uint8), "a")
    with pytest.raises(DataError, match="thing has dtype"):
        check_real_array(np.array(["a"]), "thing")
    np.save(tmp_path / "a.npy", np.zeros(2))
    np.savez(tmp_path / "a.npz", x=np.zeros(2))
    check_numpy_file(tmp_path / "a.npy", zipped=False, what="points", hint="h")
    check_numpy_file(tmp_path / "a.npz", zipped=True, what="points", hint="h")
    with pytest.raises(DataError, match="not a numpy .npz file; save the samples with np.savez"):
        check_numpy_file(tmp_path / "a.npy", zipped=True, what="samples", hint="h")
    (tmp_path / "p.npy").write_bytes(b"\x80\x04junk")
    with pytest.raises(DataError, match="pickle, which is never loaded"):
        check_numpy_file(tmp_path / "p.npy", zipped=False, what="points", hint="h")
    with pytest.raises(DataError, match="cannot read .*missing.npy: .*; give a file"):
        check_numpy_file(tmp_path / "missing.npy", zipped=False, what="points",
                         hint="give a file")
    err = numpy_load_error(tmp_path / "a.npz", ValueError("Object arrays cannot be loaded "
                                                          "when allow_pickle=False"), "h")
    assert isinstance(err, DataError) and "pickled Python objects" in str(err)
    err = numpy_load_error(tmp_path / "a.npz", OSError("bad\nheader"), "give a .npz file")
    assert str(err).endswith("bad header; give a .npz file saved by numpy")


def test_one_line():
    assert one_line(ValueError("a\n  b\tc")) == "a b c"
    assert one_line(KeyError()) == "KeyError"


def test_images_are_mapped_by_pixels_from_uint8():
    u8 = torch.arange(256, dtype=torch.uint8).view(4, 1, 8, 8)
    data = ImageArray(u8)
    x, _ = data.take(torch.arange(4), torch.Generator().manual_seed(0))
    assert torch.equal(x, from_uint8(u8))
    assert torch.equal(x, u8.float() / 127.5 - 1)


def test_a_label_beyond_the_class_limit_is_refused():
    """A label of 10^12 would make a 10^12-row class embedding: refused, naming the fix."""
    labels = torch.zeros(4, dtype=torch.int64)
    labels[1] = 10 ** 12
    with pytest.raises(DataError, match=r"label 1000000000000 would make 1,000,000,000,001 "
                       r"classes \(at most 1,000,000\); number the classes 0, 1, \.\.\."):
        check_labels(labels, 4)
    labels[1] = MAX_CLASSES - 1
    assert int(check_labels(labels, 4).max()) == MAX_CLASSES - 1
