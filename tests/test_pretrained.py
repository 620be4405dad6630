"""The model shipped in the package, ``fmnist-pretrained``: reachable by name from Python and
the command line with no training and no download, checked on load like any checkpoint, small,
packaged, and sampling the classes it is asked for."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest

import meanflow
from cli_helpers import cli
from meanflow.errors import CheckpointError
from meanflow.metrics.classifier import fmnist_predict
from meanflow.pretrained import PRETRAINED, pretrained_folder
from meanflow.runs.config import RunConfig
from meanflow.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
FOLDER = pretrained_folder("fmnist-pretrained")


def release() -> dict:
    return json.loads((FOLDER / "state.json").read_text())


def test_it_loads_by_name_with_its_record():
    m = meanflow.load("fmnist-pretrained")
    assert m.checkpoint == FOLDER and m.weights == "ema_0.995"
    assert m.shape == (1, 28, 28) and m.num_classes == 10
    assert m.class_names[0] == "T-shirt/top" and m.class_names[7] == "Sneaker"
    notes = release()["release"]
    assert notes["command"].startswith("meanflow train --preset fmnist-unet")
    assert {"fid_nfe1", "fid_nfe2", "class_accuracy_nfe1"} <= set(notes["scores"])


def test_it_samples_the_classes_asked_for():
    """100 one-step samples, 10 of each class: the in-repo classifier agrees with the asked
    class on most (the release records 10 000 of them, docs/results.md)."""
    samples = meanflow.load("fmnist-pretrained").sample(100, steps=1, seed=0)
    hit = (fmnist_predict(samples.samples) == samples.labels).double().mean().item()
    assert hit >= 0.8
    assert samples.classes[:3] == ["T-shirt/top", "Trouser", "Pullover"]


def test_the_cli_samples_it_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("sample", "fmnist-pretrained", "--n", 64, "--png", "grid.png") == 0
    assert Path("grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(Path("grid.png.json").read_text())
    assert record["checkpoint"] == str(FOLDER) and record["n"] == 64
    assert cli("sample", "fmnist-pretrained", "--n", 4, "--label", "Sneaker",
               "--out", "s.npz") == 0


def test_a_folder_of_that_name_is_loaded_instead(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig.from_dict({"model": {"options": {"width": 16, "depth": 1, "emb_dim": 8}},
                               "train": {"steps": 1, "batch_size": 8, "progress": False,
                                         "sample_count": 0}}).validate()
    train(cfg, Path("fmnist-pretrained"))
    assert meanflow.load("fmnist-pretrained").shape == (2,)


def test_a_changed_file_is_refused(tmp_path):
    """The shipped files carry their SHA-256 like any checkpoint: a copy with one flipped
    byte is refused."""
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(FOLDER, copy)
    weights = copy / "ema.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        meanflow.load(copy)


def test_it_is_small_and_packaged():
    files = sorted(p.name for p in FOLDER.iterdir())
    assert files == ["ema.safetensors", "state.json"]
    assert sum(p.stat().st_size for p in FOLDER.iterdir()) < 5 * 2 ** 20
    pyproject = (ROOT / "pyproject.toml").read_text()
    listed = re.search(r"\[tool\.setuptools\.package-data\][^\[]*?meanflow = \[([^\]]*)\]",
                       pyproject, re.S)[1]
    patterns = re.findall(r'"([^"]+)"', listed)
    package = ROOT / "src" / "meanflow"
    for path in FOLDER.iterdir():
        relative = str(path.relative_to(package))
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
    assert set(PRETRAINED) == {"fmnist-pretrained"}


def test_the_results_page_gives_the_shipped_scores():
    scores = release()["release"]["scores"]
    text = (ROOT / "docs" / "results.md").read_text()
    section = text[text.index("## The shipped model"):]
    for key in ("fid_nfe1", "fid_nfe2"):
        assert re.search(rf"\b{scores[key]:.3f}\b", section), key
    assert f"{scores['class_accuracy_nfe1']:.3f}" in section
