"""Smoke test of experiments/fmnist_guidance.py: the --quick path end to end, in-process."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "fmnist_guidance.py"
FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _load():
    spec = importlib.util.spec_from_file_location("fmnist_guidance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


@pytest.mark.skipif(not FMNIST.is_file(), reason="needs the Debian package "
                    "dataset-fashion-mnist (make setup installs it)")
def test_quick_run_writes_results_and_figure(tmp_path):
    exp = _load()
    out, fig = tmp_path / "res.json", tmp_path / "fig.png"
    record = exp.main(["--quick", "--runs", str(tmp_path / "runs"), "--out", str(out),
                       "--figure", str(fig)])
    saved = json.loads(out.read_text())
    assert saved == record and fig.stat().st_size > 1000
    assert [r["omega"] for r in saved["rows"]] == [1.0, 2.0]
    for row in saved["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and len(row["accuracy_per_class"]) == 10
        assert row["fid"] >= 0 and "kid" in row and row["step"] == 4
