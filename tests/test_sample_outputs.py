"""`meanflow sample` outputs: --png of samples it cannot draw (3-D points) is refused before
any sampling with the fix in one line, and the record of a PNG-only call is named after the
PNG (p.png.json), so a later --out p.npz, whose record is p.json, does not collide with it."""

from __future__ import annotations

import json

import numpy as np
import pytest


from cli_helpers import cli  # noqa: E402

TINY = ["--steps", "2", "--batch-size", "16", "--set", "model.options={width: 16, depth: 1, "
        "emb_dim: 8}", "--set", "train.progress=false", "--set", "train.sample_count=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_outputs")
    np.savez(root / "p3.npz", x=np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32))
    assert cli("train", "--out", root / "r3", "--data", root / "p3.npz", *TINY) == 0
    assert cli("train", "--out", root / "r2", *TINY) == 0          # 2-D toy points
    return root


def test_png_of_3d_points_is_refused_before_sampling(runs, tmp_path, capsys):
    """Decided: refused before any sampling (inputs are checked before work), one line
    naming the fix, nothing written (the advisory lock file of the output stays by design)."""
    out, png = tmp_path / "s.npz", tmp_path / "s.png"
    capsys.readouterr()
    assert cli("sample", runs / "r3", "--n", 8, "--out", out, "--png", png) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shape (3,): drop --png (nothing was sampled)" in err
    assert cli("sample", runs / "r3", "--n", 8, "--png", tmp_path / "only.png") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "write --out only.npz (nothing was sampled)" in err
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    assert cli("sample", runs / "r3", "--n", 8, "--out", out) == 0     # the fix works
    with np.load(out) as f:
        assert f["samples"].shape == (8, 3)


def test_a_png_record_does_not_block_a_later_npz_of_the_same_name(runs, tmp_path):
    png, npz = tmp_path / "x.png", tmp_path / "x.npz"
    assert cli("sample", runs / "r2", "--n", 8, "--png", png) == 0
    assert png.is_file() and (tmp_path / "x.png.json").is_file()
    assert not (tmp_path / "x.json").exists()
    assert cli("sample", runs / "r2", "--n", 8, "--out", npz) == 0
    png_record = json.loads((tmp_path / "x.png.json").read_text())
    npz_record = json.loads((tmp_path / "x.json").read_text())
    assert png_record["n"] == npz_record["n"] == 8
